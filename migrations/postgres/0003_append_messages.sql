-- Group commit in one round trip (src/store/sql.rs, PostgresStore::insert_messages_optimistic).
--
-- The server knows each channel's last sequence (from its previous batch there, or read just
-- before), encodes the new events with the sequences that follow, and calls this function
-- once, outside any explicit transaction. The function writes the batch only if those last
-- sequences still hold under the channels' row locks and every message would be accepted;
-- otherwise it writes nothing, and the server takes the general path.
--
-- Arguments (parallel arrays of one length per group):
--   $1-$13, one element per message: id, tenant_id, channel_id, sender_id, body, subject,
--     parent_message_id, client_message_id, forwarded_from_message_id, sequence, payload (the
--     encoded event), audit row id, audit row after_json;
--   $14, $15, $17, $18, one element per channel: id, the new last sequence, the tenant, the
--     last sequence expected now;
--   $16 (p_now): the create time of messages and audit rows (microseconds since the epoch).
-- Returns 0 when the batch was written; 1 when a channel is missing, deleted, of another
-- tenant or not at the expected last sequence (the server's knowledge is stale); 2 when a
-- sender is not a member or a client_message_id is stored already (the general path gives
-- those messages their own outcomes). Arrays of unequal length within a group are an error.
CREATE FUNCTION chat_append_messages(
    p_ids text[], p_tenants text[], p_channels text[], p_senders text[], p_bodies text[],
    p_subjects text[], p_parents text[], p_keys text[], p_forwarded text[],
    p_sequences bigint[], p_payloads bytea[], p_audit_ids text[], p_audit_json text[],
    p_channel_ids text[], p_channel_lasts bigint[], p_now bigint,
    p_channel_tenants text[], p_channel_expected bigint[]
) RETURNS integer LANGUAGE plpgsql
-- The tables are the ones of the schema this migration ran in, whoever calls.
SET search_path FROM CURRENT
AS $$
DECLARE
    last bigint;
BEGIN
    -- unnest pads short arrays with NULLs: a caller's mistake must not become rows.
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_tenants)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_channels)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_senders)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_bodies)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_subjects)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_parents)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_keys)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_forwarded)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_sequences)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_payloads)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_audit_ids)
       OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_audit_json)
       OR cardinality(p_channel_ids) IS DISTINCT FROM cardinality(p_channel_lasts)
       OR cardinality(p_channel_ids) IS DISTINCT FROM cardinality(p_channel_tenants)
       OR cardinality(p_channel_ids) IS DISTINCT FROM cardinality(p_channel_expected) THEN
        RAISE EXCEPTION 'chat_append_messages: arrays of one group differ in length';
    END IF;
    -- Row locks in the order of p_channel_ids (the server sorts them bytewise, as the general
    -- path's ORDER BY id COLLATE "C" does), so concurrent batches never wait in a cycle; each
    -- channel must be live, of its tenant, and at the last sequence the server expects.
    FOR j IN 1 .. cardinality(p_channel_ids) LOOP
        SELECT c.last_sequence INTO last FROM channels c
        WHERE c.id = p_channel_ids[j] AND c.tenant_id = p_channel_tenants[j]
          AND c.delete_time IS NULL
        FOR NO KEY UPDATE;
        IF NOT FOUND OR last IS DISTINCT FROM p_channel_expected[j] THEN
            RETURN 1;
        END IF;
    END LOOP;
    -- Statements after the locks, so on READ COMMITTED their snapshots see every membership
    -- change that committed while this call waited for them. One index lookup per message:
    -- a set-based check (a join or EXISTS over the whole batch) may be planned as a hash of
    -- the whole table while it is small, and that plan is kept as the table grows.
    FOR i IN 1 .. cardinality(p_ids) LOOP
        IF NOT EXISTS (SELECT 1 FROM members m
                       WHERE m.channel_id = p_channels[i] AND m.user_id = p_senders[i]) THEN
            RETURN 2;
        END IF;
        IF p_keys[i] IS NOT NULL AND EXISTS (
               SELECT 1 FROM messages x
               WHERE x.channel_id = p_channels[i] AND x.sender_id = p_senders[i]
                 AND x.client_message_id = p_keys[i]) THEN
            RETURN 2;
        END IF;
    END LOOP;
    FOR j IN 1 .. cardinality(p_channel_ids) LOOP
        UPDATE channels SET last_sequence = p_channel_lasts[j] WHERE id = p_channel_ids[j];
    END LOOP;
    INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, subject, parent_message_id,
                          attachment_ids, client_message_id, forwarded_from_message_id, sequence,
                          version, create_time)
    SELECT id, tenant_id, channel_id, sender_id, body, subject, parent_message_id, '[]', key,
           forwarded, sequence, 1, p_now
    FROM unnest(p_ids, p_tenants, p_channels, p_senders, p_bodies, p_subjects, p_parents,
                p_keys, p_forwarded, p_sequences)
         AS d (id, tenant_id, channel_id, sender_id, body, subject, parent_message_id, key,
               forwarded, sequence);
    INSERT INTO events (channel_id, sequence, payload)
    SELECT * FROM unnest(p_channels, p_sequences, p_payloads);
    INSERT INTO audit_logs (id, tenant_id, operation, table_name, entity_id, actor_id,
                            before_json, after_json, create_time)
    SELECT audit_id, tenant_id, 'create', 'messages', id, sender_id, NULL, after_json, p_now
    FROM unnest(p_audit_ids, p_tenants, p_ids, p_senders, p_audit_json)
         AS d (audit_id, tenant_id, id, sender_id, after_json);
    RETURN 0;
END
$$;

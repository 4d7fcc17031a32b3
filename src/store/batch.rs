//! The group commit's planning, shared by every database: which message of a batch is
//! refused, which repeats an earlier one, which sequence each new one takes, and the outcome
//! of every position. Each database reads what the plan needs (the channels' last sequences
//! under their locks, memberships, stored keys) and writes the plan's rows with its own SQL.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};

use uuid::Uuid;

use super::flows::to_json;
use super::*;

/// Most rows per multi-row INSERT of a group commit (13 binds each: far below SQLite's
/// 32,766, PostgreSQL's 65,535 and MySQL's 65,535 parameters per statement).
pub(super) const ROWS_PER_INSERT: usize = 256;

/// Splits `n` rows into multi-row INSERTs of at most [`ROWS_PER_INSERT`] rows each; with
/// `power_of_two`, of power-of-two sizes (37 → 32, 4, 1), largest first. A statement's text
/// depends on its row count, and prepared statements are cached per connection by text: with
/// sizes from this small set (1, 2, 4, … 256) every one is prepared once, not re-parsed for
/// each new batch size.
pub(super) fn insert_sizes(mut n: usize, power_of_two: bool) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= ROWS_PER_INSERT {
            ROWS_PER_INSERT
        } else if power_of_two {
            1 << (usize::BITS - 1 - n.leading_zeros())
        } else {
            n
        };
        n -= size;
        Some(size)
    })
}

/// Appends `rows` to `q`, each written by `bind` between `(` and `)` and separated by commas,
/// then copies of `pad` up to the next power of two. So a batch of any size uses one of a few
/// statement texts, each prepared once per connection; `pad` must match nothing.
pub(super) fn push_padded_rows<'a, DB: sqlx::Database, T: Copy>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    rows: &[T],
    pad: T,
    mut bind: impl FnMut(&mut sqlx::QueryBuilder<'a, DB>, T),
) {
    for i in 0..rows.len().next_power_of_two() {
        q.push(if i == 0 { "(" } else { ", (" });
        bind(q, rows.get(i).copied().unwrap_or(pad));
        q.push(")");
    }
}

/// The three tables a group commit writes, one multi-row INSERT each.
#[derive(Clone, Copy, Debug)]
pub(super) enum Insert {
    Messages,
    Events,
    Audits,
}

impl Insert {
    /// All three, in the order a batch writes them.
    pub const ALL: [Insert; 3] = [Insert::Messages, Insert::Events, Insert::Audits];
}

/// Appends the multi-row INSERT of `table` for the plan's rows in `range` to `q`. The SQL is
/// standard and the same for every database; the placeholders are the database's own.
pub(super) fn push_insert<'a, DB>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    plan: &'a BatchPlan<'_>,
    range: std::ops::Range<usize>,
    table: Insert,
) where
    DB: sqlx::Database,
    &'a String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let rows = &plan.rows[range.clone()];
    match table {
        Insert::Messages => {
            q.push(
                "INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, subject, \
                 parent_message_id, attachment_ids, client_message_id, \
                 forwarded_from_message_id, sequence, version, create_time) ",
            );
            q.push_values(rows, |mut v, (_, r)| {
                v.push_bind(&r.id)
                    .push_bind(&r.tenant_id)
                    .push_bind(&r.channel_id)
                    .push_bind(&r.sender_id)
                    .push_bind(&r.body)
                    .push_bind(&r.subject)
                    .push_bind(&r.parent_message_id)
                    .push_bind(&r.attachment_ids)
                    .push_bind(&r.client_message_id)
                    .push_bind(&r.forwarded_from_message_id)
                    .push_bind(r.sequence)
                    .push_bind(r.version)
                    .push_bind(r.create_time);
            });
        }
        Insert::Events => {
            q.push("INSERT INTO events (channel_id, sequence, payload) ");
            let payloads = &plan.payloads[range];
            q.push_values(rows.iter().zip(payloads), |mut v, ((_, r), p)| {
                v.push_bind(&r.channel_id)
                    .push_bind(r.sequence)
                    .push_bind(p.as_slice());
            });
        }
        Insert::Audits => {
            q.push(
                "INSERT INTO audit_logs (id, tenant_id, operation, table_name, entity_id, \
                 actor_id, before_json, after_json, create_time) ",
            );
            let audits = &plan.audits[range];
            q.push_values(rows.iter().zip(audits), |mut v, ((_, r), (id, after))| {
                v.push_bind(id)
                    .push_bind(&r.tenant_id)
                    .push_bind("create")
                    .push_bind("messages")
                    .push_bind(&r.id)
                    .push_bind(&r.sender_id)
                    .push_bind(None::<String>)
                    .push_bind(after)
                    .push_bind(plan.now);
            });
        }
    }
}

/// The rows of `plan` in chunks of [`insert_sizes`] (with `power_of_two`, so each statement
/// text is prepared once per connection), as ranges of `plan.rows`.
pub(super) fn insert_chunks(
    plan: &BatchPlan<'_>,
    power_of_two: bool,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut at = 0;
    insert_sizes(plan.rows.len(), power_of_two).map(move |size| {
        at += size;
        at - size..at
    })
}

/// A batch grouped by `(channel, tenant)`, channels in bytewise id order: every batch locks
/// its channels in this order, so concurrent batches never wait on each other in a cycle.
pub(super) struct Grouped<'b> {
    pub batch: &'b [BatchMessage],
    /// `(channel, tenant)` → batch positions, in batch order.
    pub by_channel: BTreeMap<(&'b str, &'b str), Vec<usize>>,
}

impl<'b> Grouped<'b> {
    /// Groups `batch` by channel.
    pub fn new(batch: &'b [BatchMessage]) -> Self {
        let mut by_channel: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        for (i, b) in batch.iter().enumerate() {
            by_channel
                .entry((b.msg.channel_id.as_str(), b.tenant_id.as_str()))
                .or_default()
                .push(i);
        }
        Grouped { batch, by_channel }
    }

    /// The channel ids, once each, in lock order.
    pub fn channel_ids(&self) -> Vec<&'b str> {
        let mut ids: Vec<&str> = self.by_channel.keys().map(|&(c, _)| c).collect();
        ids.dedup();
        ids
    }

    /// `(channel, tenant, messages)` of each group.
    pub fn counts(&self) -> Vec<(&'b str, &'b str, i64)> {
        self.by_channel
            .iter()
            .map(|(&(c, t), p)| (c, t, p.len() as i64))
            .collect()
    }

    /// The `(channel, sender)` pairs whose membership the batch needs, sorted, once each.
    pub fn member_pairs(&self) -> Vec<(&'b str, &'b str)> {
        let mut pairs: Vec<(&str, &str)> = self
            .batch
            .iter()
            .map(|b| (b.msg.channel_id.as_str(), b.user_id.as_str()))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs
    }

    /// The `(channel, sender, client_message_id)` keys of the batch, sorted, once each.
    pub fn keys(&self) -> Vec<(&'b str, &'b str, &'b str)> {
        let mut keys: Vec<(&str, &str, &str)> = self
            .batch
            .iter()
            .filter_map(|b| {
                let key = b.msg.client_message_id.as_deref()?;
                Some((b.msg.channel_id.as_str(), b.user_id.as_str(), key))
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// [`Grouped::plan`] from what a database read under the channel locks: `lasts`, each live
    /// channel's `(id, tenant, last sequence)` — after the batch's count was added to it when
    /// `advanced`, else as it was —, the `(channel, user)` membership rows found, and the
    /// messages stored under the batch's keys.
    pub fn plan_from(
        &self,
        lasts: &[(String, String, i64)],
        advanced: bool,
        members: &[(String, String)],
        stored: &[MessageRow],
        enc: Encoder<'_, MessageRow>,
    ) -> BatchPlan<'b> {
        let mut last_of: HashMap<(&str, &str), i64> = HashMap::new();
        for (&(c, t), positions) in &self.by_channel {
            if let Some((_, _, last)) = lasts.iter().find(|(a, b, _)| a == c && b == t) {
                let taken = if advanced { positions.len() as i64 } else { 0 };
                last_of.insert((c, t), last - taken);
            }
        }
        let members: HashSet<(&str, &str)> = members
            .iter()
            .map(|(c, u)| (c.as_str(), u.as_str()))
            .collect();
        let stored: HashMap<(&str, &str, &str), &MessageRow> = stored
            .iter()
            .filter_map(|r| {
                let key = r.client_message_id.as_deref()?;
                Some(((r.channel_id.as_str(), r.sender_id.as_str(), key), r))
            })
            .collect();
        self.plan(&last_of, |c, u| members.contains(&(c, u)), &stored, enc)
    }

    /// Lays the batch out on the channels' last sequences before it (`last_of`; a channel not
    /// in it is missing, deleted or of another tenant: `NotFound`). A sender who is not a
    /// member (`is_member` false) gets `NotFound`; a key stored already (`stored`) gets that
    /// message as `Existing`, a key repeated within the batch its first message; every other
    /// message takes its channel's next sequence, in batch order, an id (UUIDv7, taken in that
    /// order) and the time of the plan. None of these affect the others.
    pub fn plan(
        &self,
        last_of: &HashMap<(&str, &str), i64>,
        is_member: impl Fn(&str, &str) -> bool,
        stored: &HashMap<(&str, &str, &str), &MessageRow>,
        enc: Encoder<'_, MessageRow>,
    ) -> BatchPlan<'b> {
        let now = now_micros();
        let mut out: Vec<Option<StoreResult<Inserted>>> = vec![None; self.batch.len()];
        let mut rows: Vec<(usize, MessageRow)> = Vec::with_capacity(self.batch.len());
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut channels = Vec::with_capacity(self.by_channel.len());
        for (&(channel, tenant), positions) in &self.by_channel {
            let Some(&last) = last_of.get(&(channel, tenant)) else {
                for &i in positions {
                    out[i] = Some(Err(StoreError::NotFound));
                }
                continue;
            };
            let mut next = last;
            let mut first_of_key: HashMap<(&str, &str), usize> = HashMap::new();
            for &i in positions {
                let b = &self.batch[i];
                if !is_member(channel, &b.user_id) {
                    out[i] = Some(Err(StoreError::NotFound));
                    continue;
                }
                if let Some(key) = &b.msg.client_message_id {
                    if let Some(first) = stored.get(&(channel, b.user_id.as_str(), key.as_str())) {
                        out[i] = Some(Ok(Inserted::Existing((*first).clone())));
                        continue;
                    }
                    match first_of_key.entry((b.user_id.as_str(), key.as_str())) {
                        Entry::Occupied(first) => {
                            repeats.push((i, *first.get()));
                            continue;
                        }
                        Entry::Vacant(slot) => {
                            slot.insert(rows.len());
                        }
                    }
                }
                next += 1;
                rows.push((i, batch_row(b, Uuid::now_v7().to_string(), next, now)));
            }
            channels.push((channel, tenant, last, next));
        }
        let payloads = rows.iter().map(|(_, r)| enc(r, r.sequence)).collect();
        let audits = rows
            .iter()
            .map(|(_, r)| (Uuid::now_v7().to_string(), to_json(r)))
            .collect();
        BatchPlan {
            out,
            rows,
            payloads,
            audits,
            repeats,
            channels,
            now,
        }
    }
}

/// One group-commit batch laid out: the new rows with their sequences, ids, encoded events
/// and audit rows, and what every position of the batch gets.
pub(super) struct BatchPlan<'b> {
    /// Outcomes decided already: refusals and keys stored before.
    out: Vec<Option<StoreResult<Inserted>>>,
    /// (batch position, new row), in channel order, each channel's rows in batch order.
    pub rows: Vec<(usize, MessageRow)>,
    /// The encoded event of each row.
    pub payloads: Vec<Vec<u8>>,
    /// The audit row of each row: its id and `after_json`.
    pub audits: Vec<(String, Option<String>)>,
    /// Repeats of a client_message_id within the batch: (position, index into `rows`).
    repeats: Vec<(usize, usize)>,
    /// (channel, tenant, last sequence before the batch, last sequence after it) of every
    /// live channel of the batch.
    pub channels: Vec<(&'b str, &'b str, i64, i64)>,
    /// Create time of the rows and their audit rows (microseconds since the epoch).
    pub now: i64,
}

impl BatchPlan<'_> {
    /// `(channel, new last sequence)` of every channel whose sequence the batch moves.
    pub fn moved(&self) -> Vec<(&str, i64)> {
        self.channels
            .iter()
            .filter(|c| c.3 != c.2)
            .map(|c| (c.0, c.3))
            .collect()
    }

    /// `(channel, last sequence)` of every channel that `advanced` (`(id, tenant, last)`, as
    /// moved on by the batch's full count) took further than the plan does, because some of
    /// its messages were refused: their sequences are given back.
    pub fn give_backs(&self, advanced: &[(String, String, i64)]) -> Vec<(&str, i64)> {
        self.channels
            .iter()
            .filter(|&&(c, t, _, last)| {
                advanced
                    .iter()
                    .any(|(a, b, taken)| a == c && b == t && *taken != last)
            })
            .map(|&(c, _, _, last)| (c, last))
            .collect()
    }

    /// The outcome of every position once the rows are committed.
    pub fn committed(self) -> Vec<StoreResult<Inserted>> {
        let BatchPlan {
            mut out,
            rows,
            payloads,
            repeats,
            ..
        } = self;
        for (i, r) in repeats {
            out[i] = Some(Ok(Inserted::Existing(rows[r].1.clone())));
        }
        for ((i, row), payload) in rows.into_iter().zip(payloads) {
            out[i] = Some(Ok(Inserted::New(row, payload)));
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Err(StoreError::Internal("batch item without outcome".into())))
            })
            .collect()
    }
}

/// The new row of a group-commit message: version 1, no attachments (sends with attachments
/// take the single-message path).
fn batch_row(b: &BatchMessage, id: String, sequence: i64, create_time: i64) -> MessageRow {
    MessageRow {
        id,
        tenant_id: b.tenant_id.clone(),
        channel_id: b.msg.channel_id.clone(),
        sender_id: b.user_id.clone(),
        body: b.msg.body.clone(),
        subject: b.msg.subject.clone(),
        parent_message_id: b.msg.parent_message_id.clone(),
        attachment_ids: "[]".to_owned(),
        client_message_id: b.msg.client_message_id.clone(),
        forwarded_from_message_id: b.msg.forwarded_from_message_id.clone(),
        sequence,
        version: 1,
        create_time,
        update_time: None,
        delete_time: None,
        deleted_by: None,
    }
}

#[cfg(test)]
mod tests {
    use super::insert_sizes;

    #[test]
    fn insert_sizes_are_powers_of_two_that_add_up() {
        assert_eq!(
            insert_sizes(0, true).collect::<Vec<_>>(),
            Vec::<usize>::new()
        );
        assert_eq!(insert_sizes(1, true).collect::<Vec<_>>(), vec![1]);
        assert_eq!(insert_sizes(37, true).collect::<Vec<_>>(), vec![32, 4, 1]);
        assert_eq!(insert_sizes(256, true).collect::<Vec<_>>(), vec![256]);
        assert_eq!(
            insert_sizes(600, true).collect::<Vec<_>>(),
            vec![256, 256, 64, 16, 8]
        );
        for n in 0..1000 {
            let sizes: Vec<usize> = insert_sizes(n, true).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= 256));
            let exact: Vec<usize> = insert_sizes(n, false).collect();
            assert_eq!(exact.iter().sum::<usize>(), n);
            assert!(exact.iter().all(|s| *s <= 256));
            assert_eq!(exact.len(), n.div_ceil(256));
        }
    }
}

//! The machine's own limits, measured in the same run as the service: sequential disk writes,
//! a bare tonic server, and single-row INSERTs straight into PostgreSQL (pgbench), SQLite
//! (sqlx) and MySQL / MariaDB (sqlx), at the concurrencies of scenario 1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::proc::{CpuSnapshot, Server};
use crate::{histogram, record, say, summary, Bench, BenchResult};

/// A row shaped like `messages` (same columns, same indexes); both INSERT baselines use it.
const TABLE: &str = "CREATE TABLE bench_messages (
    id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, channel_id TEXT NOT NULL,
    sender_id TEXT NOT NULL, body TEXT NOT NULL, subject TEXT NOT NULL DEFAULT '',
    parent_message_id TEXT, attachment_ids TEXT NOT NULL DEFAULT '[]', client_message_id TEXT,
    forwarded_from_message_id TEXT, sequence BIGINT NOT NULL, version BIGINT NOT NULL DEFAULT 1,
    create_time BIGINT NOT NULL, update_time BIGINT, delete_time BIGINT, deleted_by TEXT)";
const INDEXES: [&str; 3] = [
    "CREATE UNIQUE INDEX bench_by_sequence ON bench_messages (channel_id, sequence)",
    "CREATE INDEX bench_by_thread ON bench_messages (channel_id, parent_message_id, sequence)",
    "CREATE UNIQUE INDEX bench_idempotency ON bench_messages (channel_id, sender_id, client_message_id)",
];

/// The same row on MySQL / MariaDB, as `messages` is there (migrations/mysql): the same
/// column types, character set, collation and indexes.
const MYSQL_TABLE: &str = "CREATE TABLE bench_messages (
    id VARCHAR(36) NOT NULL, tenant_id VARBINARY(255) NOT NULL, channel_id VARCHAR(36) NOT NULL,
    sender_id VARBINARY(255) NOT NULL, body MEDIUMTEXT NOT NULL,
    subject VARCHAR(200) NOT NULL DEFAULT '', parent_message_id VARCHAR(36) NULL,
    attachment_ids VARCHAR(2048) NOT NULL DEFAULT '[]', client_message_id VARBINARY(100) NULL,
    forwarded_from_message_id VARCHAR(36) NULL, sequence BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1, create_time BIGINT NOT NULL, update_time BIGINT NULL,
    delete_time BIGINT NULL, deleted_by VARBINARY(255) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY bench_by_sequence (channel_id, sequence),
    KEY bench_by_thread (channel_id, parent_message_id, sequence),
    UNIQUE KEY bench_idempotency (channel_id, sender_id, client_message_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC";

/// The MySQL / MariaDB server settings that decide what a commit costs and what fits in
/// memory, as one line for the report.
const MYSQL_SETTINGS: &str = "SELECT CAST(CONCAT(\
    'innodb_flush_log_at_trx_commit=', @@innodb_flush_log_at_trx_commit, \
    ', innodb_flush_method=', @@innodb_flush_method, \
    ', innodb_buffer_pool_size=', @@innodb_buffer_pool_size DIV 1048576, ' MiB', \
    ', innodb_log_file_size=', @@innodb_log_file_size DIV 1048576, ' MiB', \
    ', innodb_doublewrite=', @@innodb_doublewrite, \
    ', log_bin=', @@log_bin, ', sync_binlog=', @@sync_binlog) AS CHAR CHARACTER SET utf8mb4)";

/// The ~100-byte body every scenario sends.
pub const BODY: &str = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs, please!!";

/// Sequential write speed: `dd` of `plan.upload_bytes` with fdatasync, in MB/s.
pub async fn disk(bench: &Bench) -> BenchResult<Value> {
    let path = crate::proc::scratch(bench, "dd.bin");
    let mib = (bench.plan.upload_bytes >> 20).max(1);
    let t = Instant::now();
    let out = tokio::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fdatasync"])
        .output()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        return Err(format!("dd: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let mb_s = (mib << 20) as f64 / 1e6 / secs;
    say(&format!("  dd: {mib} MiB in {secs:.2} s = {mb_s:.0} MB/s"));
    Ok(json!({ "tool": "dd bs=1M conv=fdatasync", "bytes": mib << 20, "mb_per_second": mb_s }))
}

/// `chat-bench --echo-server`: tonic with only the health service, on 127.0.0.1:0.
pub async fn echo_server() -> BenchResult<()> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    eprintln!("echo server listening addr={}", listener.local_addr()?);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// The RPC floor: closed-loop health checks against the bare tonic server at each concurrency
/// of scenario 1, one connection per four callers.
pub async fn echo(bench: &Bench) -> BenchResult<Value> {
    let exe = std::env::current_exe()?;
    let server = Server::spawn(&exe, &["--echo-server"], &[]).await?;
    let mut runs = Vec::new();
    for &c in &bench.plan.send_concurrency {
        let conns = crate::scenarios::connect_many(&server.url(), c.div_ceil(4)).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..c {
            let mut client = HealthClient::new(conns[i % conns.len()].clone());
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut h = histogram();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if client.check(HealthCheckRequest::default()).await.is_ok() {
                        record(&mut h, t.elapsed());
                    }
                }
                h
            }));
        }
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(bench.plan.send_seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut h = histogram();
        for task in tasks {
            h.add(task.await?)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let rate = h.len() as f64 / secs;
        say(&format!("  echo c={c}: {rate:.0} calls/s"));
        runs.push(json!({ "concurrency": c, "per_second": rate, "latency": summary(&h) }));
    }
    server.stop().await;
    Ok(json!({ "runs": runs }))
}

/// pgbench: single-row INSERTs of a message-shaped row, `-M prepared`, at each concurrency.
pub async fn pgbench(bench: &Bench) -> BenchResult<Value> {
    let schema = format!("bench_pgbench_{}", std::process::id());
    let pool = sqlx::PgPool::connect(&bench.pg_url).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await?;
    sqlx::query(&TABLE.replacen("bench_messages", &format!("{schema}.bench_messages"), 1))
        .execute(&pool)
        .await?;
    for idx in INDEXES {
        sqlx::query(&idx.replace("ON bench_messages", &format!("ON {schema}.bench_messages")))
            .execute(&pool)
            .await?;
    }
    sqlx::query(&format!("CREATE SEQUENCE {schema}.seq"))
        .execute(&pool)
        .await?;
    let script = crate::proc::scratch(bench, "pgbench.sql");
    std::fs::write(
        &script,
        format!(
            "\\set ch random(0, 15)\n\
             INSERT INTO {schema}.bench_messages (id, tenant_id, channel_id, sender_id, body, sequence, create_time) \
             VALUES (gen_random_uuid()::text, 'default', 'channel-' || :ch, 'alice', '{BODY}', nextval('{schema}.seq'), 0);\n"
        ),
    )?;
    let mut runs = Vec::new();
    for &c in &bench.plan.send_concurrency {
        let secs = bench.plan.send_seconds.ceil().max(1.0) as u64;
        let out = tokio::process::Command::new("pgbench")
            .args(["-n", "-M", "prepared", "-f"])
            .arg(&script)
            .args([
                "-c",
                &c.to_string(),
                "-j",
                &c.min(2).to_string(),
                "-T",
                &secs.to_string(),
            ])
            .arg(&bench.pg_url)
            .output()
            .await
            .map_err(|e| format!("pgbench: {e} (install PostgreSQL's client tools)"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| {
                format!(
                    "pgbench said:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        say(&format!("  pgbench c={c}: {tps:.0} inserts/s"));
        runs.push(json!({ "concurrency": c, "per_second": tps }));
    }
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(json!({ "tool": "pgbench -M prepared, one INSERT per transaction", "runs": runs }))
}

/// SQLite: the same row, one INSERT per transaction, from `c` tasks through one sqlx writer
/// connection with the server's settings (WAL, synchronous FULL).
pub async fn sqlite_loop(bench: &Bench) -> BenchResult<Value> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let mut runs = Vec::new();
    for &c in &bench.plan.send_concurrency {
        let path = crate::proc::scratch(bench, &format!("baseline-{}.db", bench.next_id()));
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        sqlx::query(TABLE).execute(&pool).await?;
        for idx in INDEXES {
            sqlx::query(idx).execute(&pool).await?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..c {
            let (pool, stop, seq) = (pool.clone(), stop.clone(), seq.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let s = seq.fetch_add(1, Ordering::Relaxed) as i64;
                    let ok = sqlx::query(
                        "INSERT INTO bench_messages (id, tenant_id, channel_id, sender_id, body, sequence, create_time) \
                         VALUES ($1, 'default', $2, 'alice', $3, $4, 0)",
                    )
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(format!("channel-{}", i % 16))
                    .bind(BODY)
                    .bind(s)
                    .execute(&pool)
                    .await
                    .is_ok();
                    n += u64::from(ok);
                }
                n
            }));
        }
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(bench.plan.send_seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for task in tasks {
            total += task.await?;
        }
        let rate = total as f64 / t.elapsed().as_secs_f64();
        pool.close().await;
        say(&format!("  sqlite loop c={c}: {rate:.0} inserts/s"));
        runs.push(json!({ "concurrency": c, "per_second": rate }));
    }
    Ok(
        json!({ "tool": "sqlx, one INSERT per transaction, WAL + synchronous=FULL, one writer connection", "runs": runs }),
    )
}

/// MySQL / MariaDB: the same row, one autocommit INSERT (a prepared statement) per
/// transaction, from `c` tasks each on its own connection, into a table of its own in a
/// database of its own on the server the service uses, with the server's settings as they are
/// (on MariaDB's defaults, `innodb_flush_log_at_trx_commit=1`: a redo-log flush per commit).
pub async fn mysql_loop(bench: &Bench) -> BenchResult<Value> {
    use sqlx::Connection;
    let db = format!("chat_bench_{}_baseline", std::process::id());
    let admin = bench.mysql_admin().await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await?;
    let url = bench.mysql_db_url(&db);
    let opts: sqlx::mysql::MySqlConnectOptions = url.parse()?;
    let opts = opts.charset("utf8mb4").collation("utf8mb4_bin");
    // Channel ids shaped as the service's (UUID text), 16 of them as in scenario 1.
    let channels: Arc<Vec<String>> =
        Arc::new((0..16).map(|_| uuid::Uuid::now_v7().to_string()).collect());
    let mut runs = Vec::new();
    let outcome: BenchResult<()> = async {
        for &c in &bench.plan.send_concurrency {
            // A fresh table per concurrency, as SQLite's loop gets a fresh file.
            sqlx::query(&format!("DROP TABLE IF EXISTS {db}.bench_messages"))
                .execute(&admin)
                .await?;
            sqlx::query(&MYSQL_TABLE.replacen(
                "bench_messages",
                &format!("{db}.bench_messages"),
                1,
            ))
            .execute(&admin)
            .await?;
            let mut conns = Vec::with_capacity(c);
            for _ in 0..c {
                conns.push(sqlx::mysql::MySqlConnection::connect_with(&opts).await?);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let seq = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for (i, mut conn) in conns.into_iter().enumerate() {
                let (stop, seq, errors) = (stop.clone(), seq.clone(), errors.clone());
                let channel = channels[i % channels.len()].clone();
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let s = seq.fetch_add(1, Ordering::Relaxed) as i64;
                        let ok = sqlx::query(
                            "INSERT INTO bench_messages (id, tenant_id, channel_id, sender_id, \
                             body, sequence, create_time) VALUES (?, 'default', ?, 'alice', ?, ?, ?)",
                        )
                        .bind(uuid::Uuid::now_v7().to_string())
                        .bind(&channel)
                        .bind(BODY)
                        .bind(s)
                        .bind(chat_service::store::now_micros())
                        .execute(&mut conn)
                        .await
                        .is_ok();
                        n += u64::from(ok);
                        errors.fetch_add(u64::from(!ok), Ordering::Relaxed);
                    }
                    let _ = conn.close().await;
                    n
                }));
            }
            let (t, cpu0) = (Instant::now(), CpuSnapshot::take(&[std::process::id()]));
            tokio::time::sleep(Duration::from_secs_f64(bench.plan.send_seconds)).await;
            stop.store(true, Ordering::Relaxed);
            let mut total = 0;
            for task in tasks {
                total += task.await?;
            }
            let rate = total as f64 / t.elapsed().as_secs_f64();
            // The "server" here is this process (the loop), as is the generator.
            let cpu = cpu0.per_op(&CpuSnapshot::take(&[std::process::id()]), total as f64);
            let errors = errors.load(Ordering::Relaxed);
            if errors > 0 {
                return Err(format!("{errors} baseline INSERTs failed").into());
            }
            say(&format!(
                "  mysql loop c={c}: {rate:.0} inserts/s, database CPU {:.0} µs per INSERT",
                cpu["mysql_us"].as_f64().unwrap_or(f64::NAN)
            ));
            runs.push(json!({ "concurrency": c, "per_second": rate, "cpu_per_insert": cpu }));
        }
        Ok(())
    }
    .await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&admin)
        .await;
    let settings: String = sqlx::query_scalar(MYSQL_SETTINGS)
        .fetch_one(&admin)
        .await
        .unwrap_or_else(|e| e.to_string());
    admin.close().await;
    outcome?;
    say(&format!("  server settings: {settings}"));
    Ok(json!({
        "server_settings": settings,
        "tool": "sqlx, one autocommit INSERT (prepared) per transaction, one connection per task, \
                 the server's own settings",
        "runs": runs,
    }))
}

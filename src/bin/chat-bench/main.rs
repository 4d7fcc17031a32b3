//! `chat-bench`: the benchmark program. Drives a real `chat-service serve` process over
//! loopback with tonic clients on many HTTP/2 connections, closed-loop and open-loop, records
//! latencies in HDR histograms, measures the machine's own limits in the same run (pgbench
//! single-row INSERTs, sqlx insert loops on SQLite and MySQL / MariaDB, a bare tonic server,
//! sequential disk writes)
//! and writes `BENCHMARKS.md` and `results.json`. Scenario 7 runs two nodes with `FANOUT=nats`
//! over a `nats-server` of its own (CHAT_BENCH_NATS_SERVER names the binary).
//!
//! ```text
//! scripts/bench                      # everything, SQLite, PostgreSQL and MySQL / MariaDB
//! chat-bench --backends mysql        # one database (CHAT_BENCH_MYSQL_URL names the server)
//! chat-bench --quick                 # a smoke run of every scenario in seconds (CI)
//! chat-bench --backends sqlite --scenarios 1,2
//! chat-bench --backends postgres --scenarios 1,7   # two nodes over NATS against one
//! chat-bench soak --minutes 30       # mixed load for leaks and drift (scripts/soak; see soak.rs)
//! chat-bench soak --quick            # its 20-second smoke run (CI)
//! ```

mod baselines;
mod cluster;
mod proc;
mod report;
mod scenarios;
mod soak;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

/// The generator shares the machine with the server: the same allocator as the server, so its
/// own decoding costs the cores as little as it can.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Errors of the bench: text is enough, it is a tool.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug)]
#[command(about = "Benchmarks chat-service against the machine's own limits and writes a report")]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Tiny sizes and durations: every scenario in a few seconds (the CI smoke run).
    #[arg(long)]
    quick: bool,
    /// Databases to run on.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
    backends: Vec<Backend>,
    /// Scenarios to run (1 sends, 2 latency, 3 fan-out, 4 idle streams, 5 history, 6 uploads,
    /// 7 cluster: two nodes over NATS; not on SQLite).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7")]
    scenarios: Vec<u8>,
    #[command(flatten)]
    server: ServerArgs,
    /// Where the report, the JSON and scratch files go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Override the open-loop load levels (fractions of the best closed-loop rate).
    #[arg(long, value_delimiter = ',')]
    load_levels: Option<Vec<f64>>,
    /// Override the seconds per open-loop level.
    #[arg(long)]
    open_loop_seconds: Option<f64>,
    /// Scenario 2's full load in sends/s (its levels are fractions of it), and scenario 7's.
    /// Without it, scenario 2 brings scenario 1 along and its best rate is the full load;
    /// scenario 7 takes scenario 1's best rate when it ran, else measures a closed-loop rate
    /// of its own.
    #[arg(long)]
    full_load: Option<f64>,
    /// Internal: serve only gRPC health on 127.0.0.1:0 (the bare-tonic baseline).
    #[arg(long, hide = true)]
    echo_server: bool,
}

/// The server under test, for the scenarios and the soak alike.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// The server binary (default: `chat-service` beside this program).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// PostgreSQL for the server on `postgres`, and for pgbench.
    #[arg(
        long,
        env = "CHAT_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// MySQL / MariaDB for the server on `mysql`, and for its INSERT baseline. Only the server
    /// part is used: every server and the baseline get a fresh database
    /// (`chat_bench_<pid>_<n>`), dropped when they stop.
    #[arg(
        long,
        env = "CHAT_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    mysql_url: String,
    /// `nats-server` for scenario 7 (default: the one on PATH, else /usr/sbin/nats-server).
    #[arg(long, env = "CHAT_BENCH_NATS_SERVER")]
    nats_server: Option<PathBuf>,
}

impl ServerArgs {
    /// A run with these servers, whose scratch files go to `dir` (made if missing, and
    /// canonicalised: the server runs with its own working directory).
    pub fn bench(self, plan: Plan, quick: bool, dir: &std::path::Path) -> BenchResult<Bench> {
        let server_bin = match self.server_bin {
            Some(p) => p,
            None => std::env::current_exe()?
                .parent()
                .ok_or("no folder")?
                .join("chat-service"),
        };
        if !server_bin.exists() {
            return Err(format!("no server binary at {}", server_bin.display()).into());
        }
        std::fs::create_dir_all(dir)?;
        Ok(Bench {
            plan,
            quick,
            server_bin,
            pg_url: self.postgres_url,
            mysql_url: self.mysql_url,
            nats_server: self.nats_server,
            dir: std::fs::canonicalize(dir)?,
            secret: "bench-secret-0123456789abcdef".into(),
            ids: AtomicU64::new(0),
        })
    }
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Mixed load at a steady, moderate rate for minutes, recording the server's RSS, open fds
    /// and latency every interval (leaks and drift, not peak throughput).
    Soak(soak::SoakArgs),
}

/// A database backend of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MySQL 8.0+ or MariaDB 10.6+.
    Mysql,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::Mysql => "MySQL",
        }
    }
}

/// Sizes and durations of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// Concurrent senders of scenario 1.
    pub send_concurrency: Vec<usize>,
    /// Seconds per closed-loop measurement (scenario 1 and its baselines).
    pub send_seconds: f64,
    /// Open-loop load levels, as fractions of scenario 1's best rate.
    pub load_levels: Vec<f64>,
    /// Seconds per open-loop level.
    pub open_loop_seconds: f64,
    /// Fan-out subscribers, their connections, and messages sent.
    pub fanout_subscribers: usize,
    pub fanout_connections: usize,
    pub fanout_messages: usize,
    /// Idle streams and streams per connection.
    pub idle_streams: usize,
    pub idle_streams_per_connection: usize,
    /// Seconds of idle CPU measurement.
    pub idle_seconds: f64,
    /// Messages in the history channel; seconds per history measurement; concurrent readers.
    pub history_messages: i64,
    pub history_seconds: f64,
    pub history_readers: usize,
    /// Bytes uploaded in scenario 6 (and written by the disk baseline).
    pub upload_bytes: u64,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            send_concurrency: vec![1, 16, 64],
            send_seconds: 8.0,
            load_levels: vec![0.1, 0.5, 0.8],
            open_loop_seconds: 30.0,
            fanout_subscribers: 1000,
            fanout_connections: 10,
            fanout_messages: 1000,
            idle_streams: 10_000,
            idle_streams_per_connection: 100,
            // Two heartbeat periods (15 s): streams opened together beat together, and a
            // shorter window can fall between two rounds and see no work at all.
            idle_seconds: 30.0,
            history_messages: 1_000_000,
            history_seconds: 3.0,
            history_readers: 16,
            upload_bytes: 1 << 30,
        }
    }

    fn quick() -> Plan {
        Plan {
            send_concurrency: vec![1, 4],
            send_seconds: 0.5,
            load_levels: vec![0.5],
            open_loop_seconds: 0.5,
            fanout_subscribers: 20,
            fanout_connections: 2,
            fanout_messages: 10,
            idle_streams: 50,
            idle_streams_per_connection: 25,
            idle_seconds: 0.5,
            history_messages: 2_000,
            history_seconds: 0.3,
            history_readers: 4,
            upload_bytes: 8 << 20,
        }
    }
}

/// What every scenario needs.
pub struct Bench {
    pub plan: Plan,
    pub quick: bool,
    pub server_bin: PathBuf,
    pub pg_url: String,
    /// The MySQL / MariaDB server (its database part is ignored: see [`Bench::mysql_db_url`]).
    pub mysql_url: String,
    /// `nats-server` as given (CHAT_BENCH_NATS_SERVER); see [`cluster::nats_binary`].
    pub nats_server: Option<PathBuf>,
    pub dir: PathBuf,
    pub secret: String,
    ids: AtomicU64,
}

impl Bench {
    /// A number unique in this run (database files, schemas).
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// [`Bench::mysql_url`] with its database replaced by `db` (`mysql://user@host:port/db?…`).
    /// The scheme is `mysql:` either way (the bench's own sqlx pools know no `mariadb:`).
    pub fn mysql_db_url(&self, db: &str) -> String {
        let url = with_database(&self.mysql_url, db);
        match url.strip_prefix("mariadb:") {
            Some(rest) => format!("mysql:{rest}"),
            None => url,
        }
    }

    /// A pool on the MySQL / MariaDB server with no default database (for CREATE / DROP
    /// DATABASE).
    pub async fn mysql_admin(&self) -> BenchResult<sqlx::MySqlPool> {
        Ok(sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&self.mysql_db_url(""))
            .await
            .map_err(|e| format!("MySQL / MariaDB at {}: {e}", self.mysql_url))?)
    }

    /// A token for `user` with every permission, valid 4 h.
    pub fn token(&self, user: &str) -> String {
        chat_service::auth::mint_hs256(
            self.secret.as_bytes(),
            &chat_service::auth::TokenSpec {
                sub: user,
                tenant: "default",
                permissions: chat_service::auth::all_permission_names(),
                ttl_seconds: 4 * 3600,
                issuer: None,
                audience: None,
            },
        )
        .unwrap_or_default()
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let outcome = if args.echo_server {
        baselines::echo_server().await
    } else if let Some(Command::Soak(soak)) = args.command {
        soak::run(soak).await
    } else {
        run(args).await
    };
    if let Err(e) = outcome {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> BenchResult<()> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&args.out)?;
    let dir = args.out.join("scratch");
    let _ = std::fs::remove_dir_all(&dir);
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(levels) = args.load_levels {
        plan.load_levels = levels;
    }
    if let Some(secs) = args.open_loop_seconds {
        plan.open_loop_seconds = secs;
    }
    let bench = args.server.bench(plan, args.quick, &dir)?;
    // Scenario 2's load levels are fractions of scenario 1's best rate, so 2 brings 1 along
    // unless --full-load gives the rate.
    let wants = |n: u8| {
        args.scenarios.contains(&n)
            || (n == 1 && args.full_load.is_none() && args.scenarios.contains(&2))
    };
    let mut results = json!({
        "machine": report::machine(&bench).await,
        "plan": serde_json::to_value(&bench.plan)?,
        "baselines": {},
        "backends": {},
    });

    say("baseline: sequential disk write (dd, fdatasync)");
    results["baselines"]["disk"] = baselines::disk(&bench).await?;
    if wants(1) {
        say("baseline: bare tonic server (gRPC health check, no database)");
        results["baselines"]["echo"] = baselines::echo(&bench).await?;
    }
    let outcome = run_backends(&args.backends, &wants, args.full_load, &bench, &mut results).await;
    if args.backends.contains(&Backend::Mysql) {
        // Databases a failed scenario left behind (each server drops its own when it stops).
        drop_mysql_databases(&bench).await;
    }
    results["elapsed_seconds"] = json!(started.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        // What ran before the failure is kept (a full run takes many minutes).
        results["error"] = json!(e.to_string());
    }
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    let md_path = args.out.join("BENCHMARKS.md");
    std::fs::write(&md_path, report::markdown(&results))?;
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;
    say(&format!(
        "done in {:.0} s: {} and {}",
        started.elapsed().as_secs_f64(),
        md_path.display(),
        json_path.display()
    ));
    Ok(())
}

/// Every scenario `wants` on each of `backends`, into `results["backends"]`.
async fn run_backends(
    backends: &[Backend],
    wants: &dyn Fn(u8) -> bool,
    full_load: Option<f64>,
    bench: &Bench,
    results: &mut Value,
) -> BenchResult<()> {
    for &backend in backends {
        let mut out = json!({});
        if wants(1) {
            say(&format!("{}: baseline single-row INSERT", backend.name()));
            out["insert_baseline"] = match backend {
                Backend::Postgres => baselines::pgbench(bench).await?,
                Backend::Sqlite => baselines::sqlite_loop(bench).await?,
                Backend::Mysql => baselines::mysql_loop(bench).await?,
            };
            say(&format!("{}: 1. persisted sends/s", backend.name()));
            out["sends"] = scenarios::sends(bench, backend).await?;
        }
        // The best closed-loop rate of scenario 1 in this run, if it ran.
        let best_sends = out["sends"]["runs"]
            .as_array()
            .map(|runs| {
                runs.iter()
                    .filter_map(|r| r["per_second"].as_f64())
                    .fold(0.0, f64::max)
            })
            .filter(|&best| best > 0.0);
        if wants(2) {
            let best = full_load
                .or(best_sends)
                .ok_or("scenario 2 needs scenario 1 in the same run, or --full-load")?;
            say(&format!(
                "{}: 2. latency at fixed load (best {best:.0}/s)",
                backend.name()
            ));
            out["latency"] = scenarios::latency(bench, backend, best).await?;
        }
        if wants(3) {
            say(&format!("{}: 3. fan-out", backend.name()));
            out["fanout"] = scenarios::fanout(bench, backend).await?;
        }
        if wants(4) {
            say(&format!("{}: 4. idle streams", backend.name()));
            out["idle"] = scenarios::idle(bench, backend).await?;
        }
        if wants(5) {
            say(&format!("{}: 5. history", backend.name()));
            out["history"] = scenarios::history(bench, backend).await?;
        }
        if wants(6) {
            say(&format!("{}: 6. uploads", backend.name()));
            out["upload"] = scenarios::upload(bench, backend).await?;
        }
        if wants(7) {
            say(&format!(
                "{}: 7. cluster (two nodes over NATS)",
                backend.name()
            ));
            let full = match (full_load, best_sends) {
                (Some(r), _) => Some(cluster::FullLoad::Given(r)),
                (None, Some(r)) => Some(cluster::FullLoad::Scenario1(r)),
                (None, None) => None,
            };
            out["cluster"] = cluster::cluster(bench, backend, full).await?;
        }
        results["backends"][backend.name()] = out;
    }
    Ok(())
}

/// Drops the MySQL / MariaDB databases of this run (`chat_bench_<pid>_…`) that are still there.
async fn drop_mysql_databases(bench: &Bench) {
    let Ok(admin) = bench.mysql_admin().await else {
        return;
    };
    let pattern = format!("chat\\_bench\\_{}\\_%", std::process::id());
    let names: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS BINARY) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
    )
    .bind(&pattern)
    .fetch_all(&admin)
    .await
    .unwrap_or_default();
    for name in names {
        let name = String::from_utf8_lossy(&name);
        say(&format!("dropping leftover database {name}"));
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
            .execute(&admin)
            .await;
    }
    admin.close().await;
}

/// `url` (`scheme://authority[/database][?options]`) with its database part set to `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("mysql", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(a, _)| a);
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// Progress on stderr.
pub fn say(what: &str) {
    eprintln!("[chat-bench] {what}");
}

/// A histogram of microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Records `d` in microseconds (clamped to the histogram's range).
pub fn record(h: &mut hdrhistogram::Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// p50 / p99 / p99.9 / max in milliseconds, and the count.
pub fn summary(h: &hdrhistogram::Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": h.max() as f64 / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_part_is_replaced() {
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306/test", "b"),
            "mysql://root@127.0.0.1:3306/b"
        );
        assert_eq!(
            with_database("mysql://u:p@h:3306", "b"),
            "mysql://u:p@h:3306/b"
        );
        assert_eq!(
            with_database("mariadb://u@h/x?ssl-mode=disabled", "b"),
            "mariadb://u@h/b?ssl-mode=disabled"
        );
    }
}

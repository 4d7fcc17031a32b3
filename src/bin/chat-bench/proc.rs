//! The server under test as a child process, and what /proc says about it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::{Backend, Bench, BenchResult};

/// A running `chat-service serve` (or `chat-bench echo-server`).
pub struct Server {
    child: Child,
    pub addr: String,
    pub pid: u32,
    /// PostgreSQL schema to drop at the end, if any.
    schema: Option<String>,
    pg_url: String,
    /// MySQL / MariaDB database to drop at the end, if any, and the URL of its server (with
    /// no database).
    mysql_db: Option<(String, String)>,
    /// The server's DATABASE_URL.
    pub database_url: String,
    /// The variables naming its database (DATABASE_URL, and DB_SCHEMA on PostgreSQL), for
    /// [`Server::start_beside`].
    database: Vec<(String, String)>,
    /// `HOST:PORT` of its `/metrics` endpoint, when started with `METRICS_ADDR` (its
    /// `metrics_addr=` log line).
    pub metrics_addr: Option<String>,
}

impl Server {
    /// Starts `chat-service serve` on `backend` with a fresh database, port 0 and the bench's
    /// secret; `env` adds or overrides variables.
    pub async fn start(
        bench: &Bench,
        backend: Backend,
        env: &[(&str, String)],
    ) -> BenchResult<Server> {
        Self::start_logged(bench, backend, env, None).await
    }

    /// [`Server::start`], with every line the server logs after it is listening appended to
    /// `log` (a soak's warnings are worth keeping; a scenario's are not).
    pub async fn start_logged(
        bench: &Bench,
        backend: Backend,
        env: &[(&str, String)],
        log: Option<&Path>,
    ) -> BenchResult<Server> {
        let n = bench.next_id();
        let mut schema = None;
        let mut mysql_db = None;
        let database: Vec<(String, String)> = match backend {
            Backend::Sqlite => vec![(
                "DATABASE_URL".into(),
                format!(
                    "sqlite://{}",
                    bench.dir.join(format!("chat-{n}.db")).display()
                ),
            )],
            Backend::Postgres => {
                let name = format!("bench_{}_{n}", std::process::id());
                let pool = sqlx::PgPool::connect(&bench.pg_url).await?;
                sqlx::query(&format!("CREATE SCHEMA {name}"))
                    .execute(&pool)
                    .await?;
                pool.close().await;
                schema = Some(name.clone());
                vec![
                    ("DATABASE_URL".into(), bench.pg_url.clone()),
                    ("DB_SCHEMA".into(), name),
                ]
            }
            Backend::Mysql => {
                let name = format!("chat_bench_{}_{n}", std::process::id());
                let admin = bench.mysql_admin().await?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await?;
                admin.close().await;
                mysql_db = Some((name.clone(), bench.mysql_db_url("")));
                vec![("DATABASE_URL".into(), bench.mysql_db_url(&name))]
            }
        };
        let mut server = Self::launch(bench, n, database, env, log).await?;
        server.schema = schema;
        server.mysql_db = mysql_db;
        Ok(server)
    }

    /// Starts another `chat-service serve` on the database (and schema) of `first`, which
    /// keeps owning it: this one drops nothing when it stops, and must stop before `first`
    /// does. `env` adds or overrides variables, as for [`Server::start`].
    pub async fn start_beside(
        bench: &Bench,
        first: &Server,
        env: &[(&str, String)],
    ) -> BenchResult<Server> {
        Self::launch(bench, bench.next_id(), first.database.clone(), env, None).await
    }

    /// Spawns `chat-service serve` with the bench's settings, the `database` variables, then
    /// `env` on top; scratch files are numbered `n`.
    async fn launch(
        bench: &Bench,
        n: u64,
        database: Vec<(String, String)>,
        env: &[(&str, String)],
        log: Option<&Path>,
    ) -> BenchResult<Server> {
        let mut vars: Vec<(String, String)> = vec![
            ("JWT_SECRET".into(), bench.secret.clone()),
            ("GRPC_ADDR".into(), "127.0.0.1:0".into()),
            ("LOG_LEVEL".into(), "info".into()),
            ("NO_COLOR".into(), "1".into()),
            // The bench drives a few users as hard as the machine allows: per-user limits
            // off (the limits themselves cost one map lookup per call).
            ("RATE_LIMIT_SENDS_PER_SECOND".into(), "0".into()),
            ("RATE_LIMIT_WRITES_PER_SECOND".into(), "0".into()),
            ("MAX_FEEDS_PER_USER".into(), "1000000".into()),
            ("MAX_UNFINISHED_UPLOADS_PER_USER".into(), "1000000".into()),
            (
                "STORAGE_URL".into(),
                format!("file://{}", bench.dir.join(format!("blobs-{n}")).display()),
            ),
        ];
        vars.extend(database.iter().cloned());
        for (k, v) in env {
            vars.retain(|(name, _)| name != k);
            vars.push(((*k).into(), v.clone()));
        }
        let mut server = Self::spawn_logged(&bench.server_bin, &["serve"], &vars, log).await?;
        server.pg_url = bench.pg_url.clone();
        server.database_url = vars
            .iter()
            .find(|(k, _)| k == "DATABASE_URL")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        server.database = database;
        Ok(server)
    }

    /// Starts `bin args…` and waits for its `listening … addr=HOST:PORT` log line.
    pub async fn spawn(
        bin: &Path,
        args: &[&str],
        vars: &[(String, String)],
    ) -> BenchResult<Server> {
        Self::spawn_logged(bin, args, vars, None).await
    }

    /// [`Server::spawn`], appending the log lines that follow `listening` to `log`.
    async fn spawn_logged(
        bin: &Path,
        args: &[&str],
        vars: &[(String, String)],
        log: Option<&Path>,
    ) -> BenchResult<Server> {
        let mut log_file = match log {
            Some(path) => Some(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            None => None,
        };
        let mut child = Command::new(bin)
            .args(args)
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let pid = child.id().ok_or("server exited at once")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut tx = Some(tx);
            let mut log = String::new();
            let mut metrics_addr = None;
            let value_of = |line: &str, key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_owned)
            };
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(tx) = tx.take_if(|_| line.contains("listening")) {
                    let addr = value_of(&line, "addr=").unwrap_or_default();
                    let _ = tx.send(Ok((addr, metrics_addr.take())));
                } else if tx.is_some() {
                    if metrics_addr.is_none() {
                        metrics_addr = value_of(&line, "metrics_addr=");
                    }
                    log.push_str(&line);
                    log.push('\n');
                } else if let Some(file) = log_file.as_mut() {
                    let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(Err(log));
            }
        });
        let (addr, metrics_addr) = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(Ok((addr, metrics)))) if !addr.is_empty() => (addr, metrics),
            Ok(Ok(Err(log))) => return Err(format!("server did not start:\n{log}").into()),
            _ => return Err("server did not report its address within 60 s".into()),
        };
        Ok(Server {
            child,
            addr,
            pid,
            schema: None,
            pg_url: String::new(),
            mysql_db: None,
            database_url: String::new(),
            database: Vec::new(),
            metrics_addr,
        })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_number(self.pid, "VmRSS:")
    }

    /// Threads now (`Threads:` of /proc/PID/status).
    pub fn threads(&self) -> u64 {
        status_number(self.pid, "Threads:")
    }

    /// Open file descriptors now: the entries of /proc/PID/fd (sockets, database files, blobs
    /// being written, the epoll and event fds of the runtime).
    pub fn open_fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|dir| dir.count() as u64)
            .unwrap_or(0)
    }

    /// Peak resident memory since start or the last [`Server::reset_peak`], in KiB.
    pub fn peak_kib(&self) -> u64 {
        status_number(self.pid, "VmHWM:")
    }

    /// Resets the peak RSS (`/proc/PID/clear_refs` = 5); false where the kernel refuses.
    pub fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// CPU time used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.pid)
    }

    /// SIGKILL and drop the PostgreSQL schema or the MySQL database.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        if let Some(schema) = self.schema.take() {
            if let Ok(pool) = sqlx::PgPool::connect(&self.pg_url).await {
                let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                    .execute(&pool)
                    .await;
                pool.close().await;
            }
        }
        if let Some((db, url)) = self.mysql_db.take() {
            if let Ok(pool) = sqlx::MySqlPool::connect(&url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
                    .execute(&pool)
                    .await;
                pool.close().await;
            }
        }
    }

    /// The PostgreSQL schema of this server, if any.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }
}

/// The number after `key` in /proc/PID/status (KiB for the `Vm*` keys; a trailing `kB` is
/// dropped), 0 when unreadable.
fn status_number(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `/proc/PID/stat` counts CPU time in USER_HZ ticks, 100 per second on every Linux ABI we run on.
fn clock_ticks() -> f64 {
    100.0
}

/// CPU time spent so far by each part of a run, from /proc: the server(s) under test, this
/// load generator, PostgreSQL's processes (every process on the host named `postgres`, with
/// the time of the ones that exited counted through their parent's reaped-children time), the
/// MySQL / MariaDB server (`mariadbd` or `mysqld`: one process, a thread per connection),
/// `nats-server` (scenario 7's bus), and the whole machine.
#[derive(Clone)]
pub struct CpuSnapshot {
    /// Seconds of each server under test, in the order of the pids given to
    /// [`CpuSnapshot::take`].
    servers: Vec<f64>,
    generator: f64,
    postgres: f64,
    mysql: f64,
    nats: f64,
    /// Seconds the machine's cores were busy (user, system, interrupts, steal), summed.
    busy: f64,
    /// Seconds the machine's cores existed (busy + idle + I/O wait), summed.
    total: f64,
}

impl CpuSnapshot {
    /// Reads every counter now; `server_pids` are the servers under test (one, or the nodes
    /// of a cluster).
    pub fn take(server_pids: &[u32]) -> CpuSnapshot {
        let stats: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .collect();
        let named = |names: &[&str]| -> f64 {
            stats
                .iter()
                .filter(|stat| names.iter().any(|n| stat.contains(&format!(" ({n}) "))))
                .map(|stat| stat_seconds(stat) + reaped_seconds(stat))
                .sum()
        };
        let postgres = named(&["postgres"]);
        let mysql = named(&["mariadbd", "mysqld"]);
        let nats = named(&["nats-server"]);
        let (busy, total) =
            machine_seconds(&std::fs::read_to_string("/proc/stat").unwrap_or_default());
        CpuSnapshot {
            servers: server_pids.iter().map(|&p| cpu_seconds_of(p)).collect(),
            generator: cpu_seconds_of("self"),
            postgres,
            mysql,
            nats,
            busy,
            total,
        }
    }

    /// What was spent from `self` to `later` for `ops` operations: microseconds of CPU per
    /// operation by the server(s) (`server_us` all of them, `servers_us` each), PostgreSQL,
    /// MySQL / MariaDB, NATS and the generator, and the share of the machine's cores that
    /// were busy (0-1).
    pub fn per_op(&self, later: &CpuSnapshot, ops: f64) -> serde_json::Value {
        let us = |a: f64, b: f64| (b - a).max(0.0) * 1e6 / ops.max(1.0);
        let servers: Vec<f64> = self
            .servers
            .iter()
            .zip(&later.servers)
            .map(|(&a, &b)| us(a, b))
            .collect();
        serde_json::json!({
            "server_us": servers.iter().sum::<f64>(),
            "servers_us": servers,
            "nats_us": us(self.nats, later.nats),
            "postgres_us": us(self.postgres, later.postgres),
            "mysql_us": us(self.mysql, later.mysql),
            "generator_us": us(self.generator, later.generator),
            // iowait may go backwards between reads, so the share is clamped.
            "machine_busy": ((later.busy - self.busy) / (later.total - self.total).max(1e-9))
                .clamp(0.0, 1.0),
        })
    }
}

/// User + system seconds from the text of a `/proc/PID/stat`.
fn stat_seconds(stat: &str) -> f64 {
    // Fields after the parenthesised command name: state is field 3; utime 14, stime 15.
    stat_ticks(stat, &[11, 12]) as f64 / clock_ticks()
}

/// User + system seconds of the exited children a `/proc/PID/stat` has reaped (cutime 16,
/// cstime 17).
fn reaped_seconds(stat: &str) -> f64 {
    stat_ticks(stat, &[13, 14]) as f64 / clock_ticks()
}

/// The sum of the fields at `indices`, counted after the command name of a `/proc/PID/stat`.
fn stat_ticks(stat: &str, indices: &[usize]) -> u64 {
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    indices
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// (busy, total) seconds of all cores from the text of `/proc/stat`. Busy is user, nice,
/// system, irq, softirq and steal (time the hypervisor gave to others counts as busy: the run
/// could not use it); total adds idle and iowait. Guest time is inside user already.
fn machine_seconds(proc_stat: &str) -> (f64, f64) {
    // cpu  user nice system idle iowait irq softirq steal …
    let t: Vec<f64> = proc_stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|v| v / clock_ticks())
        .collect();
    let at = |i: usize| t.get(i).copied().unwrap_or(0.0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, busy + at(3) + at(4))
}

/// User + system seconds so far of process `who`: a pid, or `"self"` for this process.
fn cpu_seconds_of(who: impl std::fmt::Display) -> f64 {
    stat_seconds(&std::fs::read_to_string(format!("/proc/{who}/stat")).unwrap_or_default())
}

/// Samples a server's RSS every 50 ms until dropped; `max()` is the highest seen.
pub struct RssSampler {
    max: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let max = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = max.clone();
        let task = tokio::spawn(async move {
            loop {
                m.fetch_max(
                    status_number(pid, "VmRSS:"),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssSampler { max, task }
    }

    /// The highest RSS seen, in KiB.
    pub fn max(&self) -> u64 {
        self.max.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// First line of `cmd args` (stdout, else stderr), or "unknown".
pub fn version_of(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A scratch file path under the bench directory.
pub fn scratch(bench: &Bench, name: &str) -> PathBuf {
    bench.dir.join(name)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::{cpu_seconds_of, machine_seconds, reaped_seconds, stat_seconds, CpuSnapshot};
    use std::time::{Duration, Instant};

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with ") " inside, as a thread may be named; utime 150, stime 50,
        // cutime 30, cstime 20 ticks.
        let stat = "4242 (odd) name) S 1 4242 4242 0 -1 4194560 10 0 0 0 150 50 30 20 20 0 3 0";
        assert_eq!(stat_seconds(stat), 2.0);
        assert_eq!(reaped_seconds(stat), 0.5);
        assert_eq!(stat_seconds(""), 0.0);
    }

    #[test]
    fn machine_time_splits_busy_from_idle() {
        // user nice system idle iowait irq softirq steal guest guest_nice, in ticks.
        let stat = "cpu  100 10 50 700 40 5 3 2 7 0\ncpu0 50 5 25 350 20 2 1 1 3 0\n";
        let (busy, total) = machine_seconds(stat);
        assert!((busy - 1.70).abs() < 1e-9, "{busy}");
        assert!((total - 9.10).abs() < 1e-9, "{total}");
    }

    #[test]
    fn a_snapshot_counts_this_process() {
        let me = std::process::id();
        let before = CpuSnapshot::take(&[me]);
        // Spin until this process has used 300 ms of CPU, however busy the machine is.
        let own = || cpu_seconds_of("self");
        let (start, t) = (own(), Instant::now());
        let mut x = 0u64;
        while own() - start < 0.3 && t.elapsed() < Duration::from_secs(30) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let spent = before.per_op(&CpuSnapshot::take(&[me]), 2.0);
        let server = spent["server_us"].as_f64().unwrap_or(0.0);
        // Half of at least 300 ms per "operation"; ticks are 10 ms.
        assert!(server >= 145_000.0, "{spent}");
        // The "server" here is this process, so the generator's count is the same process.
        assert!((spent["generator_us"].as_f64().unwrap_or(0.0) - server).abs() <= 30_000.0);
        let busy = spent["machine_busy"].as_f64().unwrap_or(-1.0);
        assert!(busy > 0.0 && busy <= 1.0, "{spent}");
    }
}

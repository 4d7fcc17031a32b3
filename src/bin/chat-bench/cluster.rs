//! Scenario 7, "cluster": two `chat-service serve` nodes on one database with `FANOUT=nats`,
//! over a `nats-server` of the run's own on a free port. In the same run, on the same two
//! nodes, each figure is measured on one node and across the two, and reported as a ratio:
//!
//! - send → delivery, open loop at [`LOAD`] of the full send rate: after a short unrecorded
//!   warm-up, senders and subscriber on node 1, then senders on node 1 and the subscriber on
//!   node 2 (scenario 2's code path);
//! - fan-out to `fanout_subscribers` subscribers of one channel: all on node 1, then half on
//!   each node, the senders on node 1 either way (scenario 3's code path).
//!
//! Each node serves `/metrics`; the bus and catch-up counters of each phase (events published
//! on and received from NATS, recovered by the head check, dropped, feeds that read back from
//! storage) go into the results, so a slow figure can be told apart: the NATS hop, a lost
//! event waiting for the check, or a feed catching up.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::proc::{version_of, Server};
use crate::scenarios::{closed_loop, connect_many, fanout_on, groups, make_groups, open_loop};
use crate::{say, Backend, Bench, BenchResult};

/// The open-loop load of the latency figures, as a fraction of the full send rate (the
/// issue's "50% of the single-node send rate").
pub const LOAD: f64 = 0.5;

/// Where the full send rate (sends/s) of the latency figures comes from.
#[derive(Debug, Clone, Copy)]
pub enum FullLoad {
    /// `--full-load`.
    Given(f64),
    /// Scenario 1's best closed-loop rate in this run (one node, `FANOUT=memory`).
    Scenario1(f64),
}

/// `FANOUT_CHECK_MS` of the nodes: the server's default, so a lost event costs what it would
/// in production (about twice this).
const CHECK_MS: u64 = 1000;

/// The counters read from each node's `/metrics` around each phase: the NATS bus, the head
/// check, and feeds that fell behind their hub queue and read back from storage.
const COUNTERS: [&str; 5] = [
    "chat_bus_published_total",
    "chat_bus_received_total",
    "chat_bus_recovered_total",
    "chat_bus_dropped_total",
    "chat_feed_catchups_total",
];

/// The `nats-server` binary: `configured` (`--nats-server` / CHAT_BENCH_NATS_SERVER), else
/// the one on PATH, else Debian's `/usr/sbin/nats-server`. Errors: it is not there.
pub fn nats_binary(configured: Option<&Path>) -> BenchResult<PathBuf> {
    let found = match configured {
        Some(p) => p.to_path_buf(),
        None => std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(|dir| Path::new(dir).join("nats-server"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server")),
    };
    if !found.is_file() {
        return Err(format!(
            "scenario 7 needs nats-server, and there is none at {} (install Debian's \
             nats-server, or name the binary with CHAT_BENCH_NATS_SERVER)",
            found.display()
        )
        .into());
    }
    Ok(found)
}

/// A `nats-server` of this run (core NATS, no JetStream), on 127.0.0.1 and a free port;
/// killed when dropped.
pub struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
}

impl NatsServer {
    /// Starts `bin` and waits (up to 10 s) until it accepts connections.
    pub async fn start(bin: &Path) -> BenchResult<NatsServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let t = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = child.try_wait()? {
                return Err(format!("{} exited at once ({status})", bin.display()).into());
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "{} did not listen on port {port} within 10 s",
                    bin.display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        })
    }

    /// SIGKILL.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Scenario 7 on `backend`: see the module's documentation. `full` is the full send rate when
/// this run knows one; otherwise it is measured here, closed loop on node 1 at the plan's
/// highest send concurrency. On SQLite (one node's file) the scenario is not run, and says so.
pub async fn cluster(
    bench: &Bench,
    backend: Backend,
    full: Option<FullLoad>,
) -> BenchResult<Value> {
    if backend == Backend::Sqlite {
        say("  not on SQLite: several nodes need a database server");
        return Ok(json!({
            "skipped": "SQLite is one node's file: FANOUT=nats needs PostgreSQL or MySQL / MariaDB"
        }));
    }
    let bin = nats_binary(bench.nats_server.as_deref())?;
    let nats = NatsServer::start(&bin).await?;
    let nodes = start_nodes(bench, backend, &nats.url).await;
    let out = match &nodes {
        Ok((one, two)) => measure(bench, one, two, full).await,
        Err(e) => Err(e.to_string().into()),
    };
    if let Ok((one, two)) = nodes {
        two.stop().await;
        one.stop().await;
    }
    nats.stop().await;
    let mut out = out?;
    out["nats_server"] = json!(version_of(&bin.display().to_string(), &["--version"]));
    Ok(out)
}

/// Node 1 on a fresh database, then node 2 on the same one; both with `FANOUT=nats` at `url`,
/// one shared `file://` directory (`STORAGE_SHARED`) and `/metrics` on a port of their own.
async fn start_nodes(bench: &Bench, backend: Backend, url: &str) -> BenchResult<(Server, Server)> {
    let storage = bench.dir.join(format!("cluster-blobs-{}", bench.next_id()));
    let env = [
        ("FANOUT", "nats".to_owned()),
        ("NATS_URL", url.to_owned()),
        ("STORAGE_URL", format!("file://{}", storage.display())),
        ("STORAGE_SHARED", "true".to_owned()),
        ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
        ("FANOUT_CHECK_MS", CHECK_MS.to_string()),
    ];
    let one = Server::start(bench, backend, &env).await?;
    match Server::start_beside(bench, &one, &env).await {
        Ok(two) => Ok((one, two)),
        Err(e) => {
            one.stop().await;
            Err(e)
        }
    }
}

/// The four measurements on running nodes, and their ratios.
async fn measure(
    bench: &Bench,
    one: &Server,
    two: &Server,
    full: Option<FullLoad>,
) -> BenchResult<Value> {
    let pids = [one.pid, two.pid];
    let (full_rate, source) = match full {
        Some(FullLoad::Given(r)) => (r, "--full-load".to_owned()),
        Some(FullLoad::Scenario1(r)) => (
            r,
            "scenario 1's best closed-loop rate in this run (one node, FANOUT=memory)".to_owned(),
        ),
        None => {
            let c = bench
                .plan
                .send_concurrency
                .iter()
                .copied()
                .max()
                .unwrap_or(16);
            let conns = connect_many(&one.url(), c.div_ceil(4)).await?;
            let alice = bench.token("alice");
            let channels =
                make_groups(&mut groups(&conns[0], &alice)?, 16, &["bob".into()]).await?;
            say("  full send rate: closed loop on node 1");
            let run = closed_loop(bench, one, &conns, &channels, c).await?;
            let rate = run["per_second"].as_f64().unwrap_or(0.0);
            (
                rate,
                format!("measured here: closed loop, {c} senders on node 1 (FANOUT=nats)"),
            )
        }
    };
    if full_rate <= 0.0 {
        return Err("scenario 7: no send rate to load the nodes with".into());
    }
    let rate = (full_rate * LOAD).max(1.0);
    let senders = connect_many(&one.url(), 8).await?;
    let on_one = connect_many(&one.url(), 1).await?;
    let on_two = connect_many(&two.url(), 1).await?;
    // Alice sends on node 1; bob listens on `listeners[node]` (0: node 1, 1: node 2).
    let (senders, pids, listeners) = (&senders[..], &pids[..], [&on_one[0], &on_two[0]]);
    let run = move |node: usize, label: &'static str, seconds: f64| async move {
        open_loop(bench, senders, listeners[node], rate, seconds, pids, label).await
    };

    // A short unrecorded run across both nodes first: in two of four trial runs without it,
    // the first measured phase on the fresh nodes and schema had a p99 2-5 times the
    // second's (38 against 20 ms, 169 against 32 ms), which the ratio would have charged to
    // the one-node figure.
    let seconds = bench.plan.open_loop_seconds;
    run(1, "warm-up", (seconds / 4.0).min(5.0)).await?;
    let before = counters(&[one, two]).await;
    let single = run(0, "one node", seconds).await?;
    let between = counters(&[one, two]).await;
    let cross = run(1, "across nodes", seconds).await?;
    let after = counters(&[one, two]).await;
    let latency_bus = [delta(&before, &between), delta(&between, &after)];

    say("  fan-out, every subscriber on node 1");
    let before = counters(&[one, two]).await;
    let fan_single = fanout_on(bench, &[one]).await?;
    let between = counters(&[one, two]).await;
    say("  fan-out, half the subscribers on each node");
    let fan_cross = fanout_on(bench, &[one, two]).await?;
    let after = counters(&[one, two]).await;
    let fanout_bus = [delta(&before, &between), delta(&between, &after)];

    let ratio = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    let ratios = json!({
        "delivery_p50": ratio(&cross["delivery"]["p50_ms"], &single["delivery"]["p50_ms"]),
        "delivery_p99": ratio(&cross["delivery"]["p99_ms"], &single["delivery"]["p99_ms"]),
        "delivery_max": ratio(&cross["delivery"]["max_ms"], &single["delivery"]["max_ms"]),
        "fanout_deliveries_per_second": ratio(
            &fan_cross["deliveries_per_second"],
            &fan_single["deliveries_per_second"]
        ),
    });
    say(&format!("  cross-node / one node: {ratios}"));
    Ok(json!({
        "nodes": 2,
        "fanout_check_ms": CHECK_MS,
        "full_per_second": full_rate,
        "full_from": source,
        "load": LOAD,
        "latency": {
            "single": with_bus(single, &latency_bus[0]),
            "cross": with_bus(cross, &latency_bus[1]),
        },
        "fanout": {
            "single": with_bus(fan_single, &fanout_bus[0]),
            "cross": with_bus(fan_cross, &fanout_bus[1]),
        },
        "ratios": ratios,
    }))
}

/// `run` with the bus counters of its phase under `bus`.
fn with_bus(mut run: Value, bus: &Value) -> Value {
    run["bus"] = bus.clone();
    run
}

/// [`COUNTERS`] of each node now (node order as given): `[{name: value}]`; a node without a
/// metrics endpoint, or one that does not answer, gives an empty map.
async fn counters(nodes: &[&Server]) -> Vec<serde_json::Map<String, Value>> {
    let mut out = Vec::new();
    for node in nodes {
        let text = match &node.metrics_addr {
            Some(addr) => scrape(addr).await.unwrap_or_default(),
            None => String::new(),
        };
        out.push(
            COUNTERS
                .iter()
                .map(|&name| (name.to_owned(), json!(counter(&text, name))))
                .collect(),
        );
    }
    out
}

/// Each counter's growth from `a` to `b`, per node: `[{name: growth}]`.
fn delta(a: &[serde_json::Map<String, Value>], b: &[serde_json::Map<String, Value>]) -> Value {
    let nodes: Vec<Value> = a
        .iter()
        .zip(b)
        .map(|(a, b)| {
            let m: serde_json::Map<String, Value> = COUNTERS
                .iter()
                .map(|&name| {
                    let v = |m: &serde_json::Map<String, Value>| m[name].as_f64().unwrap_or(0.0);
                    (name.to_owned(), json!(v(b) - v(a)))
                })
                .collect();
            Value::Object(m)
        })
        .collect();
    Value::Array(nodes)
}

/// The sum of the samples of counter `name` (every label set) in Prometheus text `text`; 0
/// when absent.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// `GET /metrics` on `addr` (`HOST:PORT`), the whole response as text.
async fn scrape(addr: &str) -> BenchResult<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .map_err(|_| "metrics did not answer within 5 s")??;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::counter;

    #[test]
    fn counters_sum_their_label_sets_and_skip_longer_names() {
        let text = "# TYPE chat_bus_dropped_total counter\n\
                    chat_bus_dropped_total{reason=\"fault\"} 3\n\
                    chat_bus_dropped_total{reason=\"queue_full\"} 4\n\
                    chat_bus_received_total 10\n\
                    chat_bus_received_total_other 99\n";
        assert_eq!(counter(text, "chat_bus_dropped_total"), 7.0);
        assert_eq!(counter(text, "chat_bus_received_total"), 10.0);
        assert_eq!(counter(text, "chat_bus_recovered_total"), 0.0);
    }
}

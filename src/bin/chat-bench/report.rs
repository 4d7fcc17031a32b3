//! The machine description and the markdown report.

use serde_json::{json, Value};

use crate::proc::version_of;
use crate::Bench;

/// Cores, memory, CPU, kernel and versions, read off this machine.
pub async fn machine(bench: &Bench) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let postgres = match sqlx::PgPool::connect(&bench.pg_url).await {
        Ok(pool) => {
            let v: Result<String, _> = sqlx::query_scalar("SHOW server_version")
                .fetch_one(&pool)
                .await;
            pool.close().await;
            v.unwrap_or_else(|e| e.to_string())
        }
        Err(e) => format!("unreachable: {e}"),
    };
    let mysql = match bench.mysql_admin().await {
        Ok(pool) => {
            let v: Result<String, _> = sqlx::query_scalar("SELECT VERSION()")
                .fetch_one(&pool)
                .await;
            pool.close().await;
            v.unwrap_or_else(|e| e.to_string())
        }
        Err(e) => format!("unreachable: {e}"),
    };
    let sqlite = match sqlx::SqlitePool::connect("sqlite::memory:").await {
        Ok(pool) => sqlx::query_scalar::<_, String>("SELECT sqlite_version()")
            .fetch_one(&pool)
            .await
            .unwrap_or_default(),
        Err(_) => "unknown".into(),
    };
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rustc": version_of("rustc", &["--version"]),
        "postgresql": postgres,
        "mysql": mysql,
        "sqlite": sqlite,
        "pgbench": version_of("pgbench", &["--version"]),
        "chat_service": env!("CARGO_PKG_VERSION"),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "quick": bench.quick,
        "date_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "load_generator": "chat-bench on the same machine, over loopback",
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn ok(pass: bool) -> &'static str {
    if pass {
        "✅"
    } else {
        "❌"
    }
}

/// The heading of [`cpu_cell`]'s column on `backend` (a report name: "SQLite",
/// "PostgreSQL", "MySQL").
fn cpu_column(backend: &str) -> String {
    format!(
        "CPU µs per send: server · {} · generator (machine busy)",
        db_process(backend).1
    )
}

/// The key of the database's CPU in a `CpuSnapshot::per_op` value, and its name in the
/// report: MySQL / MariaDB's server on `MySQL`, PostgreSQL's processes otherwise (on SQLite,
/// only their idle time: the database runs inside the server).
fn db_process(backend: &str) -> (&'static str, &'static str) {
    if backend == "MySQL" {
        ("mysql_us", "MariaDB/MySQL")
    } else {
        ("postgres_us", "PostgreSQL")
    }
}

/// "server · database · generator (busy%)" from a `CpuSnapshot::per_op` value: microseconds
/// of CPU per send and the share of the machine's cores that were busy.
fn cpu_cell(c: &Value, backend: &str) -> String {
    format!(
        "{:.0} · {:.0} · {:.0} ({:.0}%)",
        f(&c["server_us"]),
        f(&c[db_process(backend).0]),
        f(&c["generator_us"]),
        f(&c["machine_busy"]) * 100.0
    )
}

/// Throughput of the run at `c` in `runs`.
fn rate_at(runs: &Value, c: u64) -> f64 {
    runs.as_array()
        .and_then(|rs| rs.iter().find(|r| r["concurrency"].as_u64() == Some(c)))
        .map(|r| f(&r["per_second"]))
        .unwrap_or(f64::NAN)
}

/// The report: machine, settings, baselines, then each backend's scenarios with ratios and
/// targets (✅ met, ❌ missed).
pub fn markdown(r: &Value) -> String {
    let m = &r["machine"];
    let mut out = String::new();
    let mut w = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    w("# chat-service benchmark results".into());
    w(String::new());
    w(format!(
        "Machine: {} cores ({}), {:.1} GiB RAM, Linux {}; {}; PostgreSQL {}, MySQL server {}, SQLite {}; \
         chat-service {} ({} build); load generator on the same machine over loopback.{}",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        f(&m["memory_gib"]),
        m["kernel"].as_str().unwrap_or("?"),
        m["rustc"].as_str().unwrap_or("?"),
        m["postgresql"].as_str().unwrap_or("?"),
        m["mysql"].as_str().unwrap_or("?"),
        m["sqlite"].as_str().unwrap_or("?"),
        m["chat_service"].as_str().unwrap_or("?"),
        m["build"].as_str().unwrap_or("?"),
        if m["quick"].as_bool() == Some(true) {
            " **Quick (smoke) run: tiny sizes, numbers mean nothing.**"
        } else {
            ""
        }
    ));
    w(format!(
        "Run took {:.0} s. Settings: `{}`",
        f(&r["elapsed_seconds"]),
        r["plan"]
    ));
    if let Some(e) = r["error"].as_str() {
        w(format!("\n**The run stopped early:** {e}"));
    }
    w(String::new());
    let b = &r["baselines"];
    w("## Baselines (same run)".into());
    w(String::new());
    w(format!(
        "- Disk, sequential write (`{}`): **{:.0} MB/s**",
        b["disk"]["tool"].as_str().unwrap_or(""),
        f(&b["disk"]["mb_per_second"])
    ));
    if let Some(runs) = b["echo"]["runs"].as_array() {
        for e in runs {
            w(format!("- Bare tonic server (health check, no database), {} callers: **{:.0} calls/s**, p50 {:.2} ms, p99 {:.2} ms",
                e["concurrency"], f(&e["per_second"]), f(&e["latency"]["p50_ms"]), f(&e["latency"]["p99_ms"])));
        }
    }
    w(String::new());
    let Some(backends) = r["backends"].as_object() else {
        return out;
    };
    for (name, s) in backends {
        w(format!("## {name}"));
        w(String::new());
        if s["sends"].is_object() {
            w(
                "### 1. Persisted sends/s (closed loop, 16 channels, one connection per 4 senders)"
                    .into(),
            );
            w(String::new());
            w(format!("| senders | sends/s | {name} single-row INSERT/s | ratio | ack p50 / p99 ms | peak RSS MiB | {} | target |", cpu_column(name)));
            w("|---|---|---|---|---|---|---|---|".into());
            for run in s["sends"]["runs"].as_array().into_iter().flatten() {
                let c = run["concurrency"].as_u64().unwrap_or(0);
                let base = rate_at(&s["insert_baseline"]["runs"], c);
                let ratio = f(&run["per_second"]) / base;
                let rss = f(&run["peak_rss_mib"]);
                w(format!("| {c} | {:.0} | {:.0} | **{:.2}×** | {:.2} / {:.2} | {:.1} | {} | {} ratio ≥ 1.0, {} RSS ≤ 75 MiB |",
                    f(&run["per_second"]), base, ratio, f(&run["ack"]["p50_ms"]), f(&run["ack"]["p99_ms"]), rss,
                    cpu_cell(&run["cpu_per_send"], name), ok(ratio >= 1.0), ok(rss <= 75.0)));
            }
            w(format!(
                "\nBaseline: {}. CPU: microseconds of CPU time per send used by the server, by \
                 the database (every PostgreSQL process, WAL writer included; on SQLite the \
                 database runs inside the server, and the column is PostgreSQL's idle processes; \
                 on MySQL the mariadbd / mysqld process) and by this load generator, read from \
                 /proc over the run; machine busy is the share of all cores in use.",
                s["insert_baseline"]["tool"].as_str().unwrap_or("")
            ));
            let base_cpu: Vec<String> = s["insert_baseline"]["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["cpu_per_insert"].is_object())
                .map(|r| {
                    let c = &r["cpu_per_insert"];
                    format!(
                        "{} connections {:.0} µs ({:.0}% busy)",
                        r["concurrency"],
                        f(&c[db_process(name).0]),
                        f(&c["machine_busy"]) * 100.0
                    )
                })
                .collect();
            if !base_cpu.is_empty() {
                w(format!(
                    "\nThe baseline's {} CPU per INSERT: {}.",
                    db_process(name).1,
                    base_cpu.join(", ")
                ));
            }
            if let Some(settings) = s["insert_baseline"]["server_settings"].as_str() {
                w(format!("\nDatabase server settings: `{settings}`."));
            }
            w(String::new());
        }
        if s["latency"].is_object() {
            w(format!(
                "### 2. Latency at fixed load (open loop, % of {:.0} sends/s)",
                f(&s["latency"]["best_per_second"])
            ));
            w(String::new());
            w(format!("| load | sends/s | ack p50 / p99 / p99.9 ms | send → delivery p50 / p99 / p99.9 ms | generator lag p50 / p99 ms | {} | target (50%: delivery p99 ≤ 5 ms) |", cpu_column(name)));
            w("|---|---|---|---|---|---|---|".into());
            for l in s["latency"]["levels"].as_array().into_iter().flatten() {
                let lvl = f(&l["level"]);
                let d99 = f(&l["delivery"]["p99_ms"]);
                w(format!(
                    "| {:.0}% | {:.0} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} | {} | {} |",
                    lvl * 100.0,
                    f(&l["achieved_per_second"]),
                    f(&l["ack"]["p50_ms"]),
                    f(&l["ack"]["p99_ms"]),
                    f(&l["ack"]["p999_ms"]),
                    f(&l["delivery"]["p50_ms"]),
                    d99,
                    f(&l["delivery"]["p999_ms"]),
                    f(&l["generator_lag"]["p50_ms"]),
                    f(&l["generator_lag"]["p99_ms"]),
                    cpu_cell(&l["cpu_per_send"], name),
                    if (lvl - 0.5).abs() < 1e-9 {
                        ok(d99 <= 5.0)
                    } else {
                        "–"
                    }
                ));
            }
            w(String::new());
        }
        if s["fanout"].is_object() {
            let x = &s["fanout"];
            let rate = f(&x["deliveries_per_second"]);
            let complete = x["subscribers_missing_events"].as_u64() == Some(0)
                && x["subscribers_with_gaps"].as_u64() == Some(0);
            w("### 3. Fan-out".into());
            w(String::new());
            w(format!("{} subscribers of one channel over {} connections, {} messages of ~100 bytes: **{:.0} deliveries/s**, \
                delivery p50 {:.2} ms, p99 {:.2} ms; every subscriber got every event in order: {}. \
                Server CPU {:.1} s, peak RSS {:.1} MiB. Target ≥ 250,000/s with nothing missed: {}",
                x["subscribers"], x["connections"], x["messages"], rate, f(&x["delivery"]["p50_ms"]), f(&x["delivery"]["p99_ms"]),
                if complete { "yes" } else { "**no**" }, f(&x["server_cpu_seconds"]), f(&x["peak_rss_mib"]), ok(rate >= 250_000.0 && complete)));
            w(String::new());
        }
        if s["idle"].is_object() {
            let x = &s["idle"];
            let kib = f(&x["kib_per_stream"]);
            let cpu = f(&x["idle_cpu_percent"]);
            w("### 4. Idle streams".into());
            w(String::new());
            w(format!("{} open Subscribe streams over {} connections (heartbeat every {} s): RSS {:.1} → {:.1} MiB = **{:.1} KiB per stream** \
                (target ≤ 16 KiB {}), idle CPU **{:.2}%** (target < 2% {})",
                x["streams"], x["connections"], x["heartbeat_seconds"], f(&x["rss_before_mib"]), f(&x["rss_after_mib"]), kib, ok(kib <= 16.0), cpu, ok(cpu < 2.0)));
            w(String::new());
        }
        if s["history"].is_object() {
            let x = &s["history"];
            w(format!(
                "### 5. History: ListMessages, pages of 50, channel of {} messages",
                x["messages"]
            ));
            w(String::new());
            w("| page | p50 ms | p99 ms | target p99 ≤ 2 ms |".into());
            w("|---|---|---|---|".into());
            for pos in ["first", "middle", "last"] {
                let p = &x["single_reader"][pos];
                w(format!(
                    "| {pos} | {:.2} | {:.2} | {} |",
                    f(&p["p50_ms"]),
                    f(&p["p99_ms"]),
                    ok(f(&p["p99_ms"]) <= 2.0)
                ));
            }
            let rate = f(&x["pages_per_second"]);
            w(format!("\n{} concurrent readers: **{:.0} pages/s**, p99 {:.2} ms (target ≥ 10,000 pages/s {})",
                x["readers"], rate, f(&x["concurrent"]["p99_ms"]), ok(rate >= 10_000.0)));
            w(String::new());
        }
        if s["upload"].is_object() {
            let x = &s["upload"];
            // dd measured beside the upload, in the same rounds (older results: the baseline).
            let disk = if x["disk_mb_per_second"].is_number() {
                f(&x["disk_mb_per_second"])
            } else {
                f(&b["disk"]["mb_per_second"])
            };
            let ratio = f(&x["mb_per_second"]) / disk;
            let growth = f(&x["peak_rss_growth_mib"]);
            w("### 6. Uploads".into());
            w(String::new());
            w(format!("{} MiB in 1 MiB frames: **{:.0} MB/s = {:.2}× dd's {:.0} MB/s** (best of {} rounds each, dd and upload alternating after a `sync`; target ≥ 0.8 {}), peak RSS growth **{:.1} MiB** (target < 64 MiB {}; {})",
                x["bytes"].as_u64().unwrap_or(0) >> 20, f(&x["mb_per_second"]), ratio, disk, x["rounds"].as_u64().unwrap_or(1), ok(ratio >= 0.8), growth, ok(growth < 64.0), x["peak_from"].as_str().unwrap_or("")));
            w(String::new());
        }
        if s["cluster"].is_object() {
            cluster_section(&mut w, &s["cluster"], name);
        }
    }
    out
}

/// Scenario 7's section: one node against two, each figure and the ratio.
fn cluster_section(w: &mut impl FnMut(String), x: &Value, backend: &str) {
    w("### 7. Cluster: two nodes over NATS".into());
    w(String::new());
    if let Some(why) = x["skipped"].as_str() {
        w(format!("Not run: {why}."));
        w(String::new());
        return;
    }
    let (one, two) = (&x["latency"]["single"], &x["latency"]["cross"]);
    let (fan1, fan2) = (&x["fanout"]["single"], &x["fanout"]["cross"]);
    let r = &x["ratios"];
    w(format!(
        "Two `chat-service serve` nodes on one {backend} database, `FANOUT=nats` ({}), \
         `FANOUT_CHECK_MS={}`. Latency: open loop at {:.0}% of {:.0} sends/s ({}) = **{:.0} sends/s**, \
         senders on node 1; the subscriber on node 1 (one node) or node 2 (across nodes). \
         Fan-out: {} subscribers of one channel, all on node 1 or half on each node, senders on \
         node 1.",
        x["nats_server"].as_str().unwrap_or("nats-server"),
        x["fanout_check_ms"],
        f(&x["load"]) * 100.0,
        f(&x["full_per_second"]),
        x["full_from"].as_str().unwrap_or(""),
        f(&one["target_per_second"]),
        fan1["subscribers"],
    ));
    w(String::new());
    w("| figure | one node | across nodes | across / one | target (across nodes) |".into());
    w("|---|---|---|---|---|".into());
    let p99 = f(&two["delivery"]["p99_ms"]);
    for (label, key, target) in [
        ("send → delivery p50 ms", "p50_ms", "–".to_owned()),
        (
            "send → delivery p99 ms",
            "p99_ms",
            format!("≤ 10 ms {}", ok(p99 <= 10.0)),
        ),
        ("send → delivery max ms", "max_ms", "–".to_owned()),
    ] {
        let ratio_key = format!("delivery_{}", key.trim_end_matches("_ms"));
        w(format!(
            "| {label} | {:.2} | {:.2} | **{:.2}×** | {target} |",
            f(&one["delivery"][key]),
            f(&two["delivery"][key]),
            f(&r[&ratio_key])
        ));
    }
    w(format!(
        "| ack p99 ms | {:.2} | {:.2} | – | – |",
        f(&one["ack"]["p99_ms"]),
        f(&two["ack"]["p99_ms"])
    ));
    let complete = |v: &Value| {
        v["subscribers_missing_events"].as_u64() == Some(0)
            && v["subscribers_with_gaps"].as_u64() == Some(0)
    };
    let rate2 = f(&fan2["deliveries_per_second"]);
    w(format!(
        "| fan-out deliveries/s | {:.0} | {:.0} | **{:.2}×** | ≥ 250,000 with nothing missed {} |",
        f(&fan1["deliveries_per_second"]),
        rate2,
        f(&r["fanout_deliveries_per_second"]),
        ok(rate2 >= 250_000.0 && complete(fan2) && complete(fan1))
    ));
    w(format!(
        "| fan-out delivery p50 / p99 ms | {:.2} / {:.2} | {:.2} / {:.2} | – | – |",
        f(&fan1["delivery"]["p50_ms"]),
        f(&fan1["delivery"]["p99_ms"]),
        f(&fan2["delivery"]["p50_ms"]),
        f(&fan2["delivery"]["p99_ms"])
    ));
    // "node 1 · node 2 · NATS · database · generator (busy%)", in µs of CPU per operation.
    let cpu = |c: &Value, digits: usize| {
        let us = |v: &Value| format!("{:.digits$}", f(v));
        format!(
            "{} · {} · {} · {} · {} ({:.0}%)",
            us(&c["servers_us"][0]),
            if c["servers_us"][1].is_number() {
                us(&c["servers_us"][1])
            } else {
                "–".to_owned()
            },
            us(&c["nats_us"]),
            us(&c[db_process(backend).0]),
            us(&c["generator_us"]),
            f(&c["machine_busy"]) * 100.0
        )
    };
    w(format!(
        "| CPU µs per send: node 1 · node 2 · NATS · {} · generator (machine busy) | {} | {} | – | – |",
        db_process(backend).1,
        cpu(&one["cpu_per_send"], 0),
        cpu(&two["cpu_per_send"], 0)
    ));
    w(format!(
        "| fan-out CPU µs per delivery: same columns | {} | {} | – | – |",
        cpu(&fan1["cpu_per_delivery"], 2),
        cpu(&fan2["cpu_per_delivery"], 2)
    ));
    w(String::new());
    let bus = |v: &Value| -> String {
        let nodes: Vec<String> = v["bus"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "node {}: published {:.0}, received {:.0}, recovered by the check {:.0}, dropped {:.0}, feed catch-ups {:.0}",
                    i + 1,
                    f(&n["chat_bus_published_total"]),
                    f(&n["chat_bus_received_total"]),
                    f(&n["chat_bus_recovered_total"]),
                    f(&n["chat_bus_dropped_total"]),
                    f(&n["chat_feed_catchups_total"])
                )
            })
            .collect();
        nodes.join("; ")
    };
    w(format!(
        "Bus counters (from each node's `/metrics`) during the cross-node latency run: {}. \
         During the spread fan-out: {}.",
        bus(two),
        bus(fan2)
    ));
    w(String::new());
}

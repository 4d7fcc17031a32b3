//! `chat-bench soak`: mixed load at a steady, moderate rate against one `chat-service serve`
//! for many minutes, to find leaks and drift rather than peak throughput.
//!
//! The load, all at once, each part paced by its own timer (open loop: a slow server does not
//! lower the offered rate):
//! - **sends**: many users in groups and direct channels, round-robin over the users so each
//!   sends `send_rate / users` per second, evenly spaced (per-user send limits are coming);
//! - **history**: ListMessages pages of 50, newest first, following `next_page_token`; each
//!   page is checked to continue below the one before;
//! - **feeds**: subscribers that come and go: each opens a connection and a Subscribe stream
//!   with the cursors it holds, reads for a while, drops both, stays away a moment and comes
//!   back. Every channel event must carry the sequence after the last one seen for its channel
//!   (across sessions, so replay from storage is checked too): anything else is a gap, an error;
//! - **uploads**: files of 1 KiB up to `max_file_bytes`, streamed (UploadAttachment) or
//!   resumable (CreateUpload / UploadChunk with one stale chunk retried, answered with the
//!   committed size, / CompleteUpload); some linked to a message and downloaded by another
//!   member, some downloaded in two parts (`offset`), every download compared byte for byte,
//!   then deleted; one in eight resumable uploads is abandoned for the server's sweep
//!   (`ATTACHMENT_UNLINKED_TTL=60` here, so sweeps run during the soak).
//!
//! Every interval (a minute by default) it writes a row: the server's RSS (VmRSS) and open fds
//! (/proc/PID/fd), threads, CPU, p50/p99 of sends and history pages in that interval, operation
//! counts and errors. `soak.csv` gets each row as it is taken (a run cut short keeps its table);
//! `soak.json` and `soak.md` come at the end with a summary of the curve after the warm-up.
//! `scripts/soak-plot.py` draws `soak.png` from the CSV. The run fails (exit 1) on any error or
//! gap, or when a kind of operation never happened.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_service::cli::{Bearer, ChatClient};
use chat_service::proto::attachment_service_client::AttachmentServiceClient;
use chat_service::proto::{self, download_attachment_response, upload_attachment_request};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::proc::Server;
use crate::scenarios::{chat, connect_many, groups, send_req};
use crate::{histogram, record, say, Backend, Bench, BenchResult, Plan, ServerArgs};

/// The highest per-user send rate the soak will offer. Per-user send limits are on their way
/// (about 20/s sustained); the soak stays well under them so it measures the service, not the
/// limiter.
const MAX_SENDS_PER_USER: f64 = 5.0;
/// Tokens are minted for 4 h (`Bench::token`); a longer run would see them expire.
const MAX_MINUTES: f64 = 230.0;
/// Requests of one kind in flight before the generator counts a tick as an error instead of
/// queueing more: a server that falls this far behind is not "steady" any more.
const MAX_SENDS_IN_FLIGHT: usize = 256;
const MAX_READS_IN_FLIGHT: usize = 64;
const MAX_UPLOADS_IN_FLIGHT: usize = 8;
/// Data frames and resumable chunks (the API allows up to 1 MiB).
const CHUNK: usize = 256 << 10;
/// HTTP/2 connections shared by senders, history readers and uploads (subscribers open
/// their own, one per session).
const CONNECTIONS: usize = 8;
/// Error messages printed; the rest are only counted.
const SHOWN_ERRORS: u64 = 20;

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// A 20-second smoke run at a small load (CI): sets every size below that is not given.
    #[arg(long)]
    quick: bool,
    /// Length of the run in minutes [default: 30].
    #[arg(long, conflicts_with = "seconds")]
    minutes: Option<f64>,
    /// Length of the run in seconds, instead of --minutes [--quick: 20].
    #[arg(long)]
    seconds: Option<f64>,
    /// Seconds between two rows of the table [default: 60; --quick: 5].
    #[arg(long)]
    interval_seconds: Option<f64>,
    /// Minutes at the start that the flatness summary leaves out [default: 5; --quick: the
    /// first interval].
    #[arg(long)]
    warmup_minutes: Option<f64>,
    /// Database of the server.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Users [default: 200; --quick: 40].
    #[arg(long)]
    users: Option<usize>,
    /// Groups; each user is in two of them and in one direct channel [default: 10; --quick: 4].
    #[arg(long)]
    groups: Option<usize>,
    /// Sends per second over all users, each user `send_rate / users` (at most 5/s)
    /// [default: 200; --quick: 40].
    #[arg(long)]
    send_rate: Option<f64>,
    /// History reads per second, each up to --history-pages pages of 50 [default: 10;
    /// --quick: 4].
    #[arg(long)]
    history_rate: Option<f64>,
    /// Pages followed by one history read (with `next_page_token`) [default: 3].
    #[arg(long)]
    history_pages: Option<usize>,
    /// Subscribers, each a user whose feed comes and goes [default: 50; --quick: 8].
    #[arg(long)]
    subscribers: Option<usize>,
    /// Longest feed session in seconds; each lasts a third of this to this, then the
    /// subscriber stays away 0.2-2 s [default: 30; --quick: 4].
    #[arg(long)]
    session_seconds: Option<f64>,
    /// Uploads started per second [default: 0.5; --quick: 1].
    #[arg(long)]
    upload_rate: Option<f64>,
    /// Largest file in bytes; sizes spread log-uniformly from 1 KiB [default: 2 MiB;
    /// --quick: 256 KiB].
    #[arg(long)]
    max_file_bytes: Option<u64>,
    /// A variable for the server, KEY=VALUE (repeatable): per-user limits, say, once the
    /// server has them.
    #[arg(long = "server-env", value_parser = parse_env)]
    server_env: Vec<(String, String)>,
    #[command(flatten)]
    server: ServerArgs,
    /// Where soak.csv, soak.json, soak.md and server.log go.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// The sizes of one soak, resolved from the arguments.
#[derive(Debug, Clone, serde::Serialize)]
struct SoakPlan {
    backend: Backend,
    seconds: f64,
    interval_seconds: f64,
    warmup_seconds: f64,
    users: usize,
    groups: usize,
    send_rate: f64,
    sends_per_user_per_second: f64,
    history_rate: f64,
    history_pages: usize,
    subscribers: usize,
    session_seconds: f64,
    upload_rate: f64,
    max_file_bytes: u64,
    server_env: Vec<(String, String)>,
}

impl SoakPlan {
    fn from_args(a: &SoakArgs) -> BenchResult<SoakPlan> {
        let q = a.quick;
        let seconds = match (a.seconds, a.minutes) {
            (Some(s), _) => s,
            (None, Some(m)) => m * 60.0,
            (None, None) if q => 20.0,
            (None, None) => 30.0 * 60.0,
        };
        let interval = a.interval_seconds.unwrap_or(if q { 5.0 } else { 60.0 });
        let users = a.users.unwrap_or(if q { 40 } else { 200 });
        let send_rate = a.send_rate.unwrap_or(if q { 40.0 } else { 200.0 });
        let plan = SoakPlan {
            backend: a.backend,
            seconds,
            interval_seconds: interval,
            warmup_seconds: a.warmup_minutes.map(|m| m * 60.0).unwrap_or(if q {
                interval
            } else {
                300.0
            }),
            users,
            groups: a.groups.unwrap_or(if q { 4 } else { 10 }),
            send_rate,
            sends_per_user_per_second: send_rate / users.max(1) as f64,
            history_rate: a.history_rate.unwrap_or(if q { 4.0 } else { 10.0 }),
            history_pages: a.history_pages.unwrap_or(3),
            subscribers: a.subscribers.unwrap_or(if q { 8 } else { 50 }),
            session_seconds: a.session_seconds.unwrap_or(if q { 4.0 } else { 30.0 }),
            upload_rate: a.upload_rate.unwrap_or(if q { 1.0 } else { 0.5 }),
            max_file_bytes: a
                .max_file_bytes
                .unwrap_or(if q { 256 << 10 } else { 2 << 20 }),
            server_env: a.server_env.clone(),
        };
        let checks: [(bool, String); 9] = [
            (
                plan.seconds > 0.0 && plan.seconds <= MAX_MINUTES * 60.0,
                format!("the run lasts more than 0 and at most {MAX_MINUTES} minutes (tokens last 4 h)"),
            ),
            (plan.interval_seconds >= 1.0, "--interval-seconds is at least 1".into()),
            (plan.groups >= 2, "--groups is at least 2 (each user is in two)".into()),
            (plan.users >= 2 * plan.groups, "--users is at least twice --groups".into()),
            (
                plan.subscribers <= plan.users,
                "--subscribers is at most --users (one feed per user)".into(),
            ),
            (
                plan.send_rate > 0.0 && plan.history_rate > 0.0 && plan.upload_rate > 0.0,
                "every rate is above 0".into(),
            ),
            (
                plan.sends_per_user_per_second <= MAX_SENDS_PER_USER,
                format!(
                    "{:.1} sends/s per user is over {MAX_SENDS_PER_USER}: add --users (per-user send limits are ~20/s)",
                    plan.sends_per_user_per_second
                ),
            ),
            (plan.session_seconds >= 1.0, "--session-seconds is at least 1".into()),
            (plan.max_file_bytes >= 1024, "--max-file-bytes is at least 1024".into()),
        ];
        if let Some((_, why)) = checks.into_iter().find(|(ok, _)| !ok) {
            return Err(why.into());
        }
        Ok(plan)
    }
}

/// Operation and error counts since the last row (the sampler takes them with `swap(0)`).
#[derive(Default)]
struct Counters {
    sends: AtomicU64,
    pages: AtomicU64,
    /// Subscribe streams opened.
    sessions: AtomicU64,
    /// Channel events received (heartbeats and read markers, which carry no sequence, left out).
    events: AtomicU64,
    /// Uploads completed (streamed or resumable).
    uploads: AtomicU64,
    /// Stale chunks answered with the committed size, and downloads resumed by offset.
    resumed: AtomicU64,
    /// Resumable uploads left unfinished on purpose, for the sweep.
    abandoned: AtomicU64,
    /// Downloads read to the end and compared byte for byte.
    downloads: AtomicU64,
    /// A channel event whose sequence was not the one after the last seen for its channel.
    gaps: AtomicU64,
    send_errors: AtomicU64,
    history_errors: AtomicU64,
    feed_errors: AtomicU64,
    upload_errors: AtomicU64,
}

/// What the load tasks share with the sampler.
struct Shared {
    counts: Counters,
    /// Latencies of this interval, in µs; the sampler swaps them for empty ones. A std mutex:
    /// it is held for one `record` (never across an await), a few hundred times a second.
    send_us: Mutex<Histogram<u64>>,
    page_us: Mutex<Histogram<u64>>,
    /// Errors printed so far: the first [`SHOWN_ERRORS`] say what went wrong, the rest are
    /// only counted, so a failing server cannot flood the terminal.
    shown: AtomicU64,
    /// Set once: every load task winds down.
    stop: watch::Receiver<bool>,
}

impl Shared {
    /// Counts an error in `counter` and prints it while few have been.
    fn fail(&self, counter: &AtomicU64, what: impl std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        if self.shown.fetch_add(1, Ordering::Relaxed) < SHOWN_ERRORS {
            say(&format!("  error: {what}"));
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits until the run stops.
    async fn until_stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// Sleeps `d`, or less if the run stops first; false if it stopped.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.stopped(),
            _ = self.until_stopped() => false,
        }
    }
}

fn lock(h: &Mutex<Histogram<u64>>) -> std::sync::MutexGuard<'_, Histogram<u64>> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

fn take(h: &Mutex<Histogram<u64>>) -> Histogram<u64> {
    std::mem::replace(&mut *lock(h), histogram())
}

/// One user of the soak.
struct User {
    id: String,
    token: String,
    conn: Channel,
    chat: ChatClient,
    /// Two groups, then the direct channel (if the user has a partner).
    channels: Vec<String>,
    /// Another member of `channels[0]`: downloads what this user linked there.
    peer: usize,
}

impl User {
    fn files(&self) -> BenchResult<AttachmentServiceClient<InterceptedService<Channel, Bearer>>> {
        Ok(
            AttachmentServiceClient::with_interceptor(self.conn.clone(), Bearer::new(&self.token)?)
                .max_encoding_message_size(2 * CHUNK),
        )
    }
}

pub async fn run(args: SoakArgs) -> BenchResult<()> {
    let plan = SoakPlan::from_args(&args)?;
    std::fs::create_dir_all(&args.out)?;
    let scratch = args.out.join("scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    // The soak uses none of the scenarios' sizes; `Bench` brings the server, secret and tokens.
    let bench = args.server.bench(Plan::quick(), args.quick, &scratch)?;
    let log = args.out.join("server.log");
    let _ = std::fs::remove_file(&log);
    let limits = chat_service::limits::LimitSettings::default();
    let mut env: Vec<(&str, String)> = vec![
        // Unfinished uploads are swept after a minute, every 15 s: the sweep runs in the soak.
        ("ATTACHMENT_UNLINKED_TTL", "60".into()),
        // The service's own per-user limits, which the benchmark's scenarios switch off: the
        // soak runs as a deployment would, and its users stay under them.
        (
            "RATE_LIMIT_SENDS_PER_SECOND",
            limits.sends_per_second.to_string(),
        ),
        (
            "RATE_LIMIT_WRITES_PER_SECOND",
            limits.writes_per_second.to_string(),
        ),
        ("MAX_FEEDS_PER_USER", limits.feeds_per_user.to_string()),
        (
            "MAX_UNFINISHED_UPLOADS_PER_USER",
            limits.unfinished_uploads.to_string(),
        ),
    ];
    for (k, v) in &plan.server_env {
        env.retain(|(name, _)| name != k);
        env.push((k.as_str(), v.clone()));
    }
    say(&format!(
        "soak on {}: {:.0} s, a row every {:.0} s; {} users in {} groups, {:.0} sends/s ({:.2}/s per user), {:.0} history reads/s, {} subscribers, {} uploads/s",
        plan.backend.name(),
        plan.seconds,
        plan.interval_seconds,
        plan.users,
        plan.groups,
        plan.send_rate,
        plan.sends_per_user_per_second,
        plan.history_rate,
        plan.subscribers,
        plan.upload_rate,
    ));
    let server = Server::start_logged(&bench, plan.backend, &env, Some(&log)).await?;
    let outcome = soak(&bench, &plan, &server, &args.out).await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&scratch);
    outcome
}

/// Sets up users, groups and direct channels; the users.
async fn setup(bench: &Bench, plan: &SoakPlan, server: &Server) -> BenchResult<Vec<User>> {
    let conns = connect_many(&server.url(), CONNECTIONS).await?;
    let n = plan.users;
    let ids: Vec<String> = (0..n).map(|i| format!("soak-{i:04}")).collect();
    // User i is in groups i % G and i % G + 1 (mod G).
    let g = plan.groups;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); g];
    for i in 0..n {
        members[i % g].push(i);
        members[(i + 1) % g].push(i);
    }
    let mut group_ids = Vec::with_capacity(g);
    for (k, list) in members.iter().enumerate() {
        let owner = &ids[list[0]];
        let channel = groups(&conns[k % CONNECTIONS], &bench.token(owner))?
            .create_group(proto::CreateGroupRequest {
                name: format!("soak {k}"),
                member_ids: list[1..].iter().map(|&i| ids[i].clone()).collect(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .channel
            .ok_or("no channel")?;
        group_ids.push(channel.id);
    }
    let mut users = Vec::with_capacity(n);
    for (i, id) in ids.iter().enumerate() {
        let token = bench.token(id);
        let conn = conns[i % CONNECTIONS].clone();
        let first = &members[i % g];
        let at = first.iter().position(|&m| m == i).unwrap_or(0);
        users.push(User {
            id: id.clone(),
            chat: chat(&conn, &token)?,
            token,
            conn,
            channels: vec![group_ids[i % g].clone(), group_ids[(i + 1) % g].clone()],
            peer: first[(at + 1) % first.len()],
        });
    }
    // Direct channels: user i and user i + n/2, made by a first message.
    for i in 0..n / 2 {
        let partner = i + n / 2;
        let channel = users[i]
            .chat
            .clone()
            .send_message(proto::SendMessageRequest {
                recipient_id: users[partner].id.clone(),
                body: "hello".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .message
            .ok_or("no message")?
            .channel_id;
        users[i].channels.push(channel.clone());
        users[partner].channels.push(channel);
    }
    Ok(users)
}

async fn soak(bench: &Bench, plan: &SoakPlan, server: &Server, out: &Path) -> BenchResult<()> {
    let users = Arc::new(setup(bench, plan, server).await?);
    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        counts: Counters::default(),
        send_us: Mutex::new(histogram()),
        page_us: Mutex::new(histogram()),
        shown: AtomicU64::new(0),
        stop,
    });
    let csv_path = out.join("soak.csv");
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&csv_path)?);
    let mut rows: Vec<Vec<(&'static str, f64)>> = Vec::new();
    let mut sampler = Sampler::new(server);
    let first = sampler.row(&shared);
    write_csv(&mut csv, &first, true)?;
    rows.push(first);

    let mut load = JoinSet::new();
    load.spawn(senders(shared.clone(), users.clone(), plan.send_rate));
    load.spawn(readers(shared.clone(), users.clone(), plan.clone()));
    load.spawn(uploads(shared.clone(), users.clone(), plan.clone()));
    for s in 0..plan.subscribers {
        // Subscribers spread over the users.
        let user = s * plan.users / plan.subscribers;
        load.spawn(subscriber(
            shared.clone(),
            bench.token(&users[user].id),
            users[user].channels.clone(),
            server.url(),
            plan.session_seconds,
        ));
    }
    let total = Duration::from_secs_f64(plan.seconds);
    let every = Duration::from_secs_f64(plan.interval_seconds);
    let start = sampler.start;
    let mut due = every.min(total);
    loop {
        tokio::time::sleep_until((start + due).into()).await;
        let mut row = sampler.row(&shared);
        let last = due >= total;
        if last {
            // The last row's /proc readings are taken under load, like every other row's;
            // then the load stops, and what finishes while it winds down (and any error it
            // meets) is counted in that row too.
            let _ = stop_tx.send(true);
            let drained = tokio::time::timeout(Duration::from_secs(60), async {
                while load.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                shared.fail(
                    &shared.counts.feed_errors,
                    "the load did not wind down in 60 s",
                );
                load.abort_all();
            }
            let tail = sampler.row(&shared);
            for (k, v) in row.iter_mut() {
                if COUNTS.contains(k) {
                    *v += cell(&tail, k);
                }
            }
        }
        say(&progress(&row));
        write_csv(&mut csv, &row, false)?;
        rows.push(row);
        if last {
            break;
        }
        due = (due + every).min(total);
    }
    drop(csv);

    let summary = summarize(plan, &rows, &sampler);
    let json_path = out.join("soak.json");
    let columns: Vec<&str> = rows[0].iter().map(|(k, _)| *k).collect();
    let values: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().map(|(_, v)| *v).collect())
        .collect();
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({
            "plan": plan,
            "server": server.url(),
            "summary": summary,
            "columns": columns,
            "rows": values,
        }))?,
    )?;
    let md_path = out.join("soak.md");
    std::fs::write(&md_path, markdown(plan, &rows, &summary))?;
    say(&format!(
        "{}\nwrote {}, {} and {}",
        summary["verdict"].as_str().unwrap_or_default(),
        csv_path.display(),
        json_path.display(),
        md_path.display()
    ));
    let errors = summary["errors"].as_u64().unwrap_or(0);
    if errors > 0 {
        return Err(format!("{errors} errors in the soak (see the table)").into());
    }
    let missing: Vec<&str> = [
        "sends",
        "pages",
        "sessions",
        "events",
        "uploads",
        "resumed",
        "downloads",
    ]
    .into_iter()
    .filter(|k| summary["totals"][*k].as_u64().unwrap_or(0) == 0)
    .collect();
    if !missing.is_empty() {
        return Err(format!("nothing counted for: {}", missing.join(", ")).into());
    }
    Ok(())
}

/// Takes the rows: what /proc says of the server now, and the counts since the last row.
struct Sampler<'a> {
    server: &'a Server,
    start: Instant,
    last_at: Instant,
    last_cpu: f64,
    /// Every latency of the run, for the summary.
    send_total: Histogram<u64>,
    page_total: Histogram<u64>,
}

impl<'a> Sampler<'a> {
    fn new(server: &'a Server) -> Sampler<'a> {
        let now = Instant::now();
        Sampler {
            server,
            start: now,
            last_at: now,
            last_cpu: server.cpu_seconds(),
            send_total: histogram(),
            page_total: histogram(),
        }
    }

    fn row(&mut self, shared: &Shared) -> Vec<(&'static str, f64)> {
        let now = Instant::now();
        let cpu = self.server.cpu_seconds();
        let secs = now.duration_since(self.last_at).as_secs_f64();
        let cpu_percent = if secs > 0.0 {
            (cpu - self.last_cpu) / secs * 100.0
        } else {
            0.0
        };
        (self.last_at, self.last_cpu) = (now, cpu);
        let (send, page) = (take(&shared.send_us), take(&shared.page_us));
        let _ = self.send_total.add(&send);
        let _ = self.page_total.add(&page);
        let c = &shared.counts;
        let n = |a: &AtomicU64| a.swap(0, Ordering::Relaxed) as f64;
        let ms = |h: &Histogram<u64>, q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
        let (gaps, send_errors, history_errors, feed_errors, upload_errors) = (
            n(&c.gaps),
            n(&c.send_errors),
            n(&c.history_errors),
            n(&c.feed_errors),
            n(&c.upload_errors),
        );
        vec![
            (
                "minute",
                round3(now.duration_since(self.start).as_secs_f64() / 60.0),
            ),
            ("rss_mib", round3(self.server.rss_kib() as f64 / 1024.0)),
            ("fds", self.server.open_fds() as f64),
            ("threads", self.server.threads() as f64),
            ("cpu_percent", round3(cpu_percent)),
            ("sends", n(&c.sends)),
            ("send_p50_ms", ms(&send, 0.5)),
            ("send_p99_ms", ms(&send, 0.99)),
            ("send_max_ms", round3(send.max() as f64 / 1000.0)),
            ("pages", n(&c.pages)),
            ("page_p50_ms", ms(&page, 0.5)),
            ("page_p99_ms", ms(&page, 0.99)),
            ("sessions", n(&c.sessions)),
            ("events", n(&c.events)),
            ("uploads", n(&c.uploads)),
            ("resumed", n(&c.resumed)),
            ("abandoned", n(&c.abandoned)),
            ("downloads", n(&c.downloads)),
            ("gaps", gaps),
            ("send_errors", send_errors),
            ("history_errors", history_errors),
            ("feed_errors", feed_errors),
            ("upload_errors", upload_errors),
            (
                "errors",
                gaps + send_errors + history_errors + feed_errors + upload_errors,
            ),
        ]
    }
}

/// The columns that count operations and errors (the others are readings and latencies).
const COUNTS: [&str; 14] = [
    "sends",
    "pages",
    "sessions",
    "events",
    "uploads",
    "resumed",
    "abandoned",
    "downloads",
    "gaps",
    "send_errors",
    "history_errors",
    "feed_errors",
    "upload_errors",
    "errors",
];

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn cell(row: &[(&str, f64)], key: &str) -> f64 {
    row.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

fn write_csv(
    out: &mut impl Write,
    row: &[(&'static str, f64)],
    header: bool,
) -> std::io::Result<()> {
    if header {
        let names: Vec<&str> = row.iter().map(|(k, _)| *k).collect();
        writeln!(out, "{}", names.join(","))?;
    }
    let values: Vec<String> = row.iter().map(|(_, v)| v.to_string()).collect();
    writeln!(out, "{}", values.join(","))?;
    // Row by row: a run cut short keeps every row it took.
    out.flush()
}

fn progress(row: &[(&str, f64)]) -> String {
    let c = |k| cell(row, k);
    format!(
        "  min {:.2}: RSS {:.1} MiB, {} fds, CPU {:.0}%; {} sends (p99 {:.2} ms), {} pages (p99 {:.2} ms), {} feeds, {} events, {} uploads, {} downloads; errors {}",
        c("minute"),
        c("rss_mib"),
        c("fds"),
        c("cpu_percent"),
        c("sends"),
        c("send_p99_ms"),
        c("pages"),
        c("page_p99_ms"),
        c("sessions"),
        c("events"),
        c("uploads"),
        c("downloads"),
        c("errors"),
    )
}

/// Totals, and how RSS and fds moved after the warm-up: first and last, range, and the
/// least-squares slope of RSS in MiB per hour.
fn summarize(plan: &SoakPlan, rows: &[Vec<(&'static str, f64)>], sampler: &Sampler) -> Value {
    let warm = plan.warmup_seconds / 60.0;
    let mut after: Vec<&Vec<(&str, f64)>> =
        rows.iter().filter(|r| cell(r, "minute") >= warm).collect();
    if after.len() < 2 {
        after = rows.iter().rev().take(2).rev().collect();
    }
    let series = |k: &str| after.iter().map(|r| cell(r, k)).collect::<Vec<f64>>();
    let stats = |v: &[f64]| {
        json!({
            "first": v.first().copied().unwrap_or(0.0),
            "last": v.last().copied().unwrap_or(0.0),
            "min": v.iter().copied().fold(f64::INFINITY, f64::min),
            "max": v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    };
    let (minutes, rss, fds) = (series("minute"), series("rss_mib"), series("fds"));
    let slope = slope_per_hour(&minutes, &rss);
    let mut totals = serde_json::Map::new();
    for (k, _) in &rows[0] {
        if !COUNTS.contains(k) {
            continue;
        }
        let total: f64 = rows.iter().map(|r| cell(r, k)).sum();
        totals.insert((*k).into(), json!(total as u64));
    }
    let errors = totals["errors"].as_u64().unwrap_or(0);
    let p = |h: &Histogram<u64>, q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
    let verdict = format!(
        "after warm-up (minute {:.2} on, {} rows): RSS {:.1} -> {:.1} MiB (range {:.1}-{:.1}, slope {:+.1} MiB/h), fds {} -> {} (range {}-{}); whole run: {} sends (p50 {:.2} ms, p99 {:.2} ms), {} history pages (p50 {:.2} ms, p99 {:.2} ms), {} errors",
        minutes.first().copied().unwrap_or(0.0),
        after.len(),
        rss.first().copied().unwrap_or(0.0),
        rss.last().copied().unwrap_or(0.0),
        rss.iter().copied().fold(f64::INFINITY, f64::min),
        rss.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        slope,
        fds.first().copied().unwrap_or(0.0),
        fds.last().copied().unwrap_or(0.0),
        fds.iter().copied().fold(f64::INFINITY, f64::min),
        fds.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        sampler.send_total.len(),
        p(&sampler.send_total, 0.5),
        p(&sampler.send_total, 0.99),
        sampler.page_total.len(),
        p(&sampler.page_total, 0.5),
        p(&sampler.page_total, 0.99),
        errors,
    );
    json!({
        "after_warmup_from_minute": minutes.first().copied().unwrap_or(0.0),
        "rss_mib": stats(&rss),
        "rss_slope_mib_per_hour": round3(slope),
        "fds": stats(&fds),
        "send": crate::summary(&sampler.send_total),
        "page": crate::summary(&sampler.page_total),
        "totals": totals,
        "errors": errors,
        "verdict": verdict,
    })
}

/// Least-squares slope of `y` over `minutes`, per hour; 0 with fewer than two points.
fn slope_per_hour(minutes: &[f64], y: &[f64]) -> f64 {
    let n = minutes.len().min(y.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (minutes.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in minutes.iter().zip(y) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 60.0
    }
}

/// The table for BENCHMARKS.md.
fn markdown(plan: &SoakPlan, rows: &[Vec<(&'static str, f64)>], summary: &Value) -> String {
    let mut s = format!(
        "Soak on {}: {}, {} users in {} groups and {} direct channels, {:.0} sends/s ({:.2}/s per user), {:.0} history reads/s of up to {} pages, {} subscribers (sessions of {:.0}-{:.0} s), {} uploads/s of 1 KiB-{} KiB.\n\n",
        plan.backend.name(),
        if plan.seconds < 120.0 {
            format!("{:.0} s", plan.seconds)
        } else {
            format!("{:.0} min", plan.seconds / 60.0)
        },
        plan.users,
        plan.groups,
        plan.users / 2,
        plan.send_rate,
        plan.sends_per_user_per_second,
        plan.history_rate,
        plan.history_pages,
        plan.subscribers,
        plan.session_seconds / 3.0,
        plan.session_seconds,
        plan.upload_rate,
        plan.max_file_bytes >> 10,
    );
    s.push_str("| minute | RSS MiB | fds | threads | CPU % | sends | send p50 ms | send p99 ms | pages | page p50 ms | page p99 ms | feeds opened | events | uploads | downloads | errors |\n");
    s.push_str(
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let c = |k| cell(r, k);
        s.push_str(&format!(
            "| {:.2} | {:.1} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} |\n",
            c("minute"),
            c("rss_mib"),
            c("fds"),
            c("threads"),
            c("cpu_percent"),
            c("sends"),
            c("send_p50_ms"),
            c("send_p99_ms"),
            c("pages"),
            c("page_p50_ms"),
            c("page_p99_ms"),
            c("sessions"),
            c("events"),
            c("uploads"),
            c("downloads"),
            c("errors"),
        ));
    }
    s.push_str(&format!(
        "\n{}\n",
        summary["verdict"].as_str().unwrap_or_default()
    ));
    s
}

/// Runs `op(k)` for k = 0, 1, 2, … at `rate` per second until the run stops, each as a task of
/// its own (open loop: a slow answer does not delay the next tick), then waits for those in
/// flight. A tick that finds `max` still in flight is counted as an error in `errors` instead:
/// a server that falls that far behind is no longer under steady load.
async fn open_loop<F>(
    shared: Arc<Shared>,
    rate: f64,
    max: usize,
    what: &'static str,
    errors: fn(&Counters) -> &AtomicU64,
    mut op: impl FnMut(u64) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let slots = Arc::new(Semaphore::new(max));
    let mut inflight = JoinSet::new();
    for k in 0.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.until_stopped() => break,
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.fail(
                errors(&shared.counts),
                format!("{max} {what} in flight: the server is not keeping up"),
            );
            continue;
        };
        let work = op(k);
        inflight.spawn(async move {
            work.await;
            drop(slot);
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// Sends: tick k is user k mod n's send to its next channel in turn.
async fn senders(shared: Arc<Shared>, users: Arc<Vec<User>>, rate: f64) {
    let n = users.len() as u64;
    let s = shared.clone();
    open_loop(
        s,
        rate,
        MAX_SENDS_IN_FLIGHT,
        "sends",
        |c| &c.send_errors,
        |k| {
            let user = &users[(k % n) as usize];
            let channel = user.channels[(k / n) as usize % user.channels.len()].clone();
            let (mut client, shared) = (user.chat.clone(), shared.clone());
            async move {
                let t = Instant::now();
                let body = format!("soak {k}: {}", crate::baselines::BODY);
                match client.send_message(send_req(&channel, body)).await {
                    Ok(_) => {
                        record(&mut lock(&shared.send_us), t.elapsed());
                        shared.counts.sends.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => shared.fail(&shared.counts.send_errors, format!("send: {e}")),
                }
            }
        },
    )
    .await
}

/// History reads: a random user's random channel, newest page first, then older pages by
/// `next_page_token`.
async fn readers(shared: Arc<Shared>, users: Arc<Vec<User>>, plan: SoakPlan) {
    let s = shared.clone();
    let (rate, pages) = (plan.history_rate, plan.history_pages);
    open_loop(
        s,
        rate,
        MAX_READS_IN_FLIGHT,
        "history reads",
        |c| &c.history_errors,
        |_| {
            let user = &users[rand::random_range(0..users.len())];
            let channel = user.channels[rand::random_range(0..user.channels.len())].clone();
            let (client, shared) = (user.chat.clone(), shared.clone());
            async move {
                if let Err(e) = read_history(&shared, client, &channel, pages).await {
                    shared.fail(
                        &shared.counts.history_errors,
                        format!("history of {channel}: {e}"),
                    );
                }
            }
        },
    )
    .await
}

async fn read_history(
    shared: &Shared,
    mut client: ChatClient,
    channel: &str,
    pages: usize,
) -> BenchResult<()> {
    let mut token = String::new();
    let mut below = i64::MAX;
    for _ in 0..pages {
        let t = Instant::now();
        let page = client
            .list_messages(proto::ListMessagesRequest {
                channel_id: channel.to_owned(),
                page_size: 50,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        record(&mut lock(&shared.page_us), t.elapsed());
        shared.counts.pages.fetch_add(1, Ordering::Relaxed);
        // Newest first, and each page older than the one before (keyset tokens are stable
        // while new messages arrive).
        for m in &page.messages {
            if m.sequence >= below {
                return Err(format!(
                    "sequence {} after {below} on a later page or row",
                    m.sequence
                )
                .into());
            }
            below = m.sequence;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    Ok(())
}

/// A subscriber whose feed comes and goes; `channels` are its user's, followed from their
/// start (cursor 0) and then from the last sequence seen.
async fn subscriber(
    shared: Arc<Shared>,
    token: String,
    channels: Vec<String>,
    url: String,
    longest: f64,
) {
    let mut cursors: HashMap<String, i64> = channels.into_iter().map(|c| (c, 0)).collect();
    while !shared.stopped() {
        let session = Duration::from_secs_f64(rand::random_range(longest / 3.0..=longest));
        if let Err(e) = feed_session(&shared, &token, &url, &mut cursors, session).await {
            shared.fail(&shared.counts.feed_errors, format!("feed: {e}"));
        }
        if !shared
            .sleep(Duration::from_millis(rand::random_range(200..=2000)))
            .await
        {
            break;
        }
    }
}

/// One feed session on a connection of its own: reads for `length`, checking every channel
/// event's sequence against `cursors`, then drops the stream and the connection.
async fn feed_session(
    shared: &Shared,
    token: &str,
    url: &str,
    cursors: &mut HashMap<String, i64>,
    length: Duration,
) -> BenchResult<()> {
    let end = tokio::time::Instant::now() + length;
    let conn = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut feed = chat(&conn, token)?
        .subscribe(proto::SubscribeRequest {
            channel_ids: Vec::new(),
            cursors: cursors.clone(),
        })
        .await?
        .into_inner();
    shared.counts.sessions.fetch_add(1, Ordering::Relaxed);
    loop {
        let ev = tokio::select! {
            _ = tokio::time::sleep_until(end) => return Ok(()),
            _ = shared.until_stopped() => return Ok(()),
            ev = feed.message() => ev?.ok_or("the server ended the feed")?,
        };
        if ev.sequence == 0 {
            continue; // heartbeats and read markers: live only, no sequence
        }
        shared.counts.events.fetch_add(1, Ordering::Relaxed);
        if let Err(why) = advance(cursors, &ev.channel_id, ev.sequence) {
            shared.fail(&shared.counts.gaps, why);
        }
    }
}

/// Moves `channel`'s cursor to `sequence`; `Err` says why when `sequence` is not the one
/// after the cursor (a gap, or a duplicate or older event, which leaves the cursor alone).
fn advance(cursors: &mut HashMap<String, i64>, channel: &str, sequence: i64) -> Result<(), String> {
    let last = cursors.entry(channel.to_owned()).or_insert(0);
    let seen = *last;
    *last = seen.max(sequence);
    match sequence - seen {
        1 => Ok(()),
        d if d > 1 => Err(format!(
            "channel {channel}: sequence {sequence} after {seen}, a gap"
        )),
        _ => Err(format!(
            "channel {channel}: sequence {sequence} after {seen}, a duplicate"
        )),
    }
}

/// Uploads; what each does depends on its number (see [`upload_one`]).
async fn uploads(shared: Arc<Shared>, users: Arc<Vec<User>>, plan: SoakPlan) {
    let s = shared.clone();
    let (rate, max) = (plan.upload_rate, plan.max_file_bytes);
    open_loop(
        s,
        rate,
        MAX_UPLOADS_IN_FLIGHT,
        "uploads",
        |c| &c.upload_errors,
        |k| {
            let (shared, users) = (shared.clone(), users.clone());
            async move {
                if let Err(e) = upload_one(&shared, &users, k, max).await {
                    shared.fail(&shared.counts.upload_errors, format!("upload {k}: {e}"));
                }
            }
        },
    )
    .await
}

/// `len` bytes that are the same for the same `seed` (xorshift64).
fn file_bytes(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// Upload number `k`: by user 7k mod n, to that user's first group. Even k streams the file;
/// odd k uploads it resumably, retrying its first chunk once (a lost answer) and resuming from
/// the committed size the server returns; k = 7 mod 8 stops after the first chunk and leaves
/// the upload for the sweep. A completed file is then downloaded and compared: k = 0 mod 4
/// links it to a message first and the downloader is another member; k = 2 mod 4 downloads
/// in two parts (the second from an `offset`). Then the uploader deletes it.
async fn upload_one(shared: &Shared, users: &[User], k: u64, max: u64) -> BenchResult<()> {
    let user = &users[(k as usize * 7) % users.len()];
    let channel = user.channels[0].clone();
    let size = (1024.0f64 * ((max as f64) / 1024.0).powf(rand::random_range(0.0..=1.0))) as usize;
    let data = file_bytes(k + 1, size);
    let sha256 = hex::encode(Sha256::digest(&data));
    let metadata = proto::AttachmentMetadata {
        channel_id: channel.clone(),
        file_name: format!("soak-{k}.bin"),
        content_type: "application/octet-stream".into(),
        size_bytes: size as i64,
        sha256: sha256.clone(),
    };
    let mut files = user.files()?;
    let attachment = if k % 2 == 0 {
        let chunks: Vec<proto::UploadAttachmentRequest> =
            std::iter::once(upload_attachment_request::Data::Metadata(metadata))
                .chain((0..size).step_by(CHUNK).map(|at| {
                    upload_attachment_request::Data::Chunk(data.slice(at..(at + CHUNK).min(size)))
                }))
                .map(|d| proto::UploadAttachmentRequest { data: Some(d) })
                .collect();
        files
            .upload_attachment(futures::stream::iter(chunks))
            .await?
            .into_inner()
            .attachment
    } else {
        let upload_id = files
            .create_upload(proto::CreateUploadRequest {
                metadata: Some(metadata),
            })
            .await?
            .into_inner()
            .upload_id;
        let mut offset = 0usize;
        let mut retried = false;
        while offset < size {
            let chunk = data.slice(offset..(offset + CHUNK).min(size));
            let committed = files
                .upload_chunk(proto::UploadChunkRequest {
                    upload_id: upload_id.clone(),
                    offset: offset as i64,
                    chunk: chunk.clone(),
                })
                .await?
                .into_inner()
                .committed_bytes as usize;
            if k % 8 == 7 {
                shared.counts.abandoned.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            if !retried {
                // The answer was "lost": the same chunk again, which the server refuses with
                // the committed size to resume from.
                retried = true;
                let e = files
                    .upload_chunk(proto::UploadChunkRequest {
                        upload_id: upload_id.clone(),
                        offset: offset as i64,
                        chunk,
                    })
                    .await
                    .err()
                    .ok_or("a stale chunk was accepted")?;
                use tonic_types::StatusExt;
                let said = e
                    .get_details_error_info()
                    .and_then(|i| i.metadata.get("committed_bytes").cloned())
                    .and_then(|v| v.parse::<usize>().ok());
                if e.code() != tonic::Code::FailedPrecondition || said != Some(committed) {
                    return Err(format!(
                        "stale chunk: {e:?}, expected committed_bytes {committed}"
                    )
                    .into());
                }
                shared.counts.resumed.fetch_add(1, Ordering::Relaxed);
            }
            offset = committed;
        }
        files
            .complete_upload(proto::CompleteUploadRequest { upload_id })
            .await?
            .into_inner()
            .attachment
    };
    let attachment = attachment.ok_or("no attachment")?;
    if attachment.size_bytes != size as i64 || attachment.sha256 != sha256 {
        return Err(format!(
            "stored {} bytes, sha256 {}; sent {size}, {sha256}",
            attachment.size_bytes, attachment.sha256
        )
        .into());
    }
    shared.counts.uploads.fetch_add(1, Ordering::Relaxed);
    let downloader = if k % 4 == 0 {
        user.chat
            .clone()
            .send_message(proto::SendMessageRequest {
                channel_id: channel,
                body: format!("file {k}"),
                attachment_ids: vec![attachment.id.clone()],
                ..Default::default()
            })
            .await?;
        &users[user.peer]
    } else {
        user
    };
    let mut reader = downloader.files()?;
    let got = if k % 4 == 2 {
        let mut head = download(&mut reader, &attachment.id, 0, Some(1)).await?;
        let tail = download(&mut reader, &attachment.id, head.len(), None).await?;
        shared.counts.resumed.fetch_add(1, Ordering::Relaxed);
        head.extend_from_slice(&tail);
        head
    } else {
        download(&mut reader, &attachment.id, 0, None).await?
    };
    if got != data {
        return Err(format!(
            "downloaded {} bytes that differ from the {size} sent",
            got.len()
        )
        .into());
    }
    shared.counts.downloads.fetch_add(1, Ordering::Relaxed);
    files
        .delete_attachment(proto::DeleteAttachmentRequest {
            attachment_id: attachment.id,
        })
        .await?;
    Ok(())
}

/// The bytes of attachment `id` from `offset`; with `frames`, stops (drops the stream) after
/// that many data frames, as an interrupted download would.
async fn download(
    files: &mut AttachmentServiceClient<InterceptedService<Channel, Bearer>>,
    id: &str,
    offset: usize,
    frames: Option<usize>,
) -> BenchResult<Vec<u8>> {
    let mut stream = files
        .download_attachment(proto::DownloadAttachmentRequest {
            attachment_id: id.to_owned(),
            offset: offset as i64,
        })
        .await?
        .into_inner();
    let (mut out, mut seen) = (Vec::new(), 0usize);
    while let Some(frame) = stream.message().await? {
        if let Some(download_attachment_response::Data::Chunk(b)) = frame.data {
            out.extend_from_slice(&b);
            seen += 1;
            if frames == Some(seen) {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{advance, file_bytes, parse_env, slope_per_hour};
    use std::collections::HashMap;

    #[test]
    fn a_sequence_must_follow_the_cursor() {
        let mut cursors: HashMap<String, i64> = [("a".to_owned(), 3)].into();
        assert_eq!(advance(&mut cursors, "a", 4), Ok(()));
        assert!(advance(&mut cursors, "a", 4).is_err_and(|e| e.contains("duplicate")));
        assert!(advance(&mut cursors, "a", 7).is_err_and(|e| e.contains("gap")));
        // After a gap the cursor is where the feed now stands.
        assert_eq!(advance(&mut cursors, "a", 8), Ok(()));
        // A channel first seen starts from 0, as the soak's cursors do.
        assert_eq!(advance(&mut cursors, "b", 1), Ok(()));
        assert_eq!(cursors["a"], 8);
    }

    #[test]
    fn slope_is_per_hour() {
        // +1 MiB a minute is +60 MiB an hour; flat is 0.
        assert!((slope_per_hour(&[5.0, 6.0, 7.0], &[40.0, 41.0, 42.0]) - 60.0).abs() < 1e-9);
        assert_eq!(slope_per_hour(&[5.0, 6.0, 7.0], &[40.0, 40.0, 40.0]), 0.0);
        assert_eq!(slope_per_hour(&[5.0], &[40.0]), 0.0);
    }

    #[test]
    fn file_bytes_repeat_per_seed() {
        assert_eq!(file_bytes(3, 1000), file_bytes(3, 1000));
        assert_ne!(file_bytes(3, 1000), file_bytes(4, 1000));
        assert_eq!(file_bytes(3, 1001).len(), 1001);
    }

    #[test]
    fn server_env_is_key_value() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=x").is_err());
    }
}

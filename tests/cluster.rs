//! Several `chat-service serve` processes on one database, with live events crossing nodes:
//! over a real `nats-server` (started here on a free port, stopped and started again by the
//! fault tests), or over PostgreSQL LISTEN/NOTIFY. Each node is the real binary, so a node can be
//! killed with SIGKILL.
//!
//! What is shown: a subscriber on one node receives, in order and without gaps, what is sent on
//! the others; 3 × 10 concurrent senders on three nodes give one gap-free sequence; a member
//! removed (or a group deleted) on one node stops feeds on every node; a killed node's
//! subscribers resume on another with their cursors and miss nothing; NATS stopped and started
//! again loses no acknowledged event, each delivered within the documented bound; bus messages
//! dropped on purpose are recovered within it; the direct channel of two users racing on two
//! nodes is made once; a resumable upload whose chunks reach different nodes completes (S3);
//! file storage is refused for several nodes unless declared shared; sweeps run on three nodes
//! at once remove each thing once.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_service::cli::{Bearer, ChatClient, GroupClient};
use chat_service::proto;
use chat_service::proto::attachment_service_client::AttachmentServiceClient;
use chat_service::proto::chat_service_client::ChatServiceClient;
use chat_service::proto::group_service_client::GroupServiceClient;
use chat_service::proto::subscribe_response::Event;
use common::{token, Backend, TestDb, SECRET};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Guards against a hang, not a speed assertion.
const WAIT: Duration = Duration::from_secs(30);

/// The head check's interval in the fault tests (`FANOUT_CHECK_MS`).
const CHECK_MS: u64 = 500;

/// The documented bound on a lost event's delay is two check intervals plus the check's reads
/// (milliseconds); this adds 700 ms for debug-build nodes on a loaded two-core machine. (The
/// cluster tests run one at a time: `.config/nextest.toml`.)
fn lost_event_bound() -> Duration {
    Duration::from_millis(2 * CHECK_MS + 700)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The `nats-server` binary: `CHAT_TEST_NATS_SERVER`, else the one on `PATH`, else Debian's.
fn nats_binary() -> String {
    if let Ok(b) = std::env::var("CHAT_TEST_NATS_SERVER") {
        return b;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join("nats-server");
        if p.is_file() {
            return p.display().to_string();
        }
    }
    "/usr/sbin/nats-server".into()
}

/// A `nats-server` of this test's own, on a free port.
struct Nats {
    child: Option<Child>,
    port: u16,
}

impl Nats {
    fn start() -> Nats {
        let mut nats = Nats {
            child: None,
            port: free_port(),
        };
        nats.resume();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    fn resume(&mut self) {
        let child = Command::new(nats_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "nats-server ({}) is required for these tests: {e}",
                    nats_binary()
                )
            });
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < WAIT, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `chat-service serve` process.
struct Node {
    child: Child,
    addr: String,
    metrics: Option<String>,
}

impl Node {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect to node")
    }

    async fn chat(&self, user: &str) -> ChatClient {
        ChatServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(&token(user)).expect("token"),
        )
    }

    async fn groups(&self, user: &str) -> GroupClient {
        GroupServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(&token(user)).expect("token"),
        )
    }

    /// SIGKILL.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The value of a counter on this node's `/metrics` (0 when absent).
    async fn counter(&self, name: &str) -> f64 {
        let addr = self.metrics.as_ref().expect("started with metrics");
        let body = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(&addr).expect("metrics connect");
                write!(
                    s,
                    "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .expect("write");
                let mut out = String::new();
                s.read_to_string(&mut out).expect("read");
                out
            }
        })
        .await
        .expect("join");
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a cluster carries events between nodes.
#[derive(Clone, Copy, Debug)]
enum Bus {
    Nats,
    Postgres,
}

/// Settings of the nodes of one test.
struct Cluster {
    db: TestDb,
    bus: Bus,
    nats: Option<Nats>,
    storage: String,
    /// Extra environment for every node.
    env: Vec<(String, String)>,
    _blobs: tempfile::TempDir,
}

impl Cluster {
    async fn new(backend: Backend, bus: Bus) -> Cluster {
        let db = TestDb::new(backend).await;
        let nats = matches!(bus, Bus::Nats).then(Nats::start);
        let blobs = tempfile::tempdir().expect("tempdir");
        Cluster {
            storage: format!("file://{}", blobs.path().display()),
            db,
            bus,
            nats,
            env: vec![
                ("FANOUT_CHECK_MS".into(), CHECK_MS.to_string()),
                // The tests send faster than a person; limits are tested in tests/limits.rs.
                ("RATE_LIMIT_SENDS_PER_SECOND".into(), "0".into()),
                ("RATE_LIMIT_WRITES_PER_SECOND".into(), "0".into()),
            ],
            _blobs: blobs,
        }
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    /// Starts a node named `name` (for its log lines), with `extra` settings on top.
    fn node(&self, name: &str, extra: &[(&str, &str)]) -> Node {
        let metrics_port = free_port();
        let mut cmd = self.command();
        cmd.env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let (child, addr) = spawn(cmd, name).unwrap_or_else(|e| panic!("node {name}: {e}"));
        Node {
            child,
            addr,
            metrics: Some(format!("127.0.0.1:{metrics_port}")),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-service"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db.url)
            .env("JWT_SECRET", SECRET)
            .env("GRPC_ADDR", "127.0.0.1:0")
            .env("STORAGE_URL", &self.storage)
            .env("STORAGE_SHARED", "true")
            .env("SHUTDOWN_DRAIN_SECONDS", "1")
            .env("LOG_LEVEL", "info,sqlx=warn")
            .env("NO_COLOR", "1");
        for (k, v) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env(k, v);
            }
        }
        if let Some(schema) = &self.db.schema {
            cmd.env("DB_SCHEMA", schema);
        }
        match self.bus {
            Bus::Nats => {
                cmd.env("FANOUT", "nats").env(
                    "NATS_URL",
                    self.nats.as_ref().expect("nats for this cluster").url(),
                );
            }
            Bus::Postgres => {
                cmd.env("FANOUT", "postgres");
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn nodes(&self, n: usize) -> Vec<Node> {
        (0..n)
            .map(|i| self.node(&((b'A' + i as u8) as char).to_string(), &[]))
            .collect()
    }
}

/// Spawns a node and waits for its `listening … addr=` line; its log lines go to this test's
/// output, prefixed with `name`. Errors: the process ended first, with its last lines.
fn spawn(mut cmd: Command, name: &str) -> Result<(Child, String), String> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn chat-service: {e}"))?;
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let name = name.to_owned();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut last = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("[{name}] {line}");
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .filter(|_| line.contains("listening"))
            {
                let addr = addr.split_whitespace().next().unwrap_or_default();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(addr.to_owned()));
                }
            }
            last.push(line);
        }
        if let Some(tx) = tx.take() {
            let _ = tx.send(Err(last.join("\n")));
        }
    });
    match rx.recv_timeout(WAIT) {
        Ok(Ok(addr)) => Ok((child, addr)),
        Ok(Err(lines)) => {
            let status = child.wait().map_err(|e| e.to_string())?;
            Err(format!("exited ({status}) before listening:\n{lines}"))
        }
        Err(_) => Err("never printed its listening line".into()),
    }
}

/// Creates a group owned by `owner` with `members` on `node`; returns its id.
async fn group_on(node: &Node, owner: &str, members: &[&str]) -> String {
    common::create_group(node.groups(owner).await, members).await
}

/// A subscriber's events of one channel: `(sequence, body or "", when received)`.
type Received = Arc<Mutex<Vec<(i64, String, Instant)>>>;

/// Opens a feed of `channel` for `user` on `node` (from `cursor` when given) and collects its
/// events until it ends; returns what it collected and the task (its result: how the stream
/// ended, `Ok` for a clean end).
async fn subscribe(
    node: &Node,
    user: &str,
    channel: &str,
    cursor: Option<i64>,
) -> (Received, tokio::task::JoinHandle<Result<(), tonic::Status>>) {
    let mut client = node.chat(user).await;
    let mut cursors = HashMap::new();
    if let Some(c) = cursor {
        cursors.insert(channel.to_owned(), c);
    }
    let mut stream = client
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![channel.to_owned()],
            cursors,
        })
        .await
        .expect("subscribe")
        .into_inner();
    let got: Received = Arc::default();
    let sink = got.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Some(item) = stream.next().await {
            let ev = item?;
            let body = match ev.event {
                Some(Event::Heartbeat(_)) | None => continue,
                Some(Event::MessageCreated(m)) => m.message.map(|m| m.body).unwrap_or_default(),
                Some(_) => String::new(),
            };
            sink.lock()
                .expect("lock")
                .push((ev.sequence, body, Instant::now()));
        }
        Ok(())
    });
    (got, task)
}

/// Waits until `got` holds `n` events.
async fn wait_for(got: &Received, n: usize, what: &str) {
    let start = Instant::now();
    loop {
        let len = got.lock().expect("lock").len();
        if len >= n {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: {len} of {n} events after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sequences of `got`, checked to run from `first` with no gap and no repeat.
fn assert_contiguous(got: &Received, first: i64, what: &str) -> Vec<i64> {
    let seqs: Vec<i64> = got.lock().expect("lock").iter().map(|e| e.0).collect();
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(
            *s,
            first + i as i64,
            "{what}: event {i} has sequence {s}; all: {seqs:?}"
        );
    }
    seqs
}

/// Sends `body` on `client` to `channel`; returns the sequence and when it was acknowledged.
async fn send(client: &mut ChatClient, channel: &str, body: String) -> (i64, Instant) {
    let m = client
        .send_message(proto::SendMessageRequest {
            channel_id: channel.into(),
            body,
            ..Default::default()
        })
        .await
        .expect("send")
        .into_inner()
        .message
        .expect("message");
    (m.sequence, Instant::now())
}

// ---------------------------------------------------------------------------------------------
// 1. In order, without gaps, across nodes.

/// A subscriber on A receives, in order and without gaps, what alice sends on B and carol on
/// C at once. The head check is set to a minute, so only the bus can deliver in time.
async fn events_cross_nodes_in_order(backend: Backend, bus: Bus) {
    let mut cluster = Cluster::new(backend, bus).await;
    cluster.set("FANOUT_CHECK_MS", "60000");
    let nodes = cluster.nodes(3);
    let g = group_on(&nodes[0], "alice", &["bob", "carol"]).await;
    let (got, _feed) = subscribe(&nodes[0], "bob", &g, None).await;
    let head = nodes[0]
        .groups("bob")
        .await
        .get_group(proto::GetGroupRequest {
            channel_id: g.clone(),
        })
        .await
        .expect("get group")
        .into_inner()
        .channel
        .expect("channel")
        .last_sequence;
    let per_sender = 40;
    let mut senders = Vec::new();
    for (node, user) in [(&nodes[1], "alice"), (&nodes[2], "carol")] {
        let mut c = node.chat(user).await;
        let g = g.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..per_sender {
                send(&mut c, &g, format!("{user} {i}")).await;
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    wait_for(&got, 2 * per_sender, "feed on A").await;
    assert_contiguous(&got, head + 1, "feed on A");
    let bodies: HashSet<String> = got
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.1.clone())
        .collect();
    for user in ["alice", "carol"] {
        for i in 0..per_sender {
            assert!(
                bodies.contains(&format!("{user} {i}")),
                "{user} {i} missing"
            );
        }
    }
    // Each sender's own messages arrive in the order they were sent.
    for user in ["alice", "carol"] {
        let mine: Vec<String> = got
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.1.starts_with(user))
            .map(|e| e.1.clone())
            .collect();
        let expected: Vec<String> = (0..per_sender).map(|i| format!("{user} {i}")).collect();
        assert_eq!(mine, expected);
    }
    // A read marker (live only, never stored, so no sequence to drop a repeat by) reaches a
    // feed on the node that made it and one on another node exactly once each.
    let (on_a, _a) = subscribe(&nodes[0], "carol", &g, None).await;
    let (on_b, _b) = subscribe(&nodes[1], "carol", &g, None).await;
    nodes[0]
        .chat("bob")
        .await
        .mark_read(proto::MarkReadRequest {
            channel_id: g.clone(),
            sequence: head + 1,
        })
        .await
        .expect("mark read");
    wait_for(&on_a, 1, "marker on A").await;
    wait_for(&on_b, 1, "marker on B").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (feed, node) in [(&on_a, "A"), (&on_b, "B")] {
        let seqs: Vec<i64> = feed.lock().expect("lock").iter().map(|e| e.0).collect();
        assert_eq!(seqs, vec![0], "one read marker on {node}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrent senders on three nodes: one gap-free sequence.

async fn concurrent_senders_on_three_nodes(backend: Backend, bus: Bus) {
    let cluster = Cluster::new(backend, bus).await;
    let nodes = cluster.nodes(3);
    let users: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    let g = group_on(&nodes[0], "owner", &members).await;
    // Live on a fourth connection all along.
    let (live, _live) = subscribe(&nodes[0], "owner", &g, Some(0)).await;
    let per_sender = 10;
    let mut tasks = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mut c = nodes[i % 3].chat(user).await;
        let (g, user) = (g.clone(), user.clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for j in 0..per_sender {
                seqs.push(send(&mut c, &g, format!("{user} {j}")).await.0);
            }
            seqs
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("sender"));
    }
    assert_eq!(acked.len(), 30 * per_sender);
    let unique: HashSet<i64> = acked.iter().copied().collect();
    assert_eq!(unique.len(), acked.len(), "a sequence given twice");
    wait_for(
        &live,
        *acked.iter().max().expect("some") as usize,
        "live feed",
    )
    .await;
    assert_contiguous(&live, 1, "live feed");
    // The whole channel replayed from storage on another node: 1..N, every one once.
    let (got, _feed) = subscribe(&nodes[1], "owner", &g, Some(0)).await;
    let last = *acked.iter().max().expect("some");
    wait_for(&got, last as usize, "replay").await;
    assert_contiguous(&got, 1, "replay");
    let messages = got
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| !e.1.is_empty())
        .count();
    assert_eq!(messages, 30 * per_sender);
}

/// A feed of all bob's channels on A learns of a group made for him on B and of a first direct
/// message sent on C, from the join events alone (its heartbeat re-read is an hour away).
async fn joins_cross_nodes(backend: Backend, bus: Bus) {
    let mut cluster = Cluster::new(backend, bus).await;
    cluster.set("HEARTBEAT_SECONDS", "3600");
    let nodes = cluster.nodes(3);
    let mut bob = nodes[0].chat("bob").await;
    let mut feed = bob
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    let g = group_on(&nodes[1], "alice", &["bob"]).await;
    let mut alice = nodes[2].chat("alice").await;
    let (_, sent_at) = send(&mut alice, &g, "in the group".into()).await;
    let direct = nodes[2]
        .chat("carol")
        .await
        .send_message(proto::SendMessageRequest {
            recipient_id: "bob".into(),
            body: "direct".into(),
            ..Default::default()
        })
        .await
        .expect("direct")
        .into_inner()
        .message
        .expect("message");
    let mut seen: Vec<(String, String)> = Vec::new();
    while seen.len() < 2 {
        let ev = tokio::time::timeout(WAIT, feed.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("event");
        if let Some(Event::MessageCreated(m)) = ev.event {
            let m = m.message.expect("message");
            seen.push((m.channel_id, m.body));
        }
    }
    assert!(
        sent_at.elapsed() <= lost_event_bound() + Duration::from_millis(500),
        "joins took {:?}",
        sent_at.elapsed()
    );
    assert_eq!(
        seen,
        vec![
            (g.clone(), "in the group".to_owned()),
            (direct.channel_id, "direct".to_owned())
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Removal and deletion end feeds on every node.

async fn removal_ends_feeds_on_every_node(backend: Backend, bus: Bus) {
    let cluster = Cluster::new(backend, bus).await;
    let nodes = cluster.nodes(3);
    let g = group_on(&nodes[0], "alice", &["bob", "carol"]).await;
    let (bob_a, bob_feed) = subscribe(&nodes[0], "bob", &g, None).await;
    let (carol_c, carol_feed) = subscribe(&nodes[2], "carol", &g, None).await;
    nodes[1]
        .groups("alice")
        .await
        .remove_member(proto::RemoveMemberRequest {
            channel_id: g.clone(),
            user_id: "bob".into(),
        })
        .await
        .expect("remove bob");
    let ended = tokio::time::timeout(WAIT, bob_feed).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "bob's feed on A did not end cleanly: {ended:?}"
    );
    assert_eq!(bob_a.lock().expect("lock").len(), 1, "only the removal");
    // Messages sent after do not reach bob anywhere; carol's feed goes on.
    nodes[1]
        .chat("alice")
        .await
        .send_message(proto::SendMessageRequest {
            channel_id: g.clone(),
            body: "after".into(),
            ..Default::default()
        })
        .await
        .expect("send");
    wait_for(&carol_c, 2, "carol on C: the removal, then after").await;
    assert_eq!(carol_c.lock().expect("lock")[1].1, "after");
    assert_eq!(
        bob_a.lock().expect("lock").len(),
        1,
        "nothing after the removal"
    );
    // DeleteGroup on B ends carol's feed on C.
    nodes[1]
        .groups("alice")
        .await
        .delete_group(proto::DeleteGroupRequest {
            channel_id: g.clone(),
        })
        .await
        .expect("delete group");
    let ended = tokio::time::timeout(WAIT, carol_feed).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "carol's feed on C did not end: {ended:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Faults.

/// Sends on `client` every `every` until `stop`, returning each acknowledged sequence and its
/// time. A failed send fails the test, unless `until_error` (a sender on the node about to be
/// killed), when it ends the sending.
async fn send_until(
    mut client: ChatClient,
    channel: String,
    tag: String,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
    until_error: bool,
) -> Vec<(i64, Instant)> {
    let mut acked = Vec::new();
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let r = client
            .send_message(proto::SendMessageRequest {
                channel_id: channel.clone(),
                body: format!("{tag} {i}"),
                ..Default::default()
            })
            .await;
        let m = match r {
            Ok(r) => r.into_inner().message.expect("message"),
            Err(_) if until_error => break,
            Err(e) => panic!("{tag}: send {i} failed: {e}"),
        };
        acked.push((m.sequence, Instant::now()));
        i += 1;
        tokio::time::sleep(every).await;
    }
    acked
}

/// Kill -9 node B under load (senders on A, B and C): B's subscribers reconnect to A with their
/// cursors and miss nothing that was acknowledged, B's own last sends included (those only the
/// head check can bring, if B died before publishing them); a subscriber on C misses nothing
/// either.
async fn killed_node_subscribers_resume_elsewhere(backend: Backend) {
    let cluster = Cluster::new(backend, Bus::Nats).await;
    let mut nodes = cluster.nodes(3);
    let subscribers: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    let mut members: Vec<&str> = subscribers.iter().map(String::as_str).collect();
    members.extend(["carol", "dave", "erin"]);
    let g = group_on(&nodes[0], "alice", &members).await;
    let mut feeds = Vec::new();
    for s in &subscribers {
        feeds.push(subscribe(&nodes[1], s, &g, Some(0)).await);
    }
    let (on_c, _c) = subscribe(&nodes[2], "erin", &g, Some(0)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_b = tokio::spawn(send_until(
        nodes[1].chat("dave").await,
        g.clone(),
        "dave".into(),
        Duration::from_millis(5),
        stop.clone(),
        true,
    ));
    let senders = vec![
        tokio::spawn(send_until(
            nodes[0].chat("alice").await,
            g.clone(),
            "alice".into(),
            Duration::from_millis(5),
            stop.clone(),
            false,
        )),
        tokio::spawn(send_until(
            nodes[2].chat("carol").await,
            g.clone(),
            "carol".into(),
            Duration::from_millis(5),
            stop.clone(),
            false,
        )),
    ];
    tokio::time::sleep(Duration::from_millis(700)).await;
    nodes[1].kill();
    // Each subscriber's stream ends with an error; it reconnects to A after its last sequence.
    let mut resumed = Vec::new();
    for (s, (got, task)) in subscribers.iter().zip(feeds) {
        let ended = tokio::time::timeout(WAIT, task)
            .await
            .expect("the feed ends");
        assert!(
            !matches!(ended, Ok(Ok(()))),
            "{s}: a killed node's stream ends with an error"
        );
        let cursor = got.lock().expect("lock").last().map_or(0, |e| e.0);
        let before = got.lock().expect("lock").len();
        let (again, task) = subscribe(&nodes[0], s, &g, Some(cursor)).await;
        resumed.push((s.clone(), got, before, again, task));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked: Vec<i64> = on_b
        .await
        .expect("sender on B")
        .into_iter()
        .map(|a| a.0)
        .collect();
    assert!(!acked.is_empty(), "B acknowledged sends before it died");
    for s in senders {
        acked.extend(s.await.expect("sender").into_iter().map(|a| a.0));
    }
    let last = *acked.iter().max().expect("sent");
    wait_for(&on_c, last as usize, "erin on C").await;
    assert_contiguous(&on_c, 1, "erin on C");
    for (s, got, before, again, _task) in resumed {
        wait_for(&again, (last as usize).saturating_sub(before), s.as_str()).await;
        let mut all: Vec<(i64, String, Instant)> = got.lock().expect("lock").clone();
        all.extend(again.lock().expect("lock").iter().cloned());
        let merged: Received = Arc::new(Mutex::new(all));
        let seqs = assert_contiguous(&merged, 1, &s);
        let have: HashSet<i64> = seqs.into_iter().collect();
        for a in &acked {
            assert!(have.contains(a), "{s}: acknowledged sequence {a} missed");
        }
    }
}

/// NATS stopped under load and started again: sends never fail, every acknowledged event
/// reaches the subscriber on the other node, each within the documented bound, and delivery
/// over the bus resumes by itself.
async fn nats_outage_loses_nothing(backend: Backend) {
    let mut cluster = Cluster::new(backend, Bus::Nats).await;
    let nodes = cluster.nodes(2);
    let g = group_on(&nodes[0], "alice", &["bob"]).await;
    let (got, _feed) = subscribe(&nodes[1], "bob", &g, Some(0)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = tokio::spawn(send_until(
        nodes[0].chat("alice").await,
        g.clone(),
        "alice".into(),
        Duration::from_millis(10),
        stop.clone(),
        false,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nats.as_mut().expect("nats").stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nats.as_mut().expect("nats").resume();
    // Reconnected (within 2 s), events cross over the bus again: in the second after, the
    // receiving node hears tens of them and the check delivers none. (A sender drops, not
    // queues, while NATS is away, so nothing stale is replayed to make this true.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let received = nodes[1].counter("chat_bus_received_total").await;
    let recovered = nodes[1].counter("chat_bus_recovered_total").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = sender.await.expect("sender");
    assert_all_within_bound(&got, &acked, "bob on B").await;
    let received_after = nodes[1].counter("chat_bus_received_total").await;
    let recovered_after = nodes[1].counter("chat_bus_recovered_total").await;
    assert!(
        received_after >= received + 20.0,
        "the bus did not resume: {received} then {received_after} received"
    );
    assert_eq!(
        recovered_after, recovered,
        "the check still had to deliver events after NATS was back"
    );
    assert!(recovered > 0.0, "the check delivered during the outage");
}

/// Every bus message dropped on purpose (a quiet channel: no later event reveals the gap),
/// then half of them under load: all arrive, each within the bound.
async fn dropped_bus_messages_recovered(backend: Backend, bus: Bus) {
    let cluster = Cluster::new(backend, bus).await;
    let a = cluster.node("A", &[("FAULT_DROP_BUS_RATIO", "1")]);
    let b = cluster.node("B", &[]);
    let g = group_on(&a, "alice", &["bob"]).await;
    let (got, _feed) = subscribe(&b, "bob", &g, Some(0)).await;
    let mut alice = a.chat("alice").await;
    // A quiet channel: one message, nothing after it.
    let (seq, at) = send(&mut alice, &g, "lonely".into()).await;
    wait_for(&got, seq as usize, "the lonely message").await;
    let took = got.lock().expect("lock").last().expect("one").2 - at;
    assert!(
        took <= lost_event_bound(),
        "recovered after {took:?}, beyond {:?}",
        lost_event_bound()
    );
    assert!(b.counter("chat_bus_recovered_total").await >= 1.0);
    // Under load, half dropped.
    drop(a);
    let a = cluster.node("A2", &[("FAULT_DROP_BUS_RATIO", "0.5")]);
    let mut alice = a.chat("alice").await;
    let mut acked = Vec::new();
    for i in 0..200 {
        acked.push(send(&mut alice, &g, format!("m{i}")).await);
    }
    assert_all_within_bound(&got, &acked, "bob on B").await;
}

/// Waits until `got` holds every acknowledged event (`(sequence, acknowledged at)`), checks
/// that it runs from 1 without gaps, and that each arrived within [`lost_event_bound`] of its
/// acknowledgement.
async fn assert_all_within_bound(got: &Received, acked: &[(i64, Instant)], what: &str) {
    let last = acked.iter().map(|a| a.0).max().expect("sent");
    wait_for(got, last as usize, what).await;
    // Long enough for a late duplicate to show.
    tokio::time::sleep(Duration::from_millis(2 * CHECK_MS)).await;
    assert_contiguous(got, 1, what);
    let arrived: HashMap<i64, Instant> = got
        .lock()
        .expect("lock")
        .iter()
        .map(|e| (e.0, e.2))
        .collect();
    let (seq, worst) = acked
        .iter()
        .map(|(seq, at)| (*seq, arrived[seq].saturating_duration_since(*at)))
        .max_by_key(|(_, d)| *d)
        .expect("sent");
    eprintln!(
        "{what}: the slowest of {} events arrived {worst:?} after its acknowledgement",
        acked.len()
    );
    assert!(
        worst <= lost_event_bound(),
        "{what}: event {seq} took {worst:?}, beyond the bound {:?}",
        lost_event_bound()
    );
}

/// Nodes started while NATS is down serve at once: sends succeed and the other node's feed
/// gets them through the head check; once NATS is up, events cross over the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_start_and_serve_without_nats() {
    let mut cluster = Cluster::new(Backend::Postgres, Bus::Nats).await;
    cluster.nats.as_mut().expect("nats").stop();
    let nodes = cluster.nodes(2);
    let g = group_on(&nodes[0], "alice", &["bob"]).await;
    let (got, _feed) = subscribe(&nodes[1], "bob", &g, Some(0)).await;
    let mut alice = nodes[0].chat("alice").await;
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push(send(&mut alice, &g, format!("before {i}")).await);
    }
    assert_all_within_bound(&got, &acked, "without NATS").await;
    cluster.nats.as_mut().expect("nats").resume();
    // The client connects by itself; then events cross over the bus.
    let start = Instant::now();
    while nodes[1].counter("chat_bus_received_total").await < 1.0 {
        assert!(start.elapsed() < WAIT, "the bus never carried an event");
        acked.push(send(&mut alice, &g, "after".into()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_all_within_bound(&got, &acked, "with NATS back").await;
}

/// FANOUT=postgres: the LISTEN connection is cut (pg_terminate_backend); the node reconnects,
/// and what was notified meanwhile still reaches the feed, within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listener_cut_recovers() {
    let cluster = Cluster::new(Backend::Postgres, Bus::Postgres).await;
    let nodes = cluster.nodes(2);
    let g = group_on(&nodes[0], "alice", &["bob"]).await;
    let (got, _feed) = subscribe(&nodes[1], "bob", &g, Some(0)).await;
    let mut alice = nodes[0].chat("alice").await;
    let mut acked = vec![send(&mut alice, &g, "first".into()).await];
    assert_all_within_bound(&got, &acked, "before the cut").await;
    let channel = chat_service::fanout::postgres::channel_name(cluster.db.schema.as_deref());
    let pool = sqlx::PgPool::connect(&cluster.db.url)
        .await
        .expect("connect");
    let cut: Vec<i32> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid)::int FROM pg_stat_activity WHERE query = $1",
    )
    .bind(format!("LISTEN \"{channel}\""))
    .fetch_all(&pool)
    .await
    .expect("terminate");
    assert_eq!(cut.len(), 2, "one LISTEN connection per node: {cut:?}");
    for i in 0..20 {
        acked.push(send(&mut alice, &g, format!("after {i}")).await);
    }
    assert_all_within_bound(&got, &acked, "after the cut").await;
}

// ---------------------------------------------------------------------------------------------
// 5. What else a cluster needs.

/// Users write to each other for the first time on two nodes at once: one direct channel per
/// pair.
async fn direct_channel_race(backend: Backend) {
    let cluster = Cluster::new(backend, Bus::Nats).await;
    let nodes = cluster.nodes(2);
    for round in 0..8 {
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        let mut cx = nodes[0].chat(&x).await;
        let mut cy = nodes[1].chat(&y).await;
        let to = |r: &str| proto::SendMessageRequest {
            recipient_id: r.into(),
            body: "hi".into(),
            ..Default::default()
        };
        let (a, b) = tokio::join!(cx.send_message(to(&y)), cy.send_message(to(&x)));
        let a = a
            .expect("x to y")
            .into_inner()
            .message
            .expect("m")
            .channel_id;
        let b = b
            .expect("y to x")
            .into_inner()
            .message
            .expect("m")
            .channel_id;
        assert_eq!(a, b, "round {round}: two direct channels for one pair");
    }
}

/// A resumable upload whose chunks go to three different nodes completes on a fourth call to
/// another node, on S3, and downloads whole from a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_across_nodes_on_s3() {
    let bucket = std::env::var("CHAT_TEST_S3_BUCKET")
        .expect("CHAT_TEST_S3_BUCKET (and AWS_ENDPOINT_URL): run the tests with ./scripts/test, which starts an S3 server");
    let mut cluster = Cluster::new(Backend::Postgres, Bus::Nats).await;
    cluster.storage = format!("s3://{bucket}/{}", uuid::Uuid::new_v4().simple());
    cluster.set("STORAGE_SHARED", "false");
    let nodes = cluster.nodes(3);
    let g = group_on(&nodes[0], "alice", &["bob"]).await;
    let att = |n: &Node| {
        let n = n.url();
        async move {
            AttachmentServiceClient::with_interceptor(
                Channel::from_shared(n)
                    .expect("url")
                    .connect()
                    .await
                    .expect("connect"),
                Bearer::new(&token("alice")).expect("token"),
            )
        }
    };
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let upload = att(&nodes[0])
        .await
        .create_upload(proto::CreateUploadRequest {
            metadata: Some(proto::AttachmentMetadata {
                channel_id: g.clone(),
                file_name: "across.bin".into(),
                size_bytes: content.len() as i64,
                ..Default::default()
            }),
        })
        .await
        .expect("create upload")
        .into_inner()
        .upload_id;
    for (i, part) in content.chunks(100_000).enumerate() {
        att(&nodes[i % 3])
            .await
            .upload_chunk(proto::UploadChunkRequest {
                upload_id: upload.clone(),
                offset: (i * 100_000) as i64,
                chunk: part.to_vec().into(),
            })
            .await
            .unwrap_or_else(|e| panic!("chunk {i} on node {}: {e}", i % 3));
    }
    let done = att(&nodes[1])
        .await
        .complete_upload(proto::CompleteUploadRequest {
            upload_id: upload.clone(),
        })
        .await
        .expect("complete on B")
        .into_inner()
        .attachment
        .expect("attachment");
    assert_eq!(done.size_bytes, content.len() as i64);
    // Unlinked, the attachment is its uploader's alone: alice reads it back on C.
    let mut stream = att(&nodes[2])
        .await
        .download_attachment(proto::DownloadAttachmentRequest {
            attachment_id: done.id.clone(),
            offset: 0,
        })
        .await
        .expect("download on C")
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(frame) = stream.next().await {
        if let Some(proto::download_attachment_response::Data::Chunk(c)) =
            frame.expect("frame").data
        {
            bytes.extend_from_slice(&c);
        }
    }
    assert!(bytes == content, "downloaded bytes differ");
}

/// Settings that would split a cluster are refused at start, naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_cluster_settings_are_refused() {
    let mut cluster = Cluster::new(Backend::Postgres, Bus::Nats).await;
    cluster.set("STORAGE_SHARED", "false");
    let err = spawn(cluster.command(), "refused").expect_err("file:// with nats refused");
    assert!(
        err.contains("STORAGE_URL") && err.contains("STORAGE_SHARED"),
        "{err}"
    );
    let mysql = Cluster::new(Backend::Mysql, Bus::Postgres).await;
    let err = spawn(mysql.command(), "refused").expect_err("postgres fan-out on MySQL refused");
    assert!(err.contains("FANOUT"), "{err}");
}

/// The sweep of three nodes at once, over one database and one storage: every expired
/// unfinished upload and unlinked attachment is removed once, with one audit row each, and
/// no sweep fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_on_every_node_at_once() {
    for backend in [Backend::Postgres, Backend::Mysql] {
        let server = common::TestServer::start(backend).await;
        let g = common::group(&server, "alice", &[]).await;
        let mut att = AttachmentServiceClient::with_interceptor(
            server.channel().await,
            Bearer::new(&token("alice")).expect("token"),
        );
        let n = 12;
        for i in 0..n {
            let meta = proto::AttachmentMetadata {
                channel_id: g.clone(),
                file_name: format!("f{i}"),
                size_bytes: 3,
                ..Default::default()
            };
            let up = att
                .create_upload(proto::CreateUploadRequest {
                    metadata: Some(meta.clone()),
                })
                .await
                .expect("upload")
                .into_inner()
                .upload_id;
            att.upload_chunk(proto::UploadChunkRequest {
                upload_id: up.clone(),
                offset: 0,
                chunk: b"abc".to_vec().into(),
            })
            .await
            .expect("chunk");
            if i % 2 == 0 {
                // Completed but never linked to a message.
                att.complete_upload(proto::CompleteUploadRequest { upload_id: up })
                    .await
                    .expect("complete");
            }
        }
        let audit_before = server
            .db
            .count_where("audit_logs", "actor_id = 'system:sweep'")
            .await;
        assert_eq!(audit_before, 0);
        // Two more nodes on the same database and storage.
        let mut chats = vec![server.chat.clone()];
        for _ in 0..2 {
            let store =
                chat_service::store::connect(&server.db.url, server.db.schema.as_deref(), false)
                    .await
                    .expect("store");
            let blobs = chat_service::blob::Blobs::from_url(&format!(
                "file://{}",
                server.db.blob_dir().display()
            ))
            .expect("blobs");
            chats.push(Arc::new(chat_service::domain::Chat::new(
                store,
                Arc::new(chat_service::fanout::Hub::default()),
                blobs,
                Default::default(),
            )));
        }
        // Everything made so far counts as expired.
        let before = chat_service::store::now_micros() + 1_000_000;
        let runs = futures::future::join_all(chats.iter().map(|c| c.sweep(before))).await;
        let (mut attachments, mut uploads) = (0, 0);
        for r in runs {
            let (a, u) = r.expect("every sweep succeeds");
            attachments += a;
            uploads += u;
        }
        assert_eq!(
            (attachments, uploads),
            (n / 2, n / 2),
            "{backend:?}: each swept once"
        );
        assert_eq!(server.db.count("attachments").await, 0);
        assert_eq!(server.db.count("uploads").await, 0);
        assert_eq!(
            server
                .db
                .count_where("audit_logs", "actor_id = 'system:sweep'")
                .await,
            (n / 2) as i64,
            "{backend:?}: one audit row per swept attachment"
        );
        let left: BTreeMap<String, usize> = walk(&server.db.blob_dir());
        assert!(left.is_empty(), "{backend:?}: files left: {left:?}");
    }
}

/// Files under `dir`, by path.
fn walk(dir: &std::path::Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.insert(p.display().to_string(), 1);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The matrix: three nodes on PostgreSQL and on MariaDB over NATS; PostgreSQL LISTEN/NOTIFY.

macro_rules! cluster_tests {
    ($($name:ident: $test:ident($($arg:expr),*);)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $test($($arg),*).await
            }
        )*
    };
}

cluster_tests! {
    postgres_nats_in_order: events_cross_nodes_in_order(Backend::Postgres, Bus::Nats);
    mysql_nats_in_order: events_cross_nodes_in_order(Backend::Mysql, Bus::Nats);
    postgres_notify_in_order: events_cross_nodes_in_order(Backend::Postgres, Bus::Postgres);
    postgres_nats_joins: joins_cross_nodes(Backend::Postgres, Bus::Nats);
    mysql_nats_joins: joins_cross_nodes(Backend::Mysql, Bus::Nats);
    postgres_notify_joins: joins_cross_nodes(Backend::Postgres, Bus::Postgres);
    postgres_nats_concurrent_senders: concurrent_senders_on_three_nodes(Backend::Postgres, Bus::Nats);
    mysql_nats_concurrent_senders: concurrent_senders_on_three_nodes(Backend::Mysql, Bus::Nats);
    postgres_notify_concurrent_senders: concurrent_senders_on_three_nodes(Backend::Postgres, Bus::Postgres);
    postgres_nats_removal: removal_ends_feeds_on_every_node(Backend::Postgres, Bus::Nats);
    mysql_nats_removal: removal_ends_feeds_on_every_node(Backend::Mysql, Bus::Nats);
    postgres_notify_removal: removal_ends_feeds_on_every_node(Backend::Postgres, Bus::Postgres);
    postgres_kill_node: killed_node_subscribers_resume_elsewhere(Backend::Postgres);
    mysql_kill_node: killed_node_subscribers_resume_elsewhere(Backend::Mysql);
    postgres_nats_outage: nats_outage_loses_nothing(Backend::Postgres);
    mysql_nats_outage: nats_outage_loses_nothing(Backend::Mysql);
    postgres_nats_dropped: dropped_bus_messages_recovered(Backend::Postgres, Bus::Nats);
    mysql_nats_dropped: dropped_bus_messages_recovered(Backend::Mysql, Bus::Nats);
    postgres_notify_dropped: dropped_bus_messages_recovered(Backend::Postgres, Bus::Postgres);
    postgres_direct_race: direct_channel_race(Backend::Postgres);
    mysql_direct_race: direct_channel_race(Backend::Mysql);
}

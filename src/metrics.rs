//! Prometheus metrics: the process-wide recorder, the `GET /metrics` endpoint, and the few
//! functions the rest of the code records through.
//!
//! The `metrics` facade has one global recorder per process; [`install`] sets the Prometheus
//! one at most once (a [`OnceLock`]), so several servers in one process (tests) share it. Until
//! it is installed every function here is a load and a branch: a server started without
//! `METRICS_ADDR` pays nothing more.
//!
//! Hot paths (the gRPC layer, a feed's batches, the group commit) record through handles
//! registered once, at [`install`], so a call is an atomic add and never builds a key or
//! allocates a label. The README lists every metric with its type, labels and meaning.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use prost::Message;
use tokio::net::TcpListener;

/// Latency buckets in seconds (`grpc_server_handling_seconds`, `chat_commit_seconds`,
/// `chat_db_acquire_seconds`): from 100 µs, where a lone send on SQLite answers, to a minute,
/// beyond which a call is a stream or a hang.
const SECONDS_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Messages per group-commit batch: powers of two up to the batch limit
/// ([`crate::domain`]'s `MAX_BATCH`, 256).
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// How often histogram samples are folded into their buckets between scrapes (the exporter
/// keeps raw samples until then; a scrape folds them too).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The installed recorder and the handles registered with it.
struct Installed {
    handle: PrometheusHandle,
    m: Handles,
}

static INSTALLED: OnceLock<Result<Installed, String>> = OnceLock::new();

/// Installs the Prometheus recorder as this process's `metrics` recorder, once; later calls
/// (another server in the same process) find it installed and succeed.
///
/// Errors: another `metrics` recorder was installed first by something else in the process.
pub fn install() -> Result<(), String> {
    match INSTALLED.get_or_init(build) {
        Ok(_) => Ok(()),
        Err(e) => Err(e.clone()),
    }
}

/// Whether [`install`] has run (successfully).
pub fn enabled() -> bool {
    handles().is_some()
}

fn handles() -> Option<&'static Handles> {
    match INSTALLED.get() {
        Some(Ok(i)) => Some(&i.m),
        _ => None,
    }
}

fn build() -> Result<Installed, String> {
    let mut builder = PrometheusBuilder::new();
    for name in [
        "grpc_server_handling_seconds",
        "chat_commit_seconds",
        "chat_db_acquire_seconds",
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.into()), &SECONDS_BUCKETS)
            .map_err(|e| e.to_string())?;
    }
    builder = builder
        .set_buckets_for_metric(
            Matcher::Full("chat_commit_batch_messages".into()),
            &BATCH_BUCKETS,
        )
        .map_err(|e| e.to_string())?;
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    let upkeep = handle.clone();
    // A thread rather than a task: it must outlive whichever runtime installed the recorder
    // (each test has its own).
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        })
        .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
    Ok(Installed {
        handle,
        m: Handles::register(),
    })
}

/// `# HELP` text of every metric.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "grpc_server_started_total",
        "RPCs started on the server, by service, method and type."
    );
    describe_counter!(
        "grpc_server_handled_total",
        "RPCs completed on the server, by service, method, type and gRPC status code."
    );
    describe_histogram!(
        "grpc_server_handling_seconds",
        "Seconds from an RPC's request headers to its status (a stream's whole life)."
    );
    describe_gauge!("chat_feeds_open", "Subscribe feeds open now.");
    describe_counter!(
        "chat_feed_events_total",
        "Events handed to Subscribe feeds, replayed or live, heartbeats included."
    );
    describe_counter!(
        "chat_feed_heartbeats_total",
        "Heartbeats handed to Subscribe feeds."
    );
    describe_counter!(
        "chat_feed_catchups_total",
        "Times a feed fell behind the in-memory fan-out and was caught up from storage."
    );
    describe_gauge!(
        "chat_streams_open",
        "Attachment streams open now, by stream (upload, download)."
    );
    describe_counter!(
        "chat_upload_bytes_total",
        "Attachment bytes received and stored (streamed uploads and resumable chunks)."
    );
    describe_counter!(
        "chat_download_bytes_total",
        "Attachment bytes sent to downloading clients."
    );
    describe_histogram!(
        "chat_commit_batch_messages",
        "Messages per group-commit batch (one transaction)."
    );
    describe_histogram!(
        "chat_commit_seconds",
        "Seconds a group-commit batch took to store and commit."
    );
    describe_histogram!(
        "chat_db_acquire_seconds",
        "Seconds a group-commit batch waited for a write connection, by pool."
    );
    describe_counter!(
        "chat_db_retries_total",
        "Transactions (group commits, upload quota checks) run again after losing a race with another (deadlock, lock wait timeout, serialization failure)."
    );
    describe_gauge!(
        "chat_db_pool_connections",
        "Open database connections, by pool (write, read)."
    );
    describe_gauge!(
        "chat_db_pool_in_use_connections",
        "Database connections checked out of the pool now, by pool."
    );
    describe_gauge!(
        "chat_db_pool_idle_connections",
        "Idle database connections, by pool."
    );
    describe_gauge!(
        "chat_db_pool_max_connections",
        "The most connections a pool opens, by pool."
    );
    describe_counter!(
        "chat_limit_refusals_total",
        "Calls refused by a per-user limit, by limit."
    );
    describe_counter!(
        "chat_bus_published_total",
        "Events this node handed to the cross-node transport (FANOUT=nats or postgres)."
    );
    describe_counter!(
        "chat_bus_received_total",
        "Events (or, with FANOUT=postgres, wake-ups) this node received from other nodes."
    );
    describe_counter!(
        "chat_bus_dropped_total",
        "Events not carried by the cross-node transport, by reason (queue_full, publish_failed, slow_consumer, fault); other nodes get them from the head check."
    );
    describe_counter!(
        "chat_bus_recovered_total",
        "Channel heads the head check delivered from storage because this node's hub had not published them."
    );
    describe_gauge!(
        "chat_bus_connected",
        "1 while the cross-node transport is connected, 0 while it is not (FANOUT=nats or postgres)."
    );
}

/// Every handle with a fixed label set, registered once.
struct Handles {
    feeds_open: Gauge,
    feed_events: Counter,
    feed_heartbeats: Counter,
    feed_catchups: Counter,
    uploads_open: Gauge,
    downloads_open: Gauge,
    upload_bytes: Counter,
    download_bytes: Counter,
    commit_batch: Histogram,
    commit_seconds: Histogram,
    write_acquire: Histogram,
    db_retries: Counter,
    bus_published: Counter,
    bus_received: Counter,
    bus_recovered: Counter,
    bus_connected: Gauge,
    grpc: GrpcMethods,
}

impl Handles {
    fn register() -> Handles {
        Handles {
            feeds_open: metrics::gauge!("chat_feeds_open"),
            feed_events: metrics::counter!("chat_feed_events_total"),
            feed_heartbeats: metrics::counter!("chat_feed_heartbeats_total"),
            feed_catchups: metrics::counter!("chat_feed_catchups_total"),
            uploads_open: metrics::gauge!("chat_streams_open", "stream" => "upload"),
            downloads_open: metrics::gauge!("chat_streams_open", "stream" => "download"),
            upload_bytes: metrics::counter!("chat_upload_bytes_total"),
            download_bytes: metrics::counter!("chat_download_bytes_total"),
            commit_batch: metrics::histogram!("chat_commit_batch_messages"),
            commit_seconds: metrics::histogram!("chat_commit_seconds"),
            write_acquire: metrics::histogram!("chat_db_acquire_seconds", "pool" => "write"),
            db_retries: metrics::counter!("chat_db_retries_total"),
            bus_published: metrics::counter!("chat_bus_published_total"),
            bus_received: metrics::counter!("chat_bus_received_total"),
            bus_recovered: metrics::counter!("chat_bus_recovered_total"),
            bus_connected: metrics::gauge!("chat_bus_connected"),
            grpc: GrpcMethods::register(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Feeds, streams, bytes, group commit, limits: called from the code that does the work.

/// A Subscribe feed opened (the hub registered it); pair with [`feed_closed`].
pub fn feed_opened() {
    if let Some(m) = handles() {
        m.feeds_open.increment(1.0);
    }
}

/// A Subscribe feed ended (its registration was dropped).
pub fn feed_closed() {
    if let Some(m) = handles() {
        m.feeds_open.decrement(1.0);
    }
}

/// `n` events handed to a feed's response stream at once (one batch: one atomic add).
pub fn feed_events(n: usize) {
    if let Some(m) = handles() {
        m.feed_events.increment(n as u64);
    }
}

/// A heartbeat handed to a feed (also counted by [`feed_events`]).
pub fn feed_heartbeat() {
    if let Some(m) = handles() {
        m.feed_heartbeats.increment(1);
    }
}

/// A feed that fell behind the hub is being caught up from storage.
pub fn feed_caught_up() {
    if let Some(m) = handles() {
        m.feed_catchups.increment(1);
    }
}

/// Which attachment stream [`stream_open`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `UploadAttachment` (client stream).
    Upload,
    /// `DownloadAttachment` (server stream).
    Download,
}

/// Counts one open attachment stream in `chat_streams_open{stream}` until dropped.
#[must_use = "the stream counts as open only while this guard lives"]
pub struct OpenStream(Option<&'static Gauge>);

/// An open attachment stream of `kind`; hold the guard for the stream's life.
pub fn stream_open(kind: StreamKind) -> OpenStream {
    let gauge = handles().map(|m| match kind {
        StreamKind::Upload => &m.uploads_open,
        StreamKind::Download => &m.downloads_open,
    });
    if let Some(g) = gauge {
        g.increment(1.0);
    }
    OpenStream(gauge)
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.decrement(1.0);
        }
    }
}

/// `n` attachment bytes received and stored.
pub fn upload_bytes(n: usize) {
    if let Some(m) = handles() {
        m.upload_bytes.increment(n as u64);
    }
}

/// `n` attachment bytes sent to a client.
pub fn download_bytes(n: usize) {
    if let Some(m) = handles() {
        m.download_bytes.increment(n as u64);
    }
}

/// A group-commit batch of `messages` stored (or failed) in `took`.
pub fn commit_batch(messages: usize, took: Duration) {
    if let Some(m) = handles() {
        m.commit_batch.record(messages as f64);
        m.commit_seconds.record(took.as_secs_f64());
    }
}

/// A group-commit batch waited `took` for a connection of the write pool.
pub fn write_acquired(took: Duration) {
    if let Some(m) = handles() {
        m.write_acquire.record(took.as_secs_f64());
    }
}

/// A transaction lost a race with another (a deadlock, a lock-wait timeout, a serialization
/// failure) and is run again: counts `chat_db_retries_total`.
pub fn transaction_retried() {
    if let Some(m) = handles() {
        m.db_retries.increment(1);
    }
}

/// An event handed to the cross-node transport: counts `chat_bus_published_total`.
pub fn bus_published() {
    if let Some(m) = handles() {
        m.bus_published.increment(1);
    }
}

/// An event (or wake-up) received from another node: counts `chat_bus_received_total`.
pub fn bus_received() {
    if let Some(m) = handles() {
        m.bus_received.increment(1);
    }
}

/// A channel head delivered from storage by the head check: counts `chat_bus_recovered_total`.
pub fn bus_recovered() {
    if let Some(m) = handles() {
        m.bus_recovered.increment(1);
    }
}

/// The cross-node transport connected or lost its connection: sets `chat_bus_connected`.
pub fn bus_connected(up: bool) {
    if let Some(m) = handles() {
        m.bus_connected.set(if up { 1.0 } else { 0.0 });
    }
}

/// An event the cross-node transport did not carry: counts `chat_bus_dropped_total{reason}`.
/// `reason` is one of a fixed few (`queue_full`, `publish_failed`, `slow_consumer`, `fault`).
pub fn bus_dropped(reason: &'static str) {
    if enabled() {
        metrics::counter!("chat_bus_dropped_total", "reason" => reason).increment(1);
    }
}

/// A call refused by a per-user limit: counts `chat_limit_refusals_total{limit}`.
///
/// `limit` names the limit as the configuration does, in snake case (`send_rate`,
/// `write_rate`, `feeds`, `uploads`, `upload_bytes`: [`crate::limits::Limit::name`]); keep the set small and fixed, since each value is a
/// time series of its own. Called once per refusal, before the error is returned; cheap when
/// metrics are off (a load and a branch), one short-lived label vector when on.
pub fn limit_refused(limit: &'static str) {
    if enabled() {
        metrics::counter!("chat_limit_refusals_total", "limit" => limit).increment(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Database pools, sampled at each scrape.

/// One pool's state at a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSample {
    /// `write` or `read`.
    pub pool: &'static str,
    /// Open connections.
    pub size: u32,
    /// Open connections not checked out.
    pub idle: usize,
    /// The pool's `max_connections`.
    pub max: u32,
}

/// Samples a store's pools; `None` once the store is gone (the sampler is then forgotten).
type Sampler = Box<dyn Fn() -> Option<Vec<PoolSample>> + Send + Sync>;

static POOLS: Mutex<Vec<Sampler>> = Mutex::new(Vec::new());

/// Has each scrape sample a store's pools (`chat_db_pool_*{pool}`). Does nothing unless metrics
/// are [`install`]ed. The sampler should hold the store weakly and answer `None` when it is
/// gone. With several stores in one process (tests), each scrape shows the last one sampled.
pub fn watch_pools(sampler: impl Fn() -> Option<Vec<PoolSample>> + Send + Sync + 'static) {
    if enabled() {
        POOLS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(sampler));
    }
}

fn sample_pools() {
    let mut samplers = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    samplers.retain(|sample| {
        let Some(pools) = sample() else {
            return false;
        };
        for p in pools {
            let in_use = (p.size as usize).saturating_sub(p.idle);
            metrics::gauge!("chat_db_pool_connections", "pool" => p.pool).set(p.size);
            metrics::gauge!("chat_db_pool_in_use_connections", "pool" => p.pool).set(in_use as f64);
            metrics::gauge!("chat_db_pool_idle_connections", "pool" => p.pool).set(p.idle as f64);
            metrics::gauge!("chat_db_pool_max_connections", "pool" => p.pool).set(p.max);
        }
        true
    });
}

// ---------------------------------------------------------------------------------------------
// gRPC calls (recorded by the request layer, `crate::telemetry`).

/// gRPC status code names as the Go middleware (go-grpc-prometheus) reports them, indexed by
/// code, so dashboards written for it work unchanged.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The `grpc_code` label of a status code number; any other number counts as `Unknown`.
pub fn code_name(code: i32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|c| CODE_NAMES.get(c))
        .copied()
        .unwrap_or("Unknown")
}

/// The handles of one method (or of every unknown path). Each is registered at its first use,
/// so a scrape shows the methods that were called and the codes they ended with, not 35
/// methods' worth of zeros (19 lines per histogram).
pub(crate) struct GrpcMethod {
    labels: Vec<Label>,
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    /// `grpc_server_handled_total` per code.
    handled: [OnceLock<Counter>; 17],
}

impl GrpcMethod {
    fn new(service: &str, method: &str, kind: &'static str) -> GrpcMethod {
        GrpcMethod {
            labels: vec![
                Label::new("grpc_service", service.to_owned()),
                Label::new("grpc_method", method.to_owned()),
                Label::new("grpc_type", kind),
            ],
            started: OnceLock::new(),
            handling: OnceLock::new(),
            handled: Default::default(),
        }
    }

    fn started(&self) {
        self.started
            .get_or_init(|| metrics::counter!("grpc_server_started_total", self.labels.iter()))
            .increment(1);
    }

    /// The call finished with `code` after `took`.
    pub(crate) fn handled(&self, code: i32, took: Duration) {
        let i = usize::try_from(code)
            .ok()
            .filter(|&c| c < CODE_NAMES.len())
            .unwrap_or(2);
        self.handled[i]
            .get_or_init(|| {
                let mut labels = self.labels.clone();
                labels.push(Label::new("grpc_code", CODE_NAMES[i]));
                metrics::counter!("grpc_server_handled_total", labels)
            })
            .increment(1);
        self.handling
            .get_or_init(|| metrics::histogram!("grpc_server_handling_seconds", self.labels.iter()))
            .record(took.as_secs_f64());
    }
}

/// Every method this server serves, by its path (`/chat.v1.ChatService/SendMessage`), read
/// from the same descriptor sets reflection serves; paths outside it share one `unknown`
/// entry, so a client cannot grow the label sets.
struct GrpcMethods {
    by_path: HashMap<String, GrpcMethod>,
    unknown: GrpcMethod,
}

impl GrpcMethods {
    fn register() -> GrpcMethods {
        let mut by_path = HashMap::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    let service_name = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    for m in &service.method {
                        let kind = match (m.client_streaming(), m.server_streaming()) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        by_path.insert(
                            format!("/{service_name}/{}", m.name()),
                            GrpcMethod::new(&service_name, m.name(), kind),
                        );
                    }
                }
            }
        }
        GrpcMethods {
            by_path,
            unknown: GrpcMethod::new("unknown", "unknown", "unknown"),
        }
    }
}

/// A call to `path` started: counts it and returns its method's handles for the end of the
/// call; `None` when metrics are off.
pub(crate) fn grpc_started(path: &str) -> Option<&'static GrpcMethod> {
    let m = handles()?;
    let method = m.grpc.by_path.get(path).unwrap_or(&m.grpc.unknown);
    method.started();
    Some(method)
}

// ---------------------------------------------------------------------------------------------
// The endpoint.

/// Serves `GET /metrics` (Prometheus text format 0.0.4) over HTTP/1.1 on `listener` until
/// `shutdown` resolves; any other path answers 404. Installs the recorder if needed. Each
/// scrape samples the database pools, then renders every metric.
///
/// Errors: the recorder could not be installed (see [`install`]); nothing is served then.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    install()?;
    let handle = match INSTALLED.get() {
        Some(Ok(i)) => i.handle.clone(),
        _ => return Err("the metrics recorder is not installed".into()),
    };
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&handle, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics endpoint: connection failed");
            }
        });
    }
}

fn respond<B>(handle: &PrometheusHandle, req: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let reply = |status: http::StatusCode, body: String| {
        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp
    };
    if req.uri().path() != "/metrics" {
        return reply(
            http::StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n".into(),
        );
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return reply(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "use GET /metrics\n".into(),
        );
    }
    sample_pools();
    let mut resp = reply(http::StatusCode::OK, handle.render());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_follow_the_go_middleware() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(5), "NotFound");
        assert_eq!(code_name(16), "Unauthenticated");
        assert_eq!(code_name(17), "Unknown");
        assert_eq!(code_name(-1), "Unknown");
    }
}

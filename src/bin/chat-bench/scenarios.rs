//! Scenarios 1-6, each against a fresh `chat-service serve` process, and the measurements
//! scenario 7 (`cluster.rs`) runs again on two nodes.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_service::cli::{Bearer, ChatClient, GroupClient};
use chat_service::proto::attachment_service_client::AttachmentServiceClient;
use chat_service::proto::chat_service_client::ChatServiceClient;
use chat_service::proto::group_service_client::GroupServiceClient;
use chat_service::proto::{self, subscribe_response::Event};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

use crate::baselines::BODY;
use crate::proc::{CpuSnapshot, RssSampler, Server};
use crate::{histogram, record, say, summary, Backend, Bench, BenchResult};

/// `n` HTTP/2 connections to `url`.
pub async fn connect_many(url: &str, n: usize) -> BenchResult<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(
            Endpoint::from_shared(url.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

pub fn chat(ch: &Channel, token: &str) -> BenchResult<ChatClient> {
    Ok(ChatServiceClient::with_interceptor(
        ch.clone(),
        Bearer::new(token)?,
    ))
}

/// What the fan-out subscribers decode of each event: its sequence and, for a created message,
/// the body (which carries the send stamp). prost skips every other field, so the generator,
/// which shares the machine's two cores with the server, spends less of them decoding events.
/// Field numbers are those of `SubscribeResponse`, `MessageCreated` and `Message`.
#[derive(Clone, PartialEq, prost::Message)]
struct LeanEvent {
    #[prost(int64, tag = "2")]
    sequence: i64,
    #[prost(message, optional, tag = "3")]
    message_created: Option<LeanCreated>,
}

/// `MessageCreated`, its `message` field only.
#[derive(Clone, PartialEq, prost::Message)]
struct LeanCreated {
    #[prost(message, optional, tag = "1")]
    message: Option<LeanMessage>,
}

/// `Message`, its `body` field only.
#[derive(Clone, PartialEq, prost::Message)]
struct LeanMessage {
    #[prost(string, tag = "4")]
    body: String,
}

/// Subscribe, decoding each event as a [`LeanEvent`].
async fn subscribe_lean(
    ch: &Channel,
    token: &str,
    req: proto::SubscribeRequest,
) -> BenchResult<tonic::Streaming<LeanEvent>> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await?;
    let mut request = tonic::Request::new(req);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let path = http::uri::PathAndQuery::from_static("/chat.v1.ChatService/Subscribe");
    let codec = tonic_prost::ProstCodec::<proto::SubscribeRequest, LeanEvent>::default();
    Ok(grpc
        .server_streaming(request, path, codec)
        .await?
        .into_inner())
}

/// What the concurrent history readers decode of a page: how many messages it holds (prost
/// skips every field of each message, and the page token).
#[derive(Clone, PartialEq, prost::Message)]
struct LeanPage {
    #[prost(message, repeated, tag = "1")]
    messages: Vec<LeanSkipped>,
}

/// A message whose fields are all skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct LeanSkipped {}

/// ListMessages, decoding the page as a [`LeanPage`]; `Err` carries the gRPC status.
async fn list_lean(
    grpc: &mut tonic::client::Grpc<Channel>,
    token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    req: proto::ListMessagesRequest,
) -> Result<LeanPage, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(req);
    request
        .metadata_mut()
        .insert("authorization", token.clone());
    let path = http::uri::PathAndQuery::from_static("/chat.v1.ChatService/ListMessages");
    let codec = tonic_prost::ProstCodec::<proto::ListMessagesRequest, LeanPage>::default();
    Ok(grpc.unary(request, path, codec).await?.into_inner())
}

pub fn groups(ch: &Channel, token: &str) -> BenchResult<GroupClient> {
    Ok(GroupServiceClient::with_interceptor(
        ch.clone(),
        Bearer::new(token)?,
    ))
}

/// Alice makes `n` groups with `members`; their channel ids.
pub async fn make_groups(
    g: &mut GroupClient,
    n: usize,
    members: &[String],
) -> BenchResult<Vec<String>> {
    Ok(make_groups_at(g, n, members)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// Alice makes `n` groups with `members`; their channel ids and last sequences (a cursor from
/// which a feed sees everything that follows, however late it opens).
async fn make_groups_at(
    g: &mut GroupClient,
    n: usize,
    members: &[String],
) -> BenchResult<Vec<(String, i64)>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let ch = g
            .create_group(proto::CreateGroupRequest {
                name: format!("bench {i}"),
                member_ids: members.to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .channel
            .ok_or("no channel")?;
        ids.push((ch.id, ch.last_sequence));
    }
    Ok(ids)
}

pub fn send_req(channel_id: &str, body: String) -> proto::SendMessageRequest {
    proto::SendMessageRequest {
        channel_id: channel_id.to_owned(),
        body,
        ..Default::default()
    }
}

/// Nanoseconds since `epoch`, written first in a body so the receiver can time delivery.
fn stamped(epoch: Instant, at: Instant) -> String {
    format!("{}|{BODY}", at.duration_since(epoch).as_nanos())
}

fn stamp_of(epoch: Instant, body: &str) -> Option<Instant> {
    let nanos: u64 = body.split_once('|')?.0.parse().ok()?;
    Some(epoch + Duration::from_nanos(nanos))
}

/// Scenario 1: closed-loop persisted sends at each concurrency, over 16 channels, one
/// connection per four senders; ack latency and the server's peak RSS.
pub async fn sends(bench: &Bench, backend: Backend) -> BenchResult<Value> {
    let server = Server::start(bench, backend, &[]).await?;
    let alice = bench.token("alice");
    let conns = connect_many(&server.url(), 16).await?;
    let channels = make_groups(&mut groups(&conns[0], &alice)?, 16, &["bob".into()]).await?;
    let rss_idle = server.rss_kib();
    let mut runs = Vec::new();
    for &c in &bench.plan.send_concurrency {
        runs.push(closed_loop(bench, &server, &conns, &channels, c).await?);
    }
    server.stop().await;
    Ok(json!({ "channels": 16, "idle_rss_mib": rss_idle as f64 / 1024.0, "runs": runs }))
}

/// `c` senders in a closed loop for `send_seconds` on `channels` (taken in turn), over the
/// first `c / 4` of `conns` (connections to `server`); sends/s (`per_second`), ack latency,
/// errors, the server's peak RSS and CPU per send.
pub async fn closed_loop(
    bench: &Bench,
    server: &Server,
    conns: &[Channel],
    channels: &[String],
    c: usize,
) -> BenchResult<Value> {
    let alice = bench.token("alice");
    let sampler = RssSampler::start(server.pid);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let n_conns = c.div_ceil(4).min(conns.len());
    let mut tasks = Vec::new();
    for i in 0..c {
        let mut client = chat(&conns[i % n_conns], &alice)?;
        let channel = channels[i % channels.len()].clone();
        let (stop, errors) = (stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client.send_message(send_req(&channel, BODY.into())).await {
                    Ok(_) => record(&mut h, t.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            h
        }));
    }
    let (t, cpu0) = (Instant::now(), CpuSnapshot::take(&[server.pid]));
    tokio::time::sleep(Duration::from_secs_f64(bench.plan.send_seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    for task in tasks {
        h.add(task.await?)?;
    }
    let rate = h.len() as f64 / t.elapsed().as_secs_f64();
    let cpu = cpu0.per_op(&CpuSnapshot::take(&[server.pid]), h.len() as f64);
    say(&format!(
        "  c={c}: {rate:.0} sends/s, p99 {:.2} ms",
        h.value_at_quantile(0.99) as f64 / 1000.0
    ));
    Ok(json!({
        "concurrency": c,
        "connections": n_conns,
        "per_second": rate,
        "errors": errors.load(Ordering::Relaxed),
        "ack": summary(&h),
        "peak_rss_mib": sampler.max() as f64 / 1024.0,
        "cpu_per_send": cpu,
    }))
}

/// Scenario 2: open loop at fractions of `best` sends/s; ack latency and send → delivery to a
/// live subscriber, both from the intended send time (no coordinated omission).
pub async fn latency(bench: &Bench, backend: Backend, best: f64) -> BenchResult<Value> {
    let mut levels = Vec::new();
    for &level in &bench.plan.load_levels {
        let rate = (best * level).max(1.0);
        let server = Server::start(bench, backend, &[]).await?;
        let senders = connect_many(&server.url(), 8).await?;
        let listener = connect_many(&server.url(), 1).await?;
        let label = format!("{:.0}%", level * 100.0);
        let seconds = bench.plan.open_loop_seconds;
        let pids = [server.pid];
        let mut run =
            open_loop(bench, &senders, &listener[0], rate, seconds, &pids, &label).await?;
        run["level"] = json!(level);
        levels.push(run);
        server.stop().await;
    }
    Ok(json!({ "best_per_second": best, "levels": levels }))
}

/// Open-loop sends at `rate` per second for `seconds`, by alice over `senders` (in
/// turn) on 16 new groups, with bob following them all on `listener` (a connection to the
/// same node or to another node of a cluster); ack latency and send → delivery, both from the
/// intended send time (no coordinated omission), the generator's own lag, and CPU per send
/// of the servers `pids`. `label` names the run in the progress line.
pub async fn open_loop(
    bench: &Bench,
    senders: &[Channel],
    listener: &Channel,
    rate: f64,
    seconds: f64,
    pids: &[u32],
    label: &str,
) -> BenchResult<Value> {
    let (alice, bob) = (bench.token("alice"), bench.token("bob"));
    let channels = make_groups(&mut groups(&senders[0], &alice)?, 16, &["bob".into()]).await?;
    let epoch = Instant::now();
    // Bob follows the 16 channels on a connection of his own.
    let mut feed = chat(listener, &bob)?
        .subscribe(proto::SubscribeRequest {
            channel_ids: channels.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut warm = chat(&senders[0], &alice)?;
    warm.send_message(send_req(&channels[0], "warm-up".into()))
        .await?;
    let warmed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ev = feed.message().await?.ok_or("feed ended")?;
            if matches!(ev.event, Some(Event::MessageCreated(_))) {
                return BenchResult::Ok(());
            }
        }
    });
    warmed
        .await
        .map_err(|_| "the warm-up message was not delivered within 30 s")??;
    let total = (rate * seconds).round().max(1.0) as u64;
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut h = histogram();
            while let Ok(Some(ev)) = feed.message().await {
                if let Some(Event::MessageCreated(m)) = ev.event {
                    if let Some(at) = m.message.as_ref().and_then(|m| stamp_of(epoch, &m.body)) {
                        record(&mut h, at.elapsed());
                    }
                    if received.fetch_add(1, Ordering::Relaxed) + 1 >= total {
                        break;
                    }
                }
            }
            h
        })
    };
    let clients: Vec<ChatClient> = senders
        .iter()
        .map(|c| chat(c, &alice))
        .collect::<BenchResult<_>>()?;
    let acks = Arc::new(std::sync::Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    // The /proc scan first: read after `start`, it would make the first sends late.
    let cpu0 = CpuSnapshot::take(pids);
    let start = Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    // The arrival schedule is kept by a thread of its own: tokio's timer fires on whole
    // milliseconds, which issued every send up to 1 ms late and in bunches, one per tick.
    // A thread's sleep wakes within tens of microseconds of the due time.
    let (ticks, mut due_times) = tokio::sync::mpsc::unbounded_channel();
    let pacer = std::thread::spawn(move || {
        for k in 0..total {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if ticks.send((k, due)).is_err() {
                return;
            }
        }
    });
    // How late the generator itself issues each send (waking, scheduling): part of every
    // latency below, reported so it is not mistaken for the server's.
    let mut lag = histogram();
    while let Some((k, due)) = due_times.recv().await {
        record(&mut lag, due.elapsed());
        let mut client = clients[k as usize % clients.len()].clone();
        let req = send_req(&channels[(k % 16) as usize], stamped(epoch, due));
        let (acks, errors) = (acks.clone(), errors.clone());
        inflight.spawn(async move {
            match client.send_message(req).await {
                Ok(_) => {
                    if let Ok(mut h) = acks.lock() {
                        record(&mut h, due.elapsed());
                    }
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while inflight.try_join_next().is_some() {}
    }
    pacer.join().map_err(|_| "the pacer thread panicked")?;
    while inflight.join_next().await.is_some() {}
    let sent_secs = start.elapsed().as_secs_f64();
    let cpu = cpu0.per_op(&CpuSnapshot::take(pids), total as f64);
    let delivery = match tokio::time::timeout(Duration::from_secs(30), receiver).await {
        Ok(h) => h?,
        Err(_) => {
            return Err(format!(
                "deliveries stopped at {} of {total}",
                received.load(Ordering::Relaxed)
            )
            .into())
        }
    };
    let ack = acks.lock().map(|h| h.clone()).map_err(|_| "poisoned")?;
    say(&format!(
        "  {label} ({rate:.0}/s): ack p99 {:.2} ms, delivery p99 {:.2} ms",
        ack.value_at_quantile(0.99) as f64 / 1000.0,
        delivery.value_at_quantile(0.99) as f64 / 1000.0
    ));
    Ok(json!({
        "target_per_second": rate,
        "achieved_per_second": total as f64 / sent_secs,
        "errors": errors.load(Ordering::Relaxed),
        "ack": summary(&ack),
        "delivery": summary(&delivery),
        "generator_lag": summary(&lag),
        "cpu_per_send": cpu,
    }))
}

/// Scenario 3: one channel, `fanout_subscribers` subscribers over `fanout_connections`
/// connections; `fanout_messages` messages of ~100 bytes; deliveries/s, delivery latency, and
/// a check that every subscriber saw every sequence exactly once, in order.
pub async fn fanout(bench: &Bench, backend: Backend) -> BenchResult<Value> {
    let server = Server::start(bench, backend, &[]).await?;
    let out = fanout_on(bench, &[&server]).await;
    server.stop().await;
    out
}

/// Scenario 3's measurement on `nodes` (one server, or the nodes of a cluster on one
/// database): the senders on the first node, the `fanout_subscribers` spread evenly over the
/// nodes, each node's share over `fanout_connections / nodes` connections (at least one).
/// Server CPU is the nodes' sum; peak RSS the highest node's (each node's is in `nodes`).
pub async fn fanout_on(bench: &Bench, nodes: &[&Server]) -> BenchResult<Value> {
    let plan = &bench.plan;
    let alice = bench.token("alice");
    let first = nodes.first().ok_or("fan-out needs a node")?;
    let sender_conn = connect_many(&first.url(), 1).await?;
    let conns_per_node = plan.fanout_connections.div_ceil(nodes.len()).max(1);
    let mut conns = Vec::new();
    for node in nodes {
        conns.extend(connect_many(&node.url(), conns_per_node).await?);
    }
    let users: Vec<String> = (0..plan.fanout_subscribers)
        .map(|i| format!("sub-{i}"))
        .collect();
    let (channel, cursor) = make_groups_at(&mut groups(&sender_conn[0], &alice)?, 1, &users)
        .await?
        .remove(0);
    let epoch = Instant::now();
    let ready = Arc::new(AtomicUsize::new(0));
    let want = plan.fanout_messages as u64;
    let mut subs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let conn = conns[i % conns.len()].clone();
        let token = bench.token(user);
        let (channel, ready) = (channel.clone(), ready.clone());
        subs.push(tokio::spawn(async move {
            // From the group's creation on: the warm-up arrives however late this stream opens.
            let req = proto::SubscribeRequest {
                channel_ids: vec![channel.clone()],
                cursors: [(channel, cursor)].into(),
            };
            let mut feed = subscribe_lean(&conn, &token, req).await?;
            let mut h = histogram();
            let (mut got, mut last, mut gaps) = (0u64, 0i64, 0u64);
            let mut warmed = false;
            while let Some(ev) = feed.message().await? {
                let Some(m) = ev.message_created else {
                    continue;
                };
                if last != 0 && ev.sequence != last + 1 {
                    gaps += 1;
                }
                last = ev.sequence;
                if !warmed {
                    warmed = true;
                    ready.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(at) = m.message.as_ref().and_then(|m| stamp_of(epoch, &m.body)) {
                    record(&mut h, at.elapsed());
                }
                got += 1;
                if got == want {
                    break;
                }
            }
            BenchResult::Ok((h, got, gaps, Instant::now()))
        }));
    }
    // Warm-up: every subscriber has its stream open once it has seen this message.
    let mut sender = chat(&sender_conn[0], &alice)?;
    sender
        .send_message(send_req(&channel, "warm-up".into()))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::Relaxed) < users.len() {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} subscribers live",
                ready.load(Ordering::Relaxed),
                users.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let samplers: Vec<RssSampler> = nodes.iter().map(|n| RssSampler::start(n.pid)).collect();
    let pids: Vec<u32> = nodes.iter().map(|n| n.pid).collect();
    let cpu0 = CpuSnapshot::take(&pids);
    let start = Instant::now();
    // Four senders in a closed loop on the sender's connection.
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..4 {
        let (mut s, next, channel) = (sender.clone(), next.clone(), channel.clone());
        senders.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < want {
                s.send_message(send_req(&channel, stamped(epoch, Instant::now())))
                    .await?;
            }
            BenchResult::Ok(())
        }));
    }
    for s in senders {
        s.await??;
    }
    let mut h = histogram();
    let (mut delivered, mut gaps, mut short, mut last_at) = (0u64, 0u64, 0usize, start);
    for sub in subs {
        let (sh, got, g, at) = tokio::time::timeout(Duration::from_secs(120), sub)
            .await
            .map_err(|_| "a subscriber stalled")???;
        h.add(sh)?;
        delivered += got;
        gaps += g;
        short += usize::from(got != want);
        last_at = last_at.max(at);
    }
    let secs = last_at.duration_since(start).as_secs_f64();
    // CPU per delivery of each node, the database, NATS and this generator, and how busy
    // the machine was: on two cores the generator's decoding is a large share.
    let cpu_per_delivery = cpu0.per_op(&CpuSnapshot::take(&pids), delivered as f64);
    let per_node: Vec<Value> = samplers
        .iter()
        .enumerate()
        .map(|(k, sampler)| {
            let us = cpu_per_delivery["servers_us"][k].as_f64().unwrap_or(0.0);
            json!({
                "subscribers": (0..users.len()).filter(|i| i % conns.len() / conns_per_node == k).count(),
                "server_cpu_seconds": us * delivered as f64 / 1e6,
                "peak_rss_mib": sampler.max() as f64 / 1024.0,
            })
        })
        .collect();
    let cpu: f64 = per_node
        .iter()
        .filter_map(|n| n["server_cpu_seconds"].as_f64())
        .sum();
    let rss = per_node
        .iter()
        .filter_map(|n| n["peak_rss_mib"].as_f64())
        .fold(0.0, f64::max);
    let rate = delivered as f64 / secs;
    say(&format!("  {delivered} deliveries in {secs:.2} s = {rate:.0}/s, p99 {:.2} ms, gaps {gaps}, short {short}",
        h.value_at_quantile(0.99) as f64 / 1000.0));
    Ok(json!({
        "subscribers": users.len(),
        "connections": conns.len(),
        "messages": want,
        "deliveries": delivered,
        "seconds": secs,
        "deliveries_per_second": rate,
        "delivery": summary(&h),
        "subscribers_with_gaps": gaps,
        "subscribers_missing_events": short,
        "server_cpu_seconds": cpu,
        "cpu_per_delivery": cpu_per_delivery,
        "peak_rss_mib": rss,
        "nodes": per_node,
    }))
}

/// Scenario 4: `idle_streams` open Subscribe streams, `idle_streams_per_connection` per
/// connection; the server's RSS per stream and its CPU while they sit idle (heartbeats only).
pub async fn idle(bench: &Bench, backend: Backend) -> BenchResult<Value> {
    let plan = &bench.plan;
    let server = Server::start(bench, backend, &[]).await?;
    let alice = bench.token("alice");
    let n_conns = plan.idle_streams.div_ceil(plan.idle_streams_per_connection);
    let users: Vec<String> = (0..n_conns).map(|i| format!("idle-{i}")).collect();
    let admin = connect_many(&server.url(), 1).await?;
    let (channel, cursor) = make_groups_at(&mut groups(&admin[0], &alice)?, 1, &users)
        .await?
        .remove(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss_kib();
    let conns = connect_many(&server.url(), n_conns).await?;
    let live = Arc::new(AtomicUsize::new(0));
    let mut streams = tokio::task::JoinSet::new();
    for s in 0..plan.idle_streams {
        let c = s / plan.idle_streams_per_connection;
        let mut client = chat(&conns[c], &bench.token(&users[c]))?;
        let (live, channel) = (live.clone(), channel.clone());
        streams.spawn(async move {
            // All of the user's channels, the group's from its creation on (see fanout).
            let req = proto::SubscribeRequest {
                channel_ids: Vec::new(),
                cursors: [(channel, cursor)].into(),
            };
            let Ok(resp) = client.subscribe(req).await else {
                return;
            };
            let mut feed = resp.into_inner();
            let mut counted = false;
            while let Ok(Some(ev)) = feed.message().await {
                if !counted && matches!(ev.event, Some(Event::MessageCreated(_))) {
                    counted = true;
                    live.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Every stream is open once it has seen this message.
    let mut sender = chat(&admin[0], &alice)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    sender
        .send_message(send_req(&channel, "are you there?".into()))
        .await?;
    while live.load(Ordering::Relaxed) < plan.idle_streams {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} streams live",
                live.load(Ordering::Relaxed),
                plan.idle_streams
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = server.rss_kib();
    let cpu0 = server.cpu_seconds();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(plan.idle_seconds)).await;
    let cpu_pct = (server.cpu_seconds() - cpu0) / t.elapsed().as_secs_f64() * 100.0;
    let per_stream_kib = rss1.saturating_sub(rss0) as f64 / plan.idle_streams as f64;
    say(&format!(
        "  {} streams: {per_stream_kib:.1} KiB each, idle CPU {cpu_pct:.2}%",
        plan.idle_streams
    ));
    streams.abort_all();
    server.stop().await;
    Ok(json!({
        "streams": plan.idle_streams,
        "connections": n_conns,
        "rss_before_mib": rss0 as f64 / 1024.0,
        "rss_after_mib": rss1 as f64 / 1024.0,
        "kib_per_stream": per_stream_kib,
        "idle_cpu_percent": cpu_pct,
        "heartbeat_seconds": 15,
    }))
}

/// Scenario 5: ListMessages pages of 50 on a channel of `history_messages` messages (written
/// straight into the database): latency of the first, middle and last page with one reader,
/// then pages/s with `history_readers` readers on random positions.
pub async fn history(bench: &Bench, backend: Backend) -> BenchResult<Value> {
    let plan = &bench.plan;
    let server = Server::start(bench, backend, &[]).await?;
    let alice = bench.token("alice");
    let conns = connect_many(&server.url(), plan.history_readers.div_ceil(4)).await?;
    let channel = make_groups(&mut groups(&conns[0], &alice)?, 1, &[])
        .await?
        .remove(0);
    let t = Instant::now();
    seed_history(bench, &server, backend, &channel, plan.history_messages).await?;
    say(&format!(
        "  seeded {} messages in {:.1} s",
        plan.history_messages,
        t.elapsed().as_secs_f64()
    ));
    let n = plan.history_messages;
    let scope = format!("messages/{channel}/");
    let token_before =
        |seq: i64| chat_service::domain::validate::encode_page_token(&scope, &seq.to_string());
    // The oldest page holds sequences base+1 … base+50.
    let positions = [
        ("first", String::new()),
        ("middle", token_before(HISTORY_BASE + n / 2)),
        ("last", token_before(HISTORY_BASE + 51)),
    ];
    let mut single = serde_json::Map::new();
    for (name, token) in &positions {
        let mut client = chat(&conns[0], &alice)?;
        let mut h = histogram();
        let end = Instant::now() + Duration::from_secs_f64(plan.history_seconds);
        while Instant::now() < end {
            let t = Instant::now();
            let page = client
                .list_messages(proto::ListMessagesRequest {
                    channel_id: channel.clone(),
                    page_size: 50,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            record(&mut h, t.elapsed());
            if page.messages.len() != 50 {
                return Err(format!("{name} page has {} messages", page.messages.len()).into());
            }
        }
        say(&format!(
            "  {name} page: p50 {:.2} ms, p99 {:.2} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        ));
        single.insert((*name).into(), summary(&h));
    }
    // Concurrent readers ask for pages all over the channel (a different position every call,
    // from a per-reader pseudo-random sequence), so nothing is served from one hot spot.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {alice}").parse()?;
    for i in 0..plan.history_readers {
        let mut grpc = tonic::client::Grpc::new(conns[i % conns.len()].clone());
        let bearer = bearer.clone();
        let (stop, errors, channel) = (stop.clone(), errors.clone(), channel.clone());
        let scope = scope.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            // xorshift64: any fixed, cheap sequence will do.
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // A page of 50 that lies wholly in the seeded range.
                let before = HISTORY_BASE + 51 + (x % (n as u64 - 50)) as i64;
                let page_token =
                    chat_service::domain::validate::encode_page_token(&scope, &before.to_string());
                let t = Instant::now();
                let req = proto::ListMessagesRequest {
                    channel_id: channel.clone(),
                    page_size: 50,
                    page_token,
                    ..Default::default()
                };
                match list_lean(&mut grpc, &bearer, req).await {
                    Ok(page) if page.messages.len() == 50 => record(&mut h, t.elapsed()),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            h
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(plan.history_seconds * 2.0)).await;
    stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    for task in tasks {
        h.add(task.await?)?;
    }
    let errors = errors.load(Ordering::Relaxed);
    if errors > 0 {
        return Err(format!("{errors} history pages failed or came back short").into());
    }
    let rate = h.len() as f64 / t.elapsed().as_secs_f64();
    say(&format!(
        "  {} readers: {rate:.0} pages/s, p99 {:.2} ms",
        plan.history_readers,
        h.value_at_quantile(0.99) as f64 / 1000.0
    ));
    server.stop().await;
    Ok(json!({
        "messages": n,
        "page_size": 50,
        "single_reader": single,
        "readers": plan.history_readers,
        "pages_per_second": rate,
        "concurrent": summary(&h),
    }))
}

/// Rounds of (dd, upload) in scenario 6; the best of each is compared.
const UPLOAD_ROUNDS: usize = 2;

/// `sync`: writes back every dirty page, so the next measurement starts from a clean disk.
async fn flush_disk() -> BenchResult<()> {
    let status = tokio::process::Command::new("sync").status().await?;
    if !status.success() {
        return Err("sync failed".into());
    }
    Ok(())
}

/// Seeded history starts after this sequence (the group's own events come first).
const HISTORY_BASE: i64 = 100;

/// Writes `n` messages into `channel` with one INSERT … SELECT, and moves its sequence on.
async fn seed_history(
    bench: &Bench,
    server: &Server,
    backend: Backend,
    channel: &str,
    n: i64,
) -> BenchResult<()> {
    let base = HISTORY_BASE;
    let now = chat_service::store::now_micros();
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&server.database_url).await?;
            sqlx::query(
                "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < $1) \
                 INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, sequence, create_time) \
                 SELECT printf('00000000-0000-7000-8000-%012d', g), 'default', $2, 'alice', \
                 'message ' || g || ' ' || $3, $4 + g, $5 FROM s",
            )
            .bind(n)
            .bind(channel)
            .bind(BODY)
            .bind(base)
            .bind(now)
            .execute(&pool)
            .await?;
            sqlx::query("UPDATE channels SET last_sequence = $1 WHERE id = $2")
                .bind(base + n)
                .bind(channel)
                .execute(&pool)
                .await?;
            pool.close().await;
        }
        Backend::Postgres => {
            let schema = server.schema().ok_or("no schema")?;
            let pool = sqlx::PgPool::connect(&bench.pg_url).await?;
            sqlx::query(&format!(
                "INSERT INTO {schema}.messages (id, tenant_id, channel_id, sender_id, body, sequence, create_time) \
                 SELECT '00000000-0000-7000-8000-' || lpad(g::text, 12, '0'), 'default', $2, 'alice', \
                 'message ' || g || ' ' || $3, $4 + g, $5 FROM generate_series(1, $1::bigint) g"
            ))
            .bind(n)
            .bind(channel)
            .bind(BODY)
            .bind(base)
            .bind(now)
            .execute(&pool)
            .await?;
            sqlx::query(&format!(
                "UPDATE {schema}.channels SET last_sequence = $1 WHERE id = $2"
            ))
            .bind(base + n)
            .bind(channel)
            .execute(&pool)
            .await?;
            sqlx::query(&format!("ANALYZE {schema}.messages"))
                .execute(&pool)
                .await?;
            pool.close().await;
        }
        Backend::Mysql => seed_history_mysql(&server.database_url, channel, n, now).await?,
    }
    Ok(())
}

/// Rows per INSERT … SELECT when seeding history on MySQL / MariaDB: each is its own
/// autocommit transaction, so no one transaction's undo log grows with the channel.
const MYSQL_SEED_CHUNK: i64 = 50_000;

/// [`seed_history`] on MySQL / MariaDB, all on the server: a table of the numbers 0-999,
/// crossed with itself, gives 1,000 × 1,000 row numbers, and INSERT … SELECT writes them into
/// `messages` in chunks of [`MYSQL_SEED_CHUNK`], in primary-key order (ids grow with `g`).
/// Neither database has a portable series function (MariaDB's `seq_1_to_N` tables are
/// MariaDB's own; MySQL's recursive CTEs stop at 1,000 levels by default).
async fn seed_history_mysql(url: &str, channel: &str, n: i64, now: i64) -> BenchResult<()> {
    if n > 1_000_000 {
        return Err("MySQL history seeding goes up to 1,000,000 messages".into());
    }
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    sqlx::query("CREATE TABLE bench_numbers (n INT NOT NULL PRIMARY KEY) ENGINE=InnoDB")
        .execute(&pool)
        .await?;
    let values: Vec<String> = (0..1000).map(|i| format!("({i})")).collect();
    sqlx::query(&format!(
        "INSERT INTO bench_numbers (n) VALUES {}",
        values.join(",")
    ))
    .execute(&pool)
    .await?;
    let mut from = 0;
    while from < n {
        let to = (from + MYSQL_SEED_CHUNK).min(n);
        sqlx::query(
            "INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, sequence, create_time) \
             SELECT CONCAT('00000000-0000-7000-8000-', LPAD(g, 12, '0')), 'default', ?, 'alice', \
             CONCAT('message ', g, ' ', ?), ? + g, ? \
             FROM (SELECT a.n * 1000 + b.n + 1 AS g FROM bench_numbers a CROSS JOIN bench_numbers b \
             WHERE a.n BETWEEN ? AND ?) s WHERE g > ? AND g <= ? ORDER BY g",
        )
        .bind(channel)
        .bind(BODY)
        .bind(HISTORY_BASE)
        .bind(now)
        .bind(from / 1000)
        .bind((to - 1) / 1000)
        .bind(from)
        .bind(to)
        .execute(&pool)
        .await?;
        from = to;
    }
    sqlx::query("DROP TABLE bench_numbers")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE channels SET last_sequence = ? WHERE id = ?")
        .bind(HISTORY_BASE + n)
        .bind(channel)
        .execute(&pool)
        .await?;
    sqlx::query("ANALYZE TABLE messages").execute(&pool).await?;
    // InnoDB writes the seed's pages back in the background: about 100 MB of dirty pages
    // after 1M rows, which the page cleaner was still flushing (through the doublewrite
    // buffer, on the same two cores) during the single-reader measurements. Live traffic does
    // not dirty 100 MB in 15 s, so pages are measured once that has settled: under 1,000
    // dirty pages (16 MiB), or 30 s at most (a shared server's other work keeps some dirty).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let dirty: Option<(String, String)> =
            sqlx::query_as("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'")
                .fetch_optional(&pool)
                .await
                .unwrap_or(None);
        match dirty.and_then(|(_, v)| v.parse::<u64>().ok()) {
            Some(pages) if pages > 1000 => tokio::time::sleep(Duration::from_millis(500)).await,
            _ => break,
        }
    }
    say(&format!(
        "  waited {:.1} s for InnoDB to write the seeded pages back",
        t.elapsed().as_secs_f64()
    ));
    pool.close().await;
    Ok(())
}

/// Scenario 6: `upload_bytes` through UploadAttachment in 1 MiB frames: MB/s and the server's
/// peak RSS growth.
pub async fn upload(bench: &Bench, backend: Backend) -> BenchResult<Value> {
    let size = bench.plan.upload_bytes;
    let server = Server::start(
        bench,
        backend,
        &[
            ("MAX_UPLOAD_BYTES", (size + 1).to_string()),
            // The per-user cap on bytes in unfinished uploads must hold the largest upload,
            // or the server refuses to start (its default is 1 GiB, the plan's size).
            (
                "MAX_UNFINISHED_UPLOAD_BYTES_PER_USER",
                (size + 1).to_string(),
            ),
        ],
    )
    .await?;
    let alice = bench.token("alice");
    let conns = connect_many(&server.url(), 1).await?;
    let channel = make_groups(&mut groups(&conns[0], &alice)?, 1, &[])
        .await?
        .remove(0);
    let mut files =
        AttachmentServiceClient::with_interceptor(conns[0].clone(), Bearer::new(&alice)?)
            .max_encoding_message_size(2 << 20);
    let frame = Bytes::from(
        (0..1 << 20)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let frames = size.div_ceil(1 << 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reset = server.reset_peak();
    let rss0 = server.rss_kib();
    let sampler = RssSampler::start(server.pid);
    // The disk's speed here swings several-fold with what it is still flushing (dd alone
    // measured 370 to 2,200 MB/s in one afternoon). So each round flushes everything first
    // (`sync`), runs dd, flushes, then uploads; the best of each over the rounds is compared.
    // The server flushes the stored file before it answers (as dd's fdatasync does).
    let (mut best_upload, mut best_dd, mut best_cpu) = (f64::MAX, 0.0f64, 0.0f64);
    for _ in 0..UPLOAD_ROUNDS {
        flush_disk().await?;
        let dd = crate::baselines::disk(bench).await?;
        best_dd = best_dd.max(dd["mb_per_second"].as_f64().unwrap_or(0.0));
        flush_disk().await?;
        let meta = proto::UploadAttachmentRequest {
            data: Some(proto::upload_attachment_request::Data::Metadata(
                proto::AttachmentMetadata {
                    channel_id: channel.clone(),
                    file_name: "bench.bin".into(),
                    content_type: "application/octet-stream".into(),
                    size_bytes: size as i64,
                    sha256: String::new(),
                },
            )),
        };
        let frame = frame.clone();
        let stream =
            futures::stream::iter(std::iter::once(meta).chain((0..frames).map(move |k| {
                let len = (size - k * (1 << 20)).min(1 << 20) as usize;
                proto::UploadAttachmentRequest {
                    data: Some(proto::upload_attachment_request::Data::Chunk(
                        frame.slice(..len),
                    )),
                }
            })));
        let (t, cpu0) = (Instant::now(), server.cpu_seconds());
        let attachment = files
            .upload_attachment(stream)
            .await?
            .into_inner()
            .attachment
            .ok_or("no attachment")?;
        let secs = t.elapsed().as_secs_f64();
        if secs < best_upload {
            best_upload = secs;
            best_cpu = server.cpu_seconds() - cpu0;
        }
        if attachment.size_bytes as u64 != size {
            return Err("wrong size stored".into());
        }
        files
            .delete_attachment(proto::DeleteAttachmentRequest {
                attachment_id: attachment.id,
            })
            .await?;
    }
    let secs = best_upload;
    let peak = if reset {
        server.peak_kib()
    } else {
        sampler.max()
    };
    let growth = peak.saturating_sub(rss0) as f64 / 1024.0;
    let mb_s = size as f64 / 1e6 / secs;
    say(&format!(
        "  {} MiB in {secs:.2} s = {mb_s:.0} MB/s (best of {UPLOAD_ROUNDS}; dd best {best_dd:.0} MB/s), server CPU {best_cpu:.2} s, peak RSS growth {growth:.1} MiB",
        size >> 20
    ));
    server.stop().await;
    Ok(json!({
        "bytes": size,
        "frame_bytes": 1 << 20,
        "seconds": secs,
        "mb_per_second": mb_s,
        "rounds": UPLOAD_ROUNDS,
        "disk_mb_per_second": best_dd,
        "server_cpu_seconds": best_cpu,
        "rss_before_mib": rss0 as f64 / 1024.0,
        "peak_rss_growth_mib": growth,
        "peak_from": if reset { "VmHWM after clear_refs" } else { "VmRSS sampled every 50 ms" },
    }))
}

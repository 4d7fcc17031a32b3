//! Real input: every dialog of `../shared/corpus/dialogs.jsonl` (7,634 dialogs, 19,587 lines,
//! 28 languages) replayed as conversations — two users alternating lines, each dialog in its own
//! group — while a third member holds one live `Subscribe` over all their channels. History
//! (every page of ListMessages) and the live feed must both give back every line byte for byte,
//! in order.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_service::proto::{self, subscribe_response::Event};
use common::*;
use futures::StreamExt;

#[derive(serde::Deserialize)]
struct Dialog {
    language: String,
    lines: Vec<String>,
}

/// The corpus file: `CHAT_CORPUS` when set, else `../shared/corpus/dialogs.jsonl` beside the
/// checkout (where CI's clone finds it).
fn dialogs() -> Vec<Dialog> {
    let path = std::env::var("CHAT_CORPUS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/corpus/dialogs.jsonl"
        )
        .to_owned()
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{path}: {e} (set CHAT_CORPUS to the path of the corpus's dialogs.jsonl)")
    });
    text.lines()
        .map(|l| serde_json::from_str(l).expect("dialog"))
        .collect()
}

/// Dialogs replayed at once (each one in order).
const CONCURRENCY: usize = 16;

async fn replay_corpus(backend: Backend) {
    let dialogs = dialogs();
    assert_eq!(dialogs.len(), 7634);
    let total_lines: usize = dialogs.iter().map(|d| d.lines.len()).sum();
    let server = TestServer::start(backend).await;

    // The watcher's feed collects every MessageCreated, per channel.
    let mut watcher = server.chat(&token("watcher")).await;
    let mut feed = watcher
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    let collector = tokio::spawn(async move {
        let mut got: HashMap<String, Vec<String>> = HashMap::new();
        let mut n = 0;
        while n < total_lines {
            let ev = tokio::time::timeout(Duration::from_secs(60), feed.message())
                .await
                .expect("feed stalled")
                .expect("feed ok")
                .expect("feed open");
            if let Some(Event::MessageCreated(m)) = ev.event {
                let m = m.message.expect("message");
                got.entry(m.channel_id).or_default().push(m.body);
                n += 1;
            }
        }
        got
    });

    let started = Instant::now();
    let server = Arc::new(server);
    let results: Vec<(String, Vec<String>)> =
        futures::stream::iter(dialogs.into_iter().enumerate())
            .map(|(i, d)| {
                let server = server.clone();
                async move {
                    let a = format!("{}-{i}-a", d.language);
                    let b = format!("{}-{i}-b", d.language);
                    let mut groups = server.groups(&token(&a)).await;
                    let ch = groups
                        .create_group(proto::CreateGroupRequest {
                            name: format!("{} #{i}", d.language),
                            member_ids: vec![b.clone(), "watcher".into()],
                            ..Default::default()
                        })
                        .await
                        .expect("create group")
                        .into_inner()
                        .channel
                        .expect("channel")
                        .id;
                    let mut ca = server.chat(&token(&a)).await;
                    let mut cb = server.chat(&token(&b)).await;
                    for (j, line) in d.lines.iter().enumerate() {
                        let client = if j % 2 == 0 { &mut ca } else { &mut cb };
                        let m = send(client, &ch, line).await;
                        assert_eq!(&m.body, line);
                    }
                    (ch, d.lines)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    let elapsed = started.elapsed();
    eprintln!(
        "corpus replay on {backend:?}: {total_lines} messages in {} dialogs in {:.1} s = {:.0} messages/s ({} build, {CONCURRENCY} dialogs at once)",
        results.len(),
        elapsed.as_secs_f64(),
        total_lines as f64 / elapsed.as_secs_f64(),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );

    // The live feed: every line, in order, per channel.
    let got = tokio::time::timeout(Duration::from_secs(120), collector)
        .await
        .expect("feed complete")
        .expect("collector");
    for (ch, lines) in &results {
        assert_eq!(got.get(ch), Some(lines), "live feed of {ch}");
    }

    // History: every page, newest first, reversed = the dialog.
    let mut reader = server.chat(&token("watcher")).await;
    for (ch, lines) in &results {
        let mut history = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = reader
                .list_messages(proto::ListMessagesRequest {
                    channel_id: ch.clone(),
                    page_size: 3,
                    page_token,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            history.extend(page.messages.into_iter().map(|m| m.body));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        history.reverse();
        assert_eq!(&history, lines, "history of {ch}");
    }
}

on_every_backend!(replay_corpus);

//! MariaDB killed under send load and started again, with the service left running: while it
//! is down sends fail `UNAVAILABLE` (and nothing else), once it is back sends succeed again
//! without restarting the service, and afterwards every acknowledged message is stored once
//! and the channel's event sequences have no gap.
//!
//! The test runs a MariaDB server of its own (the machine's `mariadbd`, a fresh data folder, a
//! free port), so killing it touches no other test.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_service::proto;
use common::*;
use tonic::Code;

/// Guards against a hang, not a speed assertion.
const WAIT: Duration = Duration::from_secs(90);

/// A private MariaDB server: data folder, port, process.
struct Mariadb {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mariadb {
    /// Creates a data folder with `mariadb-install-db` and starts the server on a free port.
    fn start() -> Mariadb {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let status = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--skip-test-db", "--auth-root-authentication-method=normal"])
            .args(user_arg())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mariadb-install-db (Debian's mariadb-server package)");
        assert!(status.success(), "mariadb-install-db failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut db = Mariadb {
            dir,
            port,
            child: None,
        };
        db.spawn();
        db
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `mariadbd` on the data folder and waits until it answers.
    fn spawn(&mut self) {
        let dir: &Path = self.dir.path();
        let child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data().display()))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                "--max-connections=300",
            ])
            .args(user_arg())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mariadbd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server (SIGKILL: no shutdown, InnoDB recovers at the next start).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `mariadbd` refuses to run as root unless told to.
fn user_arg() -> Vec<String> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if root {
        vec!["--user=root".into()]
    } else {
        Vec::new()
    }
}

/// What the senders saw: acknowledged messages (id → sequence) and refusals by code.
#[derive(Default)]
struct Seen {
    acked: HashMap<String, i64>,
    refused: HashMap<Code, usize>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_survive_a_mariadb_restart() {
    let mut mariadb = Mariadb::start();
    let db = TestDb::on_mysql(&mariadb.url()).await;
    let server = TestServer::start_on(db, Options::default()).await;
    let mut groups = server.groups(&token("alice")).await;
    let channel = groups
        .create_group(proto::CreateGroupRequest {
            name: "restart".into(),
            member_ids: vec!["bob".into()],
            ..Default::default()
        })
        .await
        .expect("group")
        .into_inner()
        .channel
        .expect("channel")
        .id;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..4 {
        let mut chat = server.chat(&token("alice")).await;
        let (seen, stop, channel) = (seen.clone(), stop.clone(), channel.clone());
        senders.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let sent = chat
                    .send_message(proto::SendMessageRequest {
                        channel_id: channel.clone(),
                        body: format!("sender {s} message {i}"),
                        client_message_id: format!("s{s}-{i}"),
                        ..Default::default()
                    })
                    .await;
                let refused = {
                    let mut seen = seen.lock().expect("seen");
                    match sent {
                        Ok(r) => {
                            let m = r.into_inner().message.expect("message");
                            seen.acked.insert(m.id, m.sequence);
                            false
                        }
                        Err(e) => {
                            *seen.refused.entry(e.code()).or_default() += 1;
                            true
                        }
                    }
                };
                if refused {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let wait_for = |n: usize| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while seen.lock().expect("seen").acked.len() < n {
                assert!(Instant::now() < deadline, "sends did not reach {n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    wait_for(200).await;
    mariadb.kill();
    // Down for a while: every send in that time is refused, none acknowledged. A send waits
    // up to the pool's acquire timeout (10 s) for a connection before it is refused, so a
    // restart shorter than that is ridden out; this one is longer.
    let refused = |n: usize| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while seen.lock().expect("seen").refused.values().sum::<usize>() < n {
                assert!(
                    Instant::now() < deadline,
                    "sends kept succeeding without MariaDB"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen.lock().expect("seen").acked.len()
        }
    };
    let acked_before = refused(1).await;
    assert_eq!(
        refused(4).await,
        acked_before,
        "nothing acknowledged while down"
    );
    mariadb.spawn();
    wait_for(acked_before + 200).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.expect("sender");
    }

    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    let codes: Vec<Code> = seen.refused.keys().copied().collect();
    assert_eq!(codes, [Code::Unavailable], "refusals while down: {codes:?}");

    // Every acknowledged message stored once, with the sequence it was acknowledged with.
    let pool = sqlx::MySqlPool::connect(&server.db.url)
        .await
        .expect("mysql");
    let stored: Vec<(Vec<u8>, i64)> =
        sqlx::query_as("SELECT CAST(id AS BINARY), sequence FROM messages WHERE channel_id = ?")
            .bind(&channel)
            .fetch_all(&pool)
            .await
            .expect("messages");
    let stored: HashMap<String, i64> = stored
        .into_iter()
        .map(|(id, seq)| (String::from_utf8(id).expect("utf-8"), seq))
        .collect();
    for (id, sequence) in &seen.acked {
        assert_eq!(
            stored.get(id),
            Some(sequence),
            "acknowledged {id} stored once"
        );
    }
    // The event log: 1..=last_sequence, no gap, no repeat.
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM events WHERE channel_id = ? ORDER BY sequence")
            .bind(&channel)
            .fetch_all(&pool)
            .await
            .expect("events");
    let last: i64 = sqlx::query_scalar("SELECT last_sequence FROM channels WHERE id = ?")
        .bind(&channel)
        .fetch_one(&pool)
        .await
        .expect("channel");
    assert_eq!(
        sequences,
        (1..=last).collect::<Vec<i64>>(),
        "gap-free events"
    );
    assert!(stored.len() >= seen.acked.len());
    pool.close().await;
    server.stop().await;
}

//! The `chat-service serve` process as an operator runs it: the development secret it writes is
//! readable by its owner only, and SIGTERM stops it with exit status 0 within the drain period
//! while a client holds a health `Watch` open (gRPC client-side health checking keeps one per
//! connection and never cancels it).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Guards against a hang, not a speed assertion.
const WAIT: Duration = Duration::from_secs(30);

/// Starts `chat-service serve` in `dir` with embedded defaults, no JWT key and port 0; returns
/// the process and the address it printed in its `listening … addr=` log line.
fn spawn(dir: &Path) -> (Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat-service"))
        .arg("serve")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRPC_ADDR", "127.0.0.1:0")
        .env("SHUTDOWN_DRAIN_SECONDS", "2")
        .env("LOG_LEVEL", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat-service");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads every line (so the server never blocks on a full pipe), sends the address once.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .filter(|_| line.contains("listening"))
            {
                let addr = addr
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = rx.recv_timeout(WAIT).expect("the server's listening line");
    (child, addr)
}

async fn connect(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            panic!("the server did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("secret file")
        .permissions()
        .mode()
        & 0o777
}

/// Runs the server once in `dir`: waits for it, holds a health Watch open, sends SIGTERM and
/// checks the watch hears NOT_SERVING and the process exits 0.
async fn run_and_terminate(dir: &Path) {
    let (mut child, addr) = spawn(dir);
    let channel = connect(&addr).await;
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch ok").expect("open");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    // SAFETY: kill(2) on the pid of our own child.
    assert_eq!(
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) },
        0,
        "kill"
    );
    let next = tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("the watch hears of the shutdown");
    assert!(
        matches!(&next, Ok(Some(r)) if r.status == ServingStatus::NotServing as i32),
        "{next:?}"
    );
    // The client keeps its watch: the server must not wait for it.
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .expect("waiter");
    assert!(status.success(), "exit status {status:?}");
    drop(watch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_with_a_health_watch_open_and_the_dev_secret_is_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("data/dev-jwt-secret");
    run_and_terminate(dir.path()).await;
    assert_eq!(
        mode(&secret),
        0o600,
        "the generated development secret is readable by its owner only"
    );
    // A secret left world-readable by an older version is tightened at the next start.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let before = std::fs::read_to_string(&secret).expect("secret");
    run_and_terminate(dir.path()).await;
    assert_eq!(mode(&secret), 0o600);
    assert_eq!(
        std::fs::read_to_string(&secret).expect("secret"),
        before,
        "the same secret is kept, so tokens survive restarts"
    );
}

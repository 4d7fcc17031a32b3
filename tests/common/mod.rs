//! Test harness: a real server on 127.0.0.1:0 over a fresh database (a SQLite file in a temp
//! folder, or a new PostgreSQL schema), real tonic clients, tokens minted with the server's secret.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chat_service::auth::{self, AuthSettings, KeySource, TokenSpec, Verifier};
use chat_service::cli::{Bearer, ChatClient, GroupClient};
use chat_service::domain::{Chat, Settings};
use chat_service::fanout::Hub;
use chat_service::proto;
use chat_service::proto::chat_service_client::ChatServiceClient;
use chat_service::proto::group_service_client::GroupServiceClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The secret every test server verifies with.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Which database a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// PostgreSQL for tests: `CHAT_TEST_POSTGRES_URL`, else the local server of the dev machine / CI.
pub fn postgres_url() -> String {
    std::env::var("CHAT_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh database: its URL and, for PostgreSQL, its own schema.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub schema: Option<String>,
    /// Holds the SQLite file and the attachment folder; removed on drop.
    dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}/chat.db", dir.path().display());
                TestDb {
                    backend,
                    url,
                    schema: None,
                    dir,
                }
            }
            Backend::Postgres => {
                let url = postgres_url();
                let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(&url).await.unwrap_or_else(|e| {
                    panic!("PostgreSQL at {url} is required for these tests: {e}")
                });
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&pool)
                    .await
                    .expect("create schema");
                pool.close().await;
                TestDb {
                    backend,
                    url,
                    schema: Some(schema),
                    dir,
                }
            }
        }
    }

    /// The folder local attachment storage uses.
    pub fn blob_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("attachments")
    }

    /// Runs statements as they are, bypassing the service (PostgreSQL: in the test's schema).
    pub async fn execute(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.url).await.expect("sqlite");
                sqlx::raw_sql(sql).execute(&pool).await.expect(sql);
                pool.close().await;
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url).await.expect("postgres");
                let schema = self.schema.as_deref().unwrap_or("public");
                let sql = format!("SET search_path TO {schema}; {sql}");
                sqlx::raw_sql(&sql).execute(&pool).await.expect(&sql);
                pool.close().await;
            }
        }
    }

    /// Rows in a table (for "nothing was written" checks).
    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.url).await.expect("sqlite");
                let n: i64 = sqlx::query_scalar(&sql)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
                pool.close().await;
                n
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url).await.expect("postgres");
                let sql = format!(
                    "SELECT COUNT(*) FROM {}.{table}",
                    self.schema.as_deref().unwrap_or("public")
                );
                let n: i64 = sqlx::query_scalar(&sql)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
                pool.close().await;
                n
            }
        }
    }

    /// Row counts of every table that a change writes to.
    pub async fn counts(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for t in [
            "channels",
            "members",
            "messages",
            "events",
            "favorites",
            "audit_logs",
        ] {
            out.push((t.to_owned(), self.count(t).await));
        }
        out
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            let url = self.url.clone();
            // Leave nothing behind: drop the schema on a thread of its own (Drop is not async).
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        if let Ok(pool) = sqlx::PgPool::connect(&url).await {
                            let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                                .execute(&pool)
                                .await;
                            pool.close().await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

/// Options of a test server.
#[derive(Clone)]
pub struct Options {
    pub heartbeat: Duration,
    pub feed_buffer: usize,
    pub enforce_permissions: bool,
    pub issuer: Option<String>,
    pub key: Option<KeySource>,
    pub storage: Option<chat_service::blob::Blobs>,
    pub max_upload_bytes: i64,
    /// Transport options (CORS origins, drain period).
    pub serve: chat_service::server::ServeOptions,
    /// Per-user limits; none by default (tests that test a limit set it).
    pub limits: chat_service::limits::LimitSettings,
    /// Appended to the database URL (say `?mode=ro`); when set, migrations are not run.
    pub url_params: Option<String>,
    /// Serve Prometheus metrics on a port of its own (see [`TestServer::metrics_addr`]).
    pub metrics: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat: Duration::from_secs(15),
            feed_buffer: chat_service::fanout::DEFAULT_FEED_BUFFER,
            enforce_permissions: true,
            issuer: None,
            key: None,
            storage: None,
            max_upload_bytes: chat_service::domain::DEFAULT_MAX_UPLOAD_BYTES,
            serve: Default::default(),
            url_params: None,
            limits: chat_service::limits::LimitSettings::unlimited(),
            metrics: false,
        }
    }
}

/// A running server.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub db: TestDb,
    pub opts: Options,
    pub chat: Arc<Chat>,
    /// Where `GET /metrics` answers, with [`Options::metrics`].
    pub metrics_addr: Option<std::net::SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, Options::default()).await
    }

    pub async fn start_with(backend: Backend, opts: Options) -> TestServer {
        Self::start_on(TestDb::new(backend).await, opts).await
    }

    /// Stops the server and starts a new one on the same database and storage.
    pub async fn restart(mut self) -> TestServer {
        if let Some(t) = self.metrics_task.take() {
            t.abort();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.chat.store().close().await;
        let TestServer { db, opts, .. } = self;
        Self::start_on(db, opts).await
    }

    pub async fn start_on(db: TestDb, opts: Options) -> TestServer {
        // Before the store connects, so its pools are watched.
        let (metrics_addr, metrics_task) = if opts.metrics {
            chat_service::metrics::install().expect("metrics recorder");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind metrics");
            let addr = listener.local_addr().expect("metrics addr");
            let task = tokio::spawn(async move {
                chat_service::metrics::serve(listener, std::future::pending())
                    .await
                    .expect("metrics endpoint");
            });
            (Some(addr), Some(task))
        } else {
            (None, None)
        };
        let url = format!(
            "{}{}",
            db.url,
            opts.url_params.as_deref().unwrap_or_default()
        );
        let store =
            chat_service::store::connect(&url, db.schema.as_deref(), opts.url_params.is_none())
                .await
                .expect("connect store");
        let blobs = opts.storage.clone().unwrap_or_else(|| {
            chat_service::blob::Blobs::from_url(&format!("file://{}", db.blob_dir().display()))
                .expect("blobs")
        });
        let chat = Arc::new(Chat::new(
            store,
            Arc::new(Hub::new(opts.feed_buffer)),
            blobs,
            Settings {
                heartbeat: opts.heartbeat,
                max_upload_bytes: opts.max_upload_bytes,
                limits: opts.limits,
                ..Settings::default()
            },
        ));
        let verifier = Verifier::new(AuthSettings {
            key: opts
                .key
                .clone()
                .unwrap_or_else(|| KeySource::Secret(SECRET.as_bytes().to_vec())),
            issuer: opts.issuer.clone(),
            audience: None,
            enforce_permissions: opts.enforce_permissions,
        })
        .expect("verifier");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(chat_service::server::serve(
            listener,
            chat.clone(),
            Arc::new(verifier),
            opts.serve.clone(),
            async {
                let _ = rx.await;
            },
        ));
        let task = tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                panic!("server failed: {e}");
            }
        });
        TestServer {
            addr,
            db,
            opts,
            chat,
            metrics_addr,
            shutdown: Some(tx),
            task: Some(task),
            metrics_task,
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(t) = self.metrics_task.take() {
            t.abort();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new HTTP/2 connection to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    /// A ChatService client for `token`.
    pub async fn chat(&self, token: &str) -> ChatClient {
        ChatServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(token).expect("token"),
        )
    }

    /// A GroupService client for `token`.
    pub async fn groups(&self, token: &str) -> GroupClient {
        GroupServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(token).expect("token"),
        )
    }

    /// A client connection without any token.
    pub async fn raw_chat(&self) -> ChatServiceClient<Channel> {
        ChatServiceClient::new(self.channel().await)
    }

    /// A GroupService connection without any token.
    pub async fn raw_groups(&self) -> GroupServiceClient<Channel> {
        GroupServiceClient::new(self.channel().await)
    }
}

/// A token for `user` in tenant `default` with every permission, valid an hour.
pub fn token(user: &str) -> String {
    token_with(user, "default", auth::all_permission_names(), 3600)
}

/// A token with the given tenant, permission keys and lifetime (seconds; negative = expired).
pub fn token_with(user: &str, tenant: &str, permissions: Vec<String>, ttl: i64) -> String {
    auth::mint_hs256(
        SECRET.as_bytes(),
        &TokenSpec {
            sub: user,
            tenant,
            permissions,
            ttl_seconds: ttl,
            issuer: None,
            audience: None,
        },
    )
    .expect("mint")
}

/// Every permission key except `missing`.
pub fn all_but(missing: &str) -> Vec<String> {
    auth::all_permission_names()
        .into_iter()
        .filter(|p| p != missing)
        .collect()
}

/// Creates a group owned by `owner` with `members`; returns its id.
pub async fn group(server: &TestServer, owner: &str, members: &[&str]) -> String {
    let mut g = server.groups(&token(owner)).await;
    g.create_group(proto::CreateGroupRequest {
        name: "test group".into(),
        member_ids: members.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .expect("create group")
    .into_inner()
    .channel
    .expect("channel")
    .id
}

/// Sends `body` to `channel` as `user`; returns the message.
pub async fn send(client: &mut ChatClient, channel: &str, body: &str) -> proto::Message {
    client
        .send_message(proto::SendMessageRequest {
            channel_id: channel.into(),
            body: body.into(),
            ..Default::default()
        })
        .await
        .expect("send")
        .into_inner()
        .message
        .expect("message")
}

/// Field paths of the `google.rpc.BadRequest` violations in an INVALID_ARGUMENT status.
pub fn violations(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Runs each named `async fn(Backend)` test on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// This test process's resident set, in KiB (Linux), for "memory stays bounded" checks (the
/// server runs in the test's process).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

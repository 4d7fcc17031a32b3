//! Test harness: a real server on 127.0.0.1:0 over a fresh database (a SQLite file in a temp
//! folder, a new PostgreSQL schema, or a new MySQL / MariaDB database), real tonic clients,
//! tokens minted with the server's secret.
//!
//! The list of backends lives here and only here: [`Backend`], [`BACKENDS`] and
//! [`on_every_backend!`]. None is ever skipped: a database that cannot be reached fails the test.
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
    /// A file in a temporary folder.
    Sqlite,
    /// A schema of its own on [`postgres_url`].
    Postgres,
    /// A database of its own on [`mysql_url`] (MySQL 8.0+ or MariaDB 10.6+).
    Mysql,
}

/// Every backend, in the order [`on_every_backend!`] lists them.
pub const BACKENDS: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::Mysql];

/// PostgreSQL for tests: `CHAT_TEST_POSTGRES_URL`, else the local server of the dev machine / CI.
pub fn postgres_url() -> String {
    std::env::var("CHAT_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// MySQL / MariaDB for tests: `CHAT_TEST_MYSQL_URL`, else the local server of the dev machine /
/// CI (scripts/ensure-mariadb starts it). Tests make a database of their own beside the one it
/// names, so its user needs CREATE and DROP.
pub fn mysql_url() -> String {
    std::env::var("CHAT_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// `url` with its database (the path) replaced by `database`, its query kept.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let root = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    format!("{}/{database}{query}", &base[..root])
}

/// How old a leftover test database must be before [`TestDb::new`] drops it: older than any
/// test runs (nextest ends a test after 20 minutes at most), so a database of a test still
/// running, in this process or another, is never touched.
const STALE_TEST_DATABASE: Duration = Duration::from_secs(2 * 3600);

/// Drops the test databases (`t_` and a UUIDv7, which carries its creation time) older than
/// [`STALE_TEST_DATABASE`]: those of test processes that were killed before their `Drop` ran.
/// Once per test process.
async fn drop_stale_mysql_databases(pool: &sqlx::MySqlPool) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let names: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS BINARY) FROM information_schema.SCHEMATA \
         WHERE SCHEMA_NAME LIKE 't\\_%'",
    )
    .fetch_all(pool)
    .await
    .expect("list test databases");
    let now = std::time::SystemTime::now();
    for name in names.iter().filter_map(|n| std::str::from_utf8(n).ok()) {
        let created = name
            .strip_prefix("t_")
            .and_then(|u| uuid::Uuid::try_parse(u).ok())
            .and_then(|u| u.get_timestamp())
            .map(|t| {
                let (secs, nanos) = t.to_unix();
                std::time::UNIX_EPOCH + Duration::new(secs, nanos)
            });
        let stale = created
            .and_then(|c| now.duration_since(c).ok())
            .is_some_and(|age| age > STALE_TEST_DATABASE);
        if stale {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
                .execute(pool)
                .await;
        }
    }
}

/// Drops a test database: ends the connections still using it (a pool the test did not close,
/// a transaction left open) so nothing can hold the DROP up, then drops it, retrying a few
/// times. Errors: the last error when every attempt failed.
async fn drop_mysql_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut last = None;
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        let result = async {
            let mut c = sqlx::MySqlConnection::connect(admin_url).await?;
            sqlx::query("SET SESSION lock_wait_timeout = 10")
                .execute(&mut c)
                .await?;
            let others: Vec<i64> = sqlx::query_scalar(
                "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
                 WHERE DB = ? AND ID <> CONNECTION_ID()",
            )
            .bind(name)
            .fetch_all(&mut c)
            .await?;
            for id in others {
                // It may have ended by itself meanwhile.
                let _ = sqlx::query(&format!("KILL CONNECTION {id}"))
                    .execute(&mut c)
                    .await;
            }
            sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
                .execute(&mut c)
                .await?;
            c.close().await
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("an attempt"))
}

/// A fresh database: its URL and, for PostgreSQL, its own schema; for MySQL, its own
/// database. Everything it made is removed on drop.
pub struct TestDb {
    pub backend: Backend,
    /// The URL the store connects to (MySQL: naming the test's own database).
    pub url: String,
    /// PostgreSQL: the test's own schema (the store's `search_path`).
    pub schema: Option<String>,
    /// MySQL: the test's own database (`t_` and a UUIDv7), dropped on drop.
    pub database: Option<String>,
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
                    database: None,
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
                    database: None,
                    dir,
                }
            }
            Backend::Mysql => TestDb::new_mysql_on(&mysql_url(), dir).await,
        }
    }

    /// A fresh database on the MySQL / MariaDB server that `admin` (a URL of a user who may
    /// create databases) names.
    pub async fn on_mysql(admin: &str) -> TestDb {
        TestDb::new_mysql_on(admin, tempfile::tempdir().expect("tempdir")).await
    }

    async fn new_mysql_on(admin: &str, dir: tempfile::TempDir) -> TestDb {
        let pool = sqlx::MySqlPool::connect(admin).await.unwrap_or_else(|e| {
            panic!(
                "MySQL / MariaDB at {admin} is required for these tests \
                 (scripts/test starts the local MariaDB; CHAT_TEST_MYSQL_URL names \
                 another server): {e}"
            )
        });
        drop_stale_mysql_databases(&pool).await;
        let database = format!("t_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(&format!(
            "CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .execute(&pool)
        .await
        .expect("create database");
        pool.close().await;
        TestDb {
            backend: Backend::Mysql,
            url: with_database(admin, &database),
            schema: None,
            database: Some(database),
            dir,
        }
    }

    /// The folder local attachment storage uses.
    pub fn blob_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("attachments")
    }

    /// Runs statements as they are, bypassing the service (PostgreSQL: in the test's schema;
    /// MySQL: in the test's database, with `NO_BACKSLASH_ESCAPES`, so string literals mean
    /// what they mean on the other two).
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
            Backend::Mysql => {
                // Standard string literals, as on the other two: a backslash is a backslash.
                let pool = sqlx::MySqlPool::connect(&self.url).await.expect("mysql");
                let sql = format!(
                    "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES'); {sql}"
                );
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
            Backend::Mysql => {
                let pool = sqlx::MySqlPool::connect(&self.url).await.expect("mysql");
                let n: i64 = sqlx::query_scalar(&sql)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
                pool.close().await;
                n
            }
        }
    }

    /// Rows of a table that meet an SQL condition (`operation = 'delete'`), written in the
    /// SQL that all three databases share.
    pub async fn count_where(&self, table: &str, condition: &str) -> i64 {
        self.count(&format!("{table} WHERE {condition}")).await
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
        if let Some(database) = self.database.take() {
            // As above; a database left behind is reported, and dropped by a later run once
            // stale (see drop_stale_mysql_databases).
            let admin = mysql_url();
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(drop_mysql_database(&admin, &database))
                    .map_err(|e| format!("{database}: {e}"))
            })
            .join();
            match dropped {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("warning: could not drop the test database {e}"),
                Err(_) => eprintln!("warning: dropping a test database panicked"),
            }
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
    /// The database URL to serve from instead of the test database's own (say, the same
    /// database as another user); when set, migrations are not run.
    pub url: Option<String>,
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
            url: None,
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
        let url = opts.url.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                db.url,
                opts.url_params.as_deref().unwrap_or_default()
            )
        });
        let migrate = opts.url_params.is_none() && opts.url.is_none();
        let store = chat_service::store::connect(&url, db.schema.as_deref(), migrate)
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
    create_group(server.groups(&token(owner)).await, members).await
}

/// Creates a group with `members`, owned by `owner`'s client (on any server); returns its id.
pub async fn create_group(mut owner: GroupClient, members: &[&str]) -> String {
    owner
        .create_group(proto::CreateGroupRequest {
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

/// Runs each named `async fn(Backend)` test on every backend of [`BACKENDS`], as
/// `sqlite::NAME`, `postgres::NAME` and `mysql::NAME`.
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
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Mysql).await
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

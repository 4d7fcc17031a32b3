//! Every setting, from the environment first (the seed's `DB_*`, `JWT_*`, `LOG_LEVEL` names plus
//! `DATABASE_URL`, `GRPC_ADDR`, …), with command-line flags mirroring each variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

/// The `chat-service` command line.
#[derive(Debug, Parser)]
#[command(
    name = "chat-service",
    version,
    about = "A chat backend served over gRPC"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(DbArgs),
    /// Mint an HS256 token from JWT_SECRET (or the development secret under ./data).
    Token(TokenArgs),
    /// Create groups and add members (client).
    #[command(subcommand)]
    Group(GroupCommand),
    /// Send a message (client).
    Send(SendArgs),
    /// Print a channel's history, oldest first (client).
    History(HistoryArgs),
    /// Follow the live feed, resuming by cursor after a dropped connection (client).
    Tail(TailArgs),
    /// Upload a file in 1 MiB frames; prints the attachment id (client).
    Upload(UploadArgs),
    /// Download an attachment to a file (client).
    Download(DownloadArgs),
}

/// Where the database is.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Full database URL (`sqlite://./data/chat.db`, `postgres://user@host/db`,
    /// `mysql://user@host/db` or `mariadb://user@host/db`). Wins over DB_*.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// `sqlite`, `postgres` (`postgresql`) or `mysql` (`mariadb`), as the seed's DB_CONNECTOR.
    #[arg(long, env = "DB_CONNECTOR")]
    pub db_connector: Option<String>,
    /// Database host.
    #[arg(long, env = "DB_HOST", default_value = "127.0.0.1")]
    pub db_host: String,
    /// Database port (default 5432 for PostgreSQL, 3306 for MySQL).
    #[arg(long, env = "DB_PORT")]
    pub db_port: Option<u16>,
    /// Database user (default `postgres` for PostgreSQL, `root` for MySQL).
    #[arg(long, env = "DB_USER")]
    pub db_user: Option<String>,
    /// Database password.
    #[arg(long, env = "DB_PASSWORD", hide_env_values = true)]
    pub db_password: Option<String>,
    /// Database name (default `chat`; a file path for sqlite).
    #[arg(long, env = "DB_DATABASE")]
    pub db_database: Option<String>,
    /// PostgreSQL schema (search_path) holding the tables (PostgreSQL only).
    #[arg(long, env = "DB_SCHEMA")]
    pub db_schema: Option<String>,
}

/// The embedded default database.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./data/chat.db";

impl DbArgs {
    /// The database URL these settings name: `DATABASE_URL` as given, else one built from
    /// `DB_CONNECTOR` and the other `DB_*` settings (user, password and database name
    /// percent-encoded), else [`DEFAULT_DATABASE_URL`].
    ///
    /// Errors: one line naming the bad variable (a `DATABASE_URL` of an unknown scheme, an
    /// unknown `DB_CONNECTOR`).
    pub fn url(&self) -> Result<String, String> {
        if let Some(u) = &self.database_url {
            if crate::store::Database::from_url(u).is_none() {
                return Err(
                    "DATABASE_URL: must start with sqlite:, postgres:, mysql: or mariadb:".into(),
                );
            }
            return Ok(u.clone());
        }
        let Some(connector) = &self.db_connector else {
            return Ok(DEFAULT_DATABASE_URL.to_owned());
        };
        match connector.as_str() {
            "sqlite" => Ok(format!(
                "sqlite://{}",
                self.db_database.as_deref().unwrap_or("./data/chat.db")
            )),
            "postgres" | "postgresql" => Ok(self.server_url("postgres", "postgres", 5432)),
            "mysql" | "mariadb" => Ok(self.server_url("mysql", "root", 3306)),
            other => Err(format!(
                "DB_CONNECTOR: unknown connector {other:?} (use sqlite, postgres or mysql)"
            )),
        }
    }

    /// `scheme://user[:password]@host:port/database`, with `user`, `port` and the database
    /// (`chat`) defaulted, and user, password and database percent-encoded.
    fn server_url(&self, scheme: &str, default_user: &str, default_port: u16) -> String {
        let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let user = self.db_user.as_deref().unwrap_or(default_user);
        let auth = match &self.db_password {
            Some(p) => format!("{}:{}", enc(user), enc(p)),
            None => enc(user),
        };
        format!(
            "{scheme}://{auth}@{}:{}/{}",
            self.db_host,
            self.db_port.unwrap_or(default_port),
            enc(self.db_database.as_deref().unwrap_or("chat"))
        )
    }
}

/// How tokens are verified.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// HS256 shared secret.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Path of a PEM public key (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA).
    #[arg(long, env = "JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Path of a JWKS file; keys picked by `kid`; re-read when the file changes.
    #[arg(long, env = "JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required member of the `aud` claim.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// `false` switches permission-key checks off (membership rules still apply).
    #[arg(long, env = "AUTH_ENFORCE_PERMISSIONS", default_value_t = true, action = clap::ArgAction::Set)]
    pub auth_enforce_permissions: bool,
}

/// Per-user limits and transport limits (see [`crate::limits`]).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// SendMessage and ForwardMessage per second per user, sustained (0: no limit).
    #[arg(long, env = "RATE_LIMIT_SENDS_PER_SECOND", default_value_t = crate::limits::DEFAULT_SENDS_PER_SECOND, value_parser = non_negative_rate)]
    pub rate_limit_sends_per_second: f64,
    /// Sends a user may make at once after a quiet spell.
    #[arg(long, env = "RATE_LIMIT_SENDS_BURST", default_value_t = crate::limits::DEFAULT_SENDS_BURST)]
    pub rate_limit_sends_burst: u32,
    /// Other changes (edits, deletes, read markers, groups, uploads and chunks) per second per
    /// user (0: no limit).
    #[arg(long, env = "RATE_LIMIT_WRITES_PER_SECOND", default_value_t = crate::limits::DEFAULT_WRITES_PER_SECOND, value_parser = non_negative_rate)]
    pub rate_limit_writes_per_second: f64,
    /// Other changes a user may make at once.
    #[arg(long, env = "RATE_LIMIT_WRITES_BURST", default_value_t = crate::limits::DEFAULT_WRITES_BURST)]
    pub rate_limit_writes_burst: u32,
    /// Subscribe streams one user may hold open on this node.
    #[arg(long, env = "MAX_FEEDS_PER_USER", default_value_t = crate::limits::DEFAULT_FEEDS_PER_USER, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_feeds_per_user: u32,
    /// Unfinished uploads per user: resumable ones not completed, and streamed ones in flight.
    #[arg(long, env = "MAX_UNFINISHED_UPLOADS_PER_USER", default_value_t = crate::limits::DEFAULT_UNFINISHED_UPLOADS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unfinished_uploads_per_user: u32,
    /// Bytes a user's unfinished uploads may declare in all (default 1 GiB).
    #[arg(long, env = "MAX_UNFINISHED_UPLOAD_BYTES_PER_USER", default_value_t = crate::limits::DEFAULT_UNFINISHED_UPLOAD_BYTES, value_parser = clap::value_parser!(i64).range(1..))]
    pub max_unfinished_upload_bytes_per_user: i64,
    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, env = "MAX_CONCURRENT_STREAMS", default_value_t = crate::server::DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Seconds a unary call may take before it is answered DEADLINE_EXCEEDED (a client's own
    /// shorter `grpc-timeout` wins).
    #[arg(long, env = "UNARY_TIMEOUT_SECONDS", default_value_t = crate::server::DEFAULT_UNARY_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub unary_timeout_seconds: u64,
}

/// A rate per second: a finite number, 0 or more (0 switches the limit off).
fn non_negative_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a rate: a number of 0 or more")),
    }
}

impl LimitArgs {
    /// The per-user limits these settings name.
    pub fn limits(&self) -> crate::limits::LimitSettings {
        crate::limits::LimitSettings {
            sends_per_second: self.rate_limit_sends_per_second,
            sends_burst: self.rate_limit_sends_burst,
            writes_per_second: self.rate_limit_writes_per_second,
            writes_burst: self.rate_limit_writes_burst,
            feeds_per_user: self.max_feeds_per_user,
            unfinished_uploads: self.max_unfinished_uploads_per_user,
            unfinished_upload_bytes: self.max_unfinished_upload_bytes_per_user,
        }
    }
}

/// `serve` settings.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Database.
    #[command(flatten)]
    pub db: DbArgs,
    /// Tokens.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Address to listen on (gRPC).
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Browser origins allowed to call over grpc-web: comma-separated exact origins
    /// (`https://app.example.com,http://localhost:5173`), or `*` for any. Empty: none.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", default_value = "")]
    pub cors_allowed_origins: crate::server::AllowedOrigins,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or tracing directives).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log lines as `text` (for people) or `json` (one object per line, for pipelines).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    /// Where to serve Prometheus metrics (`GET /metrics`, HTTP/1.1), e.g. `127.0.0.1:9090`.
    /// Unset: no metrics endpoint, and nothing is recorded.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds between heartbeats on live feeds (1 to 3600).
    #[arg(long, env = "HEARTBEAT_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_seconds: u64,
    /// Where attachment bytes go: `file://<dir>` or `s3://<bucket>/<prefix>` (with the usual
    /// `AWS_*` variables, and `AWS_ENDPOINT_URL` for MinIO-style servers).
    #[arg(long, env = "STORAGE_URL", default_value = crate::blob::DEFAULT_STORAGE_URL)]
    pub storage_url: String,
    /// Largest attachment, in bytes (default 100 MiB).
    #[arg(long, env = "MAX_UPLOAD_BYTES", default_value_t = crate::domain::DEFAULT_MAX_UPLOAD_BYTES, value_parser = clap::value_parser!(i64).range(0..))]
    pub max_upload_bytes: i64,
    /// Seconds after which unlinked attachments and unfinished uploads are deleted (default 24 h).
    #[arg(long, env = "ATTACHMENT_UNLINKED_TTL", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(60..))]
    pub attachment_unlinked_ttl: u64,
    /// Whether every node sees the same `file://` directory (one machine, or a network file
    /// system mounted at the same path on each). With `FANOUT` other than `memory`, `file://`
    /// storage is refused unless this is set: nodes with a disk each would not find each
    /// other's attachments.
    #[arg(long, env = "STORAGE_SHARED", default_value_t = false, action = clap::ArgAction::Set)]
    pub storage_shared: bool,
    /// Live fan-out: `memory` (one node), `nats` (events cross nodes over NATS at `NATS_URL`),
    /// or `postgres` (LISTEN/NOTIFY wake-ups on the PostgreSQL database; small deployments).
    #[arg(long, env = "FANOUT", default_value = "memory", value_parser = ["memory", "nats", "postgres"])]
    pub fanout: String,
    /// NATS server(s) for `FANOUT=nats`: `nats://host:port`, several separated by commas.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Subject prefix of events on NATS (`<prefix>.<tenant>.<channel>`); every node of one
    /// deployment must use the same, and two deployments on one NATS different ones.
    #[arg(long, env = "NATS_SUBJECT_PREFIX", default_value = "chat.events")]
    pub nats_subject_prefix: String,
    /// Milliseconds between a node's checks of followed channels' heads against storage
    /// (`FANOUT` other than `memory`): an event the bus lost reaches feeds within about twice
    /// this (100 to 60,000).
    #[arg(long, env = "FANOUT_CHECK_MS", default_value_t = crate::fanout::DEFAULT_CHECK_EVERY.as_millis() as u64, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub fanout_check_ms: u64,
    /// Events waiting to go on the bus, at most; past it they are dropped and other nodes get
    /// them from the check (1 to 10,000,000).
    #[arg(long, env = "FANOUT_QUEUE", default_value_t = crate::fanout::DEFAULT_QUEUE as u64, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub fanout_queue: u64,
    /// Test-only fault injection: the fraction of outgoing bus messages dropped on purpose.
    #[arg(long, env = "FAULT_DROP_BUS_RATIO", default_value_t = 0.0, hide = true)]
    pub fault_drop_bus_ratio: f64,
    /// Seconds that calls still open at shutdown (SIGTERM, Ctrl-C) may go on before they end
    /// with UNAVAILABLE; health watches end after half a second (0 to 3600).
    #[arg(long, env = "SHUTDOWN_DRAIN_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_drain_seconds: u64,
    /// Do not apply migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
}

impl ServeArgs {
    /// The fan-out settings for a store at `url` (in `schema`).
    ///
    /// Errors, one line naming the variable: `FANOUT=postgres` on a database that is not
    /// PostgreSQL; a cross-node `FANOUT` on SQLite (one node's file, not a shared server); a
    /// cross-node `FANOUT` with `file://` storage not declared shared (`STORAGE_SHARED`);
    /// `FAULT_DROP_BUS_RATIO` outside 0 to 1.
    pub fn fanout_settings(
        &self,
        url: &str,
        schema: Option<&str>,
    ) -> Result<crate::fanout::FanoutSettings, String> {
        use crate::fanout::Transport;
        use crate::store::Database;
        let database = Database::from_url(url);
        let transport = match self.fanout.as_str() {
            "nats" if !crate::fanout::nats::valid_prefix(&self.nats_subject_prefix) => {
                return Err(format!(
                    "NATS_SUBJECT_PREFIX: {:?} is not a subject prefix (dot-separated tokens, \
                     none empty, without spaces, `*` or `>`)",
                    self.nats_subject_prefix
                ))
            }
            "nats" => Transport::Nats {
                url: self.nats_url.clone(),
                prefix: self.nats_subject_prefix.clone(),
            },
            "postgres" if database == Some(Database::Postgres) => Transport::Postgres {
                url: url.to_owned(),
                schema: schema.map(str::to_owned),
            },
            "postgres" => {
                return Err(
                    "FANOUT: postgres needs a PostgreSQL DATABASE_URL (use nats with MySQL)".into(),
                )
            }
            _ => Transport::Memory,
        };
        if transport != Transport::Memory {
            if database == Some(Database::Sqlite) {
                return Err(format!(
                    "FANOUT: {} is for several nodes on one database server; SQLite is one node's \
                     file (use PostgreSQL or MySQL, or FANOUT=memory)",
                    self.fanout
                ));
            }
            if self.storage_url.starts_with("file://") && !self.storage_shared {
                return Err(format!(
                    "STORAGE_URL: {} is one machine's disk, and FANOUT={} runs several nodes: use \
                     s3://, or set STORAGE_SHARED=true if every node sees this same directory",
                    self.storage_url, self.fanout
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.fault_drop_bus_ratio) {
            return Err("FAULT_DROP_BUS_RATIO: must be between 0 and 1".into());
        }
        Ok(crate::fanout::FanoutSettings {
            transport,
            check_every: std::time::Duration::from_millis(self.fanout_check_ms),
            queue: self.fanout_queue as usize,
            drop_ratio: self.fault_drop_bus_ratio,
        })
    }
}

/// `token` settings.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// HS256 secret; defaults to the development secret `serve` wrote under ./data.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// `iss` claim to include.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// `aud` claim to include.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// User id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Tenant id (`tenantId`).
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Comma-separated permission keys; default: all of them.
    #[arg(long, value_delimiter = ',')]
    pub permissions: Option<Vec<String>>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: i64,
}

/// Where the client connects, and as whom.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server address.
    #[arg(long, env = "CHAT_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Bearer token (see `chat-service token`).
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    pub token: String,
}

/// `group` subcommands.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group; prints its id.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// Group name.
        #[arg(long)]
        name: String,
        /// Users to add as members.
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// Add users to a group.
    Add {
        #[command(flatten)]
        client: ClientArgs,
        /// The group id.
        #[arg(long)]
        channel: String,
        /// Users to add.
        #[arg(long = "user", required = true)]
        users: Vec<String>,
    },
}

/// `send` settings.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Channel id to send to.
    #[arg(long, conflicts_with = "to", required_unless_present = "to")]
    pub channel: Option<String>,
    /// User id to send to directly.
    #[arg(long)]
    pub to: Option<String>,
    /// Attachment ids to link (see `upload`).
    #[arg(long = "attachment")]
    pub attachments: Vec<String>,
    /// The text (may be empty with attachments).
    #[arg(default_value = "")]
    pub body: String,
}

/// `history` settings.
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Channel id.
    #[arg(long)]
    pub channel: String,
    /// How many of the latest messages.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

/// `upload` settings.
#[derive(Debug, Clone, Args)]
pub struct UploadArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Channel id the file is for.
    #[arg(long)]
    pub channel: String,
    /// MIME type; default application/octet-stream.
    #[arg(long, default_value = "")]
    pub content_type: String,
    /// The file.
    pub file: PathBuf,
}

/// `download` settings.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Attachment id.
    #[arg(long)]
    pub attachment: String,
    /// Where to write the bytes.
    pub out: PathBuf,
}

/// `tail` settings.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Channels to follow; none means all of yours.
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Resume cursors `CHANNEL_ID=SEQUENCE`.
    #[arg(long = "cursor")]
    pub cursors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn db(connector: Option<&str>) -> DbArgs {
        DbArgs {
            database_url: None,
            db_connector: connector.map(str::to_owned),
            db_host: "127.0.0.1".into(),
            db_port: None,
            db_user: None,
            db_password: None,
            db_database: None,
            db_schema: None,
        }
    }

    #[test]
    fn no_settings_mean_the_embedded_sqlite_file() {
        assert_eq!(db(None).url().unwrap(), DEFAULT_DATABASE_URL);
        let file = DbArgs {
            db_database: Some("/var/lib/chat/chat.db".into()),
            ..db(Some("sqlite"))
        };
        assert_eq!(file.url().unwrap(), "sqlite:///var/lib/chat/chat.db");
    }

    #[test]
    fn postgres_connector_builds_a_postgres_url() {
        assert_eq!(
            db(Some("postgres")).url().unwrap(),
            "postgres://postgres@127.0.0.1:5432/chat"
        );
        let full = DbArgs {
            db_host: "db.internal".into(),
            db_port: Some(6432),
            db_user: Some("chat".into()),
            db_password: Some("p@ss:w/rd".into()),
            db_database: Some("chat prod".into()),
            ..db(Some("postgresql"))
        };
        assert_eq!(
            full.url().unwrap(),
            "postgres://chat:p%40ss%3Aw%2Frd@db.internal:6432/chat%20prod"
        );
    }

    #[test]
    fn mysql_connector_builds_a_mysql_url() {
        for connector in ["mysql", "mariadb"] {
            assert_eq!(
                db(Some(connector)).url().unwrap(),
                "mysql://root@127.0.0.1:3306/chat",
                "{connector}"
            );
        }
        let full = DbArgs {
            db_host: "mariadb.internal".into(),
            db_port: Some(3307),
            db_user: Some("chat@app".into()),
            db_password: Some("p@ss:w/rd?#%".into()),
            db_database: Some("chat/prod".into()),
            ..db(Some("mysql"))
        };
        let url = full.url().unwrap();
        assert_eq!(
            url,
            "mysql://chat%40app:p%40ss%3Aw%2Frd%3F%23%25@mariadb.internal:3307/chat%2Fprod"
        );
        // sqlx reads back exactly what was configured.
        let opts = sqlx::mysql::MySqlConnectOptions::from_str(&url).unwrap();
        assert_eq!(opts.get_host(), "mariadb.internal");
        assert_eq!(opts.get_port(), 3307);
        assert_eq!(opts.get_username(), "chat@app");
        assert_eq!(opts.get_database(), Some("chat/prod"));
    }

    #[test]
    fn database_url_wins_and_must_name_a_known_database() {
        for url in [
            "sqlite://./x.db",
            "postgres://u@h/d",
            "postgresql://u@h/d",
            "mysql://u@h/d",
            "mariadb://u@h/d",
        ] {
            let args = DbArgs {
                database_url: Some(url.into()),
                ..db(Some("sqlite"))
            };
            assert_eq!(args.url().unwrap(), url);
        }
        let bad = DbArgs {
            database_url: Some("mssql://u@h/d".into()),
            ..db(None)
        };
        let e = bad.url().unwrap_err();
        assert!(
            e.starts_with("DATABASE_URL:") && e.contains("mysql:"),
            "{e}"
        );
    }

    #[test]
    fn unknown_connector_is_refused_by_name() {
        let e = db(Some("oracle")).url().unwrap_err();
        assert!(
            e.starts_with("DB_CONNECTOR:") && e.contains("\"oracle\""),
            "{e}"
        );
        assert!(e.contains("mysql"), "{e}");
    }
}

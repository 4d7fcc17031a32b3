//! The command line: `serve`, `migrate`, `token`, and a small client (`group`, `send`,
//! `history`, `tail`) built on the crate's own tonic client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::auth::{self, AuthSettings, KeySource, TokenSpec, Verifier};
use crate::config::*;
use crate::domain::{Chat, Settings};
use crate::fanout::Hub;
use crate::proto::attachment_service_client::AttachmentServiceClient;
use crate::proto::chat_service_client::ChatServiceClient;
use crate::proto::group_service_client::GroupServiceClient;
use crate::proto::{self, subscribe_response::Event};

/// Where `serve` keeps the generated development secret, so tokens survive restarts.
pub const DEV_SECRET_PATH: &str = "./data/dev-jwt-secret";

/// Adds `authorization: Bearer <token>` to every call of a client.
#[derive(Clone, Debug)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    /// Errors: a token with characters not allowed in metadata.
    pub fn new(token: &str) -> Result<Bearer, String> {
        format!("Bearer {token}")
            .parse()
            .map(Bearer)
            .map_err(|_| "the token has characters not allowed in gRPC metadata".to_owned())
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A ChatService client that sends a bearer token.
pub type ChatClient = ChatServiceClient<InterceptedService<Channel, Bearer>>;
/// A GroupService client that sends a bearer token.
pub type GroupClient = GroupServiceClient<InterceptedService<Channel, Bearer>>;

/// Connects both clients to `server` (`http://host:port`) with `token`.
///
/// Errors: a bad address or token, or a failed connection, as text.
pub async fn connect(server: &str, token: &str) -> Result<(ChatClient, GroupClient), String> {
    let channel = Channel::from_shared(server.to_owned())
        .map_err(|e| format!("--server {server}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {server}: {e}"))?;
    let bearer = Bearer::new(token)?;
    Ok((
        ChatServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        GroupServiceClient::with_interceptor(channel, bearer),
    ))
}

fn verifier_settings(a: &AuthArgs) -> Result<(AuthSettings, Option<String>), String> {
    let set = [
        a.jwt_secret.is_some(),
        a.jwt_public_key.is_some(),
        a.jwt_jwks.is_some(),
    ];
    if set.iter().filter(|s| **s).count() > 1 {
        return Err("JWT_SECRET, JWT_PUBLIC_KEY and JWT_JWKS: set only one".into());
    }
    let mut dev_secret = None;
    let key = if let Some(s) = &a.jwt_secret {
        if s.len() < 16 {
            return Err("JWT_SECRET: must be at least 16 bytes".into());
        }
        KeySource::Secret(s.as_bytes().to_vec())
    } else if let Some(p) = &a.jwt_public_key {
        KeySource::PublicKeyPem(p.clone())
    } else if let Some(p) = &a.jwt_jwks {
        KeySource::Jwks(p.clone())
    } else {
        let secret = match std::fs::read_to_string(DEV_SECRET_PATH) {
            Ok(s) if s.trim().len() >= 32 => {
                // Written by an older version with the default umask: readable by every
                // local user, who could mint tokens with it.
                owner_only(DEV_SECRET_PATH).map_err(|e| format!("{DEV_SECRET_PATH}: {e}"))?;
                s.trim().to_owned()
            }
            _ => {
                let bytes: [u8; 32] = rand::random();
                let s = hex::encode(bytes);
                let _ = std::fs::create_dir_all("./data");
                write_owner_only(DEV_SECRET_PATH, s.as_bytes())
                    .map_err(|e| format!("{DEV_SECRET_PATH}: {e}"))?;
                s
            }
        };
        dev_secret = Some(secret.clone());
        KeySource::Secret(secret.into_bytes())
    };
    Ok((
        AuthSettings {
            key,
            issuer: a.jwt_issuer.clone(),
            audience: a.jwt_audience.clone(),
            enforce_permissions: a.auth_enforce_permissions,
        },
        dev_secret,
    ))
}

/// Writes `contents` to a file only its owner may read or write (mode 0600 on Unix), whatever
/// the umask; an existing file is truncated and its mode tightened.
fn write_owner_only(path: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    owner_only(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Sets a file's mode to 0600 (Unix; elsewhere nothing).
fn owner_only(path: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// `serve`: runs until SIGTERM or Ctrl-C.
///
/// Errors: a bad setting (one line naming the variable) or a failure to start.
pub async fn serve(args: ServeArgs) -> Result<(), String> {
    let url = args.db.url()?;
    let fanout = args.fanout_settings(&url, args.db.db_schema.as_deref())?;
    if args.limits.max_unfinished_upload_bytes_per_user < args.max_upload_bytes {
        return Err(format!(
            "MAX_UNFINISHED_UPLOAD_BYTES_PER_USER: {} is less than MAX_UPLOAD_BYTES ({}), so the \
             largest uploads could never start",
            args.limits.max_unfinished_upload_bytes_per_user, args.max_upload_bytes
        ));
    }
    let (settings, dev_secret) = verifier_settings(&args.auth)?;
    let verifier = Arc::new(Verifier::new(settings).map_err(|e| format!("JWT key: {e}"))?);
    // Before the store connects, so its pools are sampled too.
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr).await?;
    }
    let store = crate::store::connect(&url, args.db.db_schema.as_deref(), !args.no_migrate)
        .await
        .map_err(|e| format!("DATABASE_URL: {e}"))?;
    let blobs =
        crate::blob::Blobs::from_url(&args.storage_url).map_err(|e| format!("STORAGE_URL: {e}"))?;
    let settings = Settings {
        heartbeat: Duration::from_secs(args.heartbeat_seconds),
        max_upload_bytes: args.max_upload_bytes,
        unlinked_ttl: Duration::from_secs(args.attachment_unlinked_ttl),
        limits: args.limits.limits(),
    };
    let hub = Arc::new(Hub::default());
    let publisher = crate::fanout::start(&fanout, hub.clone(), store.clone()).await?;
    let chat =
        Arc::new(Chat::new(store.clone(), hub, blobs, settings).with_publisher(publisher.clone()));
    tokio::spawn(sweep_forever(chat.clone()));

    // Before the listener exists, so no client can ask for a shutdown the process would not
    // handle.
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .map_err(|e| format!("GRPC_ADDR: cannot listen on {}: {e}", args.grpc_addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, database = %redact(&url), "chat-service listening");
    if let Some(secret) = dev_secret {
        let token = auth::mint_hs256(
            secret.as_bytes(),
            &TokenSpec {
                sub: "alice",
                tenant: "default",
                permissions: auth::all_permission_names(),
                ttl_seconds: 86_400,
                issuer: args.auth.jwt_issuer.as_deref(),
                audience: args.auth.jwt_audience.as_deref(),
            },
        )
        .map_err(|e| e.to_string())?;
        eprintln!(
            "\n!!! WARNING: no JWT key configured (JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS).\n\
             !!! Using a generated DEVELOPMENT secret stored in {DEV_SECRET_PATH}. Never run like this in production.\n\n\
             A token for user \"alice\" with every permission, valid 24 h:\n\n  export CHAT_TOKEN={token}\n\n\
             Try it:\n  chat-service group create --name hello --member bob\n  \
             grpcurl -plaintext -H \"authorization: Bearer $CHAT_TOKEN\" -d '{{\"name\":\"hello\"}}' {addr} chat.v1.GroupService/CreateGroup\n\
             More tokens: chat-service token --sub bob\n"
        );
    }
    let options = crate::server::ServeOptions {
        cors_allowed_origins: args.cors_allowed_origins.clone(),
        drain_period: Duration::from_secs(args.shutdown_drain_seconds),
        max_concurrent_streams: args.limits.max_concurrent_streams,
        unary_timeout: Duration::from_secs(args.limits.unary_timeout_seconds),
    };
    crate::server::serve(listener, chat, verifier, options, shutdown)
        .await
        .map_err(|e| format!("server: {e}"))?;
    // Every call has ended: hand other nodes this node's last events.
    publisher.flush(Duration::from_secs(2)).await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the metrics recorder and serves `GET /metrics` on `addr` for the life of the
/// process. Errors: `METRICS_ADDR` cannot be bound, or another recorder is installed.
async fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), String> {
    crate::metrics::install().map_err(|e| format!("METRICS_ADDR: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("METRICS_ADDR: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    // Not "listening": scripts find the gRPC address by that word.
    tracing::info!(metrics_addr = %bound, "serving Prometheus metrics at /metrics");
    tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(listener, std::future::pending()).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// Deletes unlinked attachments and unfinished uploads past their TTL, every TTL/4 (at most
/// hourly).
async fn sweep_forever(chat: Arc<Chat>) {
    let ttl = chat.settings().unlinked_ttl;
    let mut every = tokio::time::interval((ttl / 4).min(Duration::from_secs(3600)));
    loop {
        every.tick().await;
        let before = crate::store::now_micros() - ttl.as_micros() as i64;
        match chat.sweep(before).await {
            Ok((0, 0)) => {}
            Ok((a, u)) => {
                tracing::info!(attachments = a, uploads = u, "swept unlinked attachments")
            }
            Err(e) => tracing::warn!(error = %e, "attachment sweep failed"),
        }
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

/// SIGTERM or Ctrl-C. The SIGTERM handler is installed here, at once, not when the returned
/// future is first polled: a SIGTERM that came before would otherwise kill the process with
/// the default action (no drain, no exit status 0).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async {
            match term {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
    }
}

/// `migrate`. Errors: a bad setting or a failed migration.
pub async fn migrate(db: DbArgs) -> Result<(), String> {
    let url = db.url()?;
    let store = crate::store::connect(&url, db.db_schema.as_deref(), true)
        .await
        .map_err(|e| format!("DATABASE_URL: {e}"))?;
    store.close().await;
    println!("migrations applied to {}", redact(&url));
    Ok(())
}

/// `token`: prints a token. Errors: no secret.
pub fn token(args: TokenArgs) -> Result<(), String> {
    let secret = match args.jwt_secret {
        Some(s) => s,
        None => std::fs::read_to_string(DEV_SECRET_PATH)
            .map(|s| s.trim().to_owned())
            .map_err(|_| {
                format!("JWT_SECRET: not set, and no development secret at {DEV_SECRET_PATH}")
            })?,
    };
    let permissions = args.permissions.unwrap_or_else(auth::all_permission_names);
    let token = auth::mint_hs256(
        secret.as_bytes(),
        &TokenSpec {
            sub: &args.sub,
            tenant: &args.tenant,
            permissions,
            ttl_seconds: args.ttl,
            issuer: args.jwt_issuer.as_deref(),
            audience: args.jwt_audience.as_deref(),
        },
    )
    .map_err(|e| e.to_string())?;
    println!("{token}");
    Ok(())
}

fn status_line(s: Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// `group create` / `group add`.
pub async fn group(cmd: GroupCommand) -> Result<(), String> {
    match cmd {
        GroupCommand::Create {
            client,
            name,
            members,
        } => {
            let (_, mut groups) = connect(&client.server, &client.token).await?;
            let resp = groups
                .create_group(proto::CreateGroupRequest {
                    name,
                    member_ids: members,
                    ..Default::default()
                })
                .await
                .map_err(status_line)?
                .into_inner();
            let ch = resp.channel.unwrap_or_default();
            println!("{}", ch.id);
        }
        GroupCommand::Add {
            client,
            channel,
            users,
        } => {
            let (_, mut groups) = connect(&client.server, &client.token).await?;
            let resp = groups
                .add_members(proto::AddMembersRequest {
                    channel_id: channel,
                    user_ids: users,
                    role: 0,
                })
                .await
                .map_err(status_line)?
                .into_inner();
            for m in resp.members {
                println!("added {}", m.user_id);
            }
        }
    }
    Ok(())
}

/// `send`: prints `channel_id sequence message_id`.
pub async fn send(args: SendArgs) -> Result<(), String> {
    let (mut chat, _) = connect(&args.client.server, &args.client.token).await?;
    let m = chat
        .send_message(proto::SendMessageRequest {
            channel_id: args.channel.unwrap_or_default(),
            recipient_id: args.to.unwrap_or_default(),
            body: args.body,
            attachment_ids: args.attachments,
            ..Default::default()
        })
        .await
        .map_err(status_line)?
        .into_inner()
        .message
        .unwrap_or_default();
    println!("{} {} {}", m.channel_id, m.sequence, m.id);
    Ok(())
}

/// `history`: the latest messages, oldest first, one `#sequence sender: body` line each.
pub async fn history(args: HistoryArgs) -> Result<(), String> {
    let (mut chat, _) = connect(&args.client.server, &args.client.token).await?;
    let mut all = Vec::new();
    let mut page_token = String::new();
    while all.len() < args.limit {
        let resp = chat
            .list_messages(proto::ListMessagesRequest {
                channel_id: args.channel.clone(),
                page_size: (args.limit - all.len()).min(200) as i32,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(status_line)?
            .into_inner();
        all.extend(resp.messages);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    for m in all.iter().rev() {
        println!("#{} {}: {}", m.sequence, m.sender_id, m.body);
    }
    Ok(())
}

async fn attachments_client(
    c: &ClientArgs,
) -> Result<AttachmentServiceClient<InterceptedService<Channel, Bearer>>, String> {
    let channel = Channel::from_shared(c.server.clone())
        .map_err(|e| format!("--server {}: {e}", c.server))?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", c.server))?;
    Ok(AttachmentServiceClient::with_interceptor(
        channel,
        Bearer::new(&c.token)?,
    ))
}

/// `upload`: streams a file in 1 MiB frames (it is read as it is sent, never whole), with its
/// SHA-256 declared; prints `attachment_id sha256`.
pub async fn upload(args: UploadArgs) -> Result<(), String> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let name = args
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: no file name", args.file.display()))?
        .to_owned();
    // First pass: size and hash, so the server can check both.
    let mut f = tokio::fs::File::open(&args.file)
        .await
        .map_err(|e| format!("{}: {e}", args.file.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0i64;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = f.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as i64;
    }
    let meta = proto::AttachmentMetadata {
        channel_id: args.channel,
        file_name: name,
        content_type: args.content_type,
        size_bytes: size,
        sha256: hex::encode(hasher.finalize()),
    };
    let file = tokio::fs::File::open(&args.file)
        .await
        .map_err(|e| e.to_string())?;
    let first = futures::stream::once(async move {
        proto::UploadAttachmentRequest {
            data: Some(proto::upload_attachment_request::Data::Metadata(meta)),
        }
    });
    let chunks = futures::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 1024 * 1024];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        (filled > 0).then(|| {
            buf.truncate(filled);
            let frame = proto::UploadAttachmentRequest {
                data: Some(proto::upload_attachment_request::Data::Chunk(buf.into())),
            };
            (frame, file)
        })
    });
    let mut client = attachments_client(&args.client).await?;
    let a = client
        .upload_attachment(futures::StreamExt::chain(first, chunks))
        .await
        .map_err(status_line)?
        .into_inner()
        .attachment
        .unwrap_or_default();
    println!("{} {}", a.id, a.sha256);
    Ok(())
}

/// `download`: writes an attachment to a file; prints its size and SHA-256.
pub async fn download(args: DownloadArgs) -> Result<(), String> {
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let mut client = attachments_client(&args.client).await?;
    let mut stream = client
        .download_attachment(proto::DownloadAttachmentRequest {
            attachment_id: args.attachment,
            offset: 0,
        })
        .await
        .map_err(status_line)?
        .into_inner();
    let mut out = tokio::fs::File::create(&args.out)
        .await
        .map_err(|e| format!("{}: {e}", args.out.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0usize;
    while let Some(frame) = stream.message().await.map_err(status_line)? {
        if let Some(proto::download_attachment_response::Data::Chunk(b)) = frame.data {
            hasher.update(&b);
            size += b.len();
            out.write_all(&b).await.map_err(|e| e.to_string())?;
        }
    }
    out.flush().await.map_err(|e| e.to_string())?;
    println!("{size} {}", hex::encode(hasher.finalize()));
    Ok(())
}

/// `tail`: prints events; reconnects with its cursors after a dropped connection.
pub async fn tail(args: TailArgs) -> Result<(), String> {
    let mut cursors: HashMap<String, i64> = HashMap::new();
    for c in &args.cursors {
        let (ch, seq) = c
            .split_once('=')
            .and_then(|(ch, s)| s.parse::<i64>().ok().map(|s| (ch.to_owned(), s)))
            .ok_or_else(|| format!("--cursor {c}: expected CHANNEL_ID=SEQUENCE"))?;
        cursors.insert(ch, seq);
    }
    loop {
        let result = async {
            let (mut chat, _) = connect(&args.client.server, &args.client.token)
                .await
                .map_err(Status::unavailable)?;
            let mut stream = chat
                .subscribe(proto::SubscribeRequest {
                    channel_ids: args.channels.clone(),
                    cursors: cursors.clone(),
                })
                .await?
                .into_inner();
            eprintln!("-- following (cursors: {cursors:?})");
            while let Some(ev) = stream.message().await? {
                print_event(&ev);
                if ev.sequence > 0 {
                    cursors.insert(ev.channel_id.clone(), ev.sequence);
                }
            }
            Ok::<(), Status>(())
        }
        .await;
        match result {
            Ok(()) => eprintln!("-- the server ended the feed; resuming"),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::NotFound
                        | Code::InvalidArgument
                        | Code::OutOfRange
                ) =>
            {
                return Err(status_line(s));
            }
            Err(s) => eprintln!("-- connection lost ({}); resuming in 1 s", status_line(s)),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_event(ev: &proto::SubscribeResponse) {
    let ch = &ev.channel_id;
    let seq = ev.sequence;
    match &ev.event {
        Some(Event::MessageCreated(e)) => {
            let m = e.message.clone().unwrap_or_default();
            println!("[{ch} #{seq}] {}: {}", m.sender_id, m.body);
        }
        Some(Event::MessageUpdated(e)) => {
            let m = e.message.clone().unwrap_or_default();
            println!("[{ch} #{seq}] {} edited {}: {}", m.sender_id, m.id, m.body);
        }
        Some(Event::MessageDeleted(e)) => {
            let m = e.message.clone().unwrap_or_default();
            println!("[{ch} #{seq}] {} deleted", m.id);
        }
        Some(Event::ReadMarkerUpdated(e)) => {
            println!("[{ch}] {} read up to #{}", e.user_id, e.read_sequence)
        }
        Some(Event::MemberAdded(e)) => println!(
            "[{ch} #{seq}] {} joined",
            e.member.clone().unwrap_or_default().user_id
        ),
        Some(Event::MemberRemoved(e)) => println!(
            "[{ch} #{seq}] {} left",
            e.member.clone().unwrap_or_default().user_id
        ),
        Some(Event::Heartbeat(_)) | None => {}
    }
}

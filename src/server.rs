//! Assembles the gRPC server: ChatService and GroupService behind the auth layer, plus health
//! and reflection (no auth, so probes and `grpcurl list` work) on one listener.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::Server;

use crate::api::attachment::AttachmentApi;
use crate::api::auth::AuthInterceptor;
use crate::api::chat::ChatApi;
use crate::api::group::GroupApi;
use crate::auth::Verifier;
use crate::domain::Chat;
use crate::proto::attachment_service_server::AttachmentServiceServer;
use crate::proto::chat_service_server::ChatServiceServer;
use crate::proto::group_service_server::GroupServiceServer;

/// Largest message AttachmentService decodes: a 1 MiB chunk plus 64 KiB for the rest of the
/// frame. Larger frames are refused by tonic with `RESOURCE_EXHAUSTED`.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Serves on `listener` until `shutdown` resolves; then live feeds end cleanly and in-flight
/// calls finish before this returns.
///
/// Errors: the transport's, when serving fails.
pub async fn serve(
    listener: TcpListener,
    chat: Arc<Chat>,
    verifier: Arc<Verifier>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let auth = AuthInterceptor::new(verifier);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ChatServiceServer<ChatApi>>().await;
    health.set_serving::<GroupServiceServer<GroupApi>>().await;
    health
        .set_serving::<AttachmentServiceServer<AttachmentApi>>()
        .await;
    // Both reflection versions: grpcurl and other tools before 2023 speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection()
        .build_v1()
        .and_then(|v1| reflection().build_v1alpha().map(|alpha| (v1, alpha)))
        .map_err(|e| {
            tracing::error!(error = %e, "reflection descriptors are broken");
            e
        });
    let hub = chat.hub().clone();
    // Without TCP_NODELAY a small response waits for the peer's delayed ACK (Nagle): ~40 ms
    // added to every unary call that follows another on the same connection.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    });
    let mut router = Server::builder()
        .add_service(health_service)
        .add_service(ChatServiceServer::with_interceptor(
            ChatApi::new(chat.clone()),
            auth.clone(),
        ))
        .add_service(GroupServiceServer::with_interceptor(
            GroupApi::new(chat.clone()),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // Frames carry at most 1 MiB of data; allow that plus protobuf framing, no more.
            AttachmentServiceServer::new(AttachmentApi::new(chat))
                .max_decoding_message_size(MAX_FRAME_BYTES)
                .max_encoding_message_size(MAX_FRAME_BYTES),
            auth,
        ));
    if let Ok((v1, v1alpha)) = reflection {
        router = router.add_service(v1).add_service(v1alpha);
    }
    router
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutting down: ending live feeds, finishing in-flight calls");
            health.set_not_serving::<ChatServiceServer<ChatApi>>().await;
            hub.shutdown();
        })
        .await
}

//! Compiles `proto/chat/v1/*.proto` with protox (pure Rust, so no `protoc` is needed on the
//! machine) and generates the tonic server and client code plus a descriptor set that the
//! reflection service serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/chat/v1/types.proto",
        "proto/chat/v1/chat_service.proto",
        "proto/chat/v1/group_service.proto",
        "proto/chat/v1/attachment_service.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // `sqlx::migrate!` embeds these folders at compile time; a new migration must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("chat_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // `bytes` fields as `bytes::Bytes`: upload and download chunks are passed on, not copied.
        .bytes(".")
        // prost with a smaller first buffer per call: see `src/codec.rs`.
        .codec_path("crate::codec::ChatCodec")
        // Written by hand, so a history page can go out already encoded: see `src/page.rs`.
        .extern_path(
            ".chat.v1.ListMessagesResponse",
            "crate::page::ListMessagesResponse",
        )
        // Written by hand, so a feed can send a stored event as stored: see `src/event.rs`.
        .extern_path(
            ".chat.v1.SubscribeResponse",
            "crate::event::SubscribeResponse",
        )
        .compile_fds(fds)?;
    Ok(())
}

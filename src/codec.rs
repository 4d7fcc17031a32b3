//! The gRPC codec of every service: protobuf through prost, as `tonic_prost::ProstCodec`, but
//! with a smaller first buffer per call.
//!
//! tonic allocates each call's encode buffer eagerly (8 KiB by default) and a server stream keeps
//! it for as long as it is open. A Subscribe feed sends events of 100–500 bytes, so on an idle
//! feed that buffer was the largest single cost (chat-bench scenario 4: 10,000 open streams).
//! Buffers still grow to fit any message, up to the transport's message size limits.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Bytes each call's encode and decode buffer starts with (tonic's default is 8,192).
pub const INITIAL_BUFFER_BYTES: usize = 1024;

/// Bytes of encoded responses a stream gathers before handing them to the transport: several
/// queued events go out in one HTTP/2 DATA frame up to this size. tonic's default is 32 KiB,
/// but the buffer keeps whatever it grew to for as long as the stream is open, so one burst
/// (a replay from a cursor) left every feed holding up to 32 KiB; 4 KiB is still ten or more
/// events per frame.
pub const YIELD_THRESHOLD_BYTES: usize = 4 * 1024;

/// The codec named by `build.rs` (`codec_path`) for every generated client and server.
#[derive(Debug, Clone)]
pub struct ChatCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ChatCodec<T, U> {
    fn default() -> Self {
        ChatCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for ChatCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

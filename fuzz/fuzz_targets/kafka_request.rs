//! Kafka request framing and decoding over arbitrary bytes: never panics, whatever the API key,
//! version or body.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

// The allocator the server runs with: declared-but-absent arrays reserve address space only.
#[global_allocator]
static ALLOC: spate_kafka::alloc::ReservingAlloc = spate_kafka::alloc::ReservingAlloc;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = spate_kafka::frame::take_frame(&mut buf, 1 << 20) {
        let _ = spate_kafka::handler::decode(frame);
    }
    // The body alone, as if framed.
    let _ = spate_kafka::handler::decode(Bytes::copy_from_slice(data));
});

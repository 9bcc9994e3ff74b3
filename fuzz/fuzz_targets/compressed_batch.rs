//! Compressed batch decoding: the fuzzer's bytes (after a first byte choosing the codec and the
//! record count) become the compressed records section of a well-formed v2 batch with a valid
//! CRC, so every input reaches a decompressor and the record parser behind it. Nothing panics and
//! nothing decodes to more than the bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spate_broker::compressed::{self, CompressedError, MAX_DECOMPRESSED_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some((&first, payload)) = data.split_first() else { return };
    let codec = i16::from(first % 4) + 1;
    let count = i32::from(first >> 2);
    let mut whole = Vec::with_capacity(61 + payload.len());
    whole.extend_from_slice(&0i64.to_be_bytes()); // base offset
    whole.extend_from_slice(&((49 + payload.len()) as i32).to_be_bytes()); // batch length
    whole.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    whole.push(2); // magic
    whole.extend_from_slice(&0u32.to_be_bytes()); // CRC, set below
    whole.extend_from_slice(&codec.to_be_bytes()); // attributes
    whole.extend_from_slice(&(count - 1).max(0).to_be_bytes()); // last offset delta
    whole.extend_from_slice(&1i64.to_be_bytes()); // first timestamp
    whole.extend_from_slice(&1i64.to_be_bytes()); // max timestamp
    whole.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    whole.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    whole.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    whole.extend_from_slice(&count.to_be_bytes()); // records
    whole.extend_from_slice(payload);
    spate_log::batch::seal(&mut whole);
    match compressed::decode(&whole) {
        Ok(records) => {
            let size: usize = records
                .iter()
                .map(|r| r.value.as_ref().map_or(0, Vec::len) + r.key.as_ref().map_or(0, Vec::len))
                .sum();
            assert!(size <= MAX_DECOMPRESSED_BYTES);
        }
        Err(CompressedError::TooLarge | CompressedError::Corrupt(_)) => {}
    }
});

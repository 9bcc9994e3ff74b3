//! Compressed batches (gzip, snappy, lz4, zstd), as Kafka producers send them, are stored as sent.
//! Decoding one (to show its events over HTTP, to feed followers, or to check it when produced)
//! decompresses at most [`MAX_DECOMPRESSED_BYTES`]: a small batch that claims or expands to
//! gigabytes is refused, never allocated.

use std::io::Read;

use spate_log::batch;

/// The most one compressed batch may decompress to.
pub const MAX_DECOMPRESSED_BYTES: usize = 64 << 20;

/// Why a compressed batch cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CompressedError {
    #[error("the batch decompresses to more than {} MiB", MAX_DECOMPRESSED_BYTES >> 20)]
    TooLarge,
    #[error("{0}")]
    Corrupt(String),
}

fn corrupt(e: impl std::fmt::Display) -> CompressedError {
    CompressedError::Corrupt(e.to_string())
}

/// The attribute bit of a control batch (transaction markers).
const CONTROL: i16 = 0x20;

/// Decodes one batch after checking it (size, CRC), decompressing it within the bound; a control
/// batch has no records for readers.
pub fn decode(whole: &[u8]) -> Result<Vec<batch::Record>, CompressedError> {
    let h = batch::check(whole).map_err(corrupt)?;
    match section(&h, whole)? {
        None => Ok(Vec::new()),
        Some(records) => batch::decode_records(&h, &records).map_err(corrupt),
    }
}

/// The records section of a batch already checked (its header `h`): borrowed when stored
/// uncompressed, decompressed (within the bound) otherwise; `None` for a control batch
/// (transaction markers), which holds no records for readers.
pub fn section<'a>(
    h: &batch::BatchHeader,
    whole: &'a [u8],
) -> Result<Option<std::borrow::Cow<'a, [u8]>>, CompressedError> {
    if h.attributes & CONTROL != 0 {
        return Ok(None);
    }
    let section = &whole[batch::HEADER_BYTES..];
    let records = match h.compression() {
        0 => return Ok(Some(std::borrow::Cow::Borrowed(section))),
        1 => read_bounded(flate2::read::GzDecoder::new(section))?,
        2 => snappy(section)?,
        3 => read_bounded(lz4::Decoder::new(section).map_err(corrupt)?)?,
        4 => read_bounded(zstd::stream::read::Decoder::new(section).map_err(corrupt)?)?,
        c => {
            return Err(CompressedError::Corrupt(format!(
                "unknown compression codec {c}"
            )));
        }
    };
    Ok(Some(std::borrow::Cow::Owned(records)))
}

/// Checks that every compressed batch in `batches` (as in a produce request) decodes within the
/// bound; uncompressed ones are left to the append, which checks every batch.
pub fn check(batches: &[u8]) -> Result<(), CompressedError> {
    for (at, h) in batch::headers(batches).map_err(corrupt)? {
        if h.compression() != 0 {
            decode(&batches[at..at + h.total_bytes() as usize])?;
        }
    }
    Ok(())
}

fn read_bounded(r: impl Read) -> Result<Vec<u8>, CompressedError> {
    let mut out = Vec::new();
    r.take(MAX_DECOMPRESSED_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    if out.len() > MAX_DECOMPRESSED_BYTES {
        return Err(CompressedError::TooLarge);
    }
    Ok(out)
}

/// The header of snappy-java's framing, which Kafka's Java clients write.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";

/// Snappy: snappy-java's framing (a 16-byte header, then blocks each with a big-endian u32
/// length) or, without the header, one raw snappy block. Every block's stated length is checked
/// against the bound before anything is allocated for it.
fn snappy(data: &[u8]) -> Result<Vec<u8>, CompressedError> {
    let mut out = Vec::new();
    let block = |b: &[u8], out: &mut Vec<u8>| -> Result<(), CompressedError> {
        let len = snap::raw::decompress_len(b).map_err(corrupt)?;
        if out.len().saturating_add(len) > MAX_DECOMPRESSED_BYTES {
            return Err(CompressedError::TooLarge);
        }
        let at = out.len();
        out.resize(at + len, 0);
        snap::raw::Decoder::new()
            .decompress(b, &mut out[at..])
            .map_err(corrupt)?;
        Ok(())
    };
    if data.len() < 16 || !data.starts_with(XERIAL_MAGIC) {
        block(data, &mut out)?;
        return Ok(out);
    }
    let mut rest = &data[16..];
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("a snappy block length is cut short"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(corrupt("a snappy block is cut short"));
        }
        block(&tail[..len], &mut out)?;
        rest = &tail[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    fn encoded(values: &[Vec<u8>], compression: Compression) -> Vec<u8> {
        let records: Vec<Record> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Record {
                transactional: false,
                control: false,
                partition_leader_epoch: 0,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                // The encoder keeps records in one batch while offset minus sequence stays the same.
                sequence: i as i32 - 1,
                timestamp: 1_700_000_000_000,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(v.clone())),
                headers: Default::default(),
                delete_horizon: false,
            })
            .collect();
        let mut out = bytes::BytesMut::new();
        RecordBatchEncoder::encode(
            &mut out,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .unwrap();
        out.to_vec()
    }

    const CODECS: [Compression; 4] = [
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    #[test]
    fn every_codec_decodes_what_it_encoded() {
        let values: Vec<Vec<u8>> = (0..50)
            .map(|i| format!("value {i}").repeat(i + 1).into())
            .collect();
        for c in CODECS {
            let records = decode(&encoded(&values, c)).unwrap();
            assert_eq!(records.len(), 50, "{c:?}");
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.value.as_deref(), Some(&values[i][..]), "{c:?}");
                assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()), "{c:?}");
            }
            check(&encoded(&values, c)).unwrap();
        }
    }

    #[test]
    fn a_batch_expanding_past_the_bound_is_refused_with_every_codec() {
        // Zeros compress to a small fraction of their size.
        let bomb = vec![vec![0u8; MAX_DECOMPRESSED_BYTES + 1024]];
        for c in CODECS {
            let whole = encoded(&bomb, c);
            assert!(
                whole.len() < MAX_DECOMPRESSED_BYTES / 10,
                "{c:?}: {}",
                whole.len()
            );
            assert!(
                matches!(decode(&whole), Err(CompressedError::TooLarge)),
                "{c:?}"
            );
            assert!(
                matches!(check(&whole), Err(CompressedError::TooLarge)),
                "{c:?}"
            );
        }
        // Just under the bound still decodes.
        let fits = vec![vec![0u8; MAX_DECOMPRESSED_BYTES - 4096]];
        assert_eq!(decode(&encoded(&fits, Compression::Zstd)).unwrap().len(), 1);
    }

    #[test]
    fn a_raw_snappy_block_claiming_gigabytes_is_refused_before_allocating() {
        // A batch whose records section is a raw snappy block stating a 4 GiB length.
        let mut whole = encoded(&[b"x".to_vec()], Compression::Snappy);
        let records_at = 61;
        whole.truncate(records_at);
        whole.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]);
        let len = (whole.len() - 12) as i32;
        whole[8..12].copy_from_slice(&len.to_be_bytes());
        batch::seal(&mut whole);
        assert!(matches!(decode(&whole), Err(CompressedError::TooLarge)));
    }

    #[test]
    fn corrupt_compressed_data_is_an_error_not_a_panic() {
        for c in CODECS {
            let mut whole = encoded(&[b"some value".repeat(20)], c);
            let n = whole.len();
            for b in &mut whole[70.min(n - 1)..] {
                *b ^= 0x5a;
            }
            batch::seal(&mut whole);
            assert!(decode(&whole).is_err(), "{c:?}");
        }
    }
}

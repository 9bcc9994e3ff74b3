//! Kafka v2 record batches: the unit the log stores, checks and serves.
//!
//! Layout (big-endian), as in Kafka's protocol guide:
//!
//! ```text
//! 0  base_offset i64 | 8 batch_length i32 (bytes after this field) | 12 partition_leader_epoch i32
//! 16 magic i8 (= 2)  | 17 crc u32 (CRC32C of bytes 21..end)        | 21 attributes i16
//! 23 last_offset_delta i32 | 27 base_timestamp i64 | 35 max_timestamp i64 | 43 producer_id i64
//! 51 producer_epoch i16 | 53 base_sequence i32 | 57 record_count i32 | 61 records...
//! ```
//!
//! The base offset lies outside the CRC, so the log rewrites it on append without recomputing the
//! checksum. Records use zigzag varints; this module encodes and decodes uncompressed records (the
//! HTTP path). Decoding is bounded: every length is checked against the bytes that are there.

use thiserror::Error;

/// Bytes of the batch header, records excluded.
pub const HEADER_BYTES: usize = 61;
/// Bytes before `batch_length`'s coverage starts: base offset and the length itself.
pub const LOG_OVERHEAD: usize = 12;
const CRC_START: usize = 21;
/// The smallest legal `batch_length`.
const BATCH_LENGTH_MIN: i32 = (HEADER_BYTES - LOG_OVERHEAD) as i32;
const COMPRESSION_MASK: i16 = 0x07;

/// The fixed-size header of a record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

/// Why bytes are not a valid record batch.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch is truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: u64, available: u64 },
    #[error("unsupported record batch magic {0} (only v2 is supported)")]
    Magic(i8),
    #[error("invalid batch length {0}")]
    Length(i32),
    #[error("batch checksum mismatch: header says {expected:#010x}, content gives {actual:#010x}")]
    Crc { expected: u32, actual: u32 },
    #[error("invalid batch: {0}")]
    Invalid(&'static str),
    #[error("compressed batches (codec {0}) cannot be decoded here")]
    Compressed(i16),
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("slice of 4"))
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("slice of 8"))
}

impl BatchHeader {
    /// Parses a header from the start of `buf`, checking only what the header alone can tell.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_BYTES {
            return Err(BatchError::Truncated {
                needed: HEADER_BYTES as u64,
                available: buf.len() as u64,
            });
        }
        let h = BatchHeader {
            base_offset: be_i64(buf, 0),
            batch_length: be_i32(buf, 8),
            partition_leader_epoch: be_i32(buf, 12),
            magic: buf[16] as i8,
            crc: u32::from_be_bytes(buf[17..21].try_into().expect("slice of 4")),
            attributes: be_i16(buf, 21),
            last_offset_delta: be_i32(buf, 23),
            base_timestamp: be_i64(buf, 27),
            max_timestamp: be_i64(buf, 35),
            producer_id: be_i64(buf, 43),
            producer_epoch: be_i16(buf, 51),
            base_sequence: be_i32(buf, 53),
            record_count: be_i32(buf, 57),
        };
        if h.magic != 2 {
            return Err(BatchError::Magic(h.magic));
        }
        if h.batch_length < BATCH_LENGTH_MIN {
            return Err(BatchError::Length(h.batch_length));
        }
        if h.last_offset_delta < 0 {
            return Err(BatchError::Invalid("negative last offset delta"));
        }
        if h.record_count < 0 {
            return Err(BatchError::Invalid("negative record count"));
        }
        Ok(h)
    }

    /// Bytes of the whole batch, header included.
    pub fn total_bytes(&self) -> u64 {
        LOG_OVERHEAD as u64 + self.batch_length as u64
    }

    /// Number of offsets the batch spans.
    pub fn offset_count(&self) -> u64 {
        self.last_offset_delta as u64 + 1
    }

    pub fn compression(&self) -> i16 {
        self.attributes & COMPRESSION_MASK
    }
}

/// Checks a whole batch (`batch.len()` must equal its total bytes): structure and CRC.
pub fn check(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let h = BatchHeader::parse(batch)?;
    if h.total_bytes() != batch.len() as u64 {
        return Err(BatchError::Truncated {
            needed: h.total_bytes(),
            available: batch.len() as u64,
        });
    }
    let actual = crc32c::crc32c(&batch[CRC_START..]);
    if actual != h.crc {
        return Err(BatchError::Crc {
            expected: h.crc,
            actual,
        });
    }
    Ok(h)
}

/// Writes a batch's CRC over its content: the last step of building a batch or changing one in
/// place.
pub fn seal(batch: &mut [u8]) {
    let crc = crc32c::crc32c(&batch[CRC_START..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// Rewrites the base offset of a batch in place (outside the CRC).
pub fn set_base_offset(batch: &mut [u8], offset: i64) {
    batch[0..8].copy_from_slice(&offset.to_be_bytes());
}

/// The headers of a buffer holding whole batches back to back, with each one's position: their
/// structure is checked, not their CRC (decoding a batch checks it).
pub fn headers(buf: &[u8]) -> Result<Vec<(usize, BatchHeader)>, BatchError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        let rest = &buf[at..];
        let h = BatchHeader::parse(rest)?;
        let total = h.total_bytes();
        if total > rest.len() as u64 {
            return Err(BatchError::Truncated {
                needed: total,
                available: rest.len() as u64,
            });
        }
        out.push((at, h));
        at += total as usize;
    }
    Ok(out)
}

/// Splits a buffer holding whole batches back to back, checking each one.
pub fn split(buf: &[u8]) -> Result<Vec<(usize, BatchHeader)>, BatchError> {
    headers(buf)?
        .into_iter()
        .map(|(at, h)| check(&buf[at..at + h.total_bytes() as usize]).map(|h| (at, h)))
        .collect()
}

/// One record to encode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

fn put_varlong(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varlong(out, -1),
        Some(b) => {
            put_varlong(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

/// Encodes records into one uncompressed v2 batch of an idempotent producer: its id, epoch and the
/// sequence number of the first record.
pub fn encode_idempotent(
    records: &[NewRecord],
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
) -> Option<Vec<u8>> {
    let mut out = encode(records)?;
    out[43..51].copy_from_slice(&producer_id.to_be_bytes());
    out[51..53].copy_from_slice(&epoch.to_be_bytes());
    out[53..57].copy_from_slice(&base_sequence.to_be_bytes());
    seal(&mut out);
    Some(out)
}

/// Encodes records into one uncompressed v2 batch with base offset 0 (the log assigns the real one).
/// Returns `None` for an empty slice.
pub fn encode(records: &[NewRecord]) -> Option<Vec<u8>> {
    let first = records.first()?;
    let base_timestamp = records
        .iter()
        .map(|r| r.timestamp_ms)
        .min()
        .unwrap_or(first.timestamp_ms);
    let max_timestamp = records
        .iter()
        .map(|r| r.timestamp_ms)
        .max()
        .unwrap_or(first.timestamp_ms);
    let mut out = vec![0u8; HEADER_BYTES];
    let mut body = Vec::new();
    for (i, r) in records.iter().enumerate() {
        body.clear();
        body.push(0); // record attributes
        put_varlong(&mut body, r.timestamp_ms - base_timestamp);
        put_varlong(&mut body, i as i64);
        put_bytes(&mut body, r.key.as_deref());
        put_bytes(&mut body, r.value.as_deref());
        put_varlong(&mut body, r.headers.len() as i64);
        for (k, v) in &r.headers {
            put_bytes(&mut body, Some(k.as_bytes()));
            put_bytes(&mut body, v.as_deref());
        }
        put_varlong(&mut out, body.len() as i64);
        out.extend_from_slice(&body);
    }
    let batch_length = (out.len() - LOG_OVERHEAD) as i32;
    out[8..12].copy_from_slice(&batch_length.to_be_bytes());
    out[12..16].copy_from_slice(&(-1i32).to_be_bytes());
    out[16] = 2;
    out[21..23].copy_from_slice(&0i16.to_be_bytes());
    out[23..27].copy_from_slice(&((records.len() - 1) as i32).to_be_bytes());
    out[27..35].copy_from_slice(&base_timestamp.to_be_bytes());
    out[35..43].copy_from_slice(&max_timestamp.to_be_bytes());
    out[43..51].copy_from_slice(&(-1i64).to_be_bytes());
    out[51..53].copy_from_slice(&(-1i16).to_be_bytes());
    out[53..57].copy_from_slice(&(-1i32).to_be_bytes());
    out[57..61].copy_from_slice(&(records.len() as i32).to_be_bytes());
    seal(&mut out);
    Some(out)
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn varlong(&mut self) -> Result<i64, BatchError> {
        let mut z: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = *self
                .buf
                .get(self.at)
                .ok_or(BatchError::Invalid("varint runs past the record"))?;
            self.at += 1;
            if shift == 63 && b > 1 {
                return Err(BatchError::Invalid("varint too long"));
            }
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(BatchError::Invalid("varint too long"))
    }

    fn varint(&mut self) -> Result<i32, BatchError> {
        i32::try_from(self.varlong()?).map_err(|_| BatchError::Invalid("varint out of range"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(BatchError::Invalid("length overflow"))?;
        let s = self
            .buf
            .get(self.at..end)
            .ok_or(BatchError::Invalid("field runs past the record"))?;
        self.at = end;
        Ok(s)
    }

    fn bytes(&mut self) -> Result<Option<&'a [u8]>, BatchError> {
        let len = self.varint()?;
        if len < 0 {
            return Ok(None);
        }
        self.take(len as usize).map(Some)
    }

    fn u8(&mut self) -> Result<u8, BatchError> {
        Ok(self.take(1)?[0])
    }
}

/// Decodes the records of one uncompressed batch (as checked by [`check`]).
pub fn decode(batch: &[u8]) -> Result<Vec<Record>, BatchError> {
    let h = check(batch)?;
    if h.compression() != 0 {
        return Err(BatchError::Compressed(h.compression()));
    }
    decode_records(&h, &batch[HEADER_BYTES..])
}

/// One record of a batch, borrowed from the batch's bytes (see [`for_each_record`]).
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

impl RecordRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Record {
        Record {
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.map(<[u8]>::to_vec)))
                .collect(),
        }
    }
}

/// Decodes the records section of a batch with header `h` (the bytes after the header of an
/// uncompressed batch, or what a compressed batch's section decompresses to), handing each record
/// to `f` borrowed from `records_bytes` (for the call), without copying its fields. `f`'s error stops the walk.
pub fn for_each_record<'a, E: From<BatchError>>(
    h: &BatchHeader,
    records_bytes: &'a [u8],
    mut f: impl FnMut(&RecordRef<'_>) -> Result<(), E>,
) -> Result<(), E> {
    // Each record takes at least 7 bytes, so the count cannot exceed this; checked before allocating.
    if h.record_count as usize > records_bytes.len() / 7 + 1 {
        return Err(BatchError::Invalid("record count exceeds the batch size").into());
    }
    let mut cur = Cursor {
        buf: records_bytes,
        at: 0,
    };
    // One header list serves every record in turn.
    let mut headers: Vec<(&'a str, Option<&'a [u8]>)> = Vec::new();
    for _ in 0..h.record_count {
        let len = cur.varint()?;
        if len < 0 {
            return Err(BatchError::Invalid("negative record length").into());
        }
        let mut rec = Cursor {
            buf: cur.take(len as usize)?,
            at: 0,
        };
        let _attributes = rec.u8()?;
        let ts_delta = rec.varlong()?;
        let offset_delta = rec.varint()?;
        let key = rec.bytes()?;
        let value = rec.bytes()?;
        let n_headers = rec.varint()?;
        // Each header takes at least 2 bytes: the count is checked before reserving.
        if n_headers < 0 || n_headers as usize > rec.buf.len() {
            return Err(BatchError::Invalid("invalid header count").into());
        }
        headers.clear();
        headers.reserve(n_headers as usize);
        for _ in 0..n_headers {
            let k = rec.bytes()?.ok_or(BatchError::Invalid("null header key"))?;
            let k = std::str::from_utf8(k)
                .map_err(|_| BatchError::Invalid("header key is not UTF-8"))?;
            headers.push((k, rec.bytes()?));
        }
        f(&RecordRef {
            offset: h.base_offset + i64::from(offset_delta),
            timestamp_ms: h.base_timestamp.wrapping_add(ts_delta),
            key,
            value,
            headers: &headers,
        })?;
    }
    Ok(())
}

/// As [`for_each_record`], into owned records.
pub fn decode_records(h: &BatchHeader, records_bytes: &[u8]) -> Result<Vec<Record>, BatchError> {
    // Bounded like the count check in for_each_record, before that check runs.
    let mut out =
        Vec::with_capacity((h.record_count.max(0) as usize).min(records_bytes.len() / 7 + 1));
    for_each_record(h, records_bytes, |r| {
        out.push(r.to_owned());
        Ok::<(), BatchError>(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = NewRecord> {
        (
            0i64..4_000_000_000_000,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            proptest::collection::vec(
                (
                    "[a-z_]{1,8}",
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
                ),
                0..4,
            ),
        )
            .prop_map(|(timestamp_ms, key, value, headers)| NewRecord {
                timestamp_ms,
                key,
                value,
                headers,
            })
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_identity(records in proptest::collection::vec(record(), 1..20), base in 0i64..1_000_000) {
            let mut batch = encode(&records).unwrap();
            set_base_offset(&mut batch, base);
            let decoded = decode(&batch).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (d, r)) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(d.offset, base + i as i64);
                prop_assert_eq!(d.timestamp_ms, r.timestamp_ms);
                prop_assert_eq!(&d.key, &r.key);
                prop_assert_eq!(&d.value, &r.value);
                prop_assert_eq!(&d.headers, &r.headers);
            }
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let _ = split(&bytes);
        }

        #[test]
        fn decode_never_panics_on_damaged_batches(records in proptest::collection::vec(record(), 1..5), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut batch = encode(&records).unwrap();
            let i = at.index(batch.len());
            batch[i] = byte;
            // Keep the CRC right so the record decoder itself sees the damage.
            seal(&mut batch);
            let _ = decode(&batch);
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_crc() {
        let mut batch = encode(&[NewRecord {
            timestamp_ms: 1,
            value: Some(b"hello".to_vec()),
            ..Default::default()
        }])
        .unwrap();
        assert!(check(&batch).is_ok());
        let last = batch.len() - 1;
        batch[last] ^= 0x10;
        assert!(matches!(check(&batch), Err(BatchError::Crc { .. })));
    }

    #[test]
    fn base_offset_is_outside_the_crc() {
        let mut batch = encode(&[NewRecord::default()]).unwrap();
        set_base_offset(&mut batch, 12345);
        assert_eq!(check(&batch).unwrap().base_offset, 12345);
    }
}

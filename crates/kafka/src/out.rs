//! Responses as a list of byte chunks, so that stored record batches go to the socket without
//! being copied into the encoded response first.
//!
//! The protocol codec writes a response into a [`ByteBufMut`]. [`Chunks`] is one that, when the
//! codec copies in a large slice lying inside one of the batches the response carries (the
//! records of a fetch), keeps a reference to that batch instead of copying it. The connection then
//! writes the chunks with vectored writes.

use std::io::{self, IoSlice};
use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut, buf::UninitSlice};
use kafka_protocol::protocol::buf::ByteBufMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Slices shorter than this are copied: a reference costs a chunk, an iovec and an allocation.
const SHARE_MIN: usize = 4096;

/// A response being encoded: finished chunks, then the one being written into.
pub struct Chunks {
    done: Vec<Bytes>,
    /// Bytes in `done`.
    done_len: usize,
    current: BytesMut,
    /// Buffers whose slices are referenced rather than copied.
    shared: Vec<Bytes>,
}

impl Chunks {
    /// An empty response whose slices of `shared` (of at least [`SHARE_MIN`] bytes) are kept by
    /// reference.
    pub fn new(shared: Vec<Bytes>) -> Chunks {
        Chunks {
            done: Vec::new(),
            done_len: 0,
            current: BytesMut::with_capacity(256),
            shared,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.done_len + self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunks, in order, without empty ones.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.current.is_empty() {
            self.done.push(self.current.freeze());
        }
        self.done.retain(|c| !c.is_empty());
        self.done
    }

    /// The shared buffer `src` lies in, if any.
    fn shared_of(&self, src: &[u8]) -> Option<&Bytes> {
        let (start, end) = (src.as_ptr() as usize, src.as_ptr() as usize + src.len());
        self.shared.iter().find(|b| {
            let (b_start, b_end) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
            b_start <= start && end <= b_end
        })
    }
}

// SAFETY: every method hands the caller `current`'s own buffer and advances it by what the caller
// says it initialised, exactly as `BytesMut`'s implementation requires.
#[allow(unsafe_code)]
unsafe impl BufMut for Chunks {
    fn remaining_mut(&self) -> usize {
        self.current.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised `cnt` bytes of `current.chunk_mut()`.
        unsafe { self.current.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.current.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= SHARE_MIN
            && let Some(shared) = self.shared_of(src)
        {
            let part = shared.slice_ref(src);
            if !self.current.is_empty() {
                self.done_len += self.current.len();
                self.done.push(self.current.split().freeze());
            }
            self.done_len += part.len();
            self.done.push(part);
            return;
        }
        self.current.extend_from_slice(src);
    }
}

impl ByteBufMut for Chunks {
    fn offset(&self) -> usize {
        self.len()
    }

    /// Moves within the chunk being written (the codec seeks only to leave gaps it fills later,
    /// which response messages do not use).
    fn seek(&mut self, offset: usize) {
        assert!(offset >= self.done_len, "cannot seek into a finished chunk");
        self.current.resize(offset - self.done_len, 0);
    }

    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        assert!(r.start >= self.done_len, "cannot address a finished chunk");
        &mut self.current[r.start - self.done_len..r.end - self.done_len]
    }
}

/// Writes `chunks` whole, as few writes as the socket allows.
pub async fn write_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<()> {
    /// Chunks handed to one write at most.
    const IOVECS_MAX: usize = 64;
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[first..]
            .iter()
            .take(IOVECS_MAX)
            .map(|c| IoSlice::new(c))
            .collect();
        let mut written = w.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let c = &mut chunks[first];
            if written >= c.len() {
                written -= c.len();
                first += 1;
            } else {
                c.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_slices_of_shared_buffers_are_referenced_and_the_rest_copied() {
        let records = Bytes::from(vec![7u8; 10_000]);
        let other = vec![9u8; 10_000];
        let mut c = Chunks::new(vec![records.clone()]);
        c.put_i32(42);
        c.put_slice(&records[100..9_000]);
        c.put_slice(&other);
        c.put_slice(&records[..10]);
        assert_eq!(c.offset(), 4 + 8_900 + 10_000 + 10);
        let chunks = c.finish();
        assert_eq!(chunks.len(), 3);
        // The middle chunk is the shared buffer itself, not a copy.
        assert_eq!(chunks[1].as_ptr(), records[100..].as_ptr());
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let mut expected = 42i32.to_be_bytes().to_vec();
        expected.extend_from_slice(&records[100..9_000]);
        expected.extend_from_slice(&other);
        expected.extend_from_slice(&records[..10]);
        assert_eq!(joined, expected);
    }

    #[tokio::test]
    async fn chunks_are_written_whole_through_partial_writes() {
        let (mut a, mut b) = tokio::io::duplex(1000);
        let data: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        let mut chunks: Vec<Bytes> = data.chunks(777).map(Bytes::copy_from_slice).collect();
        let writer = tokio::spawn(async move {
            write_chunks(&mut a, &mut chunks).await.unwrap();
        });
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
            .await
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got, data);
    }
}

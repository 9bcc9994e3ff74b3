//! Kafka framing: every request and response is a big-endian i32 size followed by that many bytes.
//! Pure: takes the bytes read so far, returns a whole frame, "not yet", or an error. The size is
//! checked against the limit before any buffer for the frame is reserved.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("request of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: u64, max: u32 },
    #[error("negative request size {0}")]
    Negative(i32),
}

/// Takes one whole frame off the front of `buf`, if it holds one.
pub fn take_frame(buf: &mut BytesMut, max: u32) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if size < 0 {
        return Err(FrameError::Negative(size));
    }
    if size as u32 > max {
        return Err(FrameError::TooLarge {
            size: size as u64,
            max,
        });
    }
    let total = 4 + size as usize;
    if buf.len() < total {
        // Reserve what the frame needs (bounded by `max` above) so it is read in few calls.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(size as usize).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_whole_and_in_order() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&3i32.to_be_bytes());
        buf.extend_from_slice(b"ab");
        assert_eq!(take_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(b"c");
        buf.extend_from_slice(&1i32.to_be_bytes());
        assert_eq!(
            take_frame(&mut buf, 100),
            Ok(Some(Bytes::from_static(b"abc")))
        );
        assert_eq!(take_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(b"z");
        assert_eq!(
            take_frame(&mut buf, 100),
            Ok(Some(Bytes::from_static(b"z")))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_negative_sizes_are_refused_before_allocating() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(
            take_frame(&mut buf, 1 << 20),
            Err(FrameError::TooLarge {
                size: i32::MAX as u64,
                max: 1 << 20
            })
        );
        assert!(buf.capacity() < 1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(take_frame(&mut buf, 100), Err(FrameError::Negative(-5)));
    }
}

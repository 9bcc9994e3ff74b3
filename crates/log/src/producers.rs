//! Idempotent producers: for each producer id, the epoch and the last batches it wrote to a
//! partition, so that a retried batch is answered with its original offsets instead of being written
//! twice, and a batch that skips sequence numbers is refused. Pure: the partition writer consults it
//! under its lock; recovery rebuilds it from the batches it scans.

use std::collections::{HashMap, VecDeque};

use crate::batch::BatchHeader;
use crate::error::{Error, Result};

/// Batches remembered per producer: Kafka clients keep at most 5 requests in flight per partition
/// when idempotent, so a retry is always among the last 5.
pub const BATCHES_KEPT: usize = 5;

/// One remembered batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Append,
    /// A retry of a batch already in the log, at these offsets.
    Duplicate(ProducerBatch),
}

struct Producer {
    epoch: i16,
    batches: VecDeque<ProducerBatch>,
}

#[derive(Default)]
pub struct Producers {
    by_id: HashMap<i64, Producer>,
}

/// Sequence numbers wrap to 0 after `i32::MAX`.
fn sequence_after(sequence: i32, count: i64) -> i32 {
    ((i64::from(sequence) + count) % (i64::from(i32::MAX) + 1)) as i32
}

/// The sequence number of the last record of a batch.
pub fn last_sequence(h: &BatchHeader) -> i32 {
    sequence_after(h.base_sequence, i64::from(h.last_offset_delta))
}

impl Producers {
    /// Decides whether an idempotent batch (producer id ≥ 0) is new, a retry, or refused.
    pub fn check(&self, h: &BatchHeader, topic: &str, partition: u32) -> Result<Verdict> {
        let Some(p) = self.by_id.get(&h.producer_id) else {
            // A producer we hold no state for (new, or its batches left with retention).
            return Ok(Verdict::Append);
        };
        if h.producer_epoch < p.epoch {
            return Err(Error::InvalidProducerEpoch {
                producer_id: h.producer_id,
                epoch: h.producer_epoch,
                current: p.epoch,
            });
        }
        if h.producer_epoch > p.epoch {
            // A new epoch starts its sequence over.
            return if h.base_sequence == 0 {
                Ok(Verdict::Append)
            } else {
                Err(Error::OutOfOrderSequence {
                    topic: topic.to_string(),
                    partition,
                    producer_id: h.producer_id,
                    expected: 0,
                    got: h.base_sequence,
                })
            };
        }
        let last = last_sequence(h);
        if let Some(b) = p
            .batches
            .iter()
            .find(|b| b.first_sequence == h.base_sequence && b.last_sequence == last)
        {
            return Ok(Verdict::Duplicate(*b));
        }
        let expected = p
            .batches
            .back()
            .map_or(h.base_sequence, |b| sequence_after(b.last_sequence, 1));
        if h.base_sequence != expected {
            return Err(Error::OutOfOrderSequence {
                topic: topic.to_string(),
                partition,
                producer_id: h.producer_id,
                expected,
                got: h.base_sequence,
            });
        }
        Ok(Verdict::Append)
    }

    /// Remembers a batch written to the log.
    pub fn record(&mut self, b: ProducerBatch) {
        let p = self.by_id.entry(b.producer_id).or_insert_with(|| Producer {
            epoch: b.epoch,
            batches: VecDeque::with_capacity(BATCHES_KEPT),
        });
        if b.epoch != p.epoch {
            p.epoch = b.epoch;
            p.batches.clear();
        }
        if p.batches.len() == BATCHES_KEPT {
            p.batches.pop_front();
        }
        p.batches.push_back(b);
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(pid: i64, epoch: i16, seq: i32, count: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_length: 49,
            partition_leader_epoch: -1,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            record_count: count,
        }
    }

    fn write(p: &mut Producers, h: &BatchHeader, base: u64) -> ProducerBatch {
        let b = ProducerBatch {
            producer_id: h.producer_id,
            epoch: h.producer_epoch,
            first_sequence: h.base_sequence,
            last_sequence: last_sequence(h),
            base_offset: base,
            last_offset: base + h.last_offset_delta as u64,
        };
        p.record(b);
        b
    }

    #[test]
    fn retries_are_recognised_and_gaps_refused() {
        let mut p = Producers::default();
        let first = header(7, 0, 0, 3);
        assert_eq!(p.check(&first, "t", 0).unwrap(), Verdict::Append);
        let b0 = write(&mut p, &first, 100);
        let second = header(7, 0, 3, 2);
        assert_eq!(p.check(&second, "t", 0).unwrap(), Verdict::Append);
        write(&mut p, &second, 103);
        // A retry of the first batch gets its original offsets.
        assert_eq!(p.check(&first, "t", 0).unwrap(), Verdict::Duplicate(b0));
        // A gap is refused, naming what was expected.
        match p.check(&header(7, 0, 9, 1), "t", 0) {
            Err(Error::OutOfOrderSequence { expected, got, .. }) => {
                assert_eq!((expected, got), (5, 9))
            }
            other => panic!("{other:?}"),
        }
        // A fenced (older) epoch is refused; a newer one starts over at 0.
        assert!(matches!(
            p.check(&header(7, -1, 5, 1), "t", 0),
            Err(Error::InvalidProducerEpoch { .. })
        ));
        assert!(p.check(&header(7, 1, 3, 1), "t", 0).is_err());
        assert_eq!(
            p.check(&header(7, 1, 0, 1), "t", 0).unwrap(),
            Verdict::Append
        );
        // Only the last five batches are remembered: a retry of an older one is a sequence error.
        for (i, seq) in (5..11).enumerate() {
            write(&mut p, &header(7, 0, seq, 1), 200 + i as u64);
        }
        assert!(matches!(
            p.check(&first, "t", 0),
            Err(Error::OutOfOrderSequence { .. })
        ));
    }

    #[test]
    fn sequences_wrap_after_i32_max() {
        let mut p = Producers::default();
        let h = header(1, 0, i32::MAX - 1, 2);
        assert_eq!(last_sequence(&h), i32::MAX);
        write(&mut p, &h, 0);
        assert_eq!(
            p.check(&header(1, 0, 0, 1), "t", 0).unwrap(),
            Verdict::Append
        );
    }
}

//! Spate's detectors, pure: the `auto` anomaly detector, threshold rules, the per-series
//! bookkeeping of a detector, and NAB (Numenta Anomaly Benchmark) data and scoring.

pub mod auto;
pub mod detector;
pub mod nab;
pub mod threshold;

//! Record batch decoding over arbitrary bytes: splitting, checking and decoding never panic, and a
//! batch that decodes re-encodes to records with the same content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spate_log::batch;

fuzz_target!(|data: &[u8]| {
    let Ok(batches) = batch::split(data) else { return };
    for (at, h) in batches {
        let whole = &data[at..at + h.total_bytes() as usize];
        let Ok(records) = batch::decode(whole) else { continue };
        let again: Vec<batch::NewRecord> = records
            .iter()
            .map(|r| batch::NewRecord {
                timestamp_ms: r.timestamp_ms,
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r.headers.clone(),
            })
            .collect();
        if let Some(mut encoded) = batch::encode(&again) {
            batch::set_base_offset(&mut encoded, h.base_offset);
            let decoded = batch::decode(&encoded).expect("what we encode decodes");
            assert_eq!(decoded.len(), records.len());
            for (a, b) in decoded.iter().zip(&records) {
                assert_eq!((&a.key, &a.value, &a.headers), (&b.key, &b.value, &b.headers));
            }
        }
    }
});

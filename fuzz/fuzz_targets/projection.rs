//! Projection definitions over arbitrary JSON, applied to arbitrary events: compiling and
//! applying never panic, and a row that comes out serializes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spate_broker::Event;
use spate_broker::projections::{Definition, Outcome, Row};

fuzz_target!(|data: &[u8]| {
    // definition \0 event \0 event ...
    let mut parts = data.split(|b| *b == 0);
    let Some(definition) = parts.next() else { return };
    let Ok(definition) = serde_json::from_slice::<Definition>(definition) else { return };
    let Ok(compiled) = definition.compile() else { return };
    let mut rows: Vec<(String, Row)> = Vec::new();
    for (offset, part) in parts.take(8).enumerate() {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(part) else { continue };
        let Ok(mut event) = Event::from_json(value) else { continue };
        event.fill_defaults(0);
        let outcome = compiled.apply(&event, 0, offset as u64, |key| {
            rows.iter().find(|(k, _)| k == key).map(|(_, r)| r.clone())
        });
        if let Ok(Outcome::Row { key, row }) = outcome {
            serde_json::to_string(&row).expect("a row serializes");
            rows.retain(|(k, _)| *k != key);
            rows.push((key, row));
        }
    }
});

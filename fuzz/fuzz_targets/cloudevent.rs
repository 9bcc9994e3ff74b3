//! CloudEvent parsing over arbitrary JSON: never panics, and a valid event survives the trip through
//! a Kafka record and back to JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spate_broker::Event;
use spate_log::batch::Record;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(mut event) = Event::from_json(value) else { return };
    event.fill_defaults(0);
    let r = event.to_record(0);
    let record = Record { offset: 0, timestamp_ms: r.timestamp_ms, key: r.key, value: r.value, headers: r.headers };
    let back = Event::from_record(&record, ("t", 0));
    assert_eq!(back.event_type, event.event_type);
    assert_eq!(back.id, event.id);
    assert_eq!(back.data, event.data);
    let _ = back.to_json();
});

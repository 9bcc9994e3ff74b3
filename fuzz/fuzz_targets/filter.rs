//! Filters over arbitrary expressions, type patterns and event data: compiling and judging never
//! panic, and an expression accepted is judged (match, no match or error) for any event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spate_broker::Event;
use spate_broker::filter::{Filter, FilterInput};

fuzz_target!(|data: &[u8]| {
    // expression \0 type pattern \0 event data
    let mut parts = data.splitn(3, |b| *b == 0);
    let (Some(expr), Some(types), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let (Ok(expr), Ok(types)) = (std::str::from_utf8(expr), std::str::from_utf8(types)) else {
        return;
    };
    let types = (!types.is_empty()).then_some(types);
    let Ok(filter) = Filter::new(Some(expr), types) else { return };
    for content_type in [Some("application/json"), Some("text/plain"), None] {
        let event = Event {
            id: Some("e1".into()),
            source: Some("/fuzz".into()),
            event_type: "order.created".into(),
            datacontenttype: content_type.map(str::to_string),
            data: Some(body.to_vec()),
            ..Event::default()
        };
        let input = FilterInput::new(&event);
        let _ = filter.judge(&event, || &input);
    }
});

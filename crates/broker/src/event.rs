//! CloudEvents 1.0 and how they ride on Kafka records.
//!
//! An [`Event`] is parsed from the HTTP structured form (a JSON object) or the HTTP binary form
//! (`ce-*` headers and a body). It is stored per the CloudEvents Kafka binding in binary mode: each
//! attribute becomes a `ce_<name>` record header, `datacontenttype` the `content-type` header, the
//! data the record value, and the `partitionkey` extension the record key. Reading turns a record
//! back into the structured JSON form; a record produced without `ce_` headers (by a plain Kafka
//! producer) reads as an event of type `spate.record` whose data is the value (see `docs/http.md`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};
use spate_log::batch::{NewRecord, Record, RecordRef};
use thiserror::Error;

/// Attribute names: lowercase ASCII letters and digits; the spec asks for at most 20 characters.
const ATTRIBUTE_NAME_BYTES_MAX: usize = 20;
/// Attribute values (other than data) are short strings; this bounds header bytes per attribute.
pub const ATTRIBUTE_VALUE_BYTES_MAX: usize = 4096;
/// Extensions per event: more would be a misuse of attributes for data.
pub const EXTENSIONS_MAX: usize = 64;

/// Why an event is invalid. Messages are shown to the client.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EventError {
    #[error("event must be a JSON object")]
    NotAnObject,
    #[error("required attribute `type` is missing")]
    MissingType,
    #[error("attribute `{0}` must be a non-empty string")]
    NotAString(String),
    #[error("unsupported specversion {0:?}: only \"1.0\" is supported")]
    SpecVersion(String),
    #[error("attribute `time` is not an RFC 3339 timestamp: {0:?}")]
    Time(String),
    #[error("invalid attribute name {0:?}: names are 1-20 lowercase ASCII letters or digits")]
    AttributeName(String),
    #[error("extension `{0}` must be a string, a boolean or an integer")]
    ExtensionValue(String),
    #[error("attribute `{0}` is longer than 4096 bytes")]
    AttributeTooLong(String),
    #[error("an event has at most 64 extension attributes")]
    TooManyExtensions,
    #[error("`data` and `data_base64` are mutually exclusive")]
    BothData,
    #[error("`data_base64` is not valid base64: {0}")]
    Base64(String),
    #[error("the data is not valid JSON ({0}), but its content type {1:?} says it is")]
    DataNotJson(String, String),
}

/// A CloudEvent. Optional attributes are `None` when absent; `id`, `source` and `time` are filled by
/// [`Event::fill_defaults`] before storing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    pub id: Option<String>,
    pub source: Option<String>,
    pub event_type: String,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    /// Extension attributes as strings (their canonical string form, as in binary mode).
    pub extensions: BTreeMap<String, String>,
    pub data: Option<Vec<u8>>,
}

/// Bytes as text, invalid UTF-8 replaced (checked at full speed first: nearly all is valid).
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Appends the decimal digits of `n` to `out`.
pub fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `s` to `out` as a JSON string literal (quoted and escaped), without allocating.
pub fn push_json_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= ATTRIBUTE_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether a media type carries JSON (`application/json`, `text/json`, `*/*+json`).
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let ends_with = |suffix: &str| {
        essence.len() >= suffix.len()
            && essence.as_bytes()[essence.len() - suffix.len()..]
                .eq_ignore_ascii_case(suffix.as_bytes())
    };
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("text/json")
        || ends_with("+json")
}

fn check_time(t: &str) -> Result<(), EventError> {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map(|_| ())
        .map_err(|_| EventError::Time(t.to_string()))
}

fn check_len(name: &str, v: &str) -> Result<(), EventError> {
    if v.len() > ATTRIBUTE_VALUE_BYTES_MAX {
        return Err(EventError::AttributeTooLong(name.to_string()));
    }
    Ok(())
}

/// Current time as RFC 3339 with millisecond precision.
pub fn now_rfc3339(now_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("a valid time formats")
}

impl Event {
    /// Parses the structured JSON form of one event.
    pub fn from_json(value: Value) -> Result<Event, EventError> {
        let Value::Object(map) = value else {
            return Err(EventError::NotAnObject);
        };
        let mut event = Event::default();
        let mut data: Option<Value> = None;
        let mut data_base64: Option<String> = None;
        let mut has_type = false;
        for (name, v) in map {
            if v.is_null() {
                continue;
            }
            let string = |name: &str, v: Value| -> Result<String, EventError> {
                match v {
                    Value::String(s) if !s.is_empty() => {
                        check_len(name, &s)?;
                        Ok(s)
                    }
                    _ => Err(EventError::NotAString(name.to_string())),
                }
            };
            match name.as_str() {
                "data" => data = Some(v),
                "data_base64" => data_base64 = Some(string("data_base64", v)?),
                "specversion" => {
                    let s = string("specversion", v)?;
                    if s != "1.0" {
                        return Err(EventError::SpecVersion(s));
                    }
                }
                "id" => event.id = Some(string("id", v)?),
                "source" => event.source = Some(string("source", v)?),
                "type" => {
                    event.event_type = string("type", v)?;
                    has_type = true;
                }
                "subject" => event.subject = Some(string("subject", v)?),
                "time" => {
                    let s = string("time", v)?;
                    check_time(&s)?;
                    event.time = Some(s);
                }
                "datacontenttype" => event.datacontenttype = Some(string("datacontenttype", v)?),
                "dataschema" => event.dataschema = Some(string("dataschema", v)?),
                _ => {
                    if !valid_name(&name) {
                        return Err(EventError::AttributeName(name));
                    }
                    let s = match v {
                        Value::String(s) => s,
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                        _ => return Err(EventError::ExtensionValue(name)),
                    };
                    check_len(&name, &s)?;
                    event.extensions.insert(name, s);
                    if event.extensions.len() > EXTENSIONS_MAX {
                        return Err(EventError::TooManyExtensions);
                    }
                }
            }
        }
        if !has_type {
            return Err(EventError::MissingType);
        }
        match (data, data_base64) {
            (Some(_), Some(_)) => return Err(EventError::BothData),
            (None, Some(b64)) => {
                event.data = Some(
                    BASE64
                        .decode(b64.as_bytes())
                        .map_err(|e| EventError::Base64(e.to_string()))?,
                );
            }
            (Some(d), None) => {
                let json = event
                    .datacontenttype
                    .as_deref()
                    .is_none_or(is_json_media_type);
                event.data = Some(match d {
                    // A string under a non-JSON content type is the data itself (e.g. text/plain).
                    Value::String(s) if !json => s.into_bytes(),
                    d => {
                        if event.datacontenttype.is_none() {
                            event.datacontenttype = Some("application/json".into());
                        }
                        serde_json::to_vec(&d).expect("a JSON value serializes")
                    }
                });
            }
            (None, None) => {}
        }
        Ok(event)
    }

    /// Builds an event from the HTTP binary form: `ce-*` headers (names without the prefix,
    /// lowercase), the body's content type and the body.
    pub fn from_binary(
        attributes: Vec<(String, String)>,
        content_type: Option<String>,
        body: Vec<u8>,
    ) -> Result<Event, EventError> {
        let mut map = Map::new();
        for (name, value) in attributes {
            map.insert(name, Value::String(value));
        }
        let mut event = Event::from_json(Value::Object(map))?;
        // Data declared JSON must be JSON: readers are promised a JSON value in `data`. An empty
        // body is an event without data, whatever its content type.
        if let Some(ct) = content_type.as_deref().filter(|ct| is_json_media_type(ct))
            && !body.is_empty()
            && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        {
            return Err(EventError::DataNotJson(e.to_string(), ct.to_string()));
        }
        event.datacontenttype = content_type;
        event.data = (!body.is_empty()).then_some(body);
        Ok(event)
    }

    /// Fills `id` (UUIDv7), `source` (`/spate`) and `time` (now) when absent.
    pub fn fill_defaults(&mut self, now_ms: i64) {
        if self.id.is_none() {
            self.id = Some(uuid::Uuid::now_v7().to_string());
        }
        if self.source.is_none() {
            self.source = Some("/spate".into());
        }
        if self.time.is_none() {
            self.time = Some(now_rfc3339(now_ms));
        }
    }

    /// The `time` attribute in milliseconds since the epoch; `None` without one (or unreadable).
    pub fn time_ms(&self) -> Option<i64> {
        rfc3339_ms(self.time.as_deref()?)
    }

    /// The record key: the `partitionkey` extension.
    pub fn partition_key(&self) -> Option<&str> {
        self.extensions.get("partitionkey").map(String::as_str)
    }

    /// The record for this event per the Kafka binding, binary mode.
    pub fn to_record(&self, timestamp_ms: i64) -> NewRecord {
        let mut headers = Vec::with_capacity(8 + self.extensions.len());
        let mut put = |name: &str, v: &Option<String>| {
            if let Some(v) = v {
                headers.push((format!("ce_{name}"), Some(v.clone().into_bytes())));
            }
        };
        put("specversion", &Some("1.0".into()));
        put("id", &self.id);
        put("source", &self.source);
        put("type", &Some(self.event_type.clone()));
        put("subject", &self.subject);
        put("time", &self.time);
        put("dataschema", &self.dataschema);
        for (name, v) in &self.extensions {
            if name != "partitionkey" {
                headers.push((format!("ce_{name}"), Some(v.clone().into_bytes())));
            }
        }
        if let Some(ct) = &self.datacontenttype {
            headers.push(("content-type".into(), Some(ct.clone().into_bytes())));
        }
        NewRecord {
            timestamp_ms,
            key: self.partition_key().map(|k| k.as_bytes().to_vec()),
            value: self.data.clone(),
            headers,
        }
    }

    /// Bytes this event takes in a record (value, key and headers), for size limits.
    pub fn record_bytes(&self) -> u64 {
        let attrs = [
            &self.id,
            &self.source,
            &self.subject,
            &self.time,
            &self.dataschema,
            &self.datacontenttype,
        ];
        let a: usize = attrs
            .iter()
            .filter_map(|a| a.as_ref())
            .map(|s| s.len() + 16)
            .sum();
        let e: usize = self
            .extensions
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum();
        (self.data.as_ref().map_or(0, Vec::len) + self.event_type.len() + a + e + 64) as u64
    }

    /// The `partitionkey` of the event a stored record carries (as [`Event::from_record`] gives
    /// it), without decoding the rest: the record key, else a `ce_partitionkey` header.
    pub fn record_partition_key(record: &RecordRef<'_>) -> Option<String> {
        if let Some(key) = record.key {
            return Some(text(key));
        }
        record
            .headers
            .iter()
            .rev()
            .find_map(|(name, value)| value.filter(|_| *name == "ce_partitionkey"))
            .map(text)
    }

    /// The event a stored record carries. `origin` names the record for events synthesized from
    /// records without CloudEvents headers: (topic, partition).
    pub fn from_record(record: &Record, origin: (&str, u32)) -> Event {
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        Event::from_record_ref(
            &RecordRef {
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                key: record.key.as_deref(),
                value: record.value.as_deref(),
                headers: &headers,
            },
            origin,
        )
    }

    /// As [`Event::from_record`], from a record borrowed from its batch: only the event's own
    /// fields are allocated.
    pub fn from_record_ref(record: &RecordRef<'_>, origin: (&str, u32)) -> Event {
        let a = RecordAttrs::of(record, origin);
        Event {
            id: Some(a.id.into_owned()),
            source: Some(a.source.into_owned()),
            event_type: a.event_type.into_owned(),
            subject: a.subject.map(Cow::into_owned),
            time: Some(a.time.into_owned()),
            datacontenttype: a.datacontenttype.map(Cow::into_owned),
            dataschema: a.dataschema.map(Cow::into_owned),
            extensions: a
                .extensions
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_owned()))
                .collect(),
            data: record.value.map(<[u8]>::to_vec),
        }
    }

    /// The structured JSON form as text, the same as `to_json().to_string()` up to the order of
    /// members, written directly: JSON data is checked and copied as it is, not parsed into a tree.
    pub fn json_string(&self) -> String {
        let data_len = self.data.as_ref().map_or(0, Vec::len);
        let mut out = String::with_capacity(data_len * 4 / 3 + 256);
        self.write_json(&mut out);
        out
    }

    /// Appends [`Event::json_string`] to `out`.
    pub fn write_json(&self, out: &mut String) {
        let view = JsonView {
            id: self.id.as_deref(),
            source: self.source.as_deref(),
            event_type: &self.event_type,
            subject: self.subject.as_deref(),
            time: self.time.as_deref(),
            datacontenttype: self.datacontenttype.as_deref(),
            dataschema: self.dataschema.as_deref(),
            data: self.data.as_deref(),
        };
        view.write(
            out,
            self.extensions
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
    }

    /// The structured JSON form. JSON data stays JSON; other data becomes `data_base64`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("specversion".into(), "1.0".into());
        let mut put = |name: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(name.into(), Value::String(v.clone()));
            }
        };
        put("id", &self.id);
        put("source", &self.source);
        put("type", &Some(self.event_type.clone()));
        put("subject", &self.subject);
        put("time", &self.time);
        put("datacontenttype", &self.datacontenttype);
        put("dataschema", &self.dataschema);
        for (k, v) in &self.extensions {
            m.insert(k.clone(), Value::String(v.clone()));
        }
        if let Some(data) = &self.data {
            let json = self
                .datacontenttype
                .as_deref()
                .is_none_or(is_json_media_type);
            match serde_json::from_slice::<Value>(data) {
                Ok(v) if json => {
                    m.insert("data".into(), v);
                }
                _ => {
                    m.insert("data_base64".into(), Value::String(BASE64.encode(data)));
                }
            }
        }
        Value::Object(m)
    }
}

/// An event's attributes and data, borrowed: what its structured JSON form is written from.
struct JsonView<'a> {
    id: Option<&'a str>,
    source: Option<&'a str>,
    event_type: &'a str,
    subject: Option<&'a str>,
    time: Option<&'a str>,
    datacontenttype: Option<&'a str>,
    dataschema: Option<&'a str>,
    data: Option<&'a [u8]>,
}

impl JsonView<'_> {
    /// Writes the structured JSON form; `extensions` come sorted by name, each name once.
    fn write<'e>(&self, out: &mut String, extensions: impl Iterator<Item = (&'e str, &'e str)>) {
        use std::fmt::Write;
        out.push_str("{\"specversion\":\"1.0\"");
        let put = |out: &mut String, name: &str, v: &str| {
            out.push(',');
            push_json_str(out, name);
            out.push(':');
            push_json_str(out, v);
        };
        let attrs = [
            ("id", self.id),
            ("source", self.source),
            ("type", Some(self.event_type)),
            ("subject", self.subject),
            ("time", self.time),
            ("datacontenttype", self.datacontenttype),
            ("dataschema", self.dataschema),
        ];
        for (name, v) in attrs {
            if let Some(v) = v {
                put(out, name, v);
            }
        }
        for (k, v) in extensions {
            put(out, k, v);
        }
        if let Some(data) = self.data {
            let json = self.datacontenttype.is_none_or(is_json_media_type);
            match std::str::from_utf8(data) {
                Ok(text) if json && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
                    out.push_str(",\"data\":");
                    out.push_str(text.trim());
                }
                _ => {
                    let _ = write!(out, ",\"data_base64\":\"{}\"", BASE64.encode(data));
                }
            }
        }
        out.push('}');
    }
}

/// Milliseconds since the epoch of an RFC 3339 timestamp.
fn rfc3339_ms(t: &str) -> Option<i64> {
    utc_rfc3339_ms(t).or_else(|| {
        let t =
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()?;
        Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
    })
}

/// The common case of [`rfc3339_ms`] without a general parser: `YYYY-MM-DDTHH:MM:SS[.f…]Z`
/// from 1970 on, every field in range. `None` for anything else, which the general parser judges.
fn utc_rfc3339_ms(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let digits = |d: &[u8]| -> Option<i64> {
        d.iter().try_fold(0i64, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (hour, minute, second) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if year < 1970 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year as i32, month, u8::try_from(day).ok()?).ok()?;
    let epoch = time::OffsetDateTime::UNIX_EPOCH.date();
    let days = i64::from(date.to_julian_day() - epoch.to_julian_day());
    // Fraction: `.` and 1 to 9 digits, of which milliseconds keep the first three.
    let ms = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', f @ ..] if (1..=9).contains(&f.len()) => {
            digits(f)?;
            f.iter()
                .chain(b"00")
                .take(3)
                .fold(0, |n, c| n * 10 + i64::from(c - b'0'))
        }
        _ => return None,
    };
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + ms)
}

/// What [`write_record_json`] learned about the event besides its JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordFacts {
    /// The event's `time` in milliseconds (as [`Event::time_ms`]).
    pub time_ms: Option<i64>,
    /// The `partitionkey` extension (as [`Event::partition_key`]).
    pub partition_key: Option<String>,
}

/// The attributes of the event a stored record carries (see the module docs), borrowed from the
/// record where they are valid UTF-8, with the defaults of records without CloudEvents headers.
struct RecordAttrs<'r> {
    id: Cow<'r, str>,
    source: Cow<'r, str>,
    event_type: Cow<'r, str>,
    subject: Option<Cow<'r, str>>,
    time: Cow<'r, str>,
    datacontenttype: Option<Cow<'r, str>>,
    dataschema: Option<Cow<'r, str>>,
    /// Sorted by name, each name once (the last value given for it).
    extensions: Vec<(&'r str, Cow<'r, str>)>,
}

impl<'r> RecordAttrs<'r> {
    fn of(record: &RecordRef<'r>, origin: (&str, u32)) -> RecordAttrs<'r> {
        let lossy = |b| String::from_utf8_lossy(b);
        let (mut id, mut source, mut event_type, mut subject) = (None, None, None, None);
        let (mut time, mut datacontenttype, mut dataschema) = (None, None, None);
        let mut extensions: Vec<(&str, Cow<'_, str>)> = Vec::new();
        let mut has_ce = false;
        for &(name, value) in record.headers {
            let Some(value) = value.map(lossy) else {
                continue;
            };
            if name.eq_ignore_ascii_case("content-type") {
                datacontenttype = Some(value);
                continue;
            }
            let Some(attr) = name.strip_prefix("ce_") else {
                continue;
            };
            has_ce = true;
            match attr {
                "specversion" => {}
                "id" => id = Some(value),
                "source" => source = Some(value),
                "type" => event_type = Some(value),
                "subject" => subject = Some(value),
                "time" => time = Some(value),
                "dataschema" => dataschema = Some(value),
                other => extensions.push((other, value)),
            }
        }
        if let Some(key) = record.key {
            extensions.push(("partitionkey", lossy(key)));
        }
        // As in a map of extensions: sorted by name, the last value given for a name kept.
        extensions.reverse();
        extensions.sort_by(|a, b| a.0.cmp(b.0));
        extensions.dedup_by(|later, earlier| later.0 == earlier.0);
        let (topic, partition) = origin;
        RecordAttrs {
            event_type: match event_type {
                Some(t) if has_ce && !t.is_empty() => t,
                _ => Cow::Borrowed("spate.record"),
            },
            id: id.unwrap_or_else(|| Cow::Owned(format!("{topic}-{partition}-{}", record.offset))),
            source: source.unwrap_or_else(|| Cow::Owned(format!("/spate/topics/{topic}"))),
            time: time.unwrap_or_else(|| Cow::Owned(now_rfc3339(record.timestamp_ms))),
            subject,
            datacontenttype,
            dataschema,
            extensions,
        }
    }
}

/// The structured JSON form of the event a stored record carries, written without building the
/// event (see [`write_record_json`]).
pub fn record_json(record: &RecordRef<'_>, origin: (&str, u32)) -> String {
    let mut json = String::with_capacity(record.value.map_or(0, <[u8]>::len) + 256);
    write_record_json(record, origin, &mut json);
    json
}

/// Appends the structured JSON form of the event a stored record carries to `out`: the same text
/// as `Event::from_record_ref(record, origin).write_json(out)`, without building the event (its
/// attributes are borrowed from the record).
pub fn write_record_json(
    record: &RecordRef<'_>,
    origin: (&str, u32),
    out: &mut String,
) -> RecordFacts {
    let a = RecordAttrs::of(record, origin);
    JsonView {
        id: Some(&a.id),
        source: Some(&a.source),
        event_type: &a.event_type,
        subject: a.subject.as_deref(),
        time: Some(&a.time),
        datacontenttype: a.datacontenttype.as_deref(),
        dataschema: a.dataschema.as_deref(),
        data: record.value,
    }
    .write(out, a.extensions.iter().map(|(k, v)| (*k, v.as_ref())));
    RecordFacts {
        time_ms: rfc3339_ms(&a.time),
        partition_key: a
            .extensions
            .iter()
            .find(|(k, _)| *k == "partitionkey")
            .map(|(_, v)| v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header_name() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("ce_specversion".to_string()),
            Just("ce_id".to_string()),
            Just("ce_source".to_string()),
            Just("ce_type".to_string()),
            Just("ce_subject".to_string()),
            Just("ce_time".to_string()),
            Just("ce_dataschema".to_string()),
            Just("ce_partitionkey".to_string()),
            Just("ce_ext".to_string()),
            Just("ce_zext".to_string()),
            Just("content-type".to_string()),
            Just("Content-Type".to_string()),
            Just("other".to_string()),
        ]
    }

    fn header_value() -> impl proptest::strategy::Strategy<Value = Option<Vec<u8>>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            Just(Some(b"".to_vec())),
            Just(Some(b"application/json".to_vec())),
            Just(Some(b"text/plain".to_vec())),
            Just(Some(b"2026-11-29T01:02:03.456Z".to_vec())),
            Just(Some(b"a \"quoted\"\nvalue".to_vec())),
            Just(Some(vec![0xff, b'x', 0xfe])),
            "[a-z.]{1,12}".prop_map(|s| Some(s.into_bytes())),
        ]
    }

    fn data() -> impl proptest::strategy::Strategy<Value = Option<Vec<u8>>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            Just(Some(b" {\"a\": [1, 2.5, \"x\"]} ".to_vec())),
            Just(Some(b"not json".to_vec())),
            Just(Some(vec![0, 1, 2, 0xff])),
            Just(Some(b"\"text\"".to_vec())),
            Just(Some(Vec::new())),
        ]
    }

    #[test]
    fn json_media_types_are_told_apart_whatever_their_case_and_parameters() {
        for t in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " text/json ",
            "application/cloudevents+json",
            "application/vnd.api+JSON;x=1",
        ] {
            assert!(is_json_media_type(t), "{t}");
        }
        for t in [
            "text/plain",
            "application/jsonx",
            "json",
            "",
            "+jso",
            "application/json-seq",
        ] {
            assert!(!is_json_media_type(t), "{t}");
        }
    }

    #[test]
    fn utc_timestamps_take_the_fast_path() {
        for (t, ms) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2026-11-29T01:02:03.456Z", 1_795_914_123_456),
            ("2024-02-29T23:59:59.9999Z", 1_709_251_199_999),
            ("2000-03-01T00:00:00.5Z", 951_868_800_500),
        ] {
            assert_eq!(utc_rfc3339_ms(t), Some(ms), "{t}");
            assert_eq!(rfc3339_ms(t), Some(ms), "{t}");
        }
        for t in [
            "2023-02-29T00:00:00Z",
            "2026-11-29T01:02:03+00:00",
            "2026-11-29T01:02:03.Z",
        ] {
            assert_eq!(utc_rfc3339_ms(t), None, "{t}");
        }
    }

    proptest::proptest! {
        /// The fast path for UTC timestamps reads them as the general RFC 3339 parser does, and
        /// leaves it every string it does not take.
        #[test]
        fn utc_timestamps_read_as_the_general_parser_reads_them(
            year in 1900i64..2400,
            month in 0i64..14,
            day in 0i64..33,
            hour in 0i64..25,
            minute in 0i64..61,
            second in 0i64..61,
            fraction in proptest::option::of("[0-9]{0,10}"),
            end in proptest::sample::select(vec!["Z", "z", "+00:00", "+02:00", "X", ""]),
        ) {
            let t = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{}{end}",
                fraction.map(|f| format!(".{f}")).unwrap_or_default()
            );
            let general = time::OffsetDateTime::parse(
                &t,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
            if let Some(fast) = utc_rfc3339_ms(&t) {
                proptest::prop_assert_eq!(Some(fast), general, "{}", t);
            }
            proptest::prop_assert_eq!(rfc3339_ms(&t), general, "{}", t);
        }

        /// Rendering straight from a record gives the text the decoded event gives, whatever
        /// headers (repeated, missing, not UTF-8), key and data the record carries.
        #[test]
        fn a_record_renders_as_its_decoded_event(
            headers in proptest::collection::vec((header_name(), header_value()), 0..8),
            key in proptest::option::of("[a-z0-9]{0,6}"),
            value in data(),
            offset in 0i64..1_000_000,
        ) {
            let refs: Vec<(&str, Option<&[u8]>)> =
                headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
            let record = RecordRef {
                offset,
                timestamp_ms: 1_764_000_000_000 + offset,
                key: key.as_deref().map(str::as_bytes),
                value: value.as_deref(),
                headers: &refs,
            };
            let event = Event::from_record_ref(&record, ("orders", 3));
            let mut direct = String::new();
            let facts = write_record_json(&record, ("orders", 3), &mut direct);
            proptest::prop_assert_eq!(&direct, &event.json_string());
            proptest::prop_assert_eq!(facts.time_ms, event.time_ms());
            proptest::prop_assert_eq!(facts.partition_key.as_deref(), event.partition_key());
        }
    }

    fn roundtrip(e: &Event) -> Event {
        let nr = e.to_record(5);
        let r = Record {
            offset: 7,
            timestamp_ms: nr.timestamp_ms,
            key: nr.key,
            value: nr.value,
            headers: nr.headers,
        };
        Event::from_record(&r, ("t", 0))
    }

    #[test]
    fn json_strings_are_quoted_and_escaped() {
        for s in [
            "",
            "plain",
            "quote \" and backslash \\",
            "lines\nand\rtabs\t",
            "controls \u{0}\u{1}\u{8}\u{c}\u{1f} end",
            "non-ASCII \u{e9}\u{1f600} and \u{7f}",
            "\"",
        ] {
            let mut out = String::from("x");
            push_json_str(&mut out, s);
            let back: String = serde_json::from_str(&out[1..]).unwrap();
            assert_eq!(back, s);
            assert_eq!(&out[..1], "x");
        }
    }

    #[test]
    fn the_json_text_is_the_json_form() {
        let mut events = vec![
            Event::from_json(json!({
                "type": "order.created", "subject": "o-\"1\"\n", "partitionkey": "k\u{e9}",
                "priority": 3, "data": {"amount": 12.5, "tags": ["a", "\u{1f600}"]}
            }))
            .unwrap(),
            Event::from_json(json!({"type": "t", "data": "plain"})).unwrap(),
            Event::from_json(json!({"type": "t"})).unwrap(),
        ];
        let raw = |ct: Option<&str>, data: &[u8]| Event {
            event_type: "raw".into(),
            datacontenttype: ct.map(str::to_string),
            data: Some(data.to_vec()),
            ..Event::default()
        };
        events.push(raw(None, b" {\"a\": 1}\n"));
        events.push(raw(Some("application/json"), b"{\"a\": 1} trailing"));
        events.push(raw(Some("text/plain"), b"{}"));
        events.push(raw(None, &[0xff, 0x00, 0x7b]));
        events.push(raw(
            Some("application/cloudevents+json; charset=utf-8"),
            b"[1,2]",
        ));
        for e in &mut events {
            e.fill_defaults(0);
            let text: Value = serde_json::from_str(&e.json_string()).unwrap();
            assert_eq!(text, e.to_json(), "{e:?}");
        }
    }

    #[test]
    fn structured_event_survives_the_record_mapping() {
        let mut e = Event::from_json(json!({
            "type": "order.created", "subject": "o-1", "partitionkey": "order-42",
            "priority": 3, "urgent": true, "data": {"amount": 12.5}
        }))
        .unwrap();
        e.fill_defaults(0);
        let back = roundtrip(&e);
        assert_eq!(
            back,
            Event {
                extensions: [
                    ("partitionkey".into(), "order-42".into()),
                    ("priority".into(), "3".into()),
                    ("urgent".into(), "true".into())
                ]
                .into(),
                ..e.clone()
            }
        );
        let j = back.to_json();
        assert_eq!(j["data"], json!({"amount": 12.5}));
        assert_eq!(j["datacontenttype"], "application/json");
        assert_eq!(j["time"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn non_json_data_reads_back_as_base64() {
        let e =
            Event::from_json(json!({"type": "t", "datacontenttype": "text/plain", "data": "hi"}))
                .unwrap();
        assert_eq!(e.data.as_deref(), Some(&b"hi"[..]));
        assert_eq!(roundtrip(&e).to_json()["data_base64"], "aGk=");
        let e = Event::from_json(json!({"type": "t", "data_base64": "AAEC"})).unwrap();
        assert_eq!(e.data.as_deref(), Some(&[0u8, 1, 2][..]));
        assert_eq!(roundtrip(&e).to_json()["data_base64"], "AAEC");
    }

    #[test]
    fn invalid_events_are_named() {
        let cases = [
            (json!([1]), EventError::NotAnObject),
            (json!({"id": "x"}), EventError::MissingType),
            (json!({"type": ""}), EventError::NotAString("type".into())),
            (json!({"type": 3}), EventError::NotAString("type".into())),
            (
                json!({"type": "t", "specversion": "0.3"}),
                EventError::SpecVersion("0.3".into()),
            ),
            (
                json!({"type": "t", "time": "yesterday"}),
                EventError::Time("yesterday".into()),
            ),
            (
                json!({"type": "t", "Bad": "x"}),
                EventError::AttributeName("Bad".into()),
            ),
            (
                json!({"type": "t", "x": {"a": 1}}),
                EventError::ExtensionValue("x".into()),
            ),
            (
                json!({"type": "t", "x": 1.5}),
                EventError::ExtensionValue("x".into()),
            ),
            (
                json!({"type": "t", "data": 1, "data_base64": "AA=="}),
                EventError::BothData,
            ),
        ];
        for (input, err) in cases {
            assert_eq!(Event::from_json(input.clone()).unwrap_err(), err, "{input}");
        }
        assert!(matches!(
            Event::from_json(json!({"type": "t", "data_base64": "!!"})),
            Err(EventError::Base64(_))
        ));
    }

    #[test]
    fn plain_records_read_as_spate_record_events() {
        let r = Record {
            offset: 9,
            timestamp_ms: 1000,
            key: Some(b"k".to_vec()),
            value: Some(b"{\"a\":1}".to_vec()),
            headers: vec![("trace".into(), Some(b"x".to_vec()))],
        };
        let j = Event::from_record(&r, ("orders", 2)).to_json();
        assert_eq!(j["type"], "spate.record");
        assert_eq!(j["id"], "orders-2-9");
        assert_eq!(j["source"], "/spate/topics/orders");
        assert_eq!(j["partitionkey"], "k");
        assert_eq!(j["data"], json!({"a": 1}));
        assert_eq!(j["time"], "1970-01-01T00:00:01Z");
    }
}

//! The pure core of projections: definitions, and how one event changes one row.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};

use crate::Event;
use crate::filter::{Expression, Filter, FilterInput, from_json, to_json};

/// A row's value may take this many bytes of JSON at most.
pub const ROW_BYTES_MAX: usize = 64 * 1024;
/// The longest row key, in bytes: an event whose key is longer fails (see [`OnError`]).
pub const ROW_KEY_BYTES_MAX: usize = 4096;
/// Distinct values `count_distinct` remembers per row at most.
pub const DISTINCT_MAX: usize = 10_000;
/// Aggregates per projection at most.
pub const AGGREGATES_MAX: usize = 32;

/// What to do with an event the definition fails on (a missing field, a wrong type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the projection at the event; its status names the offset.
    #[default]
    Halt,
    /// Count the error and go on.
    Skip,
}

/// The reducer, as given: exactly one of the three forms.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReduceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply: Option<String>,
}

/// A projection's definition, as given to `PUT /v1/projections/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<String>,
    /// A CEL expression giving the row key; the event's `partitionkey` (record key) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub reduce: ReduceSpec,
    #[serde(default)]
    pub on_error: OnError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agg {
    Count,
    Sum,
    Max,
    Min,
    Avg,
    Last,
    CountDistinct,
}

/// An aggregate's argument: a plain field path of `data` (`data.amount`, `data.customer.id`)
/// read straight from the JSON, or any other CEL expression.
#[derive(Debug)]
enum Arg {
    Path(Vec<String>),
    Cel(Expression),
}

#[derive(Debug)]
struct Aggregate {
    name: String,
    agg: Agg,
    arg: Option<Arg>,
}

/// The value at `path` (field names) in an event's JSON data.
pub(crate) fn data_at<'a>(data: Option<&'a Json>, path: &[String]) -> Result<&'a Json, String> {
    let mut at = data.ok_or("the event has no JSON data")?;
    for field in path {
        at = at
            .get(field)
            .ok_or_else(|| format!("no such key: {field}"))?;
    }
    Ok(at)
}

/// `data.a.b` as the path `[a, b]`; `None` for anything else.
pub(crate) fn data_path(source: &str) -> Option<Vec<String>> {
    let mut parts = source.trim().split('.');
    if parts.next()? != "data" {
        return None;
    }
    let path: Vec<String> = parts.map(str::to_string).collect();
    let ident = |s: &String| {
        !s.is_empty()
            && !s.as_bytes()[0].is_ascii_digit()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !matches!(s.as_str(), "true" | "false" | "null" | "in")
    };
    (!path.is_empty() && path.iter().all(ident)).then_some(path)
}

#[derive(Debug)]
enum Reducer {
    Aggregate {
        aggs: Vec<Aggregate>,
        window_ms: Option<i64>,
    },
    Merge,
    Fold {
        init: Expression,
        apply: Expression,
    },
}

/// A compiled definition.
#[derive(Debug)]
pub struct Compiled {
    pub definition: Definition,
    filter: Filter,
    key: Option<Expression>,
    reducer: Reducer,
}

/// A row: the value queries see, the offset of the last event applied, and what aggregates keep
/// beside it (sums and counts of averages, distinct values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub value: Json,
    pub partition: u32,
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub acc: Json,
}

fn compile(what: &str, source: &str) -> Result<Expression, String> {
    Expression::compile(source).map_err(|e| format!("{what}: {e}"))
}

/// `1500ms`, `30s`, `5m`, `1h`, `1d` in milliseconds.
fn parse_window(w: &str) -> Result<i64, String> {
    let bad = || format!("window {w:?} must be a positive duration such as 30s, 5m, 1h or 1d");
    let (n, unit) = match w.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => w.split_at(at),
        None => return Err(bad()),
    };
    let n: i64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    if n <= 0 || n > 366 * 86_400_000 / ms {
        return Err(bad());
    }
    Ok(n * ms)
}

fn parse_aggregate(name: &str, source: &str) -> Result<Aggregate, String> {
    let s = source.trim();
    let open = s.find('(').filter(|_| s.ends_with(')')).ok_or_else(|| {
        format!("aggregate {name}: {source:?} must be a call such as count() or sum(data.amount)")
    })?;
    let (func, inner) = (&s[..open], s[open + 1..s.len() - 1].trim());
    let agg = match func.trim() {
        "count" => Agg::Count,
        "sum" => Agg::Sum,
        "max" => Agg::Max,
        "min" => Agg::Min,
        "avg" => Agg::Avg,
        "last" => Agg::Last,
        "count_distinct" => Agg::CountDistinct,
        other => {
            return Err(format!(
                "aggregate {name}: unknown function {other:?} (count, sum, max, min, avg, last, count_distinct)"
            ));
        }
    };
    let arg = match (agg, inner.is_empty()) {
        (Agg::Count, true) => None,
        (Agg::Count, false) => return Err(format!("aggregate {name}: count() takes no argument")),
        (_, true) => return Err(format!("aggregate {name}: {func}() needs an argument")),
        (_, false) => {
            let expr = compile(&format!("aggregate {name}"), inner)?;
            Some(match data_path(inner) {
                Some(path) => Arg::Path(path),
                None => Arg::Cel(expr),
            })
        }
    };
    Ok(Aggregate {
        name: name.to_string(),
        agg,
        arg,
    })
}

fn valid_field(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Definition {
    /// Whether rows are keyed by the record key (no `key` expression, or `key` / `partitionkey`),
    /// so that each stream is a row.
    pub fn keyed_by_record(&self) -> bool {
        matches!(
            self.key.as_deref().map(str::trim),
            None | Some("key") | Some("partitionkey")
        )
    }

    /// Compiles the definition; the error says what is wrong.
    pub fn compile(self) -> Result<Compiled, String> {
        let filter = Filter::new(self.filter.as_deref(), self.types.as_deref())
            .map_err(|e| format!("invalid filter: {e}"))?;
        let key = self.key.as_deref().map(|k| compile("key", k)).transpose()?;
        let r = &self.reduce;
        let forms = [
            r.aggregate.is_some(),
            r.merge.is_some(),
            r.init.is_some() || r.apply.is_some(),
        ];
        if forms.iter().filter(|f| **f).count() != 1 {
            return Err(
                "reduce needs exactly one of {\"aggregate\": …}, {\"merge\": true} or {\"init\": …, \"apply\": …}"
                    .into(),
            );
        }
        let reducer = if let Some(aggs) = &r.aggregate {
            if aggs.is_empty() || aggs.len() > AGGREGATES_MAX {
                return Err(format!("aggregate takes 1 to {AGGREGATES_MAX} fields"));
            }
            let mut out = Vec::new();
            for (name, source) in aggs {
                if !valid_field(name) {
                    return Err(format!(
                        "aggregate field {name:?}: names are 1-64 letters, digits or _"
                    ));
                }
                out.push(parse_aggregate(name, source)?);
            }
            Reducer::Aggregate {
                aggs: out,
                window_ms: r.window.as_deref().map(parse_window).transpose()?,
            }
        } else {
            if r.window.is_some() {
                return Err("window applies to aggregate only".into());
            }
            if let Some(merge) = r.merge {
                if !merge {
                    return Err("merge must be true".into());
                }
                Reducer::Merge
            } else {
                let (Some(init), Some(apply)) = (&r.init, &r.apply) else {
                    return Err("a fold needs both init and apply".into());
                };
                Reducer::Fold {
                    init: compile("init", init)?,
                    apply: compile("apply", apply)?,
                }
            }
        };
        Ok(Compiled {
            filter,
            key,
            reducer,
            definition: self,
        })
    }
}

/// What one event does.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The filter leaves it out.
    Skipped,
    /// The row `key` becomes `row`.
    Row { key: String, row: Row },
}

/// An event's `time` in ms since the epoch (0 without one).
pub fn event_ms(event: &Event) -> i64 {
    event.time_ms().unwrap_or(0)
}

fn number(v: &Json) -> Option<f64> {
    v.as_f64()
}

/// JSON merge patch (RFC 7396).
pub fn merge_patch(target: &mut Json, patch: &Json) {
    let Json::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Json::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Json::Null), v);
        }
    }
}

impl Compiled {
    /// The row key of an event.
    fn key_of<'a>(
        &self,
        event: &Event,
        input: &mut impl FnMut() -> &'a FilterInput,
    ) -> Result<String, String> {
        let base = match &self.key {
            None => event
                .partition_key()
                .map(str::to_string)
                .ok_or("the event has no partitionkey (record key) and the definition no key")?,
            Some(k) => match k.evaluate(input())? {
                cel::Value::String(s) => s.to_string(),
                other => {
                    return Err(format!(
                        "key must give a string, gave a {:?}",
                        other.type_of()
                    ));
                }
            },
        };
        // A record key that is not UTF-8 reads with U+FFFD in place of its bad bytes, so two
        // different binary keys could fold into one row: such keys name no row (as they name no
        // stream); a key expression over other attributes can place their events.
        if self.definition.keyed_by_record() && base.contains(char::REPLACEMENT_CHARACTER) {
            return Err("the event's partitionkey holds U+FFFD, which stands for bytes of a record key that are not UTF-8; key the projection by another attribute".into());
        }
        let key = match &self.reducer {
            Reducer::Aggregate {
                window_ms: Some(w), ..
            } => {
                let start = event_ms(event).div_euclid(*w) * w;
                format!("{base}@{}", crate::event::now_rfc3339(start))
            }
            _ => base,
        };
        if key.len() > ROW_KEY_BYTES_MAX {
            return Err(format!(
                "the row key takes {} bytes, over the limit of {ROW_KEY_BYTES_MAX}",
                key.len()
            ));
        }
        Ok(key)
    }

    /// Whether rows can grow large enough to need a size check.
    fn unbounded_rows(&self) -> bool {
        match &self.reducer {
            Reducer::Merge | Reducer::Fold { .. } => true,
            Reducer::Aggregate { aggs, .. } => aggs
                .iter()
                .any(|a| matches!(a.agg, Agg::Last | Agg::CountDistinct)),
        }
    }

    /// Applies one event to the row it belongs to. `current` reads the row's present state.
    pub fn apply(
        &self,
        event: &Event,
        partition: u32,
        offset: u64,
        current: impl FnOnce(&str) -> Option<Row>,
    ) -> Result<Outcome, String> {
        // CEL variables and parsed data are built only when something needs them.
        let cel_input = std::cell::OnceCell::new();
        let input = || cel_input.get_or_init(|| FilterInput::new(event));
        let parsed = std::cell::OnceCell::new();
        let data = || {
            parsed
                .get_or_init(|| {
                    event
                        .data
                        .as_deref()
                        .and_then(|d| serde_json::from_slice::<Json>(d).ok())
                })
                .as_ref()
        };
        // A filter that fails on an event counts as no match, as for every filter.
        if !self.filter.is_empty()
            && self.filter.judge(event, input) != crate::filter::Verdict::Match
        {
            return Ok(Outcome::Skipped);
        }
        let mut key_input = input;
        let key = self.key_of(event, &mut key_input)?;
        let old = current(&key);
        let (value, acc) = match &self.reducer {
            Reducer::Merge => {
                let patch = input_data(event)?;
                let mut value = old.map_or(Json::Null, |r| r.value);
                merge_patch(&mut value, &patch);
                (value, Json::Null)
            }
            Reducer::Fold { init, apply } => {
                let state = match old {
                    Some(r) => from_json(&r.value),
                    None => init.evaluate(input()).map_err(|e| format!("init: {e}"))?,
                };
                let next = apply
                    .evaluate_with(input(), &[("state", state)])
                    .map_err(|e| format!("apply: {e}"))?;
                (
                    to_json(&next).map_err(|e| format!("apply: {e}"))?,
                    Json::Null,
                )
            }
            Reducer::Aggregate { aggs, .. } => {
                let (mut value, mut acc) = match old {
                    Some(r) => (r.value, r.acc),
                    None => (json!({}), json!({})),
                };
                for a in aggs {
                    let arg = match &a.arg {
                        Some(Arg::Cel(e)) => Some(
                            to_json(
                                &e.evaluate(input())
                                    .map_err(|e| format!("{}: {e}", a.name))?,
                            )
                            .map_err(|e| format!("{}: {e}", a.name))?,
                        ),
                        Some(Arg::Path(path)) => Some(
                            data_at(data(), path)
                                .map_err(|e| format!("{}: {e}", a.name))?
                                .clone(),
                        ),
                        None => None,
                    };
                    aggregate(a, arg, &mut value, &mut acc)?;
                }
                (value, acc)
            }
        };
        let row = Row {
            value,
            partition,
            offset,
            acc,
        };
        if self.unbounded_rows() {
            let size = serde_json::to_vec(&row).map_or(usize::MAX, |v| v.len());
            if size > ROW_BYTES_MAX {
                return Err(format!(
                    "row {key:?} would take {size} bytes, over the limit of {ROW_BYTES_MAX}"
                ));
            }
        }
        Ok(Outcome::Row { key, row })
    }
}

fn input_data(event: &Event) -> Result<Json, String> {
    let data = event.data.as_deref().unwrap_or(b"null");
    serde_json::from_slice(data).map_err(|_| "merge needs JSON data".to_string())
}

fn aggregate(
    a: &Aggregate,
    arg: Option<Json>,
    value: &mut Json,
    acc: &mut Json,
) -> Result<(), String> {
    let name = a.name.as_str();
    let v = value
        .as_object_mut()
        .ok_or("aggregate row is not an object")?;
    let numeric = |arg: &Option<Json>| {
        arg.as_ref()
            .and_then(number)
            .ok_or_else(|| format!("{name}: the argument is not a number"))
    };
    match a.agg {
        Agg::Count => {
            let n = v.get(name).and_then(Json::as_u64).unwrap_or(0);
            v.insert(name.into(), json!(n + 1));
        }
        Agg::Sum => {
            let x = numeric(&arg)?;
            let old = v.get(name).and_then(number).unwrap_or(0.0);
            v.insert(name.into(), num(old + x));
        }
        Agg::Max | Agg::Min => {
            let x = numeric(&arg)?;
            let keep = match v.get(name).and_then(number) {
                Some(old) if a.agg == Agg::Max => old.max(x),
                Some(old) => old.min(x),
                None => x,
            };
            v.insert(name.into(), num(keep));
        }
        Agg::Avg => {
            let x = numeric(&arg)?;
            let st = acc
                .as_object_mut()
                .ok_or("aggregate state is not an object")?
                .entry(name.to_string())
                .or_insert(json!({"sum": 0.0, "count": 0}));
            let sum = st["sum"].as_f64().unwrap_or(0.0) + x;
            let count = st["count"].as_u64().unwrap_or(0) + 1;
            *st = json!({"sum": sum, "count": count});
            v.insert(name.into(), num(sum / count as f64));
        }
        Agg::Last => {
            v.insert(name.into(), arg.unwrap_or(Json::Null));
        }
        Agg::CountDistinct => {
            let seen_key = match arg.unwrap_or(Json::Null) {
                Json::String(s) => s,
                other => other.to_string(),
            };
            let st = acc
                .as_object_mut()
                .ok_or("aggregate state is not an object")?
                .entry(name.to_string())
                .or_insert(json!([]));
            let list = st.as_array_mut().ok_or("aggregate state is not a list")?;
            let at = list.binary_search_by(|x| x.as_str().unwrap_or("").cmp(&seen_key));
            if let Err(at) = at {
                if list.len() >= DISTINCT_MAX {
                    return Err(format!(
                        "{name}: more than {DISTINCT_MAX} distinct values in one row"
                    ));
                }
                list.insert(at, Json::String(seen_key));
            }
            let n = list.len();
            v.insert(name.into(), json!(n));
        }
    }
    Ok(())
}

/// A number as JSON: integral values as integers.
fn num(x: f64) -> Json {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, time: &str, data: Json) -> Event {
        Event {
            id: Some("e".into()),
            source: Some("/t".into()),
            event_type: "order.created".into(),
            time: Some(time.into()),
            datacontenttype: Some("application/json".into()),
            extensions: [("partitionkey".to_string(), key.to_string())].into(),
            data: Some(data.to_string().into_bytes()),
            ..Event::default()
        }
    }

    fn def(reduce: Json) -> Compiled {
        serde_json::from_value::<Definition>(json!({"topic": "orders", "reduce": reduce}))
            .unwrap()
            .compile()
            .unwrap()
    }

    fn fold(c: &Compiled, events: &[Event]) -> BTreeMap<String, Row> {
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            match c.apply(e, 0, i as u64, |k| rows.get(k).cloned()).unwrap() {
                Outcome::Row { key, row } => {
                    rows.insert(key, row);
                }
                Outcome::Skipped => {}
            }
        }
        rows
    }

    #[test]
    fn aggregates_count_sum_extremes_average_last_and_distinct() {
        let c = def(json!({"aggregate": {
            "orders": "count()", "revenue": "sum(data.amount)", "largest": "max(data.amount)",
            "smallest": "min(data.amount)", "avg_amount": "avg(data.amount)",
            "status": "last(data.status)", "customers": "count_distinct(data.customer)"}}));
        let t = "2026-01-01T00:00:00Z";
        let rows = fold(
            &c,
            &[
                event(
                    "a",
                    t,
                    json!({"amount": 10, "status": "new", "customer": "x"}),
                ),
                event(
                    "a",
                    t,
                    json!({"amount": 2.5, "status": "paid", "customer": "y"}),
                ),
                event(
                    "a",
                    t,
                    json!({"amount": 30, "status": "sent", "customer": "x"}),
                ),
                event(
                    "b",
                    t,
                    json!({"amount": 1, "status": "new", "customer": "z"}),
                ),
            ],
        );
        assert_eq!(
            rows["a"].value,
            json!({"orders": 3, "revenue": 42.5, "largest": 30, "smallest": 2.5,
                "avg_amount": 42.5 / 3.0, "status": "sent", "customers": 2})
        );
        assert_eq!(rows["a"].offset, 2);
        assert_eq!(rows["b"].value["orders"], 1);
    }

    #[test]
    fn binary_record_keys_name_no_row_by_default() {
        // Two records whose keys differ only in bytes that are not UTF-8 read alike.
        let (k1, k2) = (&[b'a', 0xff][..], &[b'a', 0xfe][..]);
        let origin = ("orders", 0);
        let record = |key: &[u8]| {
            crate::event::Event::from_record_ref(
                &spate_log::batch::RecordRef {
                    offset: 0,
                    timestamp_ms: 0,
                    key: Some(key),
                    value: Some(b"{}"),
                    headers: &[],
                },
                origin,
            )
        };
        let (e1, e2) = (record(k1), record(k2));
        assert_eq!(e1.partition_key(), e2.partition_key());
        let c = def(json!({"aggregate": {"n": "count()"}}));
        let err = c.apply(&e1, 0, 0, |_| None).unwrap_err();
        assert!(err.contains("U+FFFD"), "{err}");
        let by_key = serde_json::from_value::<Definition>(json!({
            "topic": "orders", "key": "key", "reduce": {"aggregate": {"n": "count()"}}}))
        .unwrap()
        .compile()
        .unwrap();
        assert!(by_key.apply(&e2, 0, 0, |_| None).is_err());
        // A key expression still places them; a UTF-8 key keeps its row.
        let by_type = serde_json::from_value::<Definition>(json!({
            "topic": "orders", "key": "type", "reduce": {"aggregate": {"n": "count()"}}}))
        .unwrap()
        .compile()
        .unwrap();
        assert_eq!(fold(&by_type, &[e1, e2])["spate.record"].value["n"], 2);
        assert_eq!(fold(&c, &[record(b"a")])["a"].value["n"], 1);
    }

    #[test]
    fn windows_split_rows_by_event_time() {
        let c = def(json!({"aggregate": {"n": "count()"}, "window": "1m"}));
        let rows = fold(
            &c,
            &[
                event("a", "2026-01-01T00:00:10Z", json!({})),
                event("a", "2026-01-01T00:00:59.999Z", json!({})),
                event("a", "2026-01-01T00:01:00Z", json!({})),
            ],
        );
        let keys: Vec<&String> = rows.keys().collect();
        assert_eq!(keys, ["a@2026-01-01T00:00:00Z", "a@2026-01-01T00:01:00Z"]);
        assert_eq!(rows["a@2026-01-01T00:00:00Z"].value["n"], 2);
    }

    #[test]
    fn merge_applies_json_merge_patches() {
        let c = def(json!({"merge": true}));
        let t = "2026-01-01T00:00:00Z";
        let rows = fold(
            &c,
            &[
                event(
                    "o",
                    t,
                    json!({"status": "new", "items": {"a": 1, "b": 2}, "note": "x"}),
                ),
                event(
                    "o",
                    t,
                    json!({"status": "paid", "items": {"b": null, "c": 3}, "note": null}),
                ),
            ],
        );
        assert_eq!(
            rows["o"].value,
            json!({"status": "paid", "items": {"a": 1, "c": 3}})
        );
    }

    #[test]
    fn folds_start_from_init_and_apply_each_event() {
        let c = def(json!({"init": "{'count': 0, 'total': 0}",
            "apply": "{'count': state.count + 1, 'total': state.total + event.data.amount}"}));
        let t = "2026-01-01T00:00:00Z";
        let rows = fold(
            &c,
            &[
                event("o", t, json!({"amount": 5})),
                event("o", t, json!({"amount": 7})),
            ],
        );
        assert_eq!(rows["o"].value, json!({"count": 2, "total": 12}));
    }

    #[test]
    fn field_paths_read_directly_agree_with_cel() {
        let direct =
            def(json!({"aggregate": {"s": "sum(data.order.amount)", "l": "last(data.order)"}}));
        let cel = def(
            json!({"aggregate": {"s": "sum(data['order']['amount'])", "l": "last(data['order'])"}}),
        );
        let t = "2026-01-01T00:00:00Z";
        let events = [
            event("a", t, json!({"order": {"amount": 2.5, "tags": ["x"]}})),
            event("a", t, json!({"order": {"amount": 4}})),
        ];
        assert_eq!(
            fold(&direct, &events)["a"].value,
            fold(&cel, &events)["a"].value
        );
        let missing = event("a", t, json!({"other": 1}));
        assert!(direct.apply(&missing, 0, 0, |_| None).is_err());
        assert!(cel.apply(&missing, 0, 0, |_| None).is_err());
        assert_eq!(
            data_path("data.a_1.b"),
            Some(vec!["a_1".into(), "b".into()])
        );
        assert_eq!(data_path("data.a + 1"), None);
        assert_eq!(data_path("data"), None);
        assert_eq!(data_path("event.data.a"), None);
    }

    #[test]
    fn failures_name_the_reason() {
        let c = def(json!({"aggregate": {"revenue": "sum(data.amount)"}}));
        let e = event("a", "2026-01-01T00:00:00Z", json!({"other": 1}));
        let err = c.apply(&e, 0, 0, |_| None).unwrap_err();
        assert!(err.contains("revenue"), "{err}");
        let e = event("a", "2026-01-01T00:00:00Z", json!({"amount": "ten"}));
        assert!(
            c.apply(&e, 0, 0, |_| None)
                .unwrap_err()
                .contains("not a number")
        );
        for (reduce, needle) in [
            (json!({}), "exactly one"),
            (
                json!({"merge": true, "aggregate": {"n": "count()"}}),
                "exactly one",
            ),
            (
                json!({"aggregate": {"n": "median(data.x)"}}),
                "unknown function",
            ),
            (json!({"aggregate": {"n": "sum()"}}), "needs an argument"),
            (json!({"aggregate": {"n": "count(data.x)"}}), "no argument"),
            (json!({"aggregate": {"bad name": "count()"}}), "names are"),
            (
                json!({"aggregate": {"n": "count()"}, "window": "soon"}),
                "window",
            ),
            (json!({"merge": false}), "merge must be true"),
            (json!({"init": "{}"}), "both init and apply"),
            (json!({"init": "{", "apply": "state"}), "init"),
        ] {
            let e = serde_json::from_value::<Definition>(json!({"topic": "t", "reduce": reduce}))
                .unwrap()
                .compile()
                .unwrap_err();
            assert!(e.contains(needle), "{reduce}: {e}");
        }
    }
}

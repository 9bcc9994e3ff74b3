//! Event filters: a CEL expression over the CloudEvent and a pattern over its type.
//!
//! The expression sees the event's attributes as variables (`id`, `source`, `type`, `subject`,
//! `time`, `datacontenttype`, `dataschema`, extensions by name, `key` for the record key), its
//! `data` parsed as JSON (or a string when it is not JSON), and the whole event as `event` (so
//! `event.data.amount` works too).
//! A type pattern is dot-separated: `*` matches one segment, `>` (last only) one or more.
//!
//! Expressions are compiled once; an event's variables are built once ([`FilterInput`]) and shared
//! by every filter that looks at it. An expression that fails on an event (a missing field, a type
//! mismatch) counts as no match and is counted in `spate_filter_errors_total`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::objects::{Key, Map};
use cel::{Context, Env, Value};
use serde_json::Value as Json;
use thiserror::Error;

use crate::Event;

mod cost;

pub use cost::{ADDITIONS_MAX, LITERAL_RANGES_PRODUCT_MAX, PASSES_MAX, WORK_MAX};

thread_local! {
    static STORED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, which compiles definitions stored by an earlier run of the server (subscriptions,
/// projections, detectors): they were checked when they were defined, and rules added since (see
/// [`cost`]) must neither keep the server from starting nor change what they select.
pub fn stored<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            STORED.set(self.0);
        }
    }
    let _reset = Reset(STORED.replace(true));
    f()
}

/// The longest expression accepted, in bytes.
pub const EXPRESSION_BYTES_MAX: usize = 4096;
/// The deepest nesting of an expression accepted.
pub const EXPRESSION_DEPTH_MAX: u16 = 32;
/// The longest type pattern accepted, in bytes.
pub const PATTERN_BYTES_MAX: usize = 256;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FilterError {
    #[error("filter: {0}")]
    Expression(String),
    #[error("types: {0}")]
    Pattern(String),
}

fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib()))
}

/// A compiled CEL expression.
#[derive(Debug)]
pub struct Expression {
    source: String,
    expr: cel::IdedExpr,
    /// Work per element of the event's collections (see [`cost::work_per_element`]).
    work: u64,
}

impl Expression {
    /// Compiles `source`, within the size and depth limits, refusing expressions whose evaluation
    /// could take time growing with a product of sizes (see [`cost`]).
    pub fn compile(source: &str) -> Result<Expression, FilterError> {
        if source.trim().is_empty() {
            return Err(FilterError::Expression("the expression is empty".into()));
        }
        if source.len() > EXPRESSION_BYTES_MAX {
            return Err(FilterError::Expression(format!(
                "the expression takes {} bytes, over the limit of {EXPRESSION_BYTES_MAX}",
                source.len()
            )));
        }
        let expr = env()
            .parser()
            .max_recursion_depth(EXPRESSION_DEPTH_MAX)
            .parse(source)
            .map_err(|e| FilterError::Expression(one_line(&e.to_string())))?;
        if !STORED.get() {
            cost::check(&expr).map_err(FilterError::Expression)?;
        }
        Ok(Expression {
            source: source.to_string(),
            work: cost::work_per_element(&expr),
            expr,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression with the event's variables.
    pub fn evaluate(&self, input: &FilterInput) -> Result<Value, String> {
        self.evaluate_with(input, &[])
    }

    /// Evaluates the expression with the event's variables and `extra` ones (which win).
    pub fn evaluate_with(
        &self,
        input: &FilterInput,
        extra: &[(&str, Value)],
    ) -> Result<Value, String> {
        if self.work > 0 {
            let elements = extra
                .iter()
                .map(|(_, v)| elements_of(v))
                .fold(input.elements(), u64::saturating_add);
            let work = self.work.saturating_mul(elements);
            if work > WORK_MAX {
                return Err(format!(
                    "not evaluated: on this event's {elements} collection elements the \
                     expression's macros would take {work} units of work, over the limit of \
                     {WORK_MAX}"
                ));
            }
        }
        let mut ctx = Context::with_env(env().clone());
        for (name, value) in &input.vars {
            ctx.add_variable_from_value(name.as_str(), value.clone());
        }
        for (name, value) in extra {
            ctx.add_variable_from_value(*name, value.clone());
        }
        Value::resolve(&self.expr, &ctx).map_err(|e| e.to_string())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A type pattern: dot-separated segments, `*` for any one segment, a final `>` for one or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypePattern {
    segments: Vec<String>,
    tail: bool,
}

impl TypePattern {
    pub fn parse(pattern: &str) -> Result<TypePattern, FilterError> {
        if pattern.is_empty() || pattern.len() > PATTERN_BYTES_MAX {
            return Err(FilterError::Pattern(format!(
                "a type pattern takes 1 to {PATTERN_BYTES_MAX} bytes"
            )));
        }
        let mut segments: Vec<String> = pattern.split('.').map(str::to_string).collect();
        let tail = segments.last().is_some_and(|s| s == ">");
        if tail {
            segments.pop();
        }
        for s in &segments {
            if s.is_empty() {
                return Err(FilterError::Pattern(format!(
                    "{pattern:?} has an empty segment"
                )));
            }
            if s == ">" {
                return Err(FilterError::Pattern(format!(
                    "{pattern:?}: `>` may only be the last segment"
                )));
            }
            if s != "*" && (s.contains('*') || s.contains('>')) {
                return Err(FilterError::Pattern(format!(
                    "{pattern:?}: `*` and `>` stand for whole segments"
                )));
            }
        }
        Ok(TypePattern { segments, tail })
    }

    pub fn matches(&self, event_type: &str) -> bool {
        let parts: Vec<&str> = event_type.split('.').collect();
        let fixed = self.segments.len();
        let count_ok = if self.tail {
            parts.len() > fixed
        } else {
            parts.len() == fixed
        };
        count_ok
            && self
                .segments
                .iter()
                .zip(&parts)
                .all(|(s, p)| s == "*" || s == p)
    }
}

/// An event's variables for CEL, built once and shared by every filter that looks at the event.
#[derive(Debug, Clone)]
pub struct FilterInput {
    vars: Vec<(String, Value)>,
    /// Elements of the lists and maps in the event's data: what its macros can iterate over.
    /// Counted when an expression with macros first needs them.
    elements: std::sync::OnceLock<u64>,
}

impl FilterInput {
    pub fn new(event: &Event) -> FilterInput {
        let mut attrs: Vec<(String, Value)> = Vec::with_capacity(8 + event.extensions.len());
        attrs.push(("specversion".into(), Value::from("1.0")));
        attrs.push(("type".into(), Value::from(event.event_type.as_str())));
        let optional = [
            ("id", &event.id),
            ("source", &event.source),
            ("subject", &event.subject),
            ("time", &event.time),
            ("datacontenttype", &event.datacontenttype),
            ("dataschema", &event.dataschema),
        ];
        for (name, v) in optional {
            if let Some(v) = v {
                attrs.push((name.into(), Value::from(v.as_str())));
            }
        }
        // `key`: the record key (the `partitionkey` extension); an extension named `key` wins.
        if let Some(k) = event.partition_key() {
            attrs.push(("key".into(), Value::from(k)));
        }
        for (k, v) in &event.extensions {
            attrs.push((k.clone(), Value::from(v.as_str())));
        }
        if let Some(data) = &event.data {
            let json = event
                .datacontenttype
                .as_deref()
                .is_none_or(crate::event::is_json_media_type);
            let value = match serde_json::from_slice::<Json>(data) {
                Ok(j) if json => from_json(&j),
                _ => match std::str::from_utf8(data) {
                    Ok(s) => Value::from(s),
                    Err(_) => Value::from(data.clone()),
                },
            };
            attrs.push(("data".into(), value));
        }
        let map: HashMap<Key, Value> = attrs
            .iter()
            .map(|(k, v)| (Key::from(k.as_str()), v.clone()))
            .collect();
        attrs.push(("event".into(), Value::Map(Map { map: Arc::new(map) })));
        FilterInput {
            vars: attrs,
            elements: std::sync::OnceLock::new(),
        }
    }

    /// Elements of the lists and maps in the event's data.
    fn elements(&self) -> u64 {
        *self.elements.get_or_init(|| {
            self.vars
                .iter()
                .find(|(name, _)| name == "data")
                .map_or(0, |(_, v)| elements_of(v))
        })
    }
}

/// A CEL value as JSON; functions, opaque values and non-finite numbers have no JSON form.
pub fn to_json(v: &Value) -> Result<Json, String> {
    Ok(match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::UInt(u) => Json::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("{f} has no JSON form"))?,
        Value::String(s) => Json::String(s.to_string()),
        Value::Bytes(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Value::List(l) => Json::Array(l.iter().map(to_json).collect::<Result<_, _>>()?),
        Value::Map(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m.map.iter() {
                let k = match k {
                    Key::String(s) => s.to_string(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                out.insert(k, to_json(v)?);
            }
            Json::Object(out)
        }
        other => return Err(format!("a {:?} value has no JSON form", other.type_of())),
    })
}

/// A JSON value as a CEL value: integers stay integers, other numbers are doubles.
pub fn from_json(j: &Json) -> Value {
    match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::List(Arc::new(a.iter().map(from_json).collect())),
        Json::Object(o) => Value::Map(Map {
            map: Arc::new(
                o.iter()
                    .map(|(k, v)| (Key::from(k.as_str()), from_json(v)))
                    .collect(),
            ),
        }),
    }
}

/// Elements of the lists and maps in `v`, nested ones included.
fn elements_of(v: &Value) -> u64 {
    match v {
        Value::List(l) => l
            .iter()
            .map(elements_of)
            .fold(l.len() as u64, u64::saturating_add),
        Value::Map(m) => m
            .map
            .values()
            .map(elements_of)
            .fold(m.map.len() as u64, u64::saturating_add),
        _ => 0,
    }
}

/// Whether an event passes a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Match,
    NoMatch,
    /// The expression failed on this event (counted; treated as no match).
    Error,
}

/// A subscription's filter: an optional type pattern and an optional CEL expression, both of which
/// must pass.
#[derive(Debug, Default)]
pub struct Filter {
    types: Option<TypePattern>,
    expression: Option<Expression>,
}

impl Filter {
    pub fn new(expression: Option<&str>, types: Option<&str>) -> Result<Filter, FilterError> {
        Ok(Filter {
            types: types.map(TypePattern::parse).transpose()?,
            expression: expression.map(Expression::compile).transpose()?,
        })
    }

    /// Whether the filter passes everything (no need to build variables).
    pub fn is_empty(&self) -> bool {
        self.types.is_none() && self.expression.is_none()
    }

    /// Judges `event`; `input` builds (or returns the shared) CEL variables only when needed.
    pub fn judge<'a>(&self, event: &Event, input: impl FnOnce() -> &'a FilterInput) -> Verdict {
        if let Some(t) = &self.types
            && !t.matches(&event.event_type)
        {
            return Verdict::NoMatch;
        }
        let Some(expr) = &self.expression else {
            return Verdict::Match;
        };
        match expr.evaluate(input()) {
            Ok(Value::Bool(true)) => Verdict::Match,
            Ok(Value::Bool(false)) => Verdict::NoMatch,
            Ok(_) | Err(_) => {
                metrics::counter!("spate_filter_errors_total").increment(1);
                Verdict::Error
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t: &str, data: &str) -> Event {
        Event {
            id: Some("e1".into()),
            source: Some("/shop".into()),
            event_type: t.into(),
            datacontenttype: Some("application/json".into()),
            data: Some(data.as_bytes().to_vec()),
            ..Event::default()
        }
    }

    fn judge(f: &Filter, e: &Event) -> Verdict {
        let input = FilterInput::new(e);
        f.judge(e, || &input)
    }

    #[test]
    fn expressions_see_attributes_and_json_data() {
        let f = Filter::new(
            Some(r#"type == "payment.created" && data.amount > 1000"#),
            None,
        )
        .unwrap();
        assert_eq!(
            judge(&f, &event("payment.created", r#"{"amount": 1500}"#)),
            Verdict::Match
        );
        assert_eq!(
            judge(&f, &event("payment.created", r#"{"amount": 1000.5}"#)),
            Verdict::Match
        );
        assert_eq!(
            judge(&f, &event("payment.created", r#"{"amount": 10}"#)),
            Verdict::NoMatch
        );
        assert_eq!(
            judge(&f, &event("payment.failed", r#"{"amount": 1500}"#)),
            Verdict::NoMatch
        );
        let f = Filter::new(
            Some(r#"event.source == "/shop" && event.data.items.size() == 2"#),
            None,
        )
        .unwrap();
        assert_eq!(
            judge(&f, &event("x", r#"{"items": [1, 2]}"#)),
            Verdict::Match
        );
    }

    #[test]
    fn a_missing_field_is_an_error_not_a_match() {
        let f = Filter::new(Some("data.amount > 1000"), None).unwrap();
        assert_eq!(
            judge(&f, &event("payment.created", r#"{"other": 1}"#)),
            Verdict::Error
        );
        // A non-boolean result does not match either.
        let f = Filter::new(Some("1 + 1"), None).unwrap();
        assert_eq!(judge(&f, &event("x", "{}")), Verdict::Error);
        // `has` guards a missing field.
        let f = Filter::new(Some("has(data.amount) && data.amount > 1"), None).unwrap();
        assert_eq!(judge(&f, &event("x", r#"{"other": 1}"#)), Verdict::NoMatch);
    }

    #[test]
    fn invalid_expressions_are_rejected_with_the_reason() {
        for bad in ["type ==", "data.amount >", "(((", ""] {
            let e = Filter::new(Some(bad), None).unwrap_err();
            assert!(matches!(e, FilterError::Expression(_)), "{bad}: {e}");
        }
        let long = format!("type == \"{}\"", "a".repeat(EXPRESSION_BYTES_MAX));
        assert!(
            Filter::new(Some(&long), None)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert!(Filter::new(Some(&deep), None).is_err());
    }

    #[test]
    fn an_evaluation_over_the_work_limit_is_not_run_and_fails() {
        // 200 comparisons per element: about 800 units of work each.
        let body: Vec<String> = (1..=200).map(|i| format!("x != {i}")).collect();
        let source = format!("data.l.all(x, {})", body.join(" && "));
        let f = Filter::new(Some(&source), None).unwrap();
        let list = |n: usize| format!("{{\"l\":[{}]}}", vec!["0"; n].join(","));
        let small = event("t", &list(100));
        assert_eq!(judge(&f, &small), Verdict::Match);
        // Over 10,000,000 units: refused before it runs, and counted as a failure.
        let big = event("t", &list(20_000));
        assert_eq!(judge(&f, &big), Verdict::Error);
        let e = f
            .expression
            .as_ref()
            .unwrap()
            .evaluate(&FilterInput::new(&big))
            .unwrap_err();
        assert!(e.contains("not evaluated") && e.contains("20001"), "{e}");
        // A filter without macros has no such limit.
        let plain = Filter::new(Some("size(data.l) > 0"), None).unwrap();
        assert_eq!(judge(&plain, &big), Verdict::Match);
    }

    #[test]
    fn stored_definitions_skip_the_cost_rules_new_ones_keep() {
        let costly = "data.l.all(x, x in data.l)";
        assert!(Expression::compile(costly).is_err());
        assert!(stored(|| Expression::compile(costly)).is_ok());
        assert!(stored(|| Expression::compile("data.l >")).is_err());
        assert!(Expression::compile(costly).is_err());
    }

    #[test]
    fn type_patterns_match_segments() {
        let p = TypePattern::parse("order.*").unwrap();
        assert!(p.matches("order.created"));
        assert!(!p.matches("order"));
        assert!(!p.matches("order.created.v2"));
        assert!(!p.matches("orders.created"));
        let p = TypePattern::parse("order.>").unwrap();
        assert!(p.matches("order.created"));
        assert!(p.matches("order.created.v2"));
        assert!(!p.matches("order"));
        let p = TypePattern::parse("*.created").unwrap();
        assert!(p.matches("order.created"));
        assert!(!p.matches("order.deleted"));
        let p = TypePattern::parse("order.created").unwrap();
        assert!(p.matches("order.created"));
        assert!(!p.matches("order.created.x"));
        for bad in ["", "order..x", "order.>.x", "ord*", "a.b>"] {
            assert!(TypePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn non_json_data_is_a_string() {
        let mut e = event("x", "hello");
        e.datacontenttype = Some("text/plain".into());
        let f = Filter::new(Some(r#"data == "hello""#), None).unwrap();
        assert_eq!(judge(&f, &e), Verdict::Match);
    }
}

//! Refuses expressions whose evaluation could take time growing with a product of sizes.
//!
//! Outside the macros (`all`, `exists`, `exists_one`, `map`, `filter`) every operation of an
//! expression runs once, so evaluating it takes time linear in the event and the expression.
//! Inside a macro the body runs once per element, and stays linear in total only when its costly
//! operations work on the element rather than on values from outside the loop: `x in data.list`
//! or `data.text.contains(x)` inside `data.list.all(x, ...)` take the list's size squared, a macro
//! over `data.list` inside another one the same, and three nested macros over literal lists of a
//! few hundred elements each (within the 4 KiB limit) run for about a minute per event. So inside
//! a macro's body:
//!
//! - operations that take constant time (`&&`, `||`, `!`, `?:`, `-`, `*`, `/`, `%`, indexing,
//!   `size`) take anything;
//! - a comparison (`==`, `!=`, `<`, `<=`, `>`, `>=`) needs one operand computed from the loop's
//!   variables and literals only: comparing stops within the shorter operand, so the work is
//!   bounded by the element;
//! - any other operation (`in`, `+`, `contains`, `startsWith`, `endsWith`, `matches`, conversions,
//!   functions not listed here) takes only operands computed from the loop's variables and
//!   literals;
//! - a nested macro ranges over a part of the element (`item.tags`) or over a short list written
//!   in the expression (`[x.a, x.b]`, from the loop's variables and literals), with at most
//!   [`LITERAL_RANGES_PRODUCT_MAX`] as the product of the lengths of the literal lists ranged
//!   over down the nesting, the outermost macro's included.
//!
//! Outside macros too, `+` copies both operands (strings and lists concatenate), so a chain of n
//! of them over a large string copies it about n²/2 times: an expression holds at most
//! [`ADDITIONS_MAX`] of them (`map`, `filter` and `exists_one` use one each).
//!
//! And the macros may make at most [`PASSES_MAX`] passes over the event's collections in all.
//!
//! These rules bound an evaluation by the event's size times the expression's: one macro whose
//! body holds 390 comparisons took 13 s over a list of 500,000 numbers (a 1 MB event). So each
//! expression also gets a bound of its work per element of the event's collections
//! ([`work_per_element`]), and an evaluation whose bound times the event's elements passes
//! [`WORK_MAX`] is not run: it counts as the expression failing on that event. At the limit,
//! evaluations took 0.18–0.36 s here (a short body over 900,000 elements, 200 comparisons over
//! 12,000).

use cel::IdedExpr;
use cel::common::ast::{ComprehensionExpr, EntryExpr, Expr};

/// The largest product of the lengths of the literal lists that nested macros range over.
pub const LITERAL_RANGES_PRODUCT_MAX: usize = 1024;

/// The most `+` operations an expression may hold.
pub const ADDITIONS_MAX: usize = 32;

/// The most passes an expression's macros may make over collections of the event (a macro over a
/// list written in the expression makes none; one nested in it counts once per element of that
/// list). One pass over a 1 MB event of 500,000 numbers took 0.14 s here.
pub const PASSES_MAX: u64 = 8;

/// Operations whose time does not grow with their operands.
const CONSTANT_TIME: &[&str] = &[
    "_&&_",
    "_||_",
    "!_",
    "-_",
    "_?_:_",
    "_[_]",
    "_-_",
    "_*_",
    "_/_",
    "_%_",
    "size",
    "@not_strictly_false",
];

/// Comparisons: they stop within the shorter operand.
const COMPARISONS: &[&str] = &["_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_"];

/// The macro whose body is being checked.
struct Loop<'a> {
    /// Its iteration variables and accumulator.
    vars: Vec<&'a str>,
    /// Product of the lengths of the literal lists ranged over, down to this macro.
    literal_product: usize,
}

/// Checks `expr` against the rules above; the error says which rule an expression breaks.
pub(super) fn check(expr: &IdedExpr) -> Result<(), String> {
    let additions = count_calls(expr, "_+_");
    if additions > ADDITIONS_MAX {
        return Err(format!(
            "the expression holds {additions} `+` operations, over the limit of {ADDITIONS_MAX} \
             (each copies its operands: a chain of them over a long string or list copies it \
             over and over)"
        ));
    }
    walk(expr, None)?;
    let passes = over_passes(expr, 1, &|_| 1);
    if passes > PASSES_MAX {
        return Err(format!(
            "the expression's all/exists/exists_one/map/filter make {passes} passes over the \
             event's collections, over the limit of {PASSES_MAX} (each takes time in proportion \
             to the event's size)"
        ));
    }
    Ok(())
}

/// The most work an evaluation may take, in units of [`work_per_element`] times the elements of
/// the event's collections: about 0.2–0.3 s on the benchmark machine. An evaluation that would
/// take more is not run and counts as the filter failing on that event.
pub const WORK_MAX: u64 = 10_000_000;

/// The work the macros of `expr` do per element of the event's collections, as an upper bound:
/// each pass over a collection (see [`over_passes`]) runs its body once per element, and a body costs
/// its nodes plus a few for the step itself. Times the event's elements, a bound on the work of
/// one evaluation whatever the event holds.
pub(super) fn work_per_element(expr: &IdedExpr) -> u64 {
    fn nodes(e: &IdedExpr) -> u64 {
        children(e)
            .into_iter()
            .map(nodes)
            .fold(1, u64::saturating_add)
    }
    over_passes(expr, 1, &|c| 4 + nodes(&c.loop_cond) + nodes(&c.loop_step))
}

/// Sums `per_pass` over the macros of `e` that range over something other than a list written in
/// the expression, each `times` over: a macro over a literal list makes no pass itself, and what
/// it holds runs once per element of the list.
fn over_passes(e: &IdedExpr, times: u64, per_pass: &dyn Fn(&ComprehensionExpr) -> u64) -> u64 {
    match &e.expr {
        Expr::Comprehension(c) => {
            let (own, inner) = match &c.iter_range.expr {
                Expr::List(list) => (0, times.saturating_mul(list.elements.len() as u64)),
                _ => (times.saturating_mul(per_pass(c)), times),
            };
            [&c.iter_range, &c.accu_init, &c.result]
                .into_iter()
                .map(|x| over_passes(x, times, per_pass))
                .chain([&c.loop_cond, &c.loop_step].map(|x| over_passes(x, inner, per_pass)))
                .fold(own, u64::saturating_add)
        }
        _ => children(e)
            .into_iter()
            .map(|c| over_passes(c, times, per_pass))
            .fold(0, u64::saturating_add),
    }
}

/// The expressions directly under `e`.
fn children(e: &IdedExpr) -> Vec<&IdedExpr> {
    fn entry(x: &cel::common::ast::IdedEntryExpr) -> Vec<&IdedExpr> {
        match &x.expr {
            EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
            EntryExpr::StructField(f) => vec![&f.value],
        }
    }
    match &e.expr {
        Expr::Call(c) => c.target.as_deref().into_iter().chain(&c.args).collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(l) => l.elements.iter().collect(),
        Expr::Map(m) => m.entries.iter().flat_map(entry).collect(),
        Expr::Struct(s) => s.entries.iter().flat_map(entry).collect(),
        Expr::Select(s) => vec![&s.operand],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
    }
}

/// How many calls of `name` `e` holds.
fn count_calls(e: &IdedExpr, name: &str) -> usize {
    let own = matches!(&e.expr, Expr::Call(c) if c.func_name == name);
    children(e)
        .into_iter()
        .map(|c| count_calls(c, name))
        .fold(usize::from(own), usize::saturating_add)
}

fn walk<'a>(e: &'a IdedExpr, within: Option<&Loop<'a>>) -> Result<(), String> {
    match &e.expr {
        Expr::Call(c) => {
            let operands = children(e);
            // The operands first: a refusal names the innermost rule broken.
            operands.iter().try_for_each(|o| walk(o, within))?;
            if let Some(l) = within {
                let name = c.func_name.as_str();
                if COMPARISONS.contains(&name) {
                    if !operands.iter().any(|o| local(o, &l.vars)) {
                        return Err(format!(
                            "inside all/exists/exists_one/map/filter, `{}` needs one operand \
                             computed from the loop variable (its time would grow with both \
                             sizes)",
                            display(name)
                        ));
                    }
                } else if !CONSTANT_TIME.contains(&name)
                    && !operands.iter().all(|o| local(o, &l.vars))
                {
                    return Err(format!(
                        "inside all/exists/exists_one/map/filter, `{}` takes only the loop \
                         variable's values and literals (on a value from outside the loop its \
                         time would grow with both sizes)",
                        display(name)
                    ));
                }
            }
            Ok(())
        }
        Expr::Comprehension(c) => {
            walk(&c.iter_range, within)?;
            walk(&c.accu_init, within)?;
            let literal_product = match within {
                // A macro outside any other: over a literal list, that list's length counts in
                // the product of the macros nested in it.
                None => match &c.iter_range.expr {
                    Expr::List(list) => list.elements.len().max(1),
                    _ => 1,
                },
                Some(l) if part_of_element(&c.iter_range, &l.vars) => l.literal_product,
                Some(l) => match &c.iter_range.expr {
                    Expr::List(list) if local(&c.iter_range, &l.vars) => {
                        let product = l.literal_product.saturating_mul(list.elements.len());
                        if product > LITERAL_RANGES_PRODUCT_MAX {
                            return Err(format!(
                                "nested all/exists/exists_one/map/filter over literal lists \
                                 would run their bodies {product} times, over the limit of \
                                 {LITERAL_RANGES_PRODUCT_MAX}"
                            ));
                        }
                        product
                    }
                    _ => {
                        return Err(
                            "all/exists/exists_one/map/filter inside another must range over a \
                             part of the outer loop's element (e.g. \
                             `data.items.exists(i, i.tags.exists(t, t == \"vip\"))`) or a short \
                             list of its values; over anything else its time would grow with \
                             both sizes"
                                .into(),
                        );
                    }
                },
            };
            let mut vars = vec![c.iter_var.as_str(), c.accu_var.as_str()];
            vars.extend(c.iter_var2.as_deref());
            let inner = Loop {
                vars,
                literal_product,
            };
            walk(&c.loop_cond, Some(&inner))?;
            walk(&c.loop_step, Some(&inner))?;
            walk(&c.result, within)
        }
        _ => children(e).into_iter().try_for_each(|x| walk(x, within)),
    }
}

/// Whether `e` is computed from `vars` and literals only (variables bound inside `e` count too).
fn local(e: &IdedExpr, vars: &[&str]) -> bool {
    match &e.expr {
        Expr::Ident(name) => vars.contains(&name.as_str()),
        Expr::Comprehension(c) => {
            let mut inner = vars.to_vec();
            inner.extend([c.iter_var.as_str(), c.accu_var.as_str()]);
            inner.extend(c.iter_var2.as_deref());
            local(&c.iter_range, vars)
                && local(&c.accu_init, vars)
                && local(&c.loop_cond, &inner)
                && local(&c.loop_step, &inner)
                && local(&c.result, &inner)
        }
        _ => children(e).into_iter().all(|x| local(x, vars)),
    }
}

/// Whether `e` is a loop variable or a field or element of one (`x`, `x.tags`, `x.rows[0]`).
fn part_of_element(e: &IdedExpr, vars: &[&str]) -> bool {
    match &e.expr {
        Expr::Ident(name) => vars.contains(&name.as_str()),
        Expr::Select(s) => part_of_element(&s.operand, vars),
        Expr::Call(c) if c.func_name == "_[_]" => {
            c.args.first().is_some_and(|a| part_of_element(a, vars))
        }
        _ => false,
    }
}

/// An operator's name as written (`_+_` is `+`, `@in` is `in`).
fn display(name: &str) -> &str {
    let trimmed = name.trim_matches('_');
    if trimmed == "@in" {
        "in"
    } else if trimmed.is_empty() {
        name
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(source: &str) -> Result<(), String> {
        let expr = cel::Env::stdlib()
            .parser()
            .parse(source)
            .expect("the test expression parses");
        check(&expr)
    }

    #[test]
    fn filters_whose_work_follows_the_event_are_accepted() {
        for ok in [
            "type == \"order.created\" && data.amount > 1000",
            "data.items.exists(i, i.price > 100)",
            "data.items.all(i, i.sku != data.blocked)",
            "data.items.exists(i, data.limits[i.kind] < i.qty)",
            "data.items.exists(i, i.tags.exists(t, t == \"vip\"))",
            "data.rows.all(r, r[0].all(c, c >= 0))",
            "data.items.exists(i, [i.a, i.b].exists(v, v > 0))",
            "data.items.map(i, i.qty * i.price).exists(v, v > 1000)",
            "data.items.exists(i, i.kind in [\"a\", \"b\"])",
            "data.items.exists(i, i.name.startsWith(\"x\") && size(data.items) > 2)",
            "data.items.filter(i, i.qty - data.reserved > 0).size() > 0",
            "size(data.items.filter(i, i.qty > 0)) == size(data.items)",
            "data.items.exists_one(i, i.id == data.target)",
            "data.m.all(k, k.startsWith(\"a\"))",
            "data.items.exists(i, i.price + 1 > 100)",
            "data.tags.exists(t, t in [\"a\", \"b\"])",
            "[data.l, data.m].all(v, v.all(x, x > 0))",
            &vec!["data.n"; ADDITIONS_MAX + 1].join(" + "),
            &["data.l.all(x, x >= 0)"; PASSES_MAX as usize].join(" && "),
        ] {
            assert_eq!(checked(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn filters_whose_work_grows_with_a_product_of_sizes_are_refused() {
        let big = format!("[{}]", vec!["0"; 600].join(","));
        for (bad, reason) in [
            ("data.l.all(x, x in data.l)", "`in` takes only"),
            // Linear, but refused by the conservative rules (documented).
            (
                "[\"a\", \"b\"].exists(t, t in data.tags)",
                "`in` takes only",
            ),
            ("data.l.all(x, data.s.contains(x))", "`contains` takes only"),
            ("data.l.all(x, x + data.s != \"\")", "`+` takes only"),
            ("data.l.all(x, data.m == data.m)", "`==` needs one operand"),
            (
                "data.l.all(x, [x, data.l] == [x, data.l])",
                "`==` needs one operand",
            ),
            (
                "data.l.all(x, data.l.exists(y, y == x))",
                "must range over a part",
            ),
            (
                "data.l.all(x, [data.l, 1].exists(y, size(y) > 0))",
                "must range over a part",
            ),
            (
                "data.items.exists(i, i.tags.exists(t, t in i.other))",
                "`in` takes only",
            ),
            (
                "data.l.map(x, data.l.map(y, 1)).size() > 0",
                "must range over a part",
            ),
            (
                &format!("{big}.all(x, {big}.all(y, {big}.all(z, true)))"),
                "over the limit of 1024",
            ),
            (
                &vec!["data.s"; ADDITIONS_MAX + 2].join(" + "),
                "over the limit of 32",
            ),
            (
                &["data.l.all(x, x >= 0)"; PASSES_MAX as usize + 1].join(" && "),
                "passes",
            ),
            (
                &format!(
                    "[{}].all(v, v.all(x, x >= 0))",
                    ["data.l"; PASSES_MAX as usize + 1].join(",")
                ),
                "passes",
            ),
            (
                &format!(
                    "[{}].all(a, [a, a, a, a].all(b, b.all(x, x > 0)))",
                    vec!["data.l"; 300].join(",")
                ),
                "over the limit of 1024",
            ),
            (
                &format!(
                    "[1,2].all(a, [{}].all(b, [{}].all(c, true)))",
                    vec!["a"; 40].join(","),
                    vec!["b"; 40].join(",")
                ),
                "over the limit of 1024",
            ),
        ] {
            match checked(bad) {
                Err(e) => assert!(e.contains(reason), "{}: {e}", &bad[..bad.len().min(80)]),
                Ok(()) => panic!("{} was accepted", &bad[..bad.len().min(80)]),
            }
        }
    }
}

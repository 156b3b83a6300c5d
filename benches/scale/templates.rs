//! Templates per row: what a template mapping costs, next to the plain `{{name}}`
//! substitution the engine used before Jinja, measured in the same run.
//!
//! Each case renders one field over `ROWS` distinct rows shaped like the model's (names,
//! plan, a NUMERIC, a timestamp), `REPEAT` times; the best pass is reported (the least
//! disturbed by other work on the machine), in nanoseconds per row. The cases:
//! - the baseline: `{{first_name}} {{last_name}}` through the substitution of before
//!   (`Template` with each value's `as_text`, NULL empty), inlined here as it was;
//! - the bench sync's own mapping, the same text, as `Mapper` compiles it now (the
//!   plain-substitution fast path), and forced through the Jinja machine;
//! - filter chains, a condition, `date`, `round` and a JSON template.
//!
//! `BACKFLOW_BENCH_ONLY=templates make bench` runs only this part (seconds, no database).

use std::hint::black_box;
use std::str::FromStr;
use std::time::Instant;

use backflow::model::value::Value;
use backflow::template::{Jinja, Limits, Mode, Template};
use bigdecimal::BigDecimal;

/// Distinct rows rendered per pass.
const ROWS: usize = 20_000;
/// Passes per case; the fastest counts.
const REPEAT: usize = 7;
/// The aim for a templated field with a filter chain, in nanoseconds per row.
pub const AIM_FILTER_CHAIN_NS: f64 = 2_000.0;

/// One measured case.
pub struct Case {
    pub label: &'static str,
    pub template: &'static str,
    pub ns_per_row: f64,
}

/// The figures of the template part.
pub struct Figures {
    /// The substitution of before.
    pub baseline: Case,
    /// The bench sync's mapping now (fast path).
    pub mapping: Case,
    /// The same, through the Jinja machine.
    pub machine: Case,
    /// Filter chains and the rest.
    pub others: Vec<Case>,
}

/// The bench sync's template mapping (`phase::sync_spec`).
const BENCH_MAPPING: &str = "{{first_name}} {{last_name}}";
const COLUMNS: [&str; 5] = ["first_name", "last_name", "plan", "mrr", "signed_up_at"];

fn rows() -> Vec<Vec<Value>> {
    let plans = ["free", "pro", "enterprise"];
    (0..ROWS)
        .map(|i| {
            vec![
                Value::Text(format!("first{i}")),
                Value::Text(format!("LAST {i}")),
                Value::Text(plans[i % 3].to_owned()),
                Value::Decimal(
                    BigDecimal::from_str(&format!("{}.{:02}", i * 7, i % 100)).unwrap_or_default(),
                ),
                Value::Timestamp(
                    chrono::DateTime::from_timestamp(1_700_000_000 + i as i64 * 37, 0).unwrap_or_default(),
                ),
            ]
        })
        .collect()
}

/// Nanoseconds per row of the fastest of `REPEAT` passes of `render` over every row.
fn time(rows: &[Vec<Value>], mut render: impl FnMut(&[Value]) -> usize) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..REPEAT {
        let started = Instant::now();
        let mut bytes = 0;
        for row in rows {
            bytes += render(black_box(row));
        }
        black_box(bytes);
        best = best.min(started.elapsed().as_nanos() as f64 / rows.len() as f64);
    }
    best
}

fn column(name: &str) -> usize {
    COLUMNS.iter().position(|c| *c == name).unwrap_or(0)
}

fn jinja(rows: &[Vec<Value>], label: &'static str, template: &'static str, mode: Mode) -> Case {
    let compiled = Jinja::compile(template, mode, Limits::RECORD).expect("bench template compiles");
    let columns: Vec<usize> = compiled.variables().iter().map(|v| column(v)).collect();
    let ns_per_row = time(rows, |row| {
        let out = compiled
            .render(|i| &row[columns[i]])
            .expect("bench template renders");
        if mode == Mode::Json {
            Value::from_json_text(&out).expect("bench template renders JSON");
        }
        out.len()
    });
    Case {
        label,
        template,
        ns_per_row,
    }
}

/// Runs every case.
pub fn bench() -> Figures {
    let rows = rows();
    // The substitution of before, as the engine ran it: each name's value as text, NULL empty.
    let before = Template::parse(BENCH_MAPPING).expect("bench template parses");
    let baseline = Case {
        label: "before: {{name}} substitution",
        template: BENCH_MAPPING,
        ns_per_row: time(&rows, |row| {
            before
                .render(|name| {
                    Some(match &row[column(name)] {
                        v if v.is_null() => std::borrow::Cow::Borrowed(""),
                        v => v.as_text(),
                    })
                })
                .map_or(0, |s| s.len())
        }),
    };
    let mapping = jinja(
        &rows,
        "now: the same mapping (fast path)",
        BENCH_MAPPING,
        Mode::Text,
    );
    let machine = jinja(
        &rows,
        "now: the same, through the Jinja machine",
        "{{first_name}} {{last_name}}{# off the fast path #}",
        Mode::Text,
    );
    let others = vec![
        jinja(
            &rows,
            "filter chain",
            "{{ first_name | trim | title }} {{ last_name | lower | title }}",
            Mode::Text,
        ),
        jinja(
            &rows,
            "condition",
            r#"{% if plan == "enterprise" %}customer{% else %}lead{% endif %}"#,
            Mode::Text,
        ),
        jinja(
            &rows,
            "date",
            r#"{{ signed_up_at | date("%Y-%m-%d") }}"#,
            Mode::Text,
        ),
        jinja(&rows, "round (exact decimal)", "{{ mrr | round(1) }}", Mode::Text),
        jinja(
            &rows,
            "JSON object, parsed",
            r#"{"name": {{ first_name ~ " " ~ last_name }}, "mrr": {{ mrr }}}"#,
            Mode::Json,
        ),
    ];
    Figures {
        baseline,
        mapping,
        machine,
        others,
    }
}

/// Prints the table and the aims.
pub fn print(figures: &Figures) {
    println!("\n== templates: one field per row, ns per row (best of {REPEAT} passes over {ROWS} rows) ==");
    let base = figures.baseline.ns_per_row;
    let line = |case: &Case| {
        println!(
            "{:<44} {:>8.0} ns {:>6.2}x  {}",
            case.label,
            case.ns_per_row,
            case.ns_per_row / base,
            case.template
        );
    };
    line(&figures.baseline);
    line(&figures.mapping);
    line(&figures.machine);
    for case in &figures.others {
        line(case);
    }
    let chain = figures
        .others
        .iter()
        .find(|c| c.label == "filter chain")
        .map_or(f64::INFINITY, |c| c.ns_per_row);
    println!(
        "aim: plain substitution no slower than before (5% allowed for noise): {:.0} ns vs {:.0} ns: {}",
        figures.mapping.ns_per_row,
        base,
        if figures.mapping.ns_per_row <= base * 1.05 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "aim: a filter chain under {AIM_FILTER_CHAIN_NS:.0} ns per templated field: {chain:.0} ns: {}",
        if chain < AIM_FILTER_CHAIN_NS {
            "met"
        } else {
            "NOT met"
        }
    );
}

use std::str::FromStr;

use bigdecimal::BigDecimal;

use super::*;

fn compile(text: &str) -> Jinja {
    Jinja::compile(text, Mode::Text, Limits::RECORD).unwrap()
}

/// Renders with values bound by name.
fn render_with(template: &Jinja, vars: &[(&str, Value)]) -> Result<String, RenderError> {
    let values: Vec<&Value> = template
        .variables()
        .iter()
        .map(|name| {
            vars.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .unwrap_or(&Value::Null)
        })
        .collect();
    template.render(|i| values[i])
}

fn render(text: &str, vars: &[(&str, Value)]) -> String {
    render_with(&compile(text), vars).unwrap()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn dec(s: &str) -> Value {
    Value::Decimal(BigDecimal::from_str(s).unwrap())
}

#[test]
fn plain_holes_take_the_fast_path_and_jinja_syntax_the_machine() {
    assert!(compile("{{first_name}} {{ last_name }}").is_plain());
    assert!(!compile("{{ first_name | title }}").is_plain());
    assert!(!compile("{% if a %}x{% endif %}").is_plain());
    assert!(!compile("{{ secret.token }}").is_plain());
    assert!(!compile("{{- a }}").is_plain());
    // A legacy name that is a known column keeps meaning that column.
    let legacy = Jinja::compile_with_names("{{first-name}}", Mode::Text, Limits::RECORD, |n| {
        n == "first-name"
    })
    .unwrap();
    assert!(legacy.is_plain());
    assert_eq!(legacy.variables(), ["first-name"]);
    // Otherwise it is Jinja: a subtraction of two variables.
    assert_eq!(compile("{{first-name}}").variables(), ["first", "name"]);
}

#[test]
fn variables_are_the_names_read_from_outside_without_locals_or_globals() {
    let template = compile(
        "{% set x = plan %}{% for i in range(2) %}{{ x }}{{ i }}{{ loop.index }}{% endfor %}{{ ltv }}",
    );
    assert_eq!(template.variables(), ["ltv", "plan"]);
}

#[test]
fn crm_shapes_render_with_filters_conditions_and_defaults() {
    let vars = [
        ("first_name", text("ada")),
        ("last_name", text("LOVELACE")),
        ("plan", text("enterprise")),
        ("ltv", dec("1234.5678")),
        (
            "signed_up_at",
            Value::Timestamp("2024-05-06T07:08:09Z".parse().unwrap()),
        ),
        (
            "born",
            Value::Date(chrono::NaiveDate::from_ymd_opt(1815, 12, 10).unwrap()),
        ),
        ("nickname", Value::Null),
    ];
    assert_eq!(
        render("{{ first_name | title }} {{ last_name | title }}", &vars),
        "Ada Lovelace"
    );
    assert_eq!(
        render(
            r#"{% if plan == "enterprise" %}customer{% else %}lead{% endif %}"#,
            &vars
        ),
        "customer"
    );
    assert_eq!(
        render(r#"{{ signed_up_at | date("%Y-%m-%d") }}"#, &vars),
        "2024-05-06"
    );
    assert_eq!(render(r#"{{ born | date("%d/%m/%Y") }}"#, &vars), "10/12/1815");
    assert_eq!(render("{{ ltv | round(2) }}", &vars), "1234.57");
    assert_eq!(
        render(r#"{{ nickname | default("none given") }}"#, &vars),
        "none given"
    );
    assert_eq!(render(r#"{{ missing | default("x") }}"#, &vars), "x");
    assert_eq!(render("[{{ nickname }}]", &vars), "[]");
}

#[test]
fn round_is_exact_on_decimals_and_on_floats_as_written() {
    let r = |v: Value, n: u32| render(&format!("{{{{ v | round({n}) }}}}"), &[("v", v)]);
    assert_eq!(r(Value::Float(2.675), 2), "2.68");
    assert_eq!(r(Value::Float(1.005), 2), "1.01");
    assert_eq!(r(dec("-2.5"), 0), "-3");
    assert_eq!(r(dec("12345678901234567890.125"), 2), "12345678901234567890.13");
    assert_eq!(r(Value::Int(7), 2), "7");
    assert_eq!(
        render(r#"{{ v | round(1, "floor") }}"#, &[("v", dec("9.99"))]),
        "9.9"
    );
    // Decimals that a float holds exactly are numbers: they compare and compute.
    assert_eq!(
        render("{{ v > 1000 }} {{ v * 2 }}", &[("v", dec("1234.5"))]),
        "true 2469"
    );
}

#[test]
fn date_refuses_what_is_not_a_date_without_quoting_it() {
    let template = compile(r#"{{ v | date("%Y") }}"#);
    let err = render_with(&template, &[("v", text("secret-ish text"))]).unwrap_err();
    assert!(err.to_string().contains("not a date"), "{err}");
    assert!(!err.to_string().contains("secret-ish"), "{err}");
    let err = render_with(&compile(r#"{{ v | date("%H") }}"#), &[("v", text("2024-01-02"))]).unwrap_err();
    assert!(err.to_string().contains("asks for a field"), "{err}");
    assert_eq!(render(r#"{{ v | date("%Y") }}"#, &[("v", Value::Null)]), "");
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let template =
        compile("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}");
    let err = render_with(&template, &[]).unwrap_err();
    assert_eq!(
        err,
        RenderError::OutOfFuel {
            fuel: Limits::RECORD.fuel
        }
    );
}

#[test]
fn a_huge_output_is_refused() {
    let limits = Limits {
        fuel: 10_000_000,
        max_output: 1000,
    };
    let template = Jinja::compile(r#"{{ "x" * 2000 }}"#, Mode::Text, limits).unwrap();
    assert_eq!(
        render_with(&template, &[]).unwrap_err(),
        RenderError::TooLarge { max: 1000 }
    );
    let plain = Jinja::compile("{{a}}{{a}}", Mode::Text, limits).unwrap();
    assert_eq!(
        render_with(&plain, &[("a", text(&"y".repeat(600)))]).unwrap_err(),
        RenderError::TooLarge { max: 1000 }
    );
}

#[test]
fn huge_values_cost_fuel_before_they_are_built() {
    let template = compile(r#"{{ "x" * 100000000 }}"#);
    assert!(matches!(
        render_with(&template, &[]),
        Err(RenderError::OutOfFuel { .. })
    ));
}

#[test]
fn endless_recursion_stops_at_the_recursion_limit() {
    let limits = Limits {
        fuel: u64::MAX / 2,
        max_output: 1 << 20,
    };
    let template = Jinja::compile(
        "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
        Mode::Text,
        limits,
    )
    .unwrap();
    let err = render_with(&template, &[]).unwrap_err();
    assert!(err.to_string().contains("recursion"), "{err}");
    // Nesting in the source is bounded when parsing.
    let nested = "(".repeat(1000) + "1" + &")".repeat(1000);
    assert!(matches!(
        Jinja::compile(&format!("{{{{ {nested} }}}}"), Mode::Text, Limits::RECORD),
        Err(CompileError::Syntax { .. })
    ));
}

#[test]
fn there_is_no_file_access_or_template_loading() {
    for text in [
        r#"{% include "/etc/passwd" %}"#,
        r#"{% import "x" as y %}"#,
        r#"{% extends "base" %}"#,
        "{% macro m() %}{{ m() }}{% endmacro %}",
    ] {
        assert!(
            matches!(
                Jinja::compile(text, Mode::Text, Limits::RECORD),
                Err(CompileError::Syntax { .. })
            ),
            "{text}"
        );
    }
}

#[test]
fn long_sources_unknown_filters_and_syntax_errors_are_compile_errors() {
    let long = "x".repeat(MAX_SOURCE_BYTES + 1);
    assert!(matches!(
        Jinja::compile(&long, Mode::Text, Limits::RECORD),
        Err(CompileError::TooLong { .. })
    ));
    let err = Jinja::compile("{{ a | titel }}", Mode::Text, Limits::RECORD).unwrap_err();
    assert_eq!(err, CompileError::UnknownFilter { name: "titel".into() });
    // A `|` inside a string literal is not a filter.
    Jinja::compile(r#"{{ a ~ "|nope" }}"#, Mode::Text, Limits::RECORD).unwrap();
    let err = Jinja::compile("{% if a %}", Mode::Text, Limits::RECORD).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn json_templates_write_values_as_json_and_refuse_quoted_holes() {
    let template = Jinja::compile(
        r#"{"name": {{ first ~ " " ~ last }}, "ltv": {{ ltv }}, "tags": {{ tags }}, "gone": {{ nothing }}}"#,
        Mode::Json,
        Limits::RECORD,
    )
    .unwrap();
    let out = render_with(
        &template,
        &[
            ("first", text("Ada \"the first\"")),
            ("last", text("Lovelace")),
            ("ltv", dec("12345678901234567890.5")),
            ("tags", Value::Json(serde_json::json!(["b", "a"]))),
        ],
    )
    .unwrap();
    assert_eq!(
        out,
        r#"{"name": "Ada \"the first\" Lovelace", "ltv": 12345678901234567890.5, "tags": ["b","a"], "gone": null}"#
    );
    let err = Jinja::compile(r#"{"name": "{{ name }}"}"#, Mode::Json, Limits::RECORD).unwrap_err();
    assert_eq!(err, CompileError::QuotedValue { line: 1 });
    // Text mode leaves quoting to the author.
    Jinja::compile(r#"{"name": "{{ name }}"}"#, Mode::Text, Limits::RECORD).unwrap();
}

#[test]
fn the_fast_path_and_the_machine_print_every_value_the_same() {
    let plain = compile("<{{v}}>");
    let machine = compile("<{{ v if true }}>");
    assert!(plain.is_plain() && !machine.is_plain());
    for value in values::tests::samples() {
        let vars = [("v", value.clone())];
        assert_eq!(
            render_with(&plain, &vars).unwrap(),
            render_with(&machine, &vars).unwrap(),
            "{value:?}"
        );
    }
    let plain = Jinja::compile("[{{v}}]", Mode::Json, Limits::RECORD).unwrap();
    let machine = Jinja::compile("[{{ v if true }}]", Mode::Json, Limits::RECORD).unwrap();
    for value in values::tests::samples() {
        let vars = [("v", value.clone())];
        assert_eq!(
            render_with(&plain, &vars).unwrap(),
            render_with(&machine, &vars).unwrap(),
            "{value:?}"
        );
    }
}

#[test]
fn render_errors_name_the_failure_not_the_value() {
    let err = render_with(&compile("{{ a + 1 }}"), &[("a", text("hunter2"))]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");
}

//! Canonical values in and out of templates.
//!
//! Into a template ([`to_jinja`]): integers stay integers; an exact decimal becomes an
//! integer when it is whole, a float when the float's shortest form is the same number
//! (`10.50` → `10.5`, compared and computed on like any number), and otherwise an
//! [`ExactDecimal`] that prints and rounds exactly. Dates, times, timestamps and UUIDs become
//! their ISO text (`2024-05-06`, `2024-05-06T07:08:09Z`), JSON becomes maps and lists, NULL
//! becomes `none`.
//!
//! Out of a template: a text template writes each value as [`write_text`] does (NULL empty,
//! numbers in their canonical form, lists and maps as canonical JSON); a JSON template writes
//! each value as canonical JSON ([`write_json`]), so a row value can never break the
//! document around it. The plain-substitution fast path uses the same two functions on the
//! canonical values, so both paths print the same bytes.

use std::fmt::Write as _;
use std::sync::Arc;

use bigdecimal::{BigDecimal, ToPrimitive};
use chrono::SecondsFormat;
use minijinja::value::{Object, ObjectRepr, Value as Jinja, ValueKind};

use crate::model::value::{Value, canonical_decimal, write_json_string};

/// Deepest nesting of lists and maps written as JSON; deeper values are refused.
const MAX_DEPTH: usize = 64;

/// A decimal whose digits no float can hold: printed and rounded exactly.
#[derive(Debug)]
pub struct ExactDecimal(pub BigDecimal);

impl Object for ExactDecimal {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&canonical_decimal(&self.0))
    }
}

/// The template value of a canonical value.
pub fn to_jinja(value: &Value) -> Jinja {
    match value {
        Value::Null => Jinja::from(()),
        Value::Bool(b) => Jinja::from(*b),
        Value::Int(i) => Jinja::from(*i),
        Value::Decimal(d) => decimal(d),
        Value::Float(f) => Jinja::from(*f),
        Value::Text(s) => Jinja::from(s.as_str()),
        Value::Date(d) => Jinja::from(d.format("%Y-%m-%d").to_string()),
        Value::Time(t) => Jinja::from(t.format("%H:%M:%S%.f").to_string()),
        Value::Timestamp(t) => Jinja::from(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        Value::Json(j) => json(j),
        Value::Uuid(u) => Jinja::from(u.hyphenated().to_string()),
        Value::Array(items) => items.iter().map(to_jinja).collect(),
        Value::Object(doc) => Jinja::from_pairs(doc.iter().map(|(k, v)| (k.as_str(), to_jinja(v)))),
    }
}

/// A decimal as a template number: whole → integer, float-exact → float, else exact object.
pub fn decimal(d: &BigDecimal) -> Jinja {
    if d.is_integer()
        && let Some(i) = d.to_i64()
    {
        return Jinja::from(i);
    }
    if let Some(f) = d.to_f64()
        && f.is_finite()
        && ryu::Buffer::new()
            .format_finite(f)
            .parse::<BigDecimal>()
            .ok()
            .as_ref()
            == Some(d)
    {
        return Jinja::from(f);
    }
    Jinja::from_object(ExactDecimal(d.clone()))
}

fn json(j: &serde_json::Value) -> Jinja {
    match j {
        serde_json::Value::Null => Jinja::from(()),
        serde_json::Value::Bool(b) => Jinja::from(*b),
        serde_json::Value::String(s) => Jinja::from(s.as_str()),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Jinja::from(i)
            } else if let Some(u) = n.as_u64() {
                Jinja::from(u)
            } else {
                Jinja::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::Array(items) => items.iter().map(json).collect(),
        serde_json::Value::Object(map) => Jinja::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json(v)))),
    }
}

/// Appends a canonical value as text: NULL empty, text as is, dates and timestamps in ISO
/// form, numbers canonical, lists and maps as canonical JSON.
pub fn write_text(value: &Value, out: &mut String) {
    match value {
        v if v.is_null() => {}
        Value::Text(s) | Value::Json(serde_json::Value::String(s)) => out.push_str(s),
        Value::Date(d) => {
            let _ = write!(out, "{}", d.format("%Y-%m-%d"));
        }
        Value::Time(t) => {
            let _ = write!(out, "{}", t.format("%H:%M:%S%.f"));
        }
        Value::Timestamp(t) => out.push_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        Value::Uuid(u) => {
            let _ = write!(out, "{}", u.hyphenated());
        }
        other => push_canonical(other, out),
    }
}

/// Appends a canonical value as canonical JSON (NULL is `null`).
pub fn write_json(value: &Value, out: &mut String) {
    push_canonical(value, out);
}

fn push_canonical(value: &Value, out: &mut String) {
    let mut bytes = Vec::new();
    value.write_canonical(&mut bytes);
    // Canonical output is built only from valid UTF-8 pieces.
    out.push_str(&String::from_utf8_lossy(&bytes));
}

/// Why a template value cannot be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// Functions, macros and other values that have no text or JSON form.
    Unwritable(ValueKind),
    /// Lists or maps nested deeper than `MAX_DEPTH`.
    TooDeep,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Unwritable(kind) => write!(f, "cannot write a {kind} value"),
            WriteError::TooDeep => write!(
                f,
                "cannot write lists or maps nested deeper than {MAX_DEPTH} levels"
            ),
        }
    }
}

/// Appends a template value as [`write_text`] writes the canonical value it came from.
pub fn write_jinja_text(value: &Jinja, out: &mut String) -> Result<(), WriteError> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => Ok(()),
        ValueKind::String => {
            out.push_str(value.as_str().unwrap_or_default());
            Ok(())
        }
        ValueKind::Bool => {
            out.push_str(if value.is_true() { "true" } else { "false" });
            Ok(())
        }
        ValueKind::Number => {
            write_number(value, out);
            Ok(())
        }
        ValueKind::Plain if value.downcast_object_ref::<ExactDecimal>().is_some() => {
            let _ = write!(out, "{value}");
            Ok(())
        }
        _ => write_jinja_json(value, out),
    }
}

/// Appends a template value as canonical JSON: keys sorted, numbers exact, NULL and
/// undefined as `null`. A safe string (from `tojson`, or raw JSON such as `records`) is
/// written as it is.
pub fn write_jinja_json(value: &Jinja, out: &mut String) -> Result<(), WriteError> {
    write_json_at(value, out, 0)
}

fn write_json_at(value: &Jinja, out: &mut String, depth: usize) -> Result<(), WriteError> {
    if depth > MAX_DEPTH {
        return Err(WriteError::TooDeep);
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(value, out),
        ValueKind::String if value.is_safe() => out.push_str(value.as_str().unwrap_or_default()),
        ValueKind::String => {
            let mut bytes = Vec::new();
            write_json_string(value.as_str().unwrap_or_default(), &mut bytes);
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
        ValueKind::Plain if value.downcast_object_ref::<ExactDecimal>().is_some() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            let items = value
                .try_iter()
                .map_err(|_| WriteError::Unwritable(value.kind()))?;
            for (i, item) in items.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_at(&item, out, depth + 1)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys = value
                .try_iter()
                .map_err(|_| WriteError::Unwritable(value.kind()))?;
            let mut entries: Vec<(String, Jinja)> = keys
                .map(|key| {
                    let item = value.get_item(&key).unwrap_or_default();
                    let name = match key.as_str() {
                        Some(s) => s.to_owned(),
                        None => key.to_string(),
                    };
                    (name, item)
                })
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (name, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let mut bytes = Vec::new();
                Value::write_json_key(name, &mut bytes);
                out.push_str(&String::from_utf8_lossy(&bytes));
                write_json_at(item, out, depth + 1)?;
            }
            out.push('}');
        }
        kind => return Err(WriteError::Unwritable(kind)),
    }
    Ok(())
}

/// Numbers in canonical form: integers as digits, floats as the canonical float.
fn write_number(value: &Jinja, out: &mut String) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
    } else {
        let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
        let mut bytes = Vec::new();
        Value::Float(f).write_canonical(&mut bytes);
        out.push_str(&String::from_utf8_lossy(&bytes));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::str::FromStr;

    use super::*;

    /// One value of every kind, with the awkward cases of each.
    pub(crate) fn samples() -> Vec<Value> {
        let ts = chrono::DateTime::parse_from_rfc3339("2024-05-06T07:08:09.120Z")
            .unwrap()
            .to_utc();
        let mut doc = crate::model::value::Document::new();
        doc.insert("b".into(), Value::Float(0.5));
        doc.insert("a".into(), Value::Text("x\"y".into()));
        vec![
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Int(-42),
            Value::Decimal(BigDecimal::from_str("10.50").unwrap()),
            Value::Decimal(BigDecimal::from_str("100.000").unwrap()),
            Value::Decimal(BigDecimal::from_str("0.0000001").unwrap()),
            Value::Decimal(BigDecimal::from_str("12345678901234567890.123456789").unwrap()),
            Value::Float(2.675),
            Value::Float(10.0),
            Value::Float(1e-7),
            Value::Float(f64::NAN),
            Value::Text("Ada \"Lovelace\"\n".into()),
            Value::Text(String::new()),
            Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 1, 2).unwrap()),
            Value::Time(chrono::NaiveTime::from_hms_milli_opt(7, 8, 9, 5).unwrap()),
            Value::Timestamp(ts),
            Value::Json(serde_json::json!({"z": [1, 2.5, null, "s"], "a": {"n": true}})),
            Value::Json(serde_json::json!("json text")),
            Value::Json(serde_json::Value::Null),
            Value::Uuid(uuid::Uuid::from_u128(0x1234)),
            Value::Array(vec![
                Value::Int(1),
                Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 1, 2).unwrap()),
            ]),
            Value::Object(doc),
        ]
    }

    #[test]
    fn template_values_print_as_their_canonical_values_in_text_and_json() {
        for value in samples() {
            let converted = to_jinja(&value);
            let (mut direct, mut through) = (String::new(), String::new());
            write_text(&value, &mut direct);
            write_jinja_text(&converted, &mut through).unwrap();
            assert_eq!(direct, through, "text of {value:?}");
            let (mut direct, mut through) = (String::new(), String::new());
            write_json(&value, &mut direct);
            write_jinja_json(&converted, &mut through).unwrap();
            assert_eq!(direct, through, "JSON of {value:?}");
        }
    }

    #[test]
    fn decimals_become_numbers_only_when_no_digit_is_lost() {
        assert!(decimal(&BigDecimal::from_str("10.50").unwrap()).is_number());
        assert!(decimal(&BigDecimal::from_str("7").unwrap()).is_integer());
        let long = decimal(&BigDecimal::from_str("12345678901234567890.123456789").unwrap());
        assert!(long.downcast_object_ref::<ExactDecimal>().is_some());
        assert_eq!(long.to_string(), "12345678901234567890.123456789");
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused() {
        let mut value = Jinja::from(1);
        for _ in 0..=MAX_DEPTH + 1 {
            value = Jinja::from_iter([value]);
        }
        assert_eq!(
            write_jinja_json(&value, &mut String::new()),
            Err(WriteError::TooDeep)
        );
    }
}

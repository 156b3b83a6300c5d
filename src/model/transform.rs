//! Transforms: small named steps applied to a mapped value (`lowercase`, `round(2)`,
//! `format("%Y-%m-%d")`, `default(0)`), in the order a mapping lists them.

use bigdecimal::{BigDecimal, RoundingMode};

use super::value::Value;

/// One step applied to a mapped value.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// Text to lower case.
    Lowercase,
    /// Text to upper case.
    Uppercase,
    /// Strip leading and trailing whitespace.
    Trim,
    /// Any value to its text form.
    ToString,
    /// Text holding a number to an exact number.
    ToNumber,
    /// Round a number to N decimal places (half away from zero).
    Round(u32),
    /// Format a date, time or timestamp with a `strftime` pattern.
    Format(String),
    /// Replace NULL with a value.
    Default(Value),
}

impl Transform {
    /// Parses `lowercase`, `round(2)`, `format("%Y-%m-%d")`, `default("free")`, `default(0)`.
    pub fn parse(text: &str) -> Result<Transform, String> {
        let text = text.trim();
        let (name, arg) = match text.split_once('(') {
            Some((name, rest)) => {
                let arg = rest
                    .strip_suffix(')')
                    .ok_or_else(|| format!("transform {text:?} is missing its closing parenthesis"))?;
                (name.trim(), Some(arg.trim()))
            }
            None => (text, None),
        };
        let no_arg = |t: Transform| match arg {
            None => Ok(t),
            Some(_) => Err(format!("transform {name} takes no argument")),
        };
        match name {
            "lowercase" => no_arg(Transform::Lowercase),
            "uppercase" => no_arg(Transform::Uppercase),
            "trim" => no_arg(Transform::Trim),
            "to_string" => no_arg(Transform::ToString),
            "to_number" => no_arg(Transform::ToNumber),
            "round" => {
                let digits = arg
                    .and_then(|a| a.parse::<u32>().ok())
                    .filter(|d| *d <= 30)
                    .ok_or_else(|| {
                        "round needs a number of decimal places from 0 to 30, like round(2)".to_owned()
                    })?;
                Ok(Transform::Round(digits))
            }
            "format" => {
                let pattern = arg
                    .map(unquote)
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| "format needs a pattern, like format(\"%Y-%m-%d\")".to_owned())?;
                check_format_pattern(&pattern)?;
                Ok(Transform::Format(pattern))
            }
            "default" => {
                let arg = arg.ok_or_else(|| {
                    "default needs a value, like default(\"unknown\") or default(0)".to_owned()
                })?;
                Ok(Transform::Default(parse_literal(arg)))
            }
            other => Err(format!(
                "unknown transform {other:?} (known: lowercase, uppercase, trim, to_string, to_number, round(N), format(PATTERN), default(VALUE))"
            )),
        }
    }

    /// Applies the transform to one value.
    pub fn apply(&self, value: Value) -> Result<Value, String> {
        match (self, value) {
            (Transform::Default(fallback), v) if v.is_null() => Ok(fallback.clone()),
            // NULL stays NULL and a JSON null stays a JSON null.
            (_, v) if v.is_null() => Ok(v),
            (Transform::Default(_), v) => Ok(v),
            // ASCII text (nearly all of it) is changed in place, without a new string.
            (Transform::Lowercase, Value::Text(mut s)) if s.is_ascii() => {
                s.make_ascii_lowercase();
                Ok(Value::Text(s))
            }
            (Transform::Uppercase, Value::Text(mut s)) if s.is_ascii() => {
                s.make_ascii_uppercase();
                Ok(Value::Text(s))
            }
            (Transform::Lowercase, Value::Text(s)) => Ok(Value::Text(s.to_lowercase())),
            (Transform::Uppercase, Value::Text(s)) => Ok(Value::Text(s.to_uppercase())),
            (Transform::Trim, Value::Text(s)) => Ok(Value::Text(trim_in_place(s))),
            (Transform::Lowercase | Transform::Uppercase | Transform::Trim, v) => Ok(v),
            (Transform::ToString, v) => Ok(Value::Text(v.to_text())),
            (Transform::ToNumber, v) => to_number(v),
            (Transform::Round(digits), v) => round(v, *digits),
            (Transform::Format(pattern), v) => format_time(v, pattern),
        }
    }
}

fn unquote(arg: &str) -> String {
    match serde_json::from_str::<String>(arg) {
        Ok(s) => s,
        Err(_) => arg.trim_matches('\'').to_owned(),
    }
}

fn parse_literal(arg: &str) -> Value {
    match serde_json::from_str::<serde_json::Value>(arg) {
        Ok(v) => Value::from_json(v),
        Err(_) => Value::Text(arg.trim_matches('\'').to_owned()),
    }
}

fn check_format_pattern(pattern: &str) -> Result<(), String> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(pattern).any(|item| matches!(item, Item::Error)) {
        return Err(format!(
            "format pattern {pattern:?} is not a valid strftime pattern"
        ));
    }
    Ok(())
}

/// `s` without its leading and trailing whitespace (as [`str::trim`]), in its own buffer.
fn trim_in_place(mut s: String) -> String {
    s.truncate(s.trim_end().len());
    let start = s.len() - s.trim_start().len();
    s.drain(..start);
    s
}

fn to_number(v: Value) -> Result<Value, String> {
    match v {
        Value::Int(_) | Value::Decimal(_) | Value::Float(_) => Ok(v),
        Value::Bool(b) => Ok(Value::Int(i64::from(b))),
        Value::Text(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                Ok(Value::Int(i))
            } else {
                let d = t
                    .parse::<BigDecimal>()
                    .map_err(|_| "to_number: the value is not a number".to_owned())?;
                if !crate::model::value::decimal_in_range(&d) {
                    return Err(format!(
                        "to_number: the number's exponent is outside ±{}",
                        crate::model::value::MAX_DECIMAL_EXPONENT
                    ));
                }
                Ok(Value::Decimal(d))
            }
        }
        _ => Err("to_number: the value is not text or a number".to_owned()),
    }
}

fn round(v: Value, digits: u32) -> Result<Value, String> {
    match v {
        Value::Int(_) => Ok(v),
        Value::Decimal(d) => Ok(Value::Decimal(
            d.with_scale_round(i64::from(digits), RoundingMode::HalfUp),
        )),
        Value::Float(f) => {
            // Round through an exact decimal so 2.675 rounds as written, not as stored.
            let d: BigDecimal = ryu::Buffer::new()
                .format(f)
                .parse()
                .map_err(|_| "round: the value is not a finite number".to_owned())?;
            Ok(Value::Decimal(
                d.with_scale_round(i64::from(digits), RoundingMode::HalfUp),
            ))
        }
        _ => Err("round: the value is not a number".to_owned()),
    }
}

fn format_time(v: Value, pattern: &str) -> Result<Value, String> {
    use std::fmt::Write;
    let mut out = String::new();
    let written = match &v {
        Value::Timestamp(t) => write!(out, "{}", t.format(pattern)),
        Value::Date(d) => write!(out, "{}", d.format(pattern)),
        Value::Time(t) => write!(out, "{}", t.format(pattern)),
        _ => return Err("format: the value is not a date, time or timestamp".to_owned()),
    };
    // chrono reports a field the value lacks (an hour of a date) as a formatting error.
    written.map_err(|_| format!("format: pattern {pattern:?} asks for a field this value does not have"))?;
    Ok(Value::Text(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn transforms_parse_with_and_without_arguments() {
        assert_eq!(Transform::parse("lowercase").unwrap(), Transform::Lowercase);
        assert_eq!(Transform::parse(" round(2) ").unwrap(), Transform::Round(2));
        assert_eq!(
            Transform::parse("format(\"%Y-%m-%d\")").unwrap(),
            Transform::Format("%Y-%m-%d".into())
        );
        assert_eq!(
            Transform::parse("default(\"free\")").unwrap(),
            Transform::Default(Value::Text("free".into()))
        );
        assert_eq!(
            Transform::parse("default(0)").unwrap(),
            Transform::Default(Value::Int(0))
        );
        assert!(
            Transform::parse("shout")
                .unwrap_err()
                .contains("unknown transform")
        );
        assert!(Transform::parse("round(x)").is_err());
        assert!(Transform::parse("lowercase(1)").is_err());
        assert!(Transform::parse("format(\"%Q\")").is_err());
    }

    #[test]
    fn text_transforms_change_text_and_keep_nulls() {
        assert_eq!(
            Transform::Lowercase.apply(Value::Text("A@B.COM".into())).unwrap(),
            Value::Text("a@b.com".into())
        );
        assert_eq!(
            Transform::Uppercase.apply(Value::Text("gold".into())).unwrap(),
            Value::Text("GOLD".into())
        );
        assert_eq!(
            Transform::Trim.apply(Value::Text("  x ".into())).unwrap(),
            Value::Text("x".into())
        );
        // Text beyond ASCII: the same as the standard library's conversions.
        for text in [
            "ÉCOLE Straße",
            "İstanbul",
            "ǅ",
            "\u{3000} 東京 \u{2003}\n",
            "",
            "   ",
            "x",
        ] {
            for (transform, expected) in [
                (Transform::Lowercase, text.to_lowercase()),
                (Transform::Uppercase, text.to_uppercase()),
                (Transform::Trim, text.trim().to_owned()),
            ] {
                assert_eq!(
                    transform.apply(Value::Text(text.into())).unwrap(),
                    Value::Text(expected),
                    "{transform:?} of {text:?}"
                );
            }
        }
        assert_eq!(Transform::Trim.apply(Value::Null).unwrap(), Value::Null);
        assert_eq!(
            Transform::ToString.apply(Value::Int(7)).unwrap(),
            Value::Text("7".into())
        );
    }

    #[test]
    fn numbers_convert_and_round_exactly() {
        assert_eq!(
            Transform::ToNumber.apply(Value::Text(" 42 ".into())).unwrap(),
            Value::Int(42)
        );
        assert_eq!(
            Transform::ToNumber.apply(Value::Text("1.50".into())).unwrap(),
            Value::Decimal(BigDecimal::from_str("1.50").unwrap())
        );
        assert!(Transform::ToNumber.apply(Value::Text("abc".into())).is_err());
        assert_eq!(
            Transform::Round(2).apply(Value::Float(2.675)).unwrap(),
            Value::Decimal(BigDecimal::from_str("2.68").unwrap())
        );
        assert_eq!(
            Transform::Round(0)
                .apply(Value::Decimal(BigDecimal::from_str("-2.5").unwrap()))
                .unwrap(),
            Value::Decimal(BigDecimal::from_str("-3").unwrap())
        );
    }

    #[test]
    fn dates_format_and_defaults_fill_nulls() {
        let ts = chrono::DateTime::parse_from_rfc3339("2024-05-06T07:08:09Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            Transform::Format("%d/%m/%Y".into())
                .apply(Value::Timestamp(ts))
                .unwrap(),
            Value::Text("06/05/2024".into())
        );
        let d = chrono::NaiveDate::from_ymd_opt(2024, 1, 2).unwrap();
        assert!(Transform::Format("%H".into()).apply(Value::Date(d)).is_err());
        assert_eq!(
            Transform::Default(Value::Int(0)).apply(Value::Null).unwrap(),
            Value::Int(0)
        );
        assert_eq!(
            Transform::Default(Value::Int(0)).apply(Value::Int(5)).unwrap(),
            Value::Int(5)
        );
    }
}

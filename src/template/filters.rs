//! The filters Backflow adds to (or changes in) minijinja's built-ins, for canonical values.
//!
//! - `date(pattern)`: a date, time or timestamp (or ISO text, or Unix seconds) formatted with
//!   a `strftime` pattern; NULL stays NULL.
//! - `round(digits=0, method="common")`: exact rounding of decimals and floats (half away
//!   from zero, or `ceil` / `floor`), digits as written: `2.675 | round(2)` is `2.68`.
//! - `default(fallback="", boolean=false)`: replaces NULL as well as an undefined value (and,
//!   with `boolean=true`, anything false or empty).
//! - `tojson`: the value as canonical JSON text, written as it is.
//!
//! Errors never quote the value, only what was expected.

use bigdecimal::{BigDecimal, RoundingMode};
use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};
use minijinja::value::{Value as Jinja, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::values::{ExactDecimal, decimal, write_jinja_json};

/// Most decimal places `round` accepts.
const MAX_ROUND_DIGITS: i64 = 30;

/// Registers the filters on `env`.
pub fn register(env: &mut Environment<'_>) {
    env.add_filter("date", date);
    env.add_filter("round", round);
    env.add_filter("default", default);
    env.add_filter("d", default);
    env.add_filter("tojson", tojson);
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// A point in time read from a template value.
enum When {
    Instant(DateTime<chrono::FixedOffset>),
    Local(NaiveDateTime),
    Date(NaiveDate),
    Time(NaiveTime),
}

fn read_when(value: &Jinja) -> Option<When> {
    if let Some(text) = value.as_str() {
        let text = text.trim();
        if let Ok(t) = DateTime::parse_from_rfc3339(text) {
            return Some(When::Instant(t));
        }
        for pattern in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
            if let Ok(t) = NaiveDateTime::parse_from_str(text, pattern) {
                return Some(When::Local(t));
            }
        }
        if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
            return Some(When::Date(d));
        }
        return NaiveTime::parse_from_str(text, "%H:%M:%S%.f")
            .ok()
            .map(When::Time);
    }
    if value.is_integer() {
        let seconds = i64::try_from(value.clone()).ok()?;
        return DateTime::from_timestamp(seconds, 0).map(|t| When::Instant(t.fixed_offset()));
    }
    None
}

/// `date(pattern)`.
fn date(value: Jinja, pattern: &str) -> Result<Jinja, Error> {
    if value.is_none() || value.is_undefined() {
        return Ok(Jinja::from(()));
    }
    if StrftimeItems::new(pattern).any(|item| matches!(item, Item::Error)) {
        return Err(invalid(format!("date: {pattern:?} is not a strftime pattern")));
    }
    let when = read_when(&value).ok_or_else(|| {
        invalid("date: the value is not a date, time or timestamp (ISO text or Unix seconds)")
    })?;
    let mut out = String::new();
    let written = {
        use std::fmt::Write;
        match when {
            When::Instant(t) => write!(out, "{}", t.format(pattern)),
            When::Local(t) => write!(out, "{}", t.format(pattern)),
            When::Date(d) => write!(out, "{}", d.format(pattern)),
            When::Time(t) => write!(out, "{}", t.format(pattern)),
        }
    };
    // chrono reports a field the value lacks (the hour of a date) as a formatting error.
    written.map_err(|_| {
        invalid(format!(
            "date: {pattern:?} asks for a field this value does not have"
        ))
    })?;
    Ok(Jinja::from(out))
}

/// `round(digits=0, method="common")`: exact, through the number's decimal digits.
fn round(value: Jinja, digits: Option<i64>, method: Option<&str>) -> Result<Jinja, Error> {
    if value.is_none() || value.is_undefined() {
        return Ok(Jinja::from(()));
    }
    let digits = digits.unwrap_or(0);
    if !(0..=MAX_ROUND_DIGITS).contains(&digits) {
        return Err(invalid(format!(
            "round: digits must be from 0 to {MAX_ROUND_DIGITS}"
        )));
    }
    let mode = match method.unwrap_or("common") {
        "common" => RoundingMode::HalfUp,
        "ceil" => RoundingMode::Ceiling,
        "floor" => RoundingMode::Floor,
        other => {
            return Err(invalid(format!(
                "round: method {other:?} is not common, ceil or floor"
            )));
        }
    };
    let exact: BigDecimal = if let Some(d) = value.downcast_object_ref::<ExactDecimal>() {
        d.0.clone()
    } else if value.is_integer() {
        return Ok(value);
    } else if value.kind() == ValueKind::Number {
        let f = f64::try_from(value).map_err(|_| invalid("round: the value is not a number"))?;
        if !f.is_finite() {
            return Err(invalid("round: the value is not a finite number"));
        }
        // The shortest text of the float: 2.675 rounds as written, not as stored.
        ryu::Buffer::new()
            .format_finite(f)
            .parse()
            .map_err(|_| invalid("round: the value is not a finite number"))?
    } else {
        return Err(invalid("round: the value is not a number"));
    };
    Ok(decimal(&exact.with_scale_round(digits, mode)))
}

/// `default(fallback="", boolean=false)`: NULL counts as missing.
fn default(value: Jinja, fallback: Option<Jinja>, boolean: Option<bool>) -> Jinja {
    let missing = value.is_undefined() || value.is_none() || (boolean == Some(true) && !value.is_true());
    if missing {
        fallback.unwrap_or_else(|| Jinja::from(""))
    } else {
        value
    }
}

/// `tojson`: canonical JSON, marked safe so it is written as it is.
fn tojson(value: Jinja) -> Result<Jinja, Error> {
    let mut out = String::new();
    write_jinja_json(&value, &mut out).map_err(|e| invalid(format!("tojson: {e}")))?;
    Ok(Jinja::from_safe_string(out))
}

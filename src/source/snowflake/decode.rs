//! Snowflake's `jsonv2` result values to canonical values.
//!
//! Every value arrives as a string (or null) in the form the SQL API documents
//! (<https://docs.snowflake.com/en/developer-guide/sql-api/handling-responses>, "Getting the
//! data from the results"): `FIXED` as its decimal digits, `REAL` as a float, `DATE` as days
//! since the epoch, `TIME` as seconds since midnight, `TIMESTAMP_NTZ`/`LTZ` as seconds since
//! the epoch, `TIMESTAMP_TZ` as seconds since the epoch then the offset in minutes plus 1440,
//! semi-structured values as JSON text and `BINARY` as hex.
//!
//! Each value decodes on its own into a `Result` with a reason, so a bad one names its column
//! (and, through the engine, its row's key).

use std::str::FromStr;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, Utc};
use serde::Deserialize;

use super::super::{Column, SourceError};
use crate::model::value::Value;

/// One entry of `resultSetMetaData.rowType`.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct RowType {
    /// Column name.
    pub(super) name: String,
    /// Snowflake's type (`fixed`, `text`, `timestamp_tz`, …), any case.
    #[serde(rename = "type")]
    pub(super) type_name: String,
    /// Digits after the point, for `FIXED` and the time types.
    #[serde(default)]
    pub(super) scale: Option<i64>,
    /// Total digits, for `FIXED`.
    #[serde(default)]
    pub(super) precision: Option<i64>,
}

/// How the values of a column decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `FIXED` with scale 0: an integer, exact beyond 64 bits.
    Integer,
    /// `FIXED` with a scale: an exact decimal.
    Decimal,
    Real,
    Text,
    Boolean,
    Date,
    Time,
    /// `TIMESTAMP_NTZ` (a wall-clock time, read as UTC) and `TIMESTAMP_LTZ` (an instant).
    Timestamp,
    /// `TIMESTAMP_TZ`: an instant and its offset; the instant is kept.
    TimestampTz,
    /// `VARIANT`, `OBJECT`, `ARRAY`.
    Json,
    /// `BINARY`: hex text, lower case.
    Binary,
}

/// The kind of each column, or the first column whose type Backflow does not read.
pub(super) fn plan(row_type: &[RowType]) -> Result<Vec<(Column, Kind)>, SourceError> {
    row_type
        .iter()
        .map(|t| {
            let upper = t.type_name.to_ascii_uppercase();
            let type_name = match (upper.as_str(), t.precision, t.scale) {
                ("FIXED", Some(p), Some(s)) => format!("NUMBER({p},{s})"),
                _ => upper.clone(),
            };
            let column = Column {
                name: t.name.clone(),
                type_name,
            };
            let kind = match upper.as_str() {
                "FIXED" | "NUMBER" if t.scale.unwrap_or(0) == 0 => Kind::Integer,
                "FIXED" | "NUMBER" => Kind::Decimal,
                "REAL" | "FLOAT" | "DOUBLE" => Kind::Real,
                "TEXT" => Kind::Text,
                "BOOLEAN" => Kind::Boolean,
                "DATE" => Kind::Date,
                "TIME" => Kind::Time,
                "TIMESTAMP_NTZ" | "TIMESTAMP_LTZ" => Kind::Timestamp,
                "TIMESTAMP_TZ" => Kind::TimestampTz,
                "VARIANT" | "OBJECT" | "ARRAY" => Kind::Json,
                "BINARY" => Kind::Binary,
                _ => {
                    return Err(SourceError::UnsupportedType {
                        column: column.name,
                        type_name: column.type_name,
                    });
                }
            };
            Ok((column, kind))
        })
        .collect()
}

/// One value of a column of `kind`; `Err` says why it cannot be read.
pub(super) fn value(kind: Kind, raw: Option<&str>) -> Result<Value, String> {
    let Some(raw) = raw else {
        return Ok(Value::Null);
    };
    match kind {
        Kind::Integer => match raw.parse::<i64>() {
            Ok(i) => Ok(Value::Int(i)),
            Err(_) => decimal(raw),
        },
        Kind::Decimal => decimal(raw),
        Kind::Real => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("{raw:?} is not a floating point number")),
        Kind::Text => Ok(Value::Text(raw.to_owned())),
        Kind::Boolean => match raw {
            "true" | "TRUE" | "1" => Ok(Value::Bool(true)),
            "false" | "FALSE" | "0" => Ok(Value::Bool(false)),
            other => Err(format!("{other:?} is not a boolean")),
        },
        Kind::Date => {
            let days: i64 = raw.parse().map_err(|_| format!("{raw:?} is not a day number"))?;
            NaiveDate::from_ymd_opt(1970, 1, 1)
                .zip(TimeDelta::try_days(days))
                .and_then(|(epoch, delta)| epoch.checked_add_signed(delta))
                .map(Value::Date)
                .ok_or_else(|| format!("day {days} is out of range"))
        }
        Kind::Time => {
            let (secs, nanos) = seconds(raw)?;
            u32::try_from(secs)
                .ok()
                .and_then(|s| NaiveTime::from_num_seconds_from_midnight_opt(s, nanos))
                .map(Value::Time)
                .ok_or_else(|| format!("{raw:?} is not a time of day"))
        }
        Kind::Timestamp => instant(raw),
        Kind::TimestampTz => {
            // "<seconds> <offset + 1440>": the seconds are already UTC.
            let (epoch, offset) = raw
                .split_once(' ')
                .ok_or_else(|| format!("{raw:?} is not an instant with an offset"))?;
            let minutes: i64 = offset
                .parse()
                .map_err(|_| format!("{offset:?} is not an offset"))?;
            if !(0..=2880).contains(&minutes) {
                return Err(format!("offset {offset} is out of range"));
            }
            instant(epoch)
        }
        Kind::Json => serde_json::from_str(raw)
            .map(Value::Json)
            .map_err(|e| format!("not valid JSON ({e})")),
        Kind::Binary => {
            if raw.len() % 2 == 0 && raw.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(Value::Text(raw.to_ascii_lowercase()))
            } else {
                Err("not hexadecimal binary".to_owned())
            }
        }
    }
}

fn decimal(raw: &str) -> Result<Value, String> {
    // A plain decimal only: no exponent, which `BigDecimal` would accept but could make huge.
    if raw.is_empty() || raw.len() > 80 || !raw.bytes().all(|b| b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(format!("{raw:?} is not a decimal number"));
    }
    BigDecimal::from_str(raw)
        .map(Value::Decimal)
        .map_err(|_| format!("{raw:?} is not a decimal number"))
}

/// Whole seconds and nanoseconds of `"<seconds>[.<fraction>]"`, which may be negative.
fn seconds(raw: &str) -> Result<(i64, u32), String> {
    let bad = || format!("{raw:?} is not a number of seconds");
    let (whole, fraction) = raw.split_once('.').unwrap_or((raw, ""));
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let negative = whole.starts_with('-');
    let secs: i64 = whole.parse().map_err(|_| bad())?;
    let mut nanos: u32 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().map_err(|_| bad())?
    };
    // "-1.5" is one and a half seconds before the epoch: -2 s + 0.5 s.
    let mut secs = secs;
    if negative && nanos > 0 {
        secs = secs.checked_sub(1).ok_or_else(bad)?;
        nanos = 1_000_000_000 - nanos;
    }
    Ok((secs, nanos))
}

fn instant(raw: &str) -> Result<Value, String> {
    let (secs, nanos) = seconds(raw)?;
    DateTime::<Utc>::from_timestamp(secs, nanos)
        .map(Value::Timestamp)
        .ok_or_else(|| format!("{raw:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Value {
        Value::Timestamp(DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn values_decode_from_their_documented_forms() {
        assert_eq!(value(Kind::Integer, Some("42")), Ok(Value::Int(42)));
        assert_eq!(
            value(Kind::Integer, Some("99999999999999999999999999999999999999")),
            Ok(Value::Decimal(
                "99999999999999999999999999999999999999".parse().unwrap()
            ))
        );
        assert_eq!(
            value(Kind::Decimal, Some("10.50")),
            Ok(Value::Decimal("10.5".parse().unwrap()))
        );
        assert_eq!(value(Kind::Real, Some("0.1")), Ok(Value::Float(0.1)));
        assert_eq!(value(Kind::Boolean, Some("true")), Ok(Value::Bool(true)));
        assert_eq!(
            value(Kind::Date, Some("19724")),
            Ok(Value::Date(NaiveDate::from_ymd_opt(2024, 1, 2).unwrap()))
        );
        assert_eq!(
            value(Kind::Time, Some("3723.500000000")),
            Ok(Value::Time(NaiveTime::from_hms_milli_opt(1, 2, 3, 500).unwrap()))
        );
        assert_eq!(
            value(Kind::Timestamp, Some("1704164645.000000000")),
            Ok(ts("2024-01-02T03:04:05Z"))
        );
        assert_eq!(
            value(Kind::Timestamp, Some("-1.500000000")),
            Ok(ts("1969-12-31T23:59:58.5Z"))
        );
        assert_eq!(
            value(Kind::TimestampTz, Some("1704164645.000000000 1500")),
            Ok(ts("2024-01-02T03:04:05Z"))
        );
        assert_eq!(
            value(Kind::Json, Some("{\"a\": [1, 2]}")),
            Ok(Value::Json(serde_json::json!({"a": [1, 2]})))
        );
        assert_eq!(
            value(Kind::Binary, Some("DEADBEEF")),
            Ok(Value::Text("deadbeef".into()))
        );
        assert_eq!(value(Kind::Text, None), Ok(Value::Null));
    }

    #[test]
    fn bad_values_say_why_without_panicking() {
        assert!(value(Kind::Decimal, Some("1e999999999")).is_err());
        assert!(
            value(Kind::Date, Some("99999999999999"))
                .unwrap_err()
                .contains("out of range")
        );
        assert!(value(Kind::Time, Some("90000")).is_err());
        assert!(value(Kind::Timestamp, Some("9999999999999999999")).is_err());
        assert!(value(Kind::TimestampTz, Some("1 99999")).is_err());
        assert!(value(Kind::Boolean, Some("maybe")).is_err());
        assert!(value(Kind::Binary, Some("xyz")).is_err());
    }

    #[test]
    fn unsupported_types_name_the_column() {
        let row_type = vec![RowType {
            name: "SHAPE".into(),
            type_name: "geography".into(),
            scale: None,
            precision: None,
        }];
        let err = plan(&row_type).unwrap_err().to_string();
        assert!(err.contains("SHAPE") && err.contains("GEOGRAPHY"), "{err}");
    }
}

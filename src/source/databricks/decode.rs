//! Databricks SQL `JSON_ARRAY` values to canonical values, by the column types of the
//! result manifest (`manifest.schema.columns[].type_name`).
//!
//! In the `JSON_ARRAY` format every value is a string or null
//! (<https://docs.databricks.com/api/workspace/statementexecution>): numbers as their digits,
//! `DATE` as `YYYY-MM-DD`, `TIMESTAMP` as ISO 8601, `BINARY` as base64, and `ARRAY`, `MAP`,
//! `STRUCT` and `VARIANT` as JSON text. Each value decodes on its own into a `Result` with a
//! reason.

use std::str::FromStr;

use base64::Engine as _;
use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::Deserialize;

use super::super::{Column, SourceError};
use crate::model::value::Value;

/// One column of `manifest.schema.columns`.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct ColumnInfo {
    /// Column name.
    pub(super) name: String,
    /// The full type, like `decimal(12,2)` or `array<int>`.
    #[serde(default)]
    pub(super) type_text: String,
    /// The type's family, like `DECIMAL` or `ARRAY`.
    #[serde(default)]
    pub(super) type_name: String,
}

/// How the values of a column decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Boolean,
    Integer,
    Float,
    Decimal,
    Text,
    Date,
    /// `TIMESTAMP` (an instant) and `TIMESTAMP_NTZ` (a wall-clock time, read as UTC).
    Timestamp,
    /// `BINARY`: base64 on the wire, lower-case hex text here.
    Binary,
    /// `ARRAY`, `MAP`, `STRUCT`, `VARIANT`.
    Json,
    /// The `NULL` type (`SELECT NULL`).
    Null,
}

/// The kind of each column, or the first column whose type Backflow does not read.
pub(super) fn plan(columns: &[ColumnInfo]) -> Result<Vec<(Column, Kind)>, SourceError> {
    columns
        .iter()
        .map(|c| {
            let family = c.type_name.to_ascii_uppercase();
            let column = Column {
                name: c.name.clone(),
                type_name: if c.type_text.is_empty() {
                    family.clone()
                } else {
                    c.type_text.to_ascii_uppercase()
                },
            };
            let kind = match family.as_str() {
                "BOOLEAN" => Kind::Boolean,
                "BYTE" | "SHORT" | "INT" | "LONG" => Kind::Integer,
                "FLOAT" | "DOUBLE" => Kind::Float,
                "DECIMAL" => Kind::Decimal,
                "STRING" | "CHAR" | "VARCHAR" => Kind::Text,
                "DATE" => Kind::Date,
                "TIMESTAMP" | "TIMESTAMP_NTZ" => Kind::Timestamp,
                "BINARY" => Kind::Binary,
                "ARRAY" | "MAP" | "STRUCT" | "VARIANT" => Kind::Json,
                "NULL" | "VOID" => Kind::Null,
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
        Kind::Boolean => match raw {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            other => Err(format!("{other:?} is not a boolean")),
        },
        Kind::Integer => raw
            .parse::<i64>()
            .map(Value::Int)
            .map_err(|_| format!("{raw:?} is not an integer")),
        Kind::Float => match raw {
            "NaN" => Ok(Value::Float(f64::NAN)),
            "Infinity" => Ok(Value::Float(f64::INFINITY)),
            "-Infinity" => Ok(Value::Float(f64::NEG_INFINITY)),
            _ => raw
                .parse::<f64>()
                .map(Value::Float)
                .map_err(|_| format!("{raw:?} is not a floating point number")),
        },
        Kind::Decimal => {
            if raw.is_empty()
                || raw.len() > 80
                || !raw.bytes().all(|b| b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(format!("{raw:?} is not a decimal number"));
            }
            BigDecimal::from_str(raw)
                .map(Value::Decimal)
                .map_err(|_| format!("{raw:?} is not a decimal number"))
        }
        Kind::Text => Ok(Value::Text(raw.to_owned())),
        Kind::Date => NaiveDate::parse_from_str(raw, "%Y-%m-%d")
            .map(Value::Date)
            .map_err(|_| format!("{raw:?} is not a date")),
        Kind::Timestamp => timestamp(raw),
        Kind::Binary => base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map(|bytes| Value::Text(bytes.iter().map(|b| format!("{b:02x}")).collect()))
            .map_err(|_| "not base64 binary".to_owned()),
        Kind::Json => serde_json::from_str(raw)
            .map(Value::Json)
            .map_err(|e| format!("not valid JSON ({e})")),
        Kind::Null => Ok(Value::Null),
    }
}

/// An ISO 8601 timestamp with an offset (an instant), or without one (read as UTC).
fn timestamp(raw: &str) -> Result<Value, String> {
    if let Ok(instant) = DateTime::parse_from_rfc3339(raw) {
        return Ok(Value::Timestamp(instant.with_timezone(&Utc)));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(raw, format) {
            return Ok(Value::Timestamp(naive.and_utc()));
        }
    }
    Err(format!("{raw:?} is not a timestamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Value {
        Value::Timestamp(DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn values_decode_from_their_json_array_forms() {
        assert_eq!(value(Kind::Integer, Some("-7")), Ok(Value::Int(-7)));
        assert_eq!(
            value(Kind::Decimal, Some("10.50")),
            Ok(Value::Decimal("10.5".parse().unwrap()))
        );
        assert_eq!(value(Kind::Float, Some("0.1")), Ok(Value::Float(0.1)));
        assert_eq!(value(Kind::Boolean, Some("false")), Ok(Value::Bool(false)));
        assert_eq!(
            value(Kind::Date, Some("2024-02-29")),
            Ok(Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()))
        );
        assert_eq!(
            value(Kind::Timestamp, Some("2024-03-01T12:00:00.000Z")),
            Ok(ts("2024-03-01T12:00:00Z"))
        );
        assert_eq!(
            value(Kind::Timestamp, Some("2024-03-01T14:00:00+02:00")),
            Ok(ts("2024-03-01T12:00:00Z"))
        );
        assert_eq!(
            value(Kind::Timestamp, Some("2024-03-01T12:00:00.5")),
            Ok(ts("2024-03-01T12:00:00.5Z"))
        );
        assert_eq!(
            value(Kind::Binary, Some("3q2+7w==")),
            Ok(Value::Text("deadbeef".into()))
        );
        assert_eq!(
            value(Kind::Json, Some("[1,2]")),
            Ok(Value::Json(serde_json::json!([1, 2])))
        );
        assert_eq!(value(Kind::Null, Some("x")), Ok(Value::Null));
    }

    #[test]
    fn bad_values_and_types_are_explained() {
        assert!(value(Kind::Integer, Some("1.5")).is_err());
        assert!(value(Kind::Decimal, Some("1e400")).is_err());
        assert!(value(Kind::Date, Some("2024-13-01")).is_err());
        assert!(value(Kind::Timestamp, Some("yesterday")).is_err());
        let err = plan(&[ColumnInfo {
            name: "span".into(),
            type_text: "interval day".into(),
            type_name: "INTERVAL".into(),
        }])
        .unwrap_err()
        .to_string();
        assert!(err.contains("span") && err.contains("INTERVAL DAY"), "{err}");
    }
}

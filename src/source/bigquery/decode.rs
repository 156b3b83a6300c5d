//! BigQuery result values to canonical values, by the result schema.
//!
//! `jobs.query` and `jobs.getQueryResults` return rows as `{"f":[{"v":…},…]}`
//! (<https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/getQueryResults>): scalars
//! as strings (`INT64` digits, `NUMERIC`/`BIGNUMERIC` exact digits, `DATE` `YYYY-MM-DD`,
//! `DATETIME` ISO 8601 without offset, `TIME` `HH:MM:SS[.ffffff]`, `BYTES` base64, `JSON` JSON
//! text, and, with `formatOptions.useInt64Timestamp`, `TIMESTAMP` as microseconds since the
//! epoch), a `REPEATED` field as a list of `{"v":…}`, a `RECORD` as a nested `{"f":[…]}`.
//! Each value decodes on its own into a `Result` with a reason.

use std::str::FromStr;

use base64::Engine as _;
use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde::Deserialize;
use serde_json::Value as Json;

use super::super::{Column, SourceError};
use crate::model::value::{Document, Value};

/// One field of the result schema.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct Field {
    /// Field name.
    pub(super) name: String,
    /// Its type (`INTEGER`/`INT64`, `NUMERIC`, `RECORD`/`STRUCT`, …).
    #[serde(rename = "type")]
    pub(super) type_name: String,
    /// `NULLABLE`, `REQUIRED` or `REPEATED`.
    #[serde(default)]
    pub(super) mode: Option<String>,
    /// The fields of a `RECORD`.
    #[serde(default)]
    pub(super) fields: Vec<Field>,
}

/// How a field's values decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    Integer,
    Float,
    Decimal,
    Boolean,
    Text,
    Bytes,
    Date,
    Time,
    /// `DATETIME`: a wall-clock time, read as UTC.
    DateTime,
    Timestamp,
    Json,
    /// A `REPEATED` field: an array of the inner kind.
    Repeated(Box<Kind>),
    /// A `RECORD`/`STRUCT`: its fields, by name.
    Record(Vec<(String, Kind)>),
}

/// The kind of each column, or the first column whose type Backflow does not read.
pub(super) fn plan(fields: &[Field]) -> Result<Vec<(Column, Kind)>, SourceError> {
    fields
        .iter()
        .map(|f| {
            let column = Column {
                name: f.name.clone(),
                type_name: type_name(f),
            };
            let kind = kind(f).map_err(|type_name| SourceError::UnsupportedType {
                column: f.name.clone(),
                type_name,
            })?;
            Ok((column, kind))
        })
        .collect()
}

fn type_name(f: &Field) -> String {
    let base = f.type_name.to_ascii_uppercase();
    if f.mode.as_deref() == Some("REPEATED") {
        format!("ARRAY<{base}>")
    } else {
        base
    }
}

fn kind(f: &Field) -> Result<Kind, String> {
    let scalar = match f.type_name.to_ascii_uppercase().as_str() {
        "INTEGER" | "INT64" => Kind::Integer,
        "FLOAT" | "FLOAT64" => Kind::Float,
        "NUMERIC" | "BIGNUMERIC" | "DECIMAL" | "BIGDECIMAL" => Kind::Decimal,
        "BOOLEAN" | "BOOL" => Kind::Boolean,
        "STRING" => Kind::Text,
        "BYTES" => Kind::Bytes,
        "DATE" => Kind::Date,
        "TIME" => Kind::Time,
        "DATETIME" => Kind::DateTime,
        "TIMESTAMP" => Kind::Timestamp,
        "JSON" => Kind::Json,
        "RECORD" | "STRUCT" => Kind::Record(
            f.fields
                .iter()
                .map(|inner| kind(inner).map(|k| (inner.name.clone(), k)))
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err(type_name(f)),
    };
    Ok(if f.mode.as_deref() == Some("REPEATED") {
        Kind::Repeated(Box::new(scalar))
    } else {
        scalar
    })
}

/// One cell (`{"v": …}`'s value) of a field of `kind`; `Err` says why it cannot be read.
pub(super) fn value(kind: &Kind, raw: &Json) -> Result<Value, String> {
    if raw.is_null() {
        return Ok(Value::Null);
    }
    match kind {
        Kind::Repeated(inner) => {
            let items = raw.as_array().ok_or("a repeated field is not a list")?;
            items
                .iter()
                .map(|item| value(inner, item.get("v").unwrap_or(&Json::Null)))
                .collect::<Result<_, _>>()
                .map(Value::Array)
        }
        Kind::Record(fields) => {
            let cells = raw
                .get("f")
                .and_then(Json::as_array)
                .ok_or("a record is not {\"f\": [...]}")?;
            if cells.len() != fields.len() {
                return Err(format!(
                    "a record has {} values for {} fields",
                    cells.len(),
                    fields.len()
                ));
            }
            let mut doc = Document::new();
            for ((name, kind), cell) in fields.iter().zip(cells) {
                let v =
                    value(kind, cell.get("v").unwrap_or(&Json::Null)).map_err(|e| format!("{name}: {e}"))?;
                doc.insert(name.clone(), v);
            }
            Ok(Value::Object(doc))
        }
        scalar => {
            let text = raw.as_str().ok_or_else(|| format!("{raw} is not a string"))?;
            scalar_value(scalar, text)
        }
    }
}

fn scalar_value(kind: &Kind, raw: &str) -> Result<Value, String> {
    match kind {
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
            // BIGNUMERIC holds up to 77 digits; no exponent.
            if raw.is_empty()
                || raw.len() > 100
                || !raw.bytes().all(|b| b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(format!("{raw:?} is not a decimal number"));
            }
            BigDecimal::from_str(raw)
                .map(Value::Decimal)
                .map_err(|_| format!("{raw:?} is not a decimal number"))
        }
        Kind::Boolean => match raw {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            other => Err(format!("{other:?} is not a boolean")),
        },
        Kind::Text => Ok(Value::Text(raw.to_owned())),
        Kind::Bytes => base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map(|bytes| Value::Text(bytes.iter().map(|b| format!("{b:02x}")).collect()))
            .map_err(|_| "not base64 bytes".to_owned()),
        Kind::Date => NaiveDate::parse_from_str(raw, "%Y-%m-%d")
            .map(Value::Date)
            .map_err(|_| format!("{raw:?} is not a date")),
        Kind::Time => NaiveTime::parse_from_str(raw, "%H:%M:%S%.f")
            .map(Value::Time)
            .map_err(|_| format!("{raw:?} is not a time of day")),
        Kind::DateTime => NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S%.f"))
            .map(|naive| Value::Timestamp(naive.and_utc()))
            .map_err(|_| format!("{raw:?} is not a datetime")),
        Kind::Timestamp => {
            let micros: i64 = raw
                .parse()
                .map_err(|_| format!("{raw:?} is not a count of microseconds"))?;
            DateTime::<Utc>::from_timestamp_micros(micros)
                .map(Value::Timestamp)
                .ok_or_else(|| format!("timestamp {micros} is out of range"))
        }
        Kind::Json => serde_json::from_str(raw)
            .map(Value::Json)
            .map_err(|e| format!("not valid JSON ({e})")),
        Kind::Repeated(_) | Kind::Record(_) => Err("a nested value where a scalar was expected".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(name: &str, kind: &str) -> Field {
        Field {
            name: name.into(),
            type_name: kind.into(),
            mode: None,
            fields: vec![],
        }
    }

    #[test]
    fn scalars_decode_from_their_documented_forms() {
        assert_eq!(value(&Kind::Integer, &json!("-5")), Ok(Value::Int(-5)));
        assert_eq!(
            value(&Kind::Decimal, &json!("123456789012345678901234567890.123456789")),
            Ok(Value::Decimal(
                "123456789012345678901234567890.123456789".parse().unwrap()
            ))
        );
        assert_eq!(
            value(&Kind::Timestamp, &json!("1704164645000000")),
            Ok(Value::Timestamp(
                DateTime::parse_from_rfc3339("2024-01-02T03:04:05Z")
                    .unwrap()
                    .with_timezone(&Utc)
            ))
        );
        assert_eq!(
            value(&Kind::DateTime, &json!("2024-01-02T03:04:05.5")),
            Ok(Value::Timestamp(
                DateTime::parse_from_rfc3339("2024-01-02T03:04:05.5Z")
                    .unwrap()
                    .with_timezone(&Utc)
            ))
        );
        assert_eq!(
            value(&Kind::Bytes, &json!("3q2+7w==")),
            Ok(Value::Text("deadbeef".into()))
        );
        assert_eq!(
            value(&Kind::Json, &json!("{\"a\":1}")),
            Ok(Value::Json(json!({"a": 1})))
        );
        assert_eq!(value(&Kind::Text, &Json::Null), Ok(Value::Null));
    }

    #[test]
    fn arrays_and_records_nest() {
        let record = Field {
            name: "r".into(),
            type_name: "RECORD".into(),
            mode: Some("REPEATED".into()),
            fields: vec![field("a", "INT64"), field("b", "STRING")],
        };
        let kind = kind(&record).unwrap();
        let got = value(&kind, &json!([{"v": {"f": [{"v": "1"}, {"v": "x"}]}}])).unwrap();
        let mut doc = Document::new();
        doc.insert("a".into(), Value::Int(1));
        doc.insert("b".into(), Value::Text("x".into()));
        assert_eq!(got, Value::Array(vec![Value::Object(doc)]));
    }

    #[test]
    fn unsupported_types_and_bad_values_are_explained() {
        let err = plan(&[field("shape", "GEOGRAPHY")]).unwrap_err().to_string();
        assert!(err.contains("shape") && err.contains("GEOGRAPHY"), "{err}");
        assert!(value(&Kind::Timestamp, &json!("1.7E9")).is_err());
        assert!(value(&Kind::Integer, &json!(5)).is_err());
    }
}

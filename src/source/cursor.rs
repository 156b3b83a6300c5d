//! Cursor mode at the source: the high-water mark of a model's cursor column, and the model
//! query wrapped to read only the rows at or past it, in each warehouse's dialect.
//!
//! The mark is never pasted as text: it is a typed value (an integer, an exact decimal, a
//! date or an instant) read from the model's own rows, and each dialect writes it back as a
//! literal from that type (digits, or a fixed date/time pattern), so no character of it can
//! end a literal. The column name is a plain identifier (the spec's validation) and quoted
//! anyway.

use std::cmp::Ordering;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::SourceError;
use crate::model::value::Value;

/// A cursor column's high-water mark: the largest value a run read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
pub enum Mark {
    /// An integer column.
    Int(i64),
    /// An exact decimal column (also unsigned 64-bit integers).
    Decimal(BigDecimal),
    /// A date column.
    Date(NaiveDate),
    /// A timestamp column, in UTC.
    Timestamp(DateTime<Utc>),
}

impl Mark {
    /// The mark a cell stands for: `Ok(None)` for NULL, `Err` with the value's kind for a type
    /// a cursor cannot order.
    pub fn of(value: &Value) -> Result<Option<Mark>, &'static str> {
        Ok(Some(match value {
            Value::Null => return Ok(None),
            Value::Int(i) => Mark::Int(*i),
            Value::Decimal(d) => Mark::Decimal(d.clone()),
            Value::Date(d) => Mark::Date(*d),
            Value::Timestamp(t) => Mark::Timestamp(*t),
            Value::Bool(_) => return Err("boolean"),
            Value::Float(_) => return Err("floating point"),
            Value::Text(_) => return Err("text"),
            Value::Time(_) => return Err("time of day"),
            Value::Json(_) => return Err("JSON"),
            Value::Uuid(_) => return Err("UUID"),
            Value::Array(_) => return Err("array"),
            Value::Object(_) => return Err("object"),
        }))
    }

    /// Orders two marks of one column; `None` when their kinds differ (a column whose type
    /// changed between runs).
    pub fn compare(&self, other: &Mark) -> Option<Ordering> {
        match (self, other) {
            (Mark::Int(a), Mark::Int(b)) => Some(a.cmp(b)),
            (Mark::Decimal(a), Mark::Decimal(b)) => Some(a.cmp(b)),
            (Mark::Int(a), Mark::Decimal(b)) => Some(BigDecimal::from(*a).cmp(b)),
            (Mark::Decimal(a), Mark::Int(b)) => Some(a.cmp(&BigDecimal::from(*b))),
            (Mark::Date(a), Mark::Date(b)) => Some(a.cmp(b)),
            (Mark::Timestamp(a), Mark::Timestamp(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    /// The mark as a SQL literal of `dialect`, built from its type.
    fn literal(&self, dialect: Dialect) -> String {
        match self {
            Mark::Int(i) => i.to_string(),
            Mark::Decimal(d) => {
                let plain = d.to_plain_string();
                match dialect {
                    Dialect::ClickHouse => clickhouse_decimal(&plain),
                    Dialect::BigQuery => format!("BIGNUMERIC '{plain}'"),
                    _ => plain,
                }
            }
            Mark::Date(d) => {
                let text = d.format("%Y-%m-%d");
                match dialect {
                    Dialect::Postgres | Dialect::MySql | Dialect::Sqlite => format!("'{text}'"),
                    Dialect::ClickHouse => format!("toDate('{text}')"),
                    Dialect::Snowflake => format!("'{text}'::DATE"),
                    Dialect::Databricks | Dialect::BigQuery => format!("DATE '{text}'"),
                }
            }
            Mark::Timestamp(t) => {
                // Microseconds, cut (never rounded up): a finer mark is read from slightly
                // before itself, and rows delivered already are skipped by fingerprint.
                let text = t.format("%Y-%m-%d %H:%M:%S%.6f");
                match dialect {
                    // Untyped, so it takes the column's type; a zone given to a timestamp
                    // without time zone is ignored, and those columns are read as UTC.
                    Dialect::Postgres => format!("'{text}+00'"),
                    // The session's time zone is UTC (see the MySQL source).
                    Dialect::MySql => format!("'{text}'"),
                    // SQLite keeps timestamps as text in several shapes: compare instants,
                    // from 1 ms early (julianday's precision is about 20 µs).
                    Dialect::Sqlite => format!("julianday('{text}') - 1.0 / 86400000.0"),
                    // `DateTime64` is newer than some servers in use (18.16 has none): a
                    // mark on a whole second, all a `DateTime` column can hold, is written as
                    // a `DateTime`, which newer servers compare with `DateTime64` columns too.
                    Dialect::ClickHouse if t.timestamp_subsec_micros() == 0 => {
                        format!("toDateTime('{}', 'UTC')", t.format("%Y-%m-%d %H:%M:%S"))
                    }
                    Dialect::ClickHouse => format!("toDateTime64('{text}', 6, 'UTC')"),
                    Dialect::Snowflake => format!("'{text} +00:00'::TIMESTAMP_TZ"),
                    Dialect::Databricks => format!("TIMESTAMP '{text}+00:00'"),
                    Dialect::BigQuery => format!("TIMESTAMP '{text}+00'"),
                }
            }
        }
    }
}

/// A decimal mark (digits, an optional `-` and `.`) as a ClickHouse literal that every
/// server version reads exactly: bare digits for an integer within 64 bits (a larger integer
/// literal is read as a float), else the narrowest decimal type that holds it (`Decimal256`,
/// newer than some servers, only past 38 digits). Newer servers refuse to compare a
/// 128- or 256-bit integer column holding values past the decimal's range with it: such a
/// cursor column needs a cast to `Decimal` in the model.
fn clickhouse_decimal(plain: &str) -> String {
    let scale = plain.split_once('.').map_or(0, |(_, f)| f.len());
    if scale == 0 && (plain.parse::<i64>().is_ok() || plain.parse::<u64>().is_ok()) {
        return plain.to_owned();
    }
    let digits = plain.chars().filter(char::is_ascii_digit).count();
    let width = if digits <= 38 { 128 } else { 256 };
    format!("toDecimal{width}('{plain}', {scale})")
}

/// The SQL dialects of the sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Postgres,
    MySql,
    Sqlite,
    ClickHouse,
    Snowflake,
    Databricks,
    BigQuery,
}

impl Dialect {
    fn of_url(url: &str) -> Result<Dialect, SourceError> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        Ok(match scheme {
            "postgres" | "postgresql" | "redshift" => Dialect::Postgres,
            "mysql" | "mariadb" => Dialect::MySql,
            "sqlite" => Dialect::Sqlite,
            "clickhouse" | "clickhouses" => Dialect::ClickHouse,
            "snowflake" => Dialect::Snowflake,
            "databricks" => Dialect::Databricks,
            "bigquery" => Dialect::BigQuery,
            other => return Err(SourceError::UnsupportedUrl(other.to_owned())),
        })
    }

    fn quote(self, column: &str) -> String {
        match self {
            Dialect::Postgres | Dialect::Sqlite | Dialect::Snowflake => {
                format!("\"{}\"", column.replace('"', "\"\""))
            }
            Dialect::MySql | Dialect::ClickHouse | Dialect::Databricks | Dialect::BigQuery => {
                format!("`{}`", column.replace('`', "``"))
            }
        }
    }
}

/// The model query of `url`'s source wrapped to read only the rows whose `column` is at or
/// past `mark`. The column is the name the model returns; the query's trailing `;` goes.
pub fn wrap_query(url: &str, query: &str, column: &str, mark: &Mark) -> Result<String, SourceError> {
    let dialect = Dialect::of_url(url)?;
    if matches!(dialect, Dialect::Snowflake | Dialect::Databricks) {
        // Those sources check the statement type of the text they are given: the wrapper is a
        // SELECT whatever it wraps, so the model itself is checked here.
        super::statement::check_read_only(query).map_err(SourceError::ReadOnly)?;
    }
    let body = query.trim_end().trim_end_matches(';').trim_end();
    let quoted = dialect.quote(column);
    let left = match (dialect, mark) {
        (Dialect::Sqlite, Mark::Timestamp(_)) => format!("julianday(backflow_model.{quoted})"),
        _ => format!("backflow_model.{quoted}"),
    };
    // The query goes on lines of its own so a trailing `--` comment ends before the wrapper.
    Ok(format!(
        "SELECT * FROM (\n{body}\n) AS backflow_model WHERE {left} >= {}",
        mark.literal(dialect)
    ))
}

/// Follows the largest value of the cursor column as rows stream past.
#[derive(Debug)]
pub(crate) struct Watch {
    column: usize,
    max: Option<Mark>,
    /// The first value a cursor cannot order: its kind.
    unusable: Option<String>,
}

impl Watch {
    pub(crate) fn new(column: usize) -> Watch {
        Watch {
            column,
            max: None,
            unusable: None,
        }
    }

    pub(crate) fn see(&mut self, values: &[Value]) {
        if self.unusable.is_some() {
            return;
        }
        let Some(value) = values.get(self.column) else {
            return;
        };
        match Mark::of(value) {
            Ok(None) => {}
            Ok(Some(mark)) => match self.max.as_ref().map(|max| mark.compare(max)) {
                None | Some(Some(Ordering::Greater)) => self.max = Some(mark),
                Some(Some(_)) => {}
                Some(None) => self.unusable = Some("values of more than one type".to_owned()),
            },
            Err(kind) => self.unusable = Some(kind.to_owned()),
        }
    }

    /// The largest value read, or why the column cannot be a cursor.
    pub(crate) fn result(&self) -> Result<Option<&Mark>, &str> {
        match &self.unusable {
            Some(kind) => Err(kind),
            None => Ok(self.max.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Mark {
        Mark::Timestamp(DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn each_dialect_reads_from_the_mark_with_a_literal_built_from_its_type() {
        let mark = ts("2026-01-02T03:04:05.123456789Z");
        let q = |url: &str| wrap_query(url, "SELECT id, updated_at FROM t;\n", "updated_at", &mark).unwrap();
        assert_eq!(
            q("postgres://h/db"),
            "SELECT * FROM (\nSELECT id, updated_at FROM t\n) AS backflow_model \
             WHERE backflow_model.\"updated_at\" >= '2026-01-02 03:04:05.123456+00'"
        );
        assert!(q("mysql://h/db").ends_with("`updated_at` >= '2026-01-02 03:04:05.123456'"));
        assert!(q("sqlite://x.db").ends_with(
            "julianday(backflow_model.\"updated_at\") >= julianday('2026-01-02 03:04:05.123456') - 1.0 / 86400000.0"
        ));
        assert!(q("clickhouse://h/db").ends_with("toDateTime64('2026-01-02 03:04:05.123456', 6, 'UTC')"));
        let whole = ts("2026-01-02T03:04:05Z");
        assert!(
            wrap_query("clickhouse://h/db", "SELECT 1", "updated_at", &whole)
                .unwrap()
                .ends_with(">= toDateTime('2026-01-02 03:04:05', 'UTC')"),
            "a whole second reads on servers without DateTime64"
        );
        assert!(q("snowflake://u@a/d/s").ends_with("'2026-01-02 03:04:05.123456 +00:00'::TIMESTAMP_TZ"));
        assert!(q("databricks://h/w").ends_with("TIMESTAMP '2026-01-02 03:04:05.123456+00:00'"));
        assert!(q("bigquery://p/d").ends_with("`updated_at` >= TIMESTAMP '2026-01-02 03:04:05.123456+00'"));
        assert!(q("redshift://h/db").ends_with("'2026-01-02 03:04:05.123456+00'"));
        assert!(matches!(
            wrap_query("oracle://h", "SELECT 1", "c", &mark),
            Err(SourceError::UnsupportedUrl(_))
        ));
    }

    #[test]
    fn numbers_and_dates_are_written_from_their_values() {
        let int = Mark::Int(-42);
        let dec = Mark::Decimal("18446744073709551615.50".parse().unwrap());
        let day = Mark::Date(NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
        assert!(
            wrap_query("postgres://h", "SELECT 1", "v", &int)
                .unwrap()
                .ends_with(">= -42")
        );
        assert!(
            wrap_query("mysql://h", "SELECT 1", "v", &dec)
                .unwrap()
                .ends_with(">= 18446744073709551615.50")
        );
        let clickhouse = |mark: &str| {
            wrap_query(
                "clickhouse://h",
                "SELECT 1",
                "v",
                &Mark::Decimal(mark.parse().unwrap()),
            )
            .unwrap()
        };
        assert!(
            clickhouse("18446744073709551615.50").ends_with(">= toDecimal128('18446744073709551615.50', 2)")
        );
        assert!(clickhouse("18446744073709551615").ends_with(">= 18446744073709551615"));
        assert!(clickhouse("-18446744073709551616").ends_with(">= toDecimal128('-18446744073709551616', 0)"));
        assert!(
            clickhouse(&format!("1{}", "0".repeat(40)))
                .ends_with(&format!(">= toDecimal256('1{}', 0)", "0".repeat(40)))
        );
        assert!(
            wrap_query("bigquery://p/d", "SELECT 1", "v", &day)
                .unwrap()
                .ends_with(">= DATE '2026-03-01'")
        );
        assert!(
            wrap_query("sqlite://x", "SELECT 1", "v", &day)
                .unwrap()
                .ends_with(">= '2026-03-01'")
        );
    }

    #[test]
    fn a_writing_model_is_refused_before_the_wrapper_could_hide_it() {
        let mark = Mark::Int(1);
        for url in ["snowflake://u@a/d/s", "databricks://h/w"] {
            assert!(matches!(
                wrap_query(url, "DELETE FROM t", "id", &mark),
                Err(SourceError::ReadOnly(_))
            ));
        }
    }

    #[test]
    fn the_watch_keeps_the_largest_value_and_names_a_type_it_cannot_order() {
        let mut w = Watch::new(1);
        for v in [3, 9, 4] {
            w.see(&[Value::Null, Value::Int(v)]);
        }
        w.see(&[Value::Null, Value::Null]);
        assert_eq!(w.result(), Ok(Some(&Mark::Int(9))));
        w.see(&[Value::Null, Value::Text("x".into())]);
        assert_eq!(w.result(), Err("text"));
        let mut w = Watch::new(0);
        w.see(&[Value::Int(1)]);
        w.see(&[Value::Date(NaiveDate::from_ymd_opt(2026, 1, 1).unwrap())]);
        assert!(w.result().is_err());
    }

    #[test]
    fn marks_round_trip_through_json() {
        for mark in [
            Mark::Int(7),
            Mark::Decimal("1.25".parse().unwrap()),
            Mark::Date(NaiveDate::from_ymd_opt(2026, 3, 1).unwrap()),
            ts("2026-01-02T03:04:05.000001Z"),
        ] {
            let text = serde_json::to_string(&mark).unwrap();
            assert_eq!(serde_json::from_str::<Mark>(&text).unwrap(), mark, "{text}");
        }
    }
}

//! Amazon Redshift: the PostgreSQL source with the changes Redshift needs.
//!
//! Redshift speaks the PostgreSQL protocol of version 8.0, and refuses or lacks some of what
//! the PostgreSQL source relies on (each point from the Redshift documentation or from
//! drivers' bug reports, as cited):
//!
//! - **`extra_float_digits = 3`** in the startup packet (sqlx's default) fails the login:
//!   Redshift takes -15 to 2 (sqlx issue 801). This flavour sends 2, with which `float4` and
//!   `float8` text carries 9 and 17 significant digits, enough to read every value back
//!   exactly.
//! - **Binary result format** is not supported (ConnectorX issue 750; sqlx issue 801 saw
//!   binary `int8` parameters fail with "Not implemented"). Rows are read through the simple
//!   query protocol, whose rows are text, and decoded from text.
//! - **Type lookups**: for a column type it does not know built in, sqlx reads `pg_type`
//!   including `typcategory`, a column Redshift's catalog does not have (PostgreSQL 8.4
//!   added it; npgsql PR 2094). Redshift-only types (`SUPER`, `GEOMETRY`, `GEOGRAPHY`,
//!   `HLLSKETCH`, `VARBYTE`) therefore fail while the query is prepared; the failure is
//!   reported with the casts to use (the column is not known at that point).
//! - **Timeouts** cancel with "Query (…) canceled on user's request"
//!   (<https://docs.aws.amazon.com/redshift/latest/dg/r_statement_timeout.html>).
//!
//! Unchanged because Redshift documents them: `BEGIN READ ONLY`
//! (<https://docs.aws.amazon.com/redshift/latest/dg/r_BEGIN.html>), `SET LOCAL
//! statement_timeout` in milliseconds (<https://docs.aws.amazon.com/redshift/latest/dg/r_SET.html>),
//! and preparing the query (Parse/Describe of the extended protocol) to learn its columns.
//! No cursor is declared: Redshift materialises cursor results on the leader node, while a
//! plain query streams.
//!
//! Tested against PostgreSQL with this flavour (setup statements, startup parameters, the
//! text path); a real Redshift cannot run here, so nothing above is verified against one.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

use super::postgres::{self, Flavour};
use super::{RowStream, SourceError, SourceOptions};

/// Redshift's default port.
const PORT: u16 = 5439;

/// The largest `extra_float_digits` Redshift accepts.
const EXTRA_FLOAT_DIGITS: i8 = 2;

const REDSHIFT: Flavour = Flavour {
    // Sent one by one: the simple protocol's several-statements-per-message is not
    // documented for Redshift.
    setup: |millis| {
        vec![
            "BEGIN READ ONLY".to_owned(),
            format!("SET LOCAL statement_timeout = {millis}"),
        ]
    },
    text_rows: true,
    explain,
    // The check reads PostgreSQL's role catalog (predefined server roles, `pg_has_role`),
    // which Redshift's differs from; a failed query would abort the transaction the model
    // runs in. The grants of docs/sources/redshift.md are the guarantee.
    privileges: false,
};

/// Runs `query` on the Redshift database of `url` (`redshift://user:password@host:5439/db`)
/// and streams its rows.
pub(super) async fn extract(
    url: &str,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    let (options_for_pg, has_port) = connect_options(url)?;
    let connect_options = if has_port {
        options_for_pg
    } else {
        options_for_pg.port(PORT)
    };
    postgres::extract_with(url, &connect_options, query, options, &REDSHIFT).await
}

/// The connection options of a `redshift://` URL, and whether it names a port.
fn connect_options(url: &str) -> Result<(PgConnectOptions, bool), SourceError> {
    let rest = url
        .strip_prefix("redshift://")
        .ok_or_else(|| super::connect_error(url, "the URL does not start with redshift://"))?;
    let has_port = reqwest::Url::parse(url)
        .map_err(|e| super::connect_error(url, format!("invalid URL: {e}")))?
        .port()
        .is_some();
    let options = PgConnectOptions::from_str(&format!("postgres://{rest}"))
        .map_err(|e| super::connect_error(url, e))?
        .extra_float_digits(EXTRA_FLOAT_DIGITS);
    Ok((options, has_port))
}

/// Redshift's own failures.
fn explain(e: &sqlx::Error, timeout: std::time::Duration) -> Option<SourceError> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let message = db.message();
    if message.contains("typcategory") || message.contains("pg_enum") {
        return Some(SourceError::Query(
            "a column has a type only Redshift knows (SUPER, GEOMETRY, GEOGRAPHY, HLLSKETCH, \
             VARBYTE, …), which Backflow does not read: cast it in the query, for example \
             JSON_SERIALIZE(column) for SUPER or column::VARCHAR"
                .to_owned(),
        ));
    }
    if message.contains("canceled on user's request") {
        return Some(SourceError::Timeout(timeout));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_port_is_redshifts_and_an_explicit_one_is_kept() {
        let (options, has_port) = connect_options("redshift://u:p@example.com/dev").unwrap();
        assert!(!has_port);
        assert_eq!(options.get_port(), 5432, "sqlx's default before the flavour's");
        let (options, has_port) = connect_options("redshift://u:p@example.com:6000/dev").unwrap();
        assert!(has_port);
        assert_eq!(options.get_port(), 6000);
        assert_eq!(options.get_database(), Some("dev"));
    }
}

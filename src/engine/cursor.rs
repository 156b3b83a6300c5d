//! Cursor mode in the engine: whether a run reads past the stored high-water mark or runs a
//! full diff, and the record the store keeps once the run's last checkpoint is committed.
//!
//! A run past the mark reads the rows whose cursor column is `>=` the mark: rows at the mark
//! are read again, and those delivered already are skipped by their fingerprint, so a row
//! committed later with the same value as the mark is not missed. Such a run never deletes
//! (it cannot tell a deleted row from one it did not read); full diffs do, on their own
//! schedule, and also catch changes that did not move the column, so correctness never rests
//! on the cursor.
//!
//! The mark advances only after the run's last checkpoint is committed and only when the run
//! did not fail: a crash, a cancellation or records that failed delivery leave the previous
//! mark, so the next run reads those rows again (those committed are skipped by fingerprint).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::run::RunError;
use crate::api::ReverseSyncSpec;
use crate::api::duration;
use crate::api::reverse_sync::CursorSpec;
use crate::source::cursor::Mark;

/// How often a full diff runs when `cursor.fullDiff` is not set.
pub const DEFAULT_FULL_DIFF_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// What the store keeps for cursor mode (as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// A hash of what the fingerprints depend on (query, key, mappings, mode, cursor column):
    /// a mark taken under another basis is not trusted.
    pub basis: String,
    /// The cursor column as the model returns it.
    pub column: String,
    /// The largest value read; `None` before any row had one.
    pub mark: Option<Mark>,
    /// When the last full diff that did not fail started.
    pub full_diff_at: DateTime<Utc>,
}

/// How a run of a sync with a cursor reads the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The whole model, with deletes: why.
    FullDiff(&'static str),
    /// Only the rows at or past the mark of this column.
    PastMark {
        /// The column as the model returns it.
        column: String,
        /// The stored mark.
        mark: Mark,
    },
}

/// Cursor mode for one run: how it reads, and what was stored before it.
#[derive(Debug)]
pub struct CursorRun {
    /// How this run reads.
    pub read: Read,
    previous: Option<Record>,
    basis: String,
}

/// The basis of a spec's fingerprints and cursor.
fn basis(spec: &ReverseSyncSpec, cursor: &CursorSpec) -> String {
    let parts = serde_json::json!([
        spec.source.query,
        spec.source.primary_key,
        spec.mappings,
        spec.match_fields,
        spec.mode,
        cursor.column,
    ]);
    format!("{:016x}", xxh3_64(parts.to_string().as_bytes()))
}

/// True when the schedule calls for a full diff at `now`, the last one having started at
/// `last`.
fn full_diff_due(cursor: &CursorSpec, last: DateTime<Utc>, now: DateTime<Utc>) -> Result<bool, RunError> {
    let schedule = cursor.full_diff.as_ref();
    if let Some(cron) = schedule.and_then(|s| s.cron.as_deref()) {
        let cron =
            duration::cron(cron).map_err(|e| RunError::Invalid(format!("spec.cursor.fullDiff.cron: {e}")))?;
        return Ok(cron
            .find_next_occurrence(&last, false)
            .is_ok_and(|next| next <= now));
    }
    let interval = match schedule.and_then(|s| s.interval.as_deref()) {
        Some(text) => duration::parse_at_most(text, duration::MAX_INTERVAL)
            .map_err(|e| RunError::Invalid(format!("spec.cursor.fullDiff.interval: {e}")))?,
        None => DEFAULT_FULL_DIFF_INTERVAL,
    };
    let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
    Ok(last.checked_add_signed(interval).is_none_or(|due| due <= now))
}

impl CursorRun {
    /// Decides how the run reads from the stored record (`None`: nothing stored, or a record
    /// that does not parse) and whether a full diff was asked for.
    pub fn decide(
        spec: &ReverseSyncSpec,
        cursor: &CursorSpec,
        stored: Option<&str>,
        full_diff_asked: bool,
        now: DateTime<Utc>,
    ) -> Result<CursorRun, RunError> {
        let basis = basis(spec, cursor);
        let previous = stored.and_then(|text| match serde_json::from_str::<Record>(text) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "the stored cursor record does not parse; this run is a full diff");
                None
            }
        });
        let read = match &previous {
            _ if full_diff_asked => Read::FullDiff("asked for"),
            None => Read::FullDiff("no high-water mark yet"),
            Some(r) if r.basis != basis => Read::FullDiff("the query, mappings or cursor changed"),
            Some(Record { mark: None, .. }) => Read::FullDiff("no row had a cursor value yet"),
            Some(r) if full_diff_due(cursor, r.full_diff_at, now)? => Read::FullDiff("scheduled"),
            Some(Record {
                mark: Some(mark),
                column,
                ..
            }) => Read::PastMark {
                column: column.clone(),
                mark: mark.clone(),
            },
        };
        Ok(CursorRun {
            read,
            previous,
            basis,
        })
    }

    /// True when the run reads only past the mark (no deletes).
    pub fn past_mark(&self) -> bool {
        matches!(self.read, Read::PastMark { .. })
    }

    /// The record to store once the run is committed: the larger of the old mark and the
    /// largest value read (a full diff takes what it read: it saw every row).
    pub fn next_record(&self, column: &str, read_max: Option<&Mark>, started: DateTime<Utc>) -> Record {
        match &self.read {
            Read::FullDiff(_) => Record {
                basis: self.basis.clone(),
                column: column.to_owned(),
                mark: read_max.cloned(),
                full_diff_at: started,
            },
            Read::PastMark { mark, .. } => {
                let larger = match read_max {
                    Some(m) if m.compare(mark) == Some(std::cmp::Ordering::Greater) => m.clone(),
                    _ => mark.clone(),
                };
                Record {
                    basis: self.basis.clone(),
                    column: column.to_owned(),
                    mark: Some(larger),
                    full_diff_at: self.previous.as_ref().map_or(started, |p| p.full_diff_at),
                }
            }
        }
    }
}

/// Finds the cursor column among the model's columns: the exact name, else the only one
/// that matches ignoring case (warehouses that upper-case unquoted names).
pub fn column_index(columns: &[crate::source::Column], name: &str) -> Result<usize, RunError> {
    if let Some(i) = columns.iter().position(|c| c.name == name) {
        return Ok(i);
    }
    let mut matching = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.name.eq_ignore_ascii_case(name));
    match (matching.next(), matching.next()) {
        (Some((i, _)), None) => Ok(i),
        _ => Err(RunError::Invalid(format!(
            "spec.cursor.column: the model returns no column {name:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> ReverseSyncSpec {
        serde_yaml_ng::from_str(&format!(
            "source: {{connectionSecretRef: {{name: s}}, query: SELECT 1, primaryKey: [id]}}
destinationRef: {{name: d}}
mappings: [{{from: id, to: id}}]
cursor: {{column: updated_at{extra}}}
"
        ))
        .unwrap()
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn record(spec: &ReverseSyncSpec, mark: Option<i64>, full_at: i64) -> String {
        let cursor = spec.cursor.as_ref().unwrap();
        serde_json::to_string(&Record {
            basis: basis(spec, cursor),
            column: "updated_at".into(),
            mark: mark.map(Mark::Int),
            full_diff_at: at(full_at),
        })
        .unwrap()
    }

    fn read(spec: &ReverseSyncSpec, stored: Option<&str>, asked: bool, now: i64) -> Read {
        CursorRun::decide(spec, spec.cursor.as_ref().unwrap(), stored, asked, at(now))
            .unwrap()
            .read
    }

    #[test]
    fn a_run_reads_past_the_mark_until_a_full_diff_is_due_or_asked_for() {
        let s = spec(", fullDiff: {interval: 1h}");
        let stored = record(&s, Some(7), 0);
        let past = Read::PastMark {
            column: "updated_at".into(),
            mark: Mark::Int(7),
        };
        assert_eq!(read(&s, Some(&stored), false, 3599), past);
        assert_eq!(read(&s, Some(&stored), false, 3600), Read::FullDiff("scheduled"));
        assert_eq!(read(&s, Some(&stored), true, 10), Read::FullDiff("asked for"));
        assert_eq!(
            read(&s, None, false, 10),
            Read::FullDiff("no high-water mark yet")
        );
        assert_eq!(
            read(&s, Some(&record(&s, None, 0)), false, 10),
            Read::FullDiff("no row had a cursor value yet")
        );
        assert_eq!(
            read(&s, Some("{not json"), false, 10),
            Read::FullDiff("no high-water mark yet")
        );
    }

    #[test]
    fn a_changed_query_or_mapping_distrusts_the_mark() {
        let s = spec("");
        let stored = record(&s, Some(7), 0);
        let mut changed = s.clone();
        changed.mappings[0].to = "other".into();
        assert_eq!(
            read(&changed, Some(&stored), false, 10),
            Read::FullDiff("the query, mappings or cursor changed")
        );
        // The default full diff is daily.
        assert!(matches!(
            read(&s, Some(&stored), false, 86_399),
            Read::PastMark { .. }
        ));
        assert_eq!(
            read(&s, Some(&stored), false, 86_400),
            Read::FullDiff("scheduled")
        );
    }

    #[test]
    fn a_cron_full_diff_is_due_once_a_time_passed_since_the_last() {
        let s = spec(", fullDiff: {cron: \"0 3 * * *\"}");
        let stored = record(&s, Some(1), 0);
        assert!(matches!(
            read(&s, Some(&stored), false, 3 * 3600 - 1),
            Read::PastMark { .. }
        ));
        assert_eq!(
            read(&s, Some(&stored), false, 3 * 3600),
            Read::FullDiff("scheduled")
        );
    }

    #[test]
    fn the_mark_only_moves_forward_past_the_mark_and_a_full_diff_takes_what_it_read() {
        let s = spec("");
        let stored = record(&s, Some(7), 5);
        let run = CursorRun::decide(&s, s.cursor.as_ref().unwrap(), Some(&stored), false, at(10)).unwrap();
        let next = run.next_record("updated_at", Some(&Mark::Int(3)), at(10));
        assert_eq!((next.mark, next.full_diff_at), (Some(Mark::Int(7)), at(5)));
        let next = run.next_record("updated_at", Some(&Mark::Int(9)), at(10));
        assert_eq!(next.mark, Some(Mark::Int(9)));
        let run = CursorRun::decide(&s, s.cursor.as_ref().unwrap(), Some(&stored), true, at(10)).unwrap();
        let next = run.next_record("UPDATED_AT", Some(&Mark::Int(3)), at(10));
        assert_eq!((next.mark, next.full_diff_at), (Some(Mark::Int(3)), at(10)));
        assert_eq!(next.column, "UPDATED_AT");
    }

    #[test]
    fn the_column_is_found_exactly_or_by_its_only_case_insensitive_match() {
        let cols = |names: &[&str]| -> Vec<crate::source::Column> {
            names
                .iter()
                .map(|n| crate::source::Column {
                    name: (*n).into(),
                    type_name: "INT".into(),
                })
                .collect()
        };
        assert_eq!(
            column_index(&cols(&["ID", "UPDATED_AT"]), "updated_at").unwrap(),
            1
        );
        assert_eq!(column_index(&cols(&["A", "a"]), "a").unwrap(), 1);
        assert!(column_index(&cols(&["x"]), "updated_at").is_err());
    }
}

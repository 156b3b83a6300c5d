//! The operator's Prometheus metrics, registered once and served on `/metrics`.
//!
//! Names follow Prometheus conventions. Alert rules and the Grafana dashboard of the Helm chart
//! query only these (a test checks it).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::destination::delivery::AnswerClass;
use crate::engine::progress::Snapshot;
use crate::engine::run::{RunReport, RunResult};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Runs by result (`Succeeded`, `PartiallySucceeded`, `Failed`).
    pub sync_runs: IntCounterVec,
    /// Rows by operation and outcome.
    pub sync_rows: IntCounterVec,
    /// Rows read from the model.
    pub sync_rows_read: IntCounterVec,
    /// Seconds delivery was held back by the rate limit or throttling answers.
    pub sync_throttled_seconds: CounterVec,
    /// The share of the run in flight's records that are settled (absent when no run is).
    pub sync_run_progress: GaugeVec,
    /// Run duration.
    pub sync_duration: HistogramVec,
    /// Unix time of the last run that did not fail.
    pub sync_last_success: GaugeVec,
    /// Failed runs in a row (0 after a run that did not fail).
    pub sync_consecutive_failures: IntGaugeVec,
    /// The schedule's period in seconds (interval, or the gap between the next two cron
    /// times); absent for syncs without a schedule. The staleness alert compares against it.
    pub sync_schedule_period: GaugeVec,
    /// 1 while the sync's `Ready` condition is True.
    pub sync_ready: IntGaugeVec,
    /// Deletes the delete limit held back in the sync's last run (0 when none were).
    pub sync_deletes_held_back: IntGaugeVec,
    /// Runs in flight.
    pub runs_in_flight: IntGauge,
    /// Requests to destinations by answer class.
    pub destination_requests: IntCounterVec,
    /// Throttling answers from destinations.
    pub destination_throttled: IntCounterVec,
    /// 1 while the Destination's `Ready` condition is True.
    pub destination_ready: IntGaugeVec,
    /// Reconciles that ended in an error, by kind and reason.
    pub reconcile_errors: IntCounterVec,
    /// Always 1, labelled with the version; its absence means the operator is down.
    pub build_info: IntGaugeVec,
}

/// Registering a metric failed (a duplicate name: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("failed to register metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

const SYNC: &[&str] = &["namespace", "sync"];

/// The `(op, outcome)` pairs of `backflow_sync_rows_total`: rows left alone, rows refused
/// (by the planner or the destination), rows that failed after retries, records written,
/// records deleted.
const ROW_SERIES: [(&str, &str); 5] = [
    ("unchanged", "skipped"),
    ("any", "rejected"),
    ("any", "failed"),
    ("write", "sent"),
    ("delete", "sent"),
];

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, MetricsError> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let float_counter = |name: &str, help: &str, labels: &[&str]| -> Result<CounterVec, MetricsError> {
            let c = CounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let int_gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, MetricsError> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let sync_duration = HistogramVec::new(
            HistogramOpts::new("backflow_sync_duration_seconds", "Duration of sync runs.").buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
            ]),
            SYNC,
        )?;
        registry.register(Box::new(sync_duration.clone()))?;
        let runs_in_flight = IntGauge::new("backflow_sync_runs_in_flight", "Sync runs in flight.")?;
        registry.register(Box::new(runs_in_flight.clone()))?;
        let metrics = Metrics {
            sync_runs: counter(
                "backflow_sync_runs_total",
                "Sync runs by result.",
                &["namespace", "sync", "result"],
            )?,
            sync_rows: counter(
                "backflow_sync_rows_total",
                "Rows by operation (write, delete, unchanged, any) and outcome (sent, skipped, rejected, failed).",
                &["namespace", "sync", "op", "outcome"],
            )?,
            sync_rows_read: counter(
                "backflow_sync_rows_read_total",
                "Rows read from the sync's model, counted while runs read them.",
                SYNC,
            )?,
            sync_throttled_seconds: float_counter(
                "backflow_sync_throttled_seconds_total",
                "Seconds the sync's deliveries were held back by the Destination's rate limit or throttling answers.",
                SYNC,
            )?,
            sync_run_progress: gauge(
                "backflow_sync_run_progress_ratio",
                "Share (0 to 1) of the records the run in flight sends that the destination has settled; absent when no run is in flight.",
                SYNC,
            )?,
            sync_duration,
            sync_last_success: gauge(
                "backflow_sync_last_success_timestamp_seconds",
                "Unix time of the end of the last sync run that did not fail.",
                SYNC,
            )?,
            sync_consecutive_failures: int_gauge(
                "backflow_sync_consecutive_failures",
                "Failed sync runs in a row.",
                SYNC,
            )?,
            sync_schedule_period: gauge(
                "backflow_sync_schedule_period_seconds",
                "Seconds between scheduled runs of a sync.",
                SYNC,
            )?,
            sync_ready: int_gauge(
                "backflow_sync_ready",
                "1 while the sync's Ready condition is True.",
                SYNC,
            )?,
            sync_deletes_held_back: int_gauge(
                "backflow_sync_deletes_held_back",
                "Deletes the delete limit held back in the sync's last run (0 when none were); the records are still in the destination.",
                SYNC,
            )?,
            runs_in_flight,
            destination_requests: counter(
                "backflow_destination_requests_total",
                "Requests to destinations by answer class (success, rejected, throttled, error, fatal).",
                &["namespace", "destination", "status_class"],
            )?,
            destination_throttled: counter(
                "backflow_destination_throttled_total",
                "Throttling answers (429 and the like) from destinations.",
                &["namespace", "destination"],
            )?,
            destination_ready: int_gauge(
                "backflow_destination_ready",
                "1 while the Destination's Ready condition is True.",
                &["namespace", "destination"],
            )?,
            reconcile_errors: counter(
                "backflow_reconcile_errors_total",
                "Reconciles that ended in an error.",
                &["kind", "reason"],
            )?,
            build_info: int_gauge(
                "backflow_build_info",
                "Always 1; labelled with the operator's version.",
                &["version"],
            )?,
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(metrics)
    }

    /// Publishes how far a run in flight of `namespace/sync` to `destination` has got: the
    /// run's counters move by what it did since its last publication (`published`), and the
    /// progress gauge is set.
    pub fn record_progress(
        &self,
        namespace: &str,
        sync: &str,
        destination: &str,
        snapshot: &Snapshot,
        published: &mut Published,
    ) {
        let totals = RunTotals {
            rows_read: snapshot.rows_read,
            rows: [
                snapshot.rows_unchanged,
                snapshot.rows_rejected.saturating_add(snapshot.rejected),
                snapshot.failed,
                snapshot.accepted,
                snapshot.deleted,
            ],
            answers: answer_array(&snapshot.answers),
            throttled: snapshot.throttled_answers,
            throttled_seconds: snapshot.throttled_time.as_secs_f64(),
        };
        self.advance(namespace, sync, destination, &totals, published);
        self.sync_run_progress
            .with_label_values(&[namespace, sync])
            .set(snapshot.ratio());
    }

    /// Records a finished run of `namespace/sync` to `destination`; `published` is what
    /// [`Metrics::record_progress`] added while it ran (the default when nothing was), so
    /// that the counters end at the run's totals, counted once. The progress gauge goes.
    pub fn record_run(
        &self,
        namespace: &str,
        sync: &str,
        destination: &str,
        report: &RunReport,
        published: &mut Published,
    ) {
        self.sync_runs
            .with_label_values(&[namespace, sync, report.result.as_str()])
            .inc();
        self.sync_duration
            .with_label_values(&[namespace, sync])
            .observe(report.seconds().max(0.0));
        let totals = RunTotals {
            rows_read: report.plan.rows_in_model,
            rows: [
                report.plan.unchanged,
                report.rows_rejected(),
                report.failed,
                report.accepted,
                report.deleted,
            ],
            answers: answer_array(&report.answers),
            throttled: report.throttled,
            throttled_seconds: report.throttled_time.as_secs_f64(),
        };
        self.advance(namespace, sync, destination, &totals, published);
        self.run_ended(namespace, sync);
        let held_back = report
            .delete_check
            .as_ref()
            .filter(|c| c.held_back())
            .map_or(0, |c| i64::try_from(c.deletes).unwrap_or(i64::MAX));
        self.sync_deletes_held_back
            .with_label_values(&[namespace, sync])
            .set(held_back);
        let failures = self
            .sync_consecutive_failures
            .with_label_values(&[namespace, sync]);
        if report.result == RunResult::Failed {
            failures.inc();
        } else {
            failures.set(0);
            self.sync_last_success
                .with_label_values(&[namespace, sync])
                .set(report.finished.timestamp_millis() as f64 / 1000.0);
        }
    }

    /// Moves the run's counters up to `totals` from what was `published` before (never
    /// down: a counter that got ahead of a report stays).
    fn advance(
        &self,
        namespace: &str,
        sync: &str,
        destination: &str,
        totals: &RunTotals,
        published: &mut Published,
    ) {
        let up = |published: &mut u64, total: u64| {
            let delta = total.saturating_sub(*published);
            *published = (*published).max(total);
            delta
        };
        let delta = up(&mut published.rows_read, totals.rows_read);
        if delta > 0 {
            self.sync_rows_read
                .with_label_values(&[namespace, sync])
                .inc_by(delta);
        }
        for ((op, outcome), (done, total)) in
            ROW_SERIES.iter().zip(published.rows.iter_mut().zip(totals.rows))
        {
            let delta = up(done, total);
            if delta > 0 {
                self.sync_rows
                    .with_label_values(&[namespace, sync, op, outcome])
                    .inc_by(delta);
            }
        }
        for ((class, done), total) in AnswerClass::ALL
            .iter()
            .zip(published.answers.iter_mut())
            .zip(totals.answers)
        {
            let delta = up(done, total);
            if delta > 0 {
                self.destination_requests
                    .with_label_values(&[namespace, destination, class.as_str()])
                    .inc_by(delta);
            }
        }
        let delta = up(&mut published.throttled, totals.throttled);
        if delta > 0 {
            self.destination_throttled
                .with_label_values(&[namespace, destination])
                .inc_by(delta);
        }
        let delta = totals.throttled_seconds - published.throttled_seconds;
        if delta > 0.0 {
            self.sync_throttled_seconds
                .with_label_values(&[namespace, sync])
                .inc_by(delta);
            published.throttled_seconds = totals.throttled_seconds;
        }
    }

    /// No run of `namespace/sync` is in flight any more: its progress gauge goes.
    pub fn run_ended(&self, namespace: &str, sync: &str) {
        let _ = self.sync_run_progress.remove_label_values(&[namespace, sync]);
    }

    /// Records a run that failed before the engine ran (a missing Secret, a failed Job).
    pub fn record_failure(&self, namespace: &str, sync: &str) {
        self.run_ended(namespace, sync);
        self.sync_runs
            .with_label_values(&[namespace, sync, RunResult::Failed.as_str()])
            .inc();
        self.sync_consecutive_failures
            .with_label_values(&[namespace, sync])
            .inc();
    }

    /// Drops every series of a deleted sync.
    pub fn forget_sync(&self, namespace: &str, sync: &str) {
        let labels = [namespace, sync];
        for result in [
            RunResult::Succeeded,
            RunResult::PartiallySucceeded,
            RunResult::Failed,
        ] {
            let _ = self
                .sync_runs
                .remove_label_values(&[namespace, sync, result.as_str()]);
        }
        for (op, outcome) in ROW_SERIES {
            let _ = self
                .sync_rows
                .remove_label_values(&[namespace, sync, op, outcome]);
        }
        let _ = self.sync_rows_read.remove_label_values(&labels);
        let _ = self.sync_throttled_seconds.remove_label_values(&labels);
        let _ = self.sync_run_progress.remove_label_values(&labels);
        let _ = self.sync_duration.remove_label_values(&labels);
        let _ = self.sync_last_success.remove_label_values(&labels);
        let _ = self.sync_schedule_period.remove_label_values(&labels);
        let _ = self.sync_consecutive_failures.remove_label_values(&labels);
        let _ = self.sync_ready.remove_label_values(&labels);
        let _ = self.sync_deletes_held_back.remove_label_values(&labels);
    }

    /// The names of every registered metric family, whether or not it has series yet (what
    /// alert rules and dashboards may query).
    pub fn names(&self) -> Vec<String> {
        let collectors: [&dyn prometheus::core::Collector; 17] = [
            &self.sync_runs,
            &self.sync_rows,
            &self.sync_rows_read,
            &self.sync_throttled_seconds,
            &self.sync_run_progress,
            &self.sync_duration,
            &self.sync_last_success,
            &self.sync_consecutive_failures,
            &self.sync_schedule_period,
            &self.sync_ready,
            &self.sync_deletes_held_back,
            &self.runs_in_flight,
            &self.destination_requests,
            &self.destination_throttled,
            &self.destination_ready,
            &self.reconcile_errors,
            &self.build_info,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// What one run has added to its counters so far ([`Metrics::record_progress`]), so that
/// what it publishes while it runs and at its end adds up to its totals exactly once.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Published {
    rows_read: u64,
    /// In [`ROW_SERIES`] order.
    rows: [u64; ROW_SERIES.len()],
    /// In [`AnswerClass::ALL`] order.
    answers: [u64; AnswerClass::ALL.len()],
    throttled: u64,
    throttled_seconds: f64,
}

/// A run's counts as a snapshot or its report gives them, in [`Published`]'s shape.
struct RunTotals {
    rows_read: u64,
    rows: [u64; ROW_SERIES.len()],
    answers: [u64; AnswerClass::ALL.len()],
    throttled: u64,
    throttled_seconds: f64,
}

fn answer_array(answers: &[(AnswerClass, u64)]) -> [u64; AnswerClass::ALL.len()] {
    let mut out = [0; AnswerClass::ALL.len()];
    for (class, n) in answers {
        out[*class as usize] = *n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_of_the_design_is_registered() {
        let m = Metrics::new().unwrap();
        let names = m.names();
        for name in [
            "backflow_sync_runs_total",
            "backflow_sync_rows_total",
            "backflow_sync_duration_seconds",
            "backflow_sync_last_success_timestamp_seconds",
            "backflow_destination_requests_total",
            "backflow_destination_throttled_total",
            "backflow_reconcile_errors_total",
            "backflow_sync_deletes_held_back",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
        assert!(m.render().contains("backflow_build_info{version="));
    }

    fn series(m: &Metrics, line_start: &str) -> Option<f64> {
        m.render()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn counters_move_while_a_run_goes_on_and_end_at_its_totals_counted_once() {
        use crate::engine::plan::PlanCounts;
        use crate::engine::progress::Progress;
        let m = Metrics::new().unwrap();
        let written = r#"backflow_sync_rows_total{namespace="ns",op="write",outcome="sent",sync="s"}"#;
        let read = r#"backflow_sync_rows_read_total{namespace="ns",sync="s"}"#;
        let ratio = r#"backflow_sync_run_progress_ratio{namespace="ns",sync="s"}"#;
        let progress = Progress::new();
        let mut published = Published::default();
        for _ in 0..10 {
            progress.row_read();
        }
        m.record_progress("ns", "s", "crm", &progress.snapshot(), &mut published);
        assert_eq!(series(&m, read), Some(10.0));
        assert_eq!(series(&m, ratio), Some(0.0));
        progress.delivering(8);
        progress.delivered(4, 0, 0, 0);
        m.record_progress("ns", "s", "crm", &progress.snapshot(), &mut published);
        // The same snapshot again adds nothing.
        m.record_progress("ns", "s", "crm", &progress.snapshot(), &mut published);
        assert_eq!(series(&m, written), Some(4.0));
        assert_eq!(series(&m, ratio), Some(0.5));

        let now = chrono::Utc::now();
        let report = RunReport {
            started: now,
            finished: now,
            result: RunResult::PartiallySucceeded,
            plan: PlanCounts {
                rows_in_model: 10,
                added: 8,
                unchanged: 2,
                ..PlanCounts::default()
            },
            accepted: 7,
            deleted: 0,
            rejected: 1,
            failed: 0,
            requests: 2,
            throttled: 1,
            throttled_time: std::time::Duration::from_millis(1500),
            retries: 1,
            answers: vec![(AnswerClass::Success, 2), (AnswerClass::Throttled, 1)],
            result_fingerprint: String::new(),
            rejected_samples: Vec::new(),
            plan_samples: Vec::new(),
            source_privileges: None,
            error: None,
            delete_check: None,
            spill_bytes: 0,
            cursor: None,
        };
        m.record_run("ns", "s", "crm", &report, &mut published);
        assert_eq!(series(&m, read), Some(10.0));
        assert_eq!(series(&m, written), Some(7.0));
        assert_eq!(
            series(
                &m,
                r#"backflow_sync_rows_total{namespace="ns",op="any",outcome="rejected",sync="s"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            series(
                &m,
                r#"backflow_sync_throttled_seconds_total{namespace="ns",sync="s"}"#
            ),
            Some(1.5)
        );
        assert_eq!(
            series(
                &m,
                r#"backflow_destination_requests_total{destination="crm",namespace="ns",status_class="throttled"}"#
            ),
            Some(1.0)
        );
        assert_eq!(series(&m, ratio), None, "no run in flight");
    }
}

//! `backflow describe SYNC`: everything a person asks about one sync, like `kubectl
//! describe`: spec summary, conditions, the last run, the run in flight, rejected rows, the
//! last preview, the state store and its size, the Job of the last Job-mode run, and Events.
//! A part the caller may not read (RBAC) says so instead of failing the command.

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use super::CliError;
use super::table::Table;
use super::target::{Connected, Target};
use super::text::{age, plan, progress_line, run_summary, until};
use crate::api::ReverseSync;
use crate::api::reverse_sync::{ExecutionMode, StateStoreKind};
use crate::controller::job::{self, JobState};
use crate::model::labels::{MANAGED_BY, MANAGED_BY_LABEL, SYNC_LABEL, sync_label_value};

/// Arguments of `backflow describe`.
#[derive(clap::Args)]
pub struct DescribeArgs {
    /// The ReverseSync.
    pub sync: String,
    #[command(flatten)]
    pub target: Target,
}

/// What `describe` found besides the sync; each part is the text of why it could not be
/// read when it could not.
pub struct Described {
    /// The sync.
    pub sync: ReverseSync,
    /// Its Events, oldest first.
    pub events: Result<Vec<Event>, String>,
    /// Its state ConfigMaps: how many and their bytes (ConfigMap store).
    pub configmaps: Result<(usize, u64), String>,
    /// The newest run Job of the sync (Job mode).
    pub job: Result<Option<Job>, String>,
}

/// Runs `describe`.
pub async fn run(args: DescribeArgs) -> Result<bool, CliError> {
    let connected = args.target.connect().await?;
    let sync = connected.sync(&args.sync).await?;
    let store = sync.spec.state.as_ref().map(|s| s.store).unwrap_or_default();
    let job_mode = sync.spec.execution.as_ref().map(|e| e.mode) == Some(ExecutionMode::Job);
    let described = Described {
        events: events(&connected, &args.sync).await,
        configmaps: if store == StateStoreKind::ConfigMap {
            state_size(&connected, &args.sync).await
        } else {
            Ok((0, 0))
        },
        job: if job_mode {
            newest_job(&connected, &args.sync).await
        } else {
            Ok(None)
        },
        sync,
    };
    print!("{}", render(&described, Utc::now()));
    Ok(true)
}

async fn events(connected: &Connected, name: &str) -> Result<Vec<Event>, String> {
    let api: Api<Event> = Api::namespaced(connected.client.clone(), &connected.namespace);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=ReverseSync,involvedObject.name={name}"
    ));
    let mut items = api
        .list(&params)
        .await
        .map_err(|e| format!("failed to list Events: {e}"))?
        .items;
    items.sort_by_key(|e| event_time(e).unwrap_or_default());
    Ok(items)
}

fn event_time(e: &Event) -> Option<String> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
        .or_else(|| {
            e.series
                .as_ref()
                .and_then(|s| s.last_observed_time.as_ref())
                .map(|t| t.0.to_string())
        })
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()))
}

/// Counts the state ConfigMaps and their data bytes, a page of ten at a time so a large
/// state is never held whole.
async fn state_size(connected: &Connected, name: &str) -> Result<(usize, u64), String> {
    let api: Api<ConfigMap> = Api::namespaced(connected.client.clone(), &connected.namespace);
    let selector = format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{SYNC_LABEL}={}",
        sync_label_value(name)
    );
    let mut params = ListParams::default().labels(&selector).limit(10);
    let (mut count, mut bytes) = (0usize, 0u64);
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(|e| format!("failed to list ConfigMaps: {e}"))?;
        for cm in &page.items {
            count += 1;
            let text: usize = cm.data.iter().flatten().map(|(k, v)| k.len() + v.len()).sum();
            let binary: usize = cm
                .binary_data
                .iter()
                .flatten()
                .map(|(k, v)| k.len() + v.0.len())
                .sum();
            bytes = bytes.saturating_add(u64::try_from(text.saturating_add(binary)).unwrap_or(u64::MAX));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok((count, bytes)),
        }
    }
}

async fn newest_job(connected: &Connected, name: &str) -> Result<Option<Job>, String> {
    let api: Api<Job> = Api::namespaced(connected.client.clone(), &connected.namespace);
    let selector = format!("{SYNC_LABEL}={}", sync_label_value(name));
    let jobs = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| format!("failed to list Jobs: {e}"))?;
    Ok(jobs
        .items
        .into_iter()
        .max_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0)))
}

/// Sizes as people read them: `512 B`, `3.4 KiB`, `12.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The text of `describe`.
pub fn render(d: &Described, now: DateTime<Utc>) -> String {
    let s = &d.sync;
    let name = s.name_any();
    let namespace = s.namespace().unwrap_or_default();
    let status = s.status.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<15}{v}\n", format!("{k}:")));
    line("Name", name.clone());
    line("Namespace", namespace.clone());
    line("Mode", s.spec.mode.as_str().to_owned());
    line("Destination", s.spec.destination_ref.name.clone());
    let schedule = s.spec.schedule.as_ref().map_or_else(
        || "on change or request".to_owned(),
        |sc| {
            let mut parts: Vec<String> = Vec::new();
            parts.extend(sc.interval.iter().map(|i| format!("every {i}")));
            parts.extend(sc.cron.iter().map(|c| format!("cron {c:?}")));
            if !sc.after.is_empty() {
                parts.push(format!("after {}", sc.after.join(", ")));
            }
            parts.join(", ")
        },
    );
    line("Schedule", schedule);
    let execution = s.spec.execution.as_ref().map(|e| e.mode).unwrap_or_default();
    line("Execution", format!("{execution:?}"));
    line("Suspended", s.spec.suspend.to_string());
    line(
        "Generation",
        format!(
            "{} (observed {})",
            s.metadata.generation.unwrap_or(0),
            status
                .observed_generation
                .map_or_else(|| "-".to_owned(), |g| g.to_string())
        ),
    );
    line(
        "Next run",
        if s.spec.suspend {
            "- (suspended)".to_owned()
        } else {
            until(status.next_sync_time.as_deref(), now)
        },
    );
    line(
        "Last success",
        status.last_successful_sync_time.as_deref().map_or_else(
            || "never".to_owned(),
            |t| format!("{t} ({} ago)", age(Some(t), now)),
        ),
    );
    if status.consecutive_failures > 0 {
        line("Failures", format!("{} in a row", status.consecutive_failures));
    }

    out.push_str("\nConditions:\n");
    let mut conditions = Table::new(&["type", "status", "reason", "age", "message"]);
    for c in &status.conditions {
        conditions.push(vec![
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            age(Some(&c.last_transition_time.0.to_string()), now),
            c.message.clone(),
        ]);
    }
    out.push_str(&indent(&conditions.render()));

    out.push_str("\nRun in flight:\n");
    match (&status.progress, &status.active_job) {
        (Some(p), _) => out.push_str(&format!(
            "  {} (started {} ago)\n",
            progress_line(p),
            age(Some(&p.started_at), now)
        )),
        (None, Some(job)) => out.push_str(&format!("  running in Job {job}\n")),
        (None, None) => out.push_str("  none\n"),
    }

    out.push_str("\nLast run:\n");
    match &status.last_run {
        Some(run) => out.push_str(&indent(&run_summary(&format!("{namespace}/{name}"), run))),
        None => out.push_str("  never ran\n"),
    }
    if !status.rejected_samples.is_empty() {
        out.push_str("\nRejected rows (samples of the last run):\n");
        let mut t = Table::new(&["key", "operation", "reason"]);
        for r in &status.rejected_samples {
            t.push(vec![r.key.clone(), r.operation.clone(), r.reason.clone()]);
        }
        out.push_str(&indent(&t.render()));
    }
    if let Some(p) = &status.plan {
        out.push_str(&format!(
            "\nPreview (computed {} ago):\n",
            age(Some(&p.computed_at), now)
        ));
        out.push_str(&indent(&plan(&format!("{namespace}/{name}"), p)));
    }

    out.push_str("\nState store:\n");
    let store = s.spec.state.clone().unwrap_or_default();
    match store.store {
        StateStoreKind::ConfigMap => match &d.configmaps {
            Ok((count, size)) => out.push_str(&format!(
                "  ConfigMap: {count} ConfigMaps, {} of data{}\n",
                bytes(*size),
                status
                    .state_ref
                    .as_deref()
                    .map(|r| format!(" (index {r})"))
                    .unwrap_or_default()
            )),
            Err(e) => out.push_str(&format!("  ConfigMap: size unknown ({e})\n")),
        },
        StateStoreKind::Warehouse => out.push_str(&format!(
            "  Warehouse: tables backflow_syncs and backflow_state (on PostgreSQL also backflow_state_blocks and backflow_checkpoints) in schema {:?} of the {} database; \
             their size is in the warehouse, not visible from the cluster\n",
            store.schema_or_default(),
            if store.connection_secret_ref.is_some() {
                "state connection's"
            } else {
                "source"
            }
        )),
        StateStoreKind::File => out.push_str("  File: local directory (backflow run -f only)\n"),
    }

    if execution == ExecutionMode::Job {
        out.push_str("\nLast run Job:\n");
        match &d.job {
            Ok(Some(j)) => {
                let state = match job::state(j) {
                    JobState::Running => "Running".to_owned(),
                    JobState::Succeeded => "Succeeded".to_owned(),
                    JobState::Failed(why) => format!("Failed: {why}"),
                };
                let created = j.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
                out.push_str(&format!(
                    "  {} ({state}, created {} ago; kubectl logs job/{})\n",
                    j.name_any(),
                    age(created.as_deref(), now),
                    j.name_any()
                ));
            }
            Ok(None) => out.push_str("  none (finished Jobs are deleted after their TTL)\n"),
            Err(e) => out.push_str(&format!("  unknown ({e})\n")),
        }
    }

    out.push_str("\nEvents:\n");
    match &d.events {
        Ok(events) if events.is_empty() => out.push_str("  none\n"),
        Ok(events) => {
            let mut t = Table::new(&["type", "reason", "age", "message"]);
            // The most recent ten, oldest first, as kubectl describe lists them.
            for e in events.iter().skip(events.len().saturating_sub(10)) {
                t.push(vec![
                    e.type_.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                    age(event_time(e).as_deref(), now),
                    e.message.clone().unwrap_or_default().replace('\n', " "),
                ]);
            }
            out.push_str(&indent(&t.render()));
        }
        Err(e) => out.push_str(&format!("  unknown ({e})\n")),
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::schedule::parse_time;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 + 512), "3.5 KiB");
        assert_eq!(bytes(12 * 1024 * 1024), "12.0 MiB");
    }

    #[test]
    fn describe_shows_conditions_progress_state_and_events() {
        let sync: ReverseSync = serde_yaml_ng::from_str(
            "apiVersion: backflow.dev/v1alpha1\nkind: ReverseSync\nmetadata: {name: customers, namespace: team, generation: 2}\n\
             spec:\n  source: {connectionSecretRef: {name: w}, query: q, primaryKey: [id]}\n  destinationRef: {name: crm}\n  \
             mappings: [{from: id, to: id}]\n  schedule: {interval: 15m}\n  execution: {mode: Job}\n\
             status:\n  observedGeneration: 2\n  activeJob: customers-abc\n  \
             conditions: [{type: Reconciling, status: \"True\", reason: Running, message: running in Job customers-abc, lastTransitionTime: \"2026-01-02T03:09:00Z\"}]\n  \
             progress: {startedAt: \"2026-01-02T03:09:00Z\", updatedAt: \"2026-01-02T03:09:55Z\", phase: Delivering, rowsRead: 10, rowsPlanned: 10, recordsToSend: 4, recordsSent: 2, recordsAccepted: 2, recordsRejected: 0, throttledSeconds: 0.0}\n  \
             rejectedSamples: [{key: \"7\", operation: upsert, reason: invalid email}]\n",
        )
        .unwrap();
        let event: Event = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "e", "namespace": "team"},
            "involvedObject": {"kind": "ReverseSync", "name": "customers"},
            "type": "Warning", "reason": "RowsRejected", "message": "1 rows rejected",
            "lastTimestamp": "2026-01-02T03:05:00Z"
        }))
        .unwrap();
        let d = Described {
            sync,
            events: Ok(vec![event]),
            configmaps: Ok((3, 2048)),
            job: Err("failed to list Jobs: forbidden".into()),
        };
        let text = render(&d, parse_time("2026-01-02T03:10:00Z").unwrap());
        for expected in [
            "Schedule:      every 15m\n",
            "Execution:     Job\n",
            "  Reconciling   True     Running   1m    running in Job customers-abc\n",
            "  Delivering: read 10 rows, planned 10, sent 2/4 (accepted 2, rejected 0) (started 1m ago)\n",
            "  never ran\n",
            "  7     upsert      invalid email\n",
            "  ConfigMap: 3 ConfigMaps, 2.0 KiB of data\n",
            "Last run Job:\n  unknown (failed to list Jobs: forbidden)\n",
            "  Warning   RowsRejected   5m    1 rows rejected\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }
}

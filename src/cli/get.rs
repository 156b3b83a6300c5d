//! `backflow get syncs|destinations`: a table like `kubectl get`, or the objects as JSON or
//! YAML.

use chrono::{DateTime, Utc};
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use super::table::Table;
use super::target::Target;
use super::text::{age, until};
use super::{CliError, render};
use crate::api::{Destination, ReverseSync};
use crate::controller::conditions::{self, READY};

/// Arguments of `backflow get`.
#[derive(clap::Args)]
pub struct GetArgs {
    /// What to list.
    #[arg(value_enum)]
    pub kind: Kind,
    #[command(flatten)]
    pub target: Target,
    /// List across all namespaces.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// The kinds `get` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// ReverseSyncs.
    #[value(
        alias = "sync",
        alias = "reversesyncs",
        alias = "reversesync",
        alias = "rsync"
    )]
    Syncs,
    /// Destinations.
    #[value(alias = "destination", alias = "dest")]
    Destinations,
}

/// How `get` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns.
    Table,
    /// A `v1` List of the objects, as JSON.
    Json,
    /// A `v1` List of the objects, as YAML.
    Yaml,
}

/// Runs `get`.
pub async fn run(args: GetArgs) -> Result<bool, CliError> {
    let connected = args.target.connect().await?;
    let now = Utc::now();
    let scope = if args.all_namespaces {
        "all namespaces".to_owned()
    } else {
        format!("namespace {}", connected.namespace)
    };
    let out = match args.kind {
        Kind::Syncs => {
            let api: Api<ReverseSync> = if args.all_namespaces {
                Api::all(connected.client.clone())
            } else {
                connected.syncs()
            };
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(CliError::api(format!("list ReverseSyncs in {scope}")))?;
            match args.output {
                Format::Table => syncs_table(&list.items, args.all_namespaces, now),
                f => render(&as_list(&list.items), f == Format::Yaml)?,
            }
        }
        Kind::Destinations => {
            let api: Api<Destination> = if args.all_namespaces {
                Api::all(connected.client.clone())
            } else {
                Api::namespaced(connected.client.clone(), &connected.namespace)
            };
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(CliError::api(format!("list Destinations in {scope}")))?;
            match args.output {
                Format::Table => destinations_table(&list.items, args.all_namespaces, now),
                f => render(&as_list(&list.items), f == Format::Yaml)?,
            }
        }
    };
    if out.is_empty() {
        eprintln!("No resources found in {scope}.");
    }
    print!("{out}");
    Ok(true)
}

/// The objects as a `v1` List, as `kubectl get -o json` prints several.
fn as_list<T: serde::Serialize>(items: &[T]) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The `get syncs` table; empty text when there is no sync.
pub fn syncs_table(syncs: &[ReverseSync], namespaced: bool, now: DateTime<Utc>) -> String {
    let mut headers = vec![
        "name", "ready", "mode", "last run", "added", "changed", "removed", "rejected", "age", "next run",
        "reason",
    ];
    if namespaced {
        headers.insert(0, "namespace");
    }
    let mut table = Table::new(&headers);
    for s in syncs {
        let status = s.status.clone().unwrap_or_default();
        let ready = conditions::get(&status.conditions, READY);
        let run = status.last_run.as_ref();
        let count = |f: fn(&crate::api::reverse_sync::RunSummary) -> u64| {
            run.map_or_else(|| "-".to_owned(), |r| f(r).to_string())
        };
        let last = if status.progress.is_some() || status.active_job.is_some() {
            "Running".to_owned()
        } else {
            run.map_or_else(|| "-".to_owned(), |r| r.result.clone())
        };
        let reason = match ready {
            Some(c) if c.status != "True" => c.reason.clone(),
            _ => String::new(),
        };
        let next = if s.spec.suspend {
            "suspended".to_owned()
        } else {
            until(status.next_sync_time.as_deref(), now)
        };
        let mut row = vec![
            s.name_any(),
            ready.map_or_else(|| "Unknown".to_owned(), |c| c.status.clone()),
            s.spec.mode.as_str().to_owned(),
            last,
            count(|r| r.rows_added),
            count(|r| r.rows_changed),
            count(|r| r.rows_removed),
            count(|r| r.rows_rejected),
            age(run.map(|r| r.end.as_deref().unwrap_or(&r.start)), now),
            next,
            reason,
        ];
        if namespaced {
            row.insert(0, s.namespace().unwrap_or_default());
        }
        table.push(row);
    }
    if table.is_empty() {
        String::new()
    } else {
        table.render()
    }
}

/// The `get destinations` table; empty text when there is no Destination.
pub fn destinations_table(destinations: &[Destination], namespaced: bool, now: DateTime<Utc>) -> String {
    let mut headers = vec!["name", "type", "ready", "last check", "reason"];
    if namespaced {
        headers.insert(0, "namespace");
    }
    let mut table = Table::new(&headers);
    for d in destinations {
        let status = d.status.clone().unwrap_or_default();
        let ready = conditions::get(&status.conditions, READY);
        let kind = serde_json::to_value(d.spec.destination_type)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut row = vec![
            d.name_any(),
            kind,
            ready.map_or_else(|| "Unknown".to_owned(), |c| c.status.clone()),
            age(status.last_check_time.as_deref(), now),
            match ready {
                Some(c) if c.status != "True" => c.reason.clone(),
                _ => String::new(),
            },
        ];
        if namespaced {
            row.insert(0, d.namespace().unwrap_or_default());
        }
        table.push(row);
    }
    if table.is_empty() {
        String::new()
    } else {
        table.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::schedule::parse_time;

    fn sync(name: &str, status: &str) -> ReverseSync {
        let yaml = format!(
            "apiVersion: backflow.dev/v1alpha1\nkind: ReverseSync\nmetadata: {{name: {name}, namespace: team}}\n\
             spec:\n  source: {{connectionSecretRef: {{name: w}}, query: q, primaryKey: [id]}}\n  \
             destinationRef: {{name: d}}\n  mode: mirror\n  mappings: [{{from: id, to: id}}]\n{status}"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    #[test]
    fn the_syncs_table_shows_the_last_run_the_next_and_why_not_ready() {
        let now = parse_time("2026-01-02T03:10:00Z").unwrap();
        let ok = sync(
            "customers",
            "status:\n  conditions: [{type: Ready, status: \"True\", reason: Succeeded, message: m, lastTransitionTime: \"2026-01-02T03:00:00Z\"}]\n  \
             nextSyncTime: \"2026-01-02T03:25:00Z\"\n  lastRun: {start: \"2026-01-02T03:00:00Z\", end: \"2026-01-02T03:05:00Z\", result: Succeeded, \
             rowsInModel: 100, rowsAdded: 3, rowsChanged: 2, rowsRemoved: 1, rowsUnchanged: 94, rowsRejected: 0, rowsFailed: 0, requests: 2}\n",
        );
        let failing = sync(
            "orders",
            "status:\n  conditions: [{type: Ready, status: \"False\", reason: SourceQueryFailed, message: m, lastTransitionTime: \"2026-01-02T03:00:00Z\"}]\n",
        );
        assert_eq!(
            syncs_table(&[ok, failing], false, now),
            "NAME        READY   MODE     LAST RUN    ADDED   CHANGED   REMOVED   REJECTED   AGE   NEXT RUN   REASON\n\
             customers   True    mirror   Succeeded   3       2         1         0          5m    in 15m\n\
             orders      False   mirror   -           -       -         -         -          -     -          SourceQueryFailed\n"
        );
    }

    #[test]
    fn across_namespaces_the_first_column_is_the_namespace_and_a_suspended_sync_says_so() {
        let now = parse_time("2026-01-02T03:10:00Z").unwrap();
        let mut s = sync("customers", "");
        s.spec.suspend = true;
        let text = syncs_table(&[s], true, now);
        let row = text.lines().nth(1).unwrap();
        assert!(text.starts_with("NAMESPACE   NAME"), "{text}");
        assert!(row.starts_with("team        customers   Unknown"), "{row}");
        assert!(row.ends_with("suspended"), "{row}");
        assert_eq!(syncs_table(&[], true, now), "");
    }

    #[test]
    fn the_destinations_table_shows_type_readiness_and_last_check() {
        let now = parse_time("2026-01-02T03:10:00Z").unwrap();
        let d: Destination = serde_yaml_ng::from_str(
            "apiVersion: backflow.dev/v1alpha1\nkind: Destination\nmetadata: {name: crm, namespace: team}\n\
             spec: {type: postgres, credentialsSecretRef: {name: w}, postgres: {table: crm}}\n\
             status:\n  lastCheckTime: \"2026-01-02T03:09:00Z\"\n  conditions: [{type: Ready, status: \"False\", reason: CheckFailed, message: m, lastTransitionTime: \"2026-01-02T03:00:00Z\"}]\n",
        )
        .unwrap();
        assert_eq!(
            destinations_table(&[d], false, now),
            "NAME   TYPE       READY   LAST CHECK   REASON\ncrm    postgres   False   1m           CheckFailed\n"
        );
    }
}

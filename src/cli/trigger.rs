//! `backflow trigger SYNC`: asks the operator for a run now by setting
//! `backflow.dev/requested-at` (and, with `--full-resync`, `backflow.dev/full-resync` to the
//! same value, so it applies to this request only), then optionally follows that run.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::follow::{request_value, run_answering};
use super::progress::ProgressView;
use super::target::Target;
use super::text::run_summary;
use super::{CliError, parse_timeout};
use crate::controller::schedule::{FULL_RESYNC, REQUESTED_AT};

/// Arguments of `backflow trigger`.
#[derive(clap::Args)]
pub struct TriggerArgs {
    /// The ReverseSync to run.
    pub sync: String,
    #[command(flatten)]
    pub target: Target,
    /// Ignore the stored fingerprints for this run and send every row again.
    #[arg(long)]
    pub full_resync: bool,
    /// Follow the run to its end, print its summary, and exit non-zero if it failed.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with `--wait`, like `90s`, `30m` or `2h` (exit non-zero when it runs out;
    /// the run goes on).
    #[arg(long, requires = "wait", default_value = "30m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// Runs `trigger`.
pub async fn run(args: TriggerArgs) -> Result<bool, CliError> {
    let connected = args.target.connect().await?;
    let name = args.sync.as_str();
    let namespace = connected.namespace.clone();
    let sync = connected.sync(name).await?;
    if sync.spec.suspend {
        return Err(CliError::Suspended {
            namespace,
            name: name.to_owned(),
        });
    }
    let value = request_value();
    let mut annotations = serde_json::Map::new();
    annotations.insert(REQUESTED_AT.to_owned(), json!(value));
    if args.full_resync {
        annotations.insert(FULL_RESYNC.to_owned(), json!(value));
    }
    let patch = json!({"metadata": {"annotations": annotations}});
    connected
        .syncs()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(CliError::api(format!("annotate ReverseSync {namespace}/{name}")))?;
    let what = if args.full_resync {
        "a full resync"
    } else {
        "a run"
    };
    eprintln!("requested {what} of {namespace}/{name} ({REQUESTED_AT}={value})");
    if !args.wait {
        return Ok(true);
    }
    let mut view = ProgressView::for_stderr();
    let summary = run_answering(&connected, name, &value, args.timeout, &mut view).await?;
    print!("{}", run_summary(&format!("{namespace}/{name}"), &summary));
    Ok(summary.result != "Failed")
}

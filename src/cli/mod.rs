//! The commands a data team runs against the cluster: `get`, `trigger`, `preview`,
//! `suspend`, `resume` and `describe`, plus `completion`. They talk to the API server with the
//! current kubeconfig context (or `--context`) and need only the RBAC of the data-team Role
//! (`config/rbac/data-team-role.yaml`): the operator does the work, these commands set
//! annotations, patch `spec.suspend` and read status.

pub mod completion;
pub mod describe;
pub mod follow;
pub mod get;
pub mod preview;
pub mod progress;
pub mod suspend;
pub mod table;
pub mod target;
pub mod text;
pub mod trigger;

use std::time::Duration;

/// The cluster commands, flattened into the `backflow` command line.
#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// List ReverseSyncs or Destinations: readiness, mode, last run, next run, and the reason
    /// when not Ready.
    Get(get::GetArgs),
    /// Start a run of a sync now (the `backflow.dev/requested-at` annotation); with `--wait`,
    /// follow that run to its end and exit non-zero if it failed.
    Trigger(trigger::TriggerArgs),
    /// Dry-run a sync as it stands: what a run would send, without sending anything, changing
    /// state or editing the spec (the operator answers the `backflow.dev/preview-requested-at`
    /// annotation in `status.plan`).
    Preview(preview::PreviewArgs),
    /// Pause a sync: sets `spec.suspend: true`. This edits the spec, as `flux suspend` does: a
    /// GitOps tool that owns the object sets it back unless the manifest says so too.
    Suspend(suspend::SuspendArgs),
    /// Let a suspended sync run again: sets `spec.suspend: false` (edits the spec, as `flux
    /// resume` does).
    Resume(suspend::SuspendArgs),
    /// Show a sync in detail: conditions, last run, progress of a run in flight, rejected rows,
    /// preview, state store and its size, the Job of the last Job-mode run, and Events.
    Describe(describe::DescribeArgs),
}

/// Why a cluster command failed. The cause of a variant is its `#[source]`, printed after the
/// message by the binary (`{:#}`), not repeated in it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("failed to configure the Kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster)")]
    Config {
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The object does not exist.
    #[error("failed to find {kind} {name:?} in namespace {namespace:?}")]
    NotFound {
        /// `ReverseSync` or `Destination`.
        kind: &'static str,
        /// Namespace looked in.
        namespace: String,
        /// Name looked for.
        name: String,
    },
    /// The API server refused or failed a request.
    #[error("failed to {action}")]
    Api {
        /// What was attempted, naming the object.
        action: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The sync is suspended: no run starts.
    #[error(
        "ReverseSync {namespace}/{name} is suspended (spec.suspend): no run starts; `backflow resume {name}` first"
    )]
    Suspended {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The wait ran out.
    #[error("timed out after {} waiting for {what}; it goes on in the cluster (`backflow describe {name}`)", humantime::format_duration(*.after))]
    Timeout {
        /// What was awaited.
        what: String,
        /// The sync's name.
        name: String,
        /// How long was waited.
        after: Duration,
    },
    /// The object went away while followed.
    #[error("ReverseSync {namespace}/{name} was deleted while {what}")]
    Deleted {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What was going on.
        what: &'static str,
    },
    /// Output could not be rendered.
    #[error("failed to render the output as {format}: {reason}")]
    Render {
        /// `json` or `yaml`.
        format: &'static str,
        /// The serializer's message.
        reason: String,
    },
}

impl CliError {
    fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> CliError {
        let action = action.into();
        move |source| CliError::Api { action, source }
    }
}

/// Runs a cluster command; `Ok(false)` when it ran but reports a failure (a failed run or
/// preview), which the binary turns into a non-zero exit.
pub async fn run(command: ClusterCommand) -> Result<bool, CliError> {
    match command {
        ClusterCommand::Get(args) => get::run(args).await,
        ClusterCommand::Trigger(args) => trigger::run(args).await,
        ClusterCommand::Preview(args) => preview::run(args).await,
        ClusterCommand::Suspend(args) => suspend::run(args, true).await,
        ClusterCommand::Resume(args) => suspend::run(args, false).await,
        ClusterCommand::Describe(args) => describe::run(args).await,
    }
}

/// Parses a `--timeout` value like `30m` or `1h30m`.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("not a duration like 90s, 15m or 1h: {e}"))
}

/// Renders `value` as pretty JSON or YAML.
pub fn render<T: serde::Serialize>(value: &T, yaml: bool) -> Result<String, CliError> {
    if yaml {
        serde_yaml_ng::to_string(value).map_err(|e| CliError::Render {
            format: "yaml",
            reason: e.to_string(),
        })
    } else {
        serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| CliError::Render {
                format: "json",
                reason: e.to_string(),
            })
    }
}

//! `backflow preview SYNC`: a dry run of the sync as it stands. It sets
//! `backflow.dev/preview-requested-at`, which the operator answers by planning the sync
//! without sending anything or changing state, in `status.plan` with the value echoed. The
//! spec is not touched, so Argo CD and Flux see no drift.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::follow::{preview_answering, request_value};
use super::progress::ProgressView;
use super::target::Target;
use super::text::plan;
use super::{CliError, parse_timeout, render};
use crate::controller::schedule::PREVIEW_REQUESTED_AT;

/// Arguments of `backflow preview`.
#[derive(clap::Args)]
pub struct PreviewArgs {
    /// The ReverseSync to preview.
    pub sync: String,
    #[command(flatten)]
    pub target: Target,
    /// Longest wait for the operator's answer, like `90s` or `10m`.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Output format: text like `backflow run --dry-run`, or the `status.plan` object.
    #[arg(short = 'o', long, value_enum, default_value_t = PreviewFormat::Text)]
    pub output: PreviewFormat,
}

/// How `preview` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewFormat {
    /// Counts and sample keys per operation, and delete-guard warnings.
    Text,
    /// `status.plan` as JSON.
    Json,
    /// `status.plan` as YAML.
    Yaml,
}

/// Runs `preview`; `Ok(false)` when the operator could not compute the preview.
pub async fn run(args: PreviewArgs) -> Result<bool, CliError> {
    let connected = args.target.connect().await?;
    let name = args.sync.as_str();
    let namespace = connected.namespace.clone();
    connected.sync(name).await?;
    let value = request_value();
    let patch = json!({"metadata": {"annotations": {PREVIEW_REQUESTED_AT: value}}});
    connected
        .syncs()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(CliError::api(format!("annotate ReverseSync {namespace}/{name}")))?;
    let mut view = ProgressView::for_stderr();
    let preview = preview_answering(&connected, name, &value, args.timeout, &mut view).await?;
    match args.output {
        PreviewFormat::Text => print!("{}", plan(&format!("{namespace}/{name}"), &preview)),
        f => print!("{}", render(&preview, f == PreviewFormat::Yaml)?),
    }
    Ok(preview.error.is_none())
}

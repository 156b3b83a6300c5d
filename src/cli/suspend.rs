//! `backflow suspend SYNC` and `backflow resume SYNC`: set `spec.suspend`. This edits the spec
//! (as `flux suspend` does): a GitOps tool that owns the object reverts it unless the
//! manifest in the repository says the same.

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::CliError;
use super::target::Target;

/// Arguments of `backflow suspend` and `backflow resume`.
#[derive(clap::Args)]
pub struct SuspendArgs {
    /// The ReverseSync.
    pub sync: String,
    #[command(flatten)]
    pub target: Target,
}

/// Sets `spec.suspend` to `suspend`.
pub async fn run(args: SuspendArgs, suspend: bool) -> Result<bool, CliError> {
    let connected = args.target.connect().await?;
    let name = args.sync.as_str();
    let namespace = connected.namespace.clone();
    connected.sync(name).await?;
    let patch = json!({"spec": {"suspend": suspend}});
    connected
        .syncs()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(CliError::api(format!(
            "patch spec.suspend of ReverseSync {namespace}/{name}"
        )))?;
    if suspend {
        println!("suspended {namespace}/{name} (spec.suspend: true); a run in flight finishes");
    } else {
        println!("resumed {namespace}/{name} (spec.suspend: false)");
    }
    Ok(true)
}

//! `backflow run --namespace NS --sync NAME`: one run of one sync inside the cluster, as a
//! Job-mode pod runs it. It reads the objects from the API server, runs once, writes the
//! status, state and Events itself, and exits.

use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::runner::{self, RunEnv, RunPolicy};
use super::schedule::Trigger;
use super::status::Outcome;
use crate::api::ReverseSync;
use crate::destination::delivery::rate_limit::Limiters;
use crate::metrics::Metrics;

/// Why a cluster run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterRunError {
    /// The ReverseSync does not exist.
    #[error("failed to find ReverseSync {name:?} in namespace {namespace:?}")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The API server could not be reached.
    #[error("failed to read ReverseSync {namespace}/{name}: {reason}")]
    Api {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The metrics registry could not be built.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Parses the `--trigger` value the operator passes to a Job.
pub fn parse_trigger(text: &str) -> Trigger {
    match text {
        "Schedule" => Trigger::Schedule,
        "After" => Trigger::After,
        "Retry" => Trigger::Retry,
        "Requested" => Trigger::Requested(String::new()),
        _ => Trigger::SpecChanged,
    }
}

/// A Job's `--trigger Requested` carries no value: the request it answers is the one the
/// operator marked handled when it created the Job (no other run starts while the Job runs),
/// which says whether the run is a full resync and which request its summary answers.
pub fn requested_value(trigger: Trigger, sync: &ReverseSync) -> Trigger {
    match trigger {
        Trigger::Requested(v) if v.is_empty() => Trigger::Requested(
            sync.status
                .as_ref()
                .and_then(|s| s.last_handled_requested_at.clone())
                .unwrap_or_default(),
        ),
        other => other,
    }
}

/// Runs `namespace/name` once under `policy` (the operator's, passed on in the Job's
/// arguments) and records the outcome on the resource.
pub async fn run_in_cluster(
    client: Client,
    namespace: &str,
    name: &str,
    trigger: Trigger,
    identity: &str,
    policy: RunPolicy,
    cancel: CancellationToken,
) -> Result<Outcome, ClusterRunError> {
    let api: Api<ReverseSync> = Api::namespaced(client.clone(), namespace);
    let sync = api
        .get_opt(name)
        .await
        .map_err(|e| ClusterRunError::Api {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| ClusterRunError::NotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })?;
    let env = RunEnv {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: super::CONTROLLER_NAME.to_owned(),
                instance: Some(identity.to_owned()),
            },
        ),
        client,
        metrics: Metrics::new()?,
        limiters: std::sync::Arc::new(Limiters::default()),
        policy,
        custom_connectors: crate::engine::setup::CustomConnectors::default(),
    };
    let trigger = requested_value(trigger, &sync);
    let how = format!("running in pod {identity}");
    let span =
        tracing::info_span!("run", namespace = %namespace, sync = %name, run_id = %uuid::Uuid::new_v4());
    let run = runner::execute(&env, &sync, &trigger, &how, cancel);
    Ok(tracing::Instrument::instrument(run, span).await.outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_pods_requested_run_answers_the_request_the_operator_marked_handled() {
        let mut sync: ReverseSync = serde_yaml_ng::from_str(
            "apiVersion: backflow.dev/v1alpha1\nkind: ReverseSync\nmetadata: {name: s, namespace: ns}\n\
             spec:\n  source: {connectionSecretRef: {name: w}, query: q, primaryKey: [id]}\n  \
             destinationRef: {name: d}\n  mappings: [{from: id, to: id}]\n\
             status: {lastHandledRequestedAt: \"t-2\"}\n",
        )
        .unwrap();
        assert_eq!(
            requested_value(parse_trigger("Requested"), &sync),
            Trigger::Requested("t-2".into())
        );
        assert_eq!(
            requested_value(parse_trigger("Schedule"), &sync),
            Trigger::Schedule
        );
        sync.status = None;
        assert_eq!(
            requested_value(parse_trigger("Requested"), &sync),
            Trigger::Requested(String::new())
        );
    }
}

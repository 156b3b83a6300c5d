//! Job mode: each run is a `batch/v1` Job running `backflow run --namespace NS --sync NAME`,
//! which writes the status and state itself. The operator creates the Job and reflects a Job
//! that failed before recording its run.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, Event as CoreEvent, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccount, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use xxhash_rust::xxh3::xxh3_64;

use super::runner::RunPolicy;
use super::schedule::Trigger;
use crate::api::ReverseSync;
use crate::model::labels::{MANAGED_BY, MANAGED_BY_LABEL, SYNC_LABEL, sync_label_value};

/// Operator-wide defaults of run Jobs (flags of `backflow operator`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobDefaults {
    /// Image running `backflow run` (normally the operator's own).
    pub image: String,
    /// Service account of run pods.
    pub service_account: Option<String>,
    /// Seconds a finished Job is kept before Kubernetes deletes it.
    pub ttl_seconds_after_finished: i32,
    /// Pod retries before the Job fails (0: a failed run is retried by the operator's own
    /// backoff, with a fresh Job).
    pub backoff_limit: i32,
    /// Compute resources of the run container.
    pub resources: Option<ResourceRequirements>,
    /// Node labels run pods must match.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of run pods.
    pub tolerations: Option<Vec<Toleration>>,
    /// Extra arguments before `run` (the log format).
    pub log_format: Option<String>,
    /// Images a sync's `jobTemplate.image` may name besides [`JobDefaults::image`].
    pub allowed_images: Vec<String>,
    /// ServiceAccounts a sync's `jobTemplate.serviceAccountName` may name besides
    /// [`JobDefaults::service_account`].
    pub allowed_service_accounts: Vec<String>,
    /// Whether a sync's `jobTemplate.nodeSelector` and `tolerations` are honoured (off: run
    /// pods go where the operator's own settings place them).
    pub allow_placement: bool,
    /// Size limit of the run pod's `/tmp` (an emptyDir), as a quantity such as `4Gi`.
    pub tmp_size_limit: Option<String>,
    /// The egress rules the run pod applies (`--egress-deny`); `None` leaves its default.
    pub egress_deny: Option<Vec<String>>,
}

/// Why a sync's `jobTemplate` asks for what the operator does not allow. Each is `Stalled`
/// until the spec or the operator's allow-lists change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobOverrideError {
    /// An image outside the allow-list.
    #[error(
        "spec.execution.jobTemplate.image {image:?} is not allowed: this operator runs Job pods with {allowed} (its --job-image and --job-allowed-images)"
    )]
    Image {
        /// The image asked for.
        image: String,
        /// The allowed images, quoted.
        allowed: String,
    },
    /// A ServiceAccount outside the allow-list.
    #[error(
        "spec.execution.jobTemplate.serviceAccountName {name:?} is not allowed: this operator runs Job pods as {allowed} (its --job-service-account and --job-allowed-service-accounts)"
    )]
    ServiceAccount {
        /// The ServiceAccount asked for.
        name: String,
        /// The allowed ServiceAccounts, quoted.
        allowed: String,
    },
    /// A node selector or tolerations while placement overrides are off.
    #[error(
        "spec.execution.jobTemplate.{field} is not allowed: this operator places run pods itself (--job-node-selector, --job-tolerations; --job-allow-placement lets syncs choose)"
    )]
    Placement {
        /// `nodeSelector` or `tolerations`.
        field: &'static str,
    },
}

impl JobOverrideError {
    /// The condition reason.
    pub fn category(&self) -> &'static str {
        match self {
            JobOverrideError::Image { .. } => "JobImageNotAllowed",
            JobOverrideError::ServiceAccount { .. } => "JobServiceAccountNotAllowed",
            JobOverrideError::Placement { .. } => "JobPlacementNotAllowed",
        }
    }
}

/// Refuses a `jobTemplate` that names an image or ServiceAccount outside the operator's
/// allow-lists, or places pods while placement overrides are off. A sync author could
/// otherwise run any image under any ServiceAccount of the namespace, on any node.
pub fn check_overrides(sync: &ReverseSync, defaults: &JobDefaults) -> Result<(), JobOverrideError> {
    let Some(template) = sync.spec.execution.as_ref().and_then(|e| e.job_template.as_ref()) else {
        return Ok(());
    };
    let quoted = |items: Vec<&String>| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(image) = &template.image {
        let allowed: Vec<&String> = std::iter::once(&defaults.image)
            .chain(&defaults.allowed_images)
            .collect();
        if !allowed.contains(&image) {
            return Err(JobOverrideError::Image {
                image: image.clone(),
                allowed: quoted(allowed),
            });
        }
    }
    if let Some(name) = &template.service_account_name {
        let allowed: Vec<&String> = defaults
            .service_account
            .iter()
            .chain(&defaults.allowed_service_accounts)
            .collect();
        if !allowed.contains(&name) {
            return Err(JobOverrideError::ServiceAccount {
                name: name.clone(),
                allowed: if allowed.is_empty() {
                    "the namespace's default ServiceAccount".to_owned()
                } else {
                    quoted(allowed)
                },
            });
        }
    }
    if !defaults.allow_placement {
        if template.node_selector.is_some() {
            return Err(JobOverrideError::Placement {
                field: "nodeSelector",
            });
        }
        if template.tolerations.is_some() {
            return Err(JobOverrideError::Placement { field: "tolerations" });
        }
    }
    Ok(())
}

/// The deterministic name of the Job of one run: the sync's name (cut to fit) and a hash of
/// the sync's uid and what triggered the run, so a repeated reconcile finds the same Job
/// instead of creating a second.
pub fn name(sync: &ReverseSync, run_key: &str) -> String {
    let uid = sync.metadata.uid.as_deref().unwrap_or_default();
    let hash = xxh3_64(format!("{uid}/{run_key}").as_bytes());
    let base = sync.name_any();
    // Job names become pod labels (`job-name`): at most 63 characters.
    let cut: String = base.chars().take(63 - 1 - 10).collect();
    format!("{}-{:010x}", cut.trim_end_matches('-'), hash & 0xff_ffff_ffff)
}

/// The `--trigger` argument of a run Job's container.
pub fn trigger_arg(job: &Job) -> Option<&str> {
    let pod = job.spec.as_ref()?.template.spec.as_ref()?;
    let args = pod.containers.first()?.args.as_ref()?;
    let at = args.iter().position(|a| a == "--trigger")?;
    args.get(at + 1).map(String::as_str)
}

/// The key of a run: the same trigger at the same moment gives the same key.
pub fn run_key(sync: &ReverseSync, trigger: &Trigger) -> String {
    let generation = sync.metadata.generation.unwrap_or(0);
    let status = sync.status.clone().unwrap_or_default();
    let last = status.last_run.map(|r| r.start).unwrap_or_default();
    match trigger {
        Trigger::Requested(v) => format!("requested/{v}"),
        other => format!("{}/{generation}/{last}", other.as_str()),
    }
}

/// Builds the Job of one run; its pod runs under the operator's `policy` (passed on as
/// `--secret-access`, `--allow-sqlite`, `--cluster-name`, `--progress-interval-seconds`).
pub fn build(sync: &ReverseSync, trigger: &Trigger, defaults: &JobDefaults, policy: &RunPolicy) -> Job {
    let namespace = sync.namespace().unwrap_or_default();
    let sync_name = sync.name_any();
    let overrides = sync
        .spec
        .execution
        .as_ref()
        .and_then(|e| e.job_template.clone())
        .unwrap_or_default();
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "backflow".to_owned()),
        ("app.kubernetes.io/component".to_owned(), "sync-run".to_owned()),
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (SYNC_LABEL.to_owned(), sync_label_value(&sync_name)),
    ]);
    let mut args = Vec::new();
    if let Some(format) = &defaults.log_format {
        args.extend(["--log-format".to_owned(), format.clone()]);
    }
    if let Some(rules) = &defaults.egress_deny {
        args.push(format!("--egress-deny={}", rules.join(",")));
    }
    args.extend([
        "run".to_owned(),
        "--namespace".to_owned(),
        namespace.clone(),
        "--sync".to_owned(),
        sync_name.clone(),
        "--trigger".to_owned(),
        trigger.as_str().to_owned(),
        format!("--secret-access={}", policy.secret_access.as_str()),
    ]);
    if policy.allow_sqlite {
        args.push("--allow-sqlite".to_owned());
    }
    if let Some(cluster) = &policy.cluster_name {
        args.push(format!("--cluster-name={cluster}"));
    }
    if policy.progress_interval != super::runner::DEFAULT_PROGRESS_INTERVAL {
        // Whole seconds, as the flag takes them (at least one).
        let seconds = policy.progress_interval.as_secs().max(1);
        args.push(format!("--progress-interval-seconds={seconds}"));
    }
    let pod_field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            ..ObjectFieldSelector::default()
        }),
        ..EnvVarSource::default()
    };
    let container = Container {
        name: "run".to_owned(),
        image: Some(overrides.image.clone().unwrap_or_else(|| defaults.image.clone())),
        args: Some(args),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".to_owned(),
                value_from: Some(pod_field("metadata.name")),
                ..EnvVar::default()
            },
            EnvVar {
                name: "POD_NAMESPACE".to_owned(),
                value_from: Some(pod_field("metadata.namespace")),
                ..EnvVar::default()
            },
        ]),
        resources: overrides.resources.clone().or_else(|| defaults.resources.clone()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(name(sync, &run_key(sync, trigger))),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            owner_references: sync.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(overrides.backoff_limit.unwrap_or(defaults.backoff_limit)),
            ttl_seconds_after_finished: Some(defaults.ttl_seconds_after_finished),
            active_deadline_seconds: overrides.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    service_account_name: overrides
                        .service_account_name
                        .clone()
                        .or_else(|| defaults.service_account.clone()),
                    node_selector: overrides
                        .node_selector
                        .clone()
                        .filter(|_| defaults.allow_placement)
                        .or_else(|| defaults.node_selector.clone()),
                    tolerations: overrides
                        .tolerations
                        .clone()
                        .filter(|_| defaults.allow_placement)
                        .or_else(|| defaults.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    // The spill file of planned rows lives in the temp dir.
                    // Bounded, so a run that spills without end is evicted rather than filling
                    // the node's disk.
                    volumes: Some(vec![k8s_openapi::api::core::v1::Volume {
                        name: "tmp".to_owned(),
                        empty_dir: Some(k8s_openapi::api::core::v1::EmptyDirVolumeSource {
                            size_limit: defaults
                                .tmp_size_limit
                                .clone()
                                .map(k8s_openapi::apimachinery::pkg::api::resource::Quantity),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    containers: vec![Container {
                        volume_mounts: Some(vec![k8s_openapi::api::core::v1::VolumeMount {
                            name: "tmp".to_owned(),
                            mount_path: "/tmp".to_owned(),
                            ..Default::default()
                        }]),
                        ..container
                    }],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

/// Where a Job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Still running (or waiting for a node).
    Running,
    /// Finished successfully.
    Succeeded,
    /// Failed: the reason and message of its `Failed` condition.
    Failed(String),
}

/// Reads a Job's state from its status.
pub fn state(job: &Job) -> JobState {
    let Some(status) = &job.status else {
        return JobState::Running;
    };
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let is = |t: &str| conditions.iter().find(|c| c.type_ == t && c.status == "True");
    if is("Complete").is_some() || status.succeeded.unwrap_or(0) > 0 {
        return JobState::Succeeded;
    }
    if let Some(c) = is("Failed") {
        let reason = c.reason.clone().unwrap_or_else(|| "Failed".to_owned());
        let message = c.message.clone().unwrap_or_default();
        return JobState::Failed(if message.is_empty() {
            reason
        } else {
            format!("{reason}: {message}")
        });
    }
    JobState::Running
}

/// Why a Job-mode run cannot go on, for the sync's condition and Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The condition and Event reason.
    pub reason: &'static str,
    /// What is wrong.
    pub cause: String,
    /// What fixes it.
    pub fix: String,
}

impl Blocked {
    /// The condition and Event message: the cause, then the fix.
    pub fn message(&self) -> String {
        format!("{}; {}", self.cause, self.fix)
    }
}

/// Reason when the run pods' ServiceAccount does not exist.
pub const RUN_SERVICE_ACCOUNT_MISSING: &str = "RunServiceAccountMissing";
/// Reason when the Job controller cannot create the run pod.
pub const RUN_POD_NOT_CREATED: &str = "RunPodNotCreated";

fn service_account_fix(namespace: &str, account: &str) -> String {
    format!(
        "create ServiceAccount {account} in namespace {namespace} and bind it to ClusterRole \
         backflow-run with a RoleBinding (see docs/operations.md, \"Job mode\"), or set \
         spec.execution.jobTemplate.serviceAccountName to an account that exists"
    )
}

/// The ServiceAccount of `job`'s pod, when it is missing: without it the Job controller can
/// create no pod. `None` when it exists, or when the check itself fails (logged; the Job's
/// own `FailedCreate` Events are read later anyway).
pub async fn check_service_account(client: &Client, job: &Job) -> Option<Blocked> {
    let namespace = job.namespace().unwrap_or_default();
    let account = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    match accounts.get_opt(&account).await {
        Ok(Some(_)) => None,
        Ok(None) => Some(Blocked {
            reason: RUN_SERVICE_ACCOUNT_MISSING,
            cause: format!(
                "the run pods' ServiceAccount {namespace}/{account} does not exist, so the run Job could create no pod"
            ),
            fix: service_account_fix(&namespace, &account),
        }),
        Err(e) => {
            tracing::debug!(error = %e, account = %account, "failed to check the run ServiceAccount");
            None
        }
    }
}

/// True while a Job has no pod running, finished or failed.
pub fn has_no_pod(job: &Job) -> bool {
    let status = job.status.clone().unwrap_or_default();
    status.active.unwrap_or(0) == 0 && status.succeeded.unwrap_or(0) == 0 && status.failed.unwrap_or(0) == 0
}

/// The latest `FailedCreate` Event of `job` (the Job controller could not create its pod),
/// if any.
pub async fn pod_creation_failure(client: &Client, job: &Job) -> Option<Blocked> {
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), &namespace);
    let params = ListParams::default().fields(&format!("involvedObject.kind=Job,involvedObject.name={name}"));
    let list = match events.list(&params).await {
        Ok(list) => list,
        Err(e) => {
            tracing::debug!(error = %e, job = %name, "failed to read the run Job's Events");
            return None;
        }
    };
    let failed = list
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .max_by_key(|e| e.last_timestamp.clone().map(|t| t.0))?;
    let text = failed.message.unwrap_or_default();
    let account = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let fix = if text.contains("service account") {
        service_account_fix(&namespace, &account)
    } else {
        "fix the cause; the Job controller keeps trying until the Job's deadline \
         (spec.execution.jobTemplate.activeDeadlineSeconds)"
            .to_owned()
    };
    Some(Blocked {
        reason: RUN_POD_NOT_CREATED,
        cause: format!(
            "run Job {name} cannot create its pod: {}",
            text.chars().take(400).collect::<String>()
        ),
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(name: &str) -> ReverseSync {
        let yaml = format!(
            "apiVersion: backflow.dev/v1alpha1\nkind: ReverseSync\nmetadata: {{name: {name}, namespace: ns, uid: u-1, generation: 2}}\n\
             spec:\n  source: {{connectionSecretRef: {{name: w}}, query: q, primaryKey: [id]}}\n  \
             destinationRef: {{name: d}}\n  mappings: [{{from: id, to: id}}]\n  \
             execution: {{mode: Job, jobTemplate: {{image: custom:1, backoffLimit: 2, nodeSelector: {{pool: etl}}}}}}\n"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    #[test]
    fn the_job_runs_the_sync_with_its_overrides_and_a_stable_name() {
        let s = sync("customers");
        let defaults = JobDefaults {
            image: "backflow:0.1".into(),
            service_account: Some("backflow-run".into()),
            ttl_seconds_after_finished: 3600,
            allowed_images: vec!["custom:1".into()],
            allow_placement: true,
            tmp_size_limit: Some("2Gi".into()),
            ..JobDefaults::default()
        };
        assert_eq!(check_overrides(&s, &defaults), Ok(()));
        let job = build(&s, &Trigger::Schedule, &defaults, &RunPolicy::default());
        let again = build(&s, &Trigger::Schedule, &defaults, &RunPolicy::default());
        assert_eq!(job.metadata.name, again.metadata.name, "deterministic per run");
        assert_ne!(
            job.metadata.name,
            build(
                &s,
                &Trigger::Requested("x".into()),
                &defaults,
                &RunPolicy::default()
            )
            .metadata
            .name
        );
        let name = job.metadata.name.clone().unwrap();
        assert!(name.starts_with("customers-") && name.len() <= 63, "{name}");
        let spec = job.spec.unwrap();
        assert_eq!(
            (spec.backoff_limit, spec.ttl_seconds_after_finished),
            (Some(2), Some(3600))
        );
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("custom:1"));
        assert_eq!(
            c.args.clone().unwrap(),
            [
                "run",
                "--namespace",
                "ns",
                "--sync",
                "customers",
                "--trigger",
                "Schedule",
                "--secret-access=granted"
            ]
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("backflow-run"));
        assert_eq!(pod.node_selector.unwrap()["pool"], "etl");
        let tmp = pod.volumes.unwrap()[0].empty_dir.clone().unwrap();
        assert_eq!(tmp.size_limit.unwrap().0, "2Gi");
        assert_eq!(job.metadata.owner_references.unwrap()[0].controller, Some(true));
    }

    #[test]
    fn images_service_accounts_and_placement_outside_the_allow_lists_are_refused() {
        let s = sync("customers");
        let defaults = JobDefaults {
            image: "backflow:0.1".into(),
            service_account: Some("backflow-run".into()),
            ..JobDefaults::default()
        };
        let err = check_overrides(&s, &defaults).unwrap_err();
        assert_eq!(err.category(), "JobImageNotAllowed");
        assert!(
            err.to_string().contains("\"custom:1\"") && err.to_string().contains("\"backflow:0.1\""),
            "{err}"
        );
        let images = JobDefaults {
            allowed_images: vec!["custom:1".into()],
            ..defaults.clone()
        };
        assert_eq!(
            check_overrides(&s, &images),
            Err(JobOverrideError::Placement {
                field: "nodeSelector"
            })
        );
        // Without the check, the sync's placement is ignored rather than obeyed.
        let pod = build(&s, &Trigger::Schedule, &images, &RunPolicy::default())
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(pod.node_selector, None);
        let mut other_sa = s.clone();
        other_sa
            .spec
            .execution
            .as_mut()
            .unwrap()
            .job_template
            .as_mut()
            .unwrap()
            .service_account_name = Some("admin".into());
        let all = JobDefaults {
            allow_placement: true,
            ..images
        };
        assert_eq!(
            check_overrides(&other_sa, &all).unwrap_err().category(),
            "JobServiceAccountNotAllowed"
        );
    }

    #[test]
    fn run_pods_apply_the_operators_egress_rules() {
        let defaults = JobDefaults {
            egress_deny: Some(vec!["169.254.0.0/16".into(), "loopback".into()]),
            ..JobDefaults::default()
        };
        let job = build(
            &sync("customers"),
            &Trigger::Schedule,
            &defaults,
            &RunPolicy::default(),
        );
        let args = job.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        assert_eq!(args[0], "--egress-deny=169.254.0.0/16,loopback");
        assert_eq!(args[1], "run", "a global flag, before the subcommand");
    }

    #[test]
    fn run_pods_write_progress_at_the_operators_interval() {
        let args = |policy: &RunPolicy| {
            build(
                &sync("customers"),
                &Trigger::Schedule,
                &JobDefaults::default(),
                policy,
            )
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
                .args
                .clone()
                .unwrap()
        };
        let default = args(&RunPolicy::default());
        assert!(!default.iter().any(|a| a.starts_with("--progress-interval")));
        let slower = args(&RunPolicy {
            progress_interval: std::time::Duration::from_secs(30),
            ..RunPolicy::default()
        });
        assert_eq!(slower.last().unwrap(), "--progress-interval-seconds=30");
    }

    #[test]
    fn long_names_fit_in_labels_and_job_names() {
        let long = "a".repeat(200);
        let s = sync(&long);
        let job = build(
            &s,
            &Trigger::Schedule,
            &JobDefaults::default(),
            &RunPolicy::default(),
        );
        assert!(job.metadata.name.unwrap().len() <= 63);
        assert!(job.metadata.labels.unwrap()[SYNC_LABEL].len() <= 63);
    }

    #[test]
    fn job_states_come_from_conditions() {
        let mut job = Job::default();
        assert_eq!(state(&job), JobState::Running);
        job.status = Some(
            serde_json::from_value(serde_json::json!({
                "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                "message": "Job was active longer than specified deadline"}]
            }))
            .unwrap(),
        );
        assert_eq!(
            state(&job),
            JobState::Failed("DeadlineExceeded: Job was active longer than specified deadline".into())
        );
        job.status = Some(serde_json::from_value(serde_json::json!({"succeeded": 1})).unwrap());
        assert_eq!(state(&job), JobState::Succeeded);
    }
}

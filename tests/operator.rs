//! The operator end to end: real controllers and a real `kube::Client` over the in-memory API
//! server double (`support::apiserver`), a SQLite warehouse (PostgreSQL where a test needs a
//! real database, such as the Warehouse state store's), and an HTTP destination double.

mod support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use backflow::api::{Destination, ReverseSync};
use backflow::controller::job::JobDefaults;
use backflow::controller::resolve::SecretAccess;
use backflow::controller::{Health, OperatorConfig, run_controllers};
use backflow::metrics::Metrics;
use support::apiserver::ApiServer;
use support::http_server::{Behaviour, HttpDouble};
use support::sqlite::TempSqlite;

const NS: &str = "team-a";

/// A running operator over the API double, with a warehouse and a webhook double.
struct Harness {
    /// Kept alive for the test's length.
    _server: ApiServer,
    client: Client,
    warehouse: TempSqlite,
    webhook: HttpDouble,
    metrics: Metrics,
    health: Health,
    stop: CancellationToken,
    operator: Option<tokio::task::JoinHandle<()>>,
}

fn config() -> OperatorConfig {
    OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        namespaces: vec![],
        leader_election: false,
        lease_name: "backflow-operator".into(),
        lease_namespace: "backflow-system".into(),
        identity: "test-operator".into(),
        lease_duration: Duration::from_secs(2),
        max_concurrent_runs: 2,
        job: JobDefaults {
            image: "backflow:test".into(),
            service_account: Some("backflow-run".into()),
            ttl_seconds_after_finished: 600,
            ..JobDefaults::default()
        },
        shutdown_grace: Duration::from_secs(5),
        // The harness's warehouse is SQLite; one test turns SQLite off.
        policy: sqlite_policy(),
        custom_connectors: Default::default(),
        // Most tests count on a fixed Secret being picked up at once.
        watch_secrets: true,
    }
}

impl Harness {
    /// Applies a JSON merge patch to the ReverseSync `name`.
    async fn patch_sync(&self, name: &str, patch: serde_json::Value) {
        self.syncs()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn start(rows: usize) -> Harness {
        Harness::start_with(rows, Behaviour::accept_all()).await
    }

    async fn start_with(rows: usize, webhook: Behaviour) -> Harness {
        let server = ApiServer::start().await;
        let client = server.client();
        let values: Vec<String> = (1..=rows)
            .map(|i| format!("({i}, 'user{i}@example.com', 'plan{}')", i % 3))
            .collect();
        let warehouse = TempSqlite::new(&format!(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, plan TEXT);
             INSERT INTO customers VALUES {};",
            values.join(",")
        ))
        .await;
        let webhook = HttpDouble::start(webhook).await;
        let h = Harness {
            _server: server,
            client,
            warehouse,
            webhook,
            metrics: Metrics::new().unwrap(),
            health: Health::default(),
            stop: CancellationToken::new(),
            operator: None,
        };
        // The run pods' ServiceAccount, as the install creates it (without it a Job-mode sync
        // says so and starts no Job).
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(h.client.clone(), NS);
        accounts
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "backflow-run"}})).unwrap(),
            )
            .await
            .unwrap();
        h.apply_secret("warehouse", json!({"url": h.warehouse.url})).await;
        h.apply_secret("webhook-token", json!({"token": "s3cr3t-token-value"}))
            .await;
        h.apply_destination(
            "webhook",
            json!({
                "type": "http",
                "credentialsSecretRef": {"name": "webhook-token"},
                "http": {
                    "url": h.webhook.url_for("/hook/{{operation}}"),
                    "headers": {"Authorization": "Bearer {{secret.token}}"}
                }
            }),
        )
        .await;
        h
    }

    fn run_operator(&mut self, config: OperatorConfig) {
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let health = self.health.clone();
        let stop = self.stop.clone();
        self.operator = Some(tokio::spawn(async move {
            run_controllers(client, &config, metrics, health, stop).await;
        }));
    }

    async fn stop(mut self) {
        self.stop_operator().await;
    }

    /// Stops the operator (SIGTERM) and waits for it; the API server stays up.
    async fn stop_operator(&mut self) {
        self.stop.cancel();
        if let Some(op) = self.operator.take() {
            tokio::time::timeout(Duration::from_secs(20), op)
                .await
                .expect("the operator stops within its grace period")
                .unwrap();
        }
    }

    /// Creates or replaces a Secret that grants its use to every Destination and ReverseSync,
    /// as the shipped samples do.
    async fn apply_secret(&self, name: &str, string_data: serde_json::Value) {
        self.apply_secret_granting(name, string_data, Some("Destination/*, ReverseSync/*"))
            .await;
    }

    /// Creates or replaces a Secret with `grant` as its `backflow.dev/allowed-references`.
    async fn apply_secret_granting(&self, name: &str, string_data: serde_json::Value, grant: Option<&str>) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let annotations = match grant {
            Some(g) => json!({"backflow.dev/allowed-references": g}),
            None => json!({}),
        };
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NS, "annotations": annotations},
            // The API server turns stringData into data; the double stores what it is given.
            "data": string_data.as_object().unwrap().iter()
                .map(|(k, v)| (k.clone(), json!(base64(v.as_str().unwrap()))))
                .collect::<serde_json::Map<_, _>>(),
        }))
        .unwrap();
        match api.get_opt(name).await.unwrap() {
            Some(old) => {
                let mut s = secret;
                s.metadata.resource_version = old.resource_version();
                api.replace(name, &PostParams::default(), &s).await.unwrap();
            }
            None => {
                api.create(&PostParams::default(), &secret).await.unwrap();
            }
        }
    }

    async fn apply_destination(&self, name: &str, spec: serde_json::Value) {
        let d: Destination = serde_json::from_value(json!({
            "apiVersion": "backflow.dev/v1alpha1", "kind": "Destination",
            "metadata": {"name": name, "namespace": NS}, "spec": spec
        }))
        .unwrap();
        Api::<Destination>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
    }

    async fn apply_sync(&self, name: &str, extra: serde_json::Value) {
        let mut spec = json!({
            "source": {
                "connectionSecretRef": {"name": "warehouse"},
                "query": "SELECT id, email, plan FROM customers",
                "primaryKey": ["id"]
            },
            "destinationRef": {"name": "webhook"},
            "mode": "upsert",
            "mappings": [{"from": "id", "to": "id"}, {"from": "email", "to": "email"}, {"from": "plan", "to": "plan"}]
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_object() && spec[k].is_object() {
                for (k2, v2) in v.as_object().unwrap() {
                    spec[k][k2] = v2.clone();
                }
            } else {
                spec[k] = v.clone();
            }
        }
        let s: ReverseSync = serde_json::from_value(json!({
            "apiVersion": "backflow.dev/v1alpha1", "kind": "ReverseSync",
            "metadata": {"name": name, "namespace": NS}, "spec": spec
        }))
        .unwrap();
        self.syncs().create(&PostParams::default(), &s).await.unwrap();
    }

    fn syncs(&self) -> Api<ReverseSync> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Polls the sync until `check` holds (30 s at most).
    async fn wait_sync(&self, name: &str, what: &str, check: impl Fn(&ReverseSync) -> bool) -> ReverseSync {
        let api = self.syncs();
        for _ in 0..300 {
            if let Some(s) = api.get_opt(name).await.unwrap()
                && check(&s)
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let last = api.get_opt(name).await.unwrap();
        panic!(
            "timed out waiting for {what}; last status: {}",
            serde_json::to_string_pretty(&last.and_then(|s| s.status)).unwrap()
        );
    }

    /// Polls the Events until one satisfies `check` (30 s at most): a run publishes its
    /// Events after it writes the status a test waits for.
    async fn wait_event(&self, what: &str, check: impl Fn(&Event) -> bool) -> Vec<Event> {
        for _ in 0..300 {
            let events = self.events().await;
            if events.iter().any(&check) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "timed out waiting for the Event {what}: {:?}",
            self.events().await
        );
    }

    async fn events(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), NS)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
    }
}

/// What the Job pods of [`config`] run with: grants checked, SQLite allowed (the harness's
/// warehouse), no cluster name.
fn sqlite_policy() -> backflow::controller::runner::RunPolicy {
    backflow::controller::runner::RunPolicy {
        secret_access: SecretAccess::Granted,
        allow_sqlite: true,
        cluster_name: None,
        ..Default::default()
    }
}

fn base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn condition<'a>(
    s: &'a ReverseSync,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

fn is(s: &ReverseSync, type_: &str, status: &str) -> bool {
    condition(s, type_).is_some_and(|c| c.status == status)
}

fn runs(s: &ReverseSync) -> Option<&backflow::api::reverse_sync::RunSummary> {
    s.status.as_ref()?.last_run.as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_runs_reports_on_its_status_and_a_requested_run_sends_nothing_new() {
    let mut h = Harness::start(40).await;
    h.run_operator(config());
    h.apply_sync("customers", json!({})).await;

    let s = h
        .wait_sync("customers", "the first run", |s| is(s, "Ready", "True"))
        .await;
    let run = runs(&s).unwrap();
    assert_eq!(
        (run.rows_in_model, run.rows_added, run.result.as_str()),
        (40, 40, "Succeeded")
    );
    assert_eq!(run.trigger.as_deref(), Some("SpecChanged"));
    assert!(is(&s, "Reconciling", "False") && is(&s, "Stalled", "False"));
    assert!(
        is(&s, "SourcePrivileged", "False"),
        "a read-only SQLite file escapes nothing"
    );
    let status = s.status.clone().unwrap();
    assert_eq!(status.observed_generation, s.metadata.generation);
    assert!(status.last_successful_sync_time.is_some());
    assert!(s.finalizers().contains(&"backflow.dev/cleanup".to_owned()));
    assert_eq!(h.webhook.accepted_records().len(), 40);
    assert!(
        h.webhook.requests()[0].header("authorization") == Some("Bearer s3cr3t-token-value"),
        "the Destination's Secret is used"
    );

    // State lives in ConfigMaps owned by the sync.
    let cms = Api::<ConfigMap>::namespaced(h.client.clone(), NS)
        .list(&ListParams::default().labels("backflow.dev/sync=customers"))
        .await
        .unwrap();
    assert!(!cms.items.is_empty(), "state ConfigMaps exist");
    assert!(
        cms.items
            .iter()
            .all(|c| c.owner_references().iter().any(|o| o.name == "customers"))
    );

    // Events and metrics say so; no secret anywhere.
    let events = h.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("SyncSucceeded")),
        "{events:?}"
    );
    let exposition = h.metrics.render();
    assert!(
        exposition.contains(
            "backflow_sync_runs_total{namespace=\"team-a\",result=\"Succeeded\",sync=\"customers\"} 1"
        ),
        "{exposition}"
    );
    let everything = format!("{:?}{:?}{exposition}", s.status, events);
    assert!(!everything.contains("s3cr3t-token-value"));

    // A new requested-at value runs again; nothing changed, so nothing is sent.
    let patch = json!({"metadata": {"annotations": {"backflow.dev/requested-at": "2026-11-25T10:00:00Z"}}});
    h.patch_sync("customers", patch).await;
    let s = h
        .wait_sync("customers", "the requested run", |s| {
            s.status
                .as_ref()
                .and_then(|st| st.last_handled_requested_at.as_deref())
                == Some("2026-11-25T10:00:00Z")
                && runs(s).is_some_and(|r| r.trigger.as_deref() == Some("Requested") && r.end.is_some())
                && is(s, "Reconciling", "False")
        })
        .await;
    let run = runs(&s).unwrap();
    assert_eq!((run.rows_unchanged, run.rows_added, run.requests), (40, 0, 0));
    assert_eq!(h.webhook.accepted_records().len(), 40, "nothing new was sent");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_stalls_the_sync_until_it_is_created() {
    let mut h = Harness::start(5).await;
    h.run_operator(config());
    h.apply_sync(
        "customers",
        json!({"source": {"connectionSecretRef": {"name": "not-yet"}}}),
    )
    .await;
    let s = h
        .wait_sync("customers", "Stalled", |s| is(s, "Stalled", "True"))
        .await;
    let c = condition(&s, "Ready").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "SecretNotFound")
    );
    assert!(
        c.message.contains("\"not-yet\"") && c.message.contains(NS),
        "{}",
        c.message
    );
    h.wait_event("SyncFailed", |e| e.reason.as_deref() == Some("SyncFailed"))
        .await;

    h.apply_secret("not-yet", json!({"url": h.warehouse.url})).await;
    let s = h
        .wait_sync("customers", "a run once the Secret exists", |s| {
            is(s, "Ready", "True")
        })
        .await;
    assert!(is(&s, "Stalled", "False"));
    assert_eq!(runs(&s).unwrap().rows_added, 5);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_to_other_namespaces_invalid_specs_and_suspended_syncs_run_nothing() {
    let mut h = Harness::start(3).await;
    h.run_operator(config());
    h.apply_sync(
        "elsewhere",
        json!({"destinationRef": {"name": "webhook", "namespace": "team-b"}}),
    )
    .await;
    h.apply_sync("bad-cron", json!({"schedule": {"cron": "every day"}}))
        .await;
    h.apply_sync("paused", json!({"suspend": true})).await;

    let s = h
        .wait_sync("elsewhere", "Stalled", |s| is(s, "Stalled", "True"))
        .await;
    let c = condition(&s, "Stalled").unwrap();
    assert_eq!(c.reason, "CrossNamespaceReference");
    assert!(c.message.contains("team-b"), "{}", c.message);

    let s = h
        .wait_sync("bad-cron", "Stalled", |s| is(s, "Stalled", "True"))
        .await;
    let c = condition(&s, "Stalled").unwrap();
    assert_eq!(c.reason, "InvalidSpec");
    assert!(c.message.contains("spec.schedule.cron"), "{}", c.message);
    assert!(runs(&s).is_none());

    let s = h
        .wait_sync("paused", "Suspended", |s| {
            condition(s, "Ready").is_some_and(|c| c.reason == "Suspended")
        })
        .await;
    assert!(runs(&s).is_none());
    assert_eq!(h.webhook.request_count(), 0, "nothing was sent");

    // Resuming runs it.
    h.patch_sync("paused", json!({"spec": {"suspend": false}})).await;
    h.wait_sync("paused", "a run after resuming", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(h.webhook.accepted_records().len(), 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_previews_the_plan_without_sending() {
    let mut h = Harness::start(12).await;
    h.run_operator(config());
    h.apply_sync("preview", json!({"dryRun": true})).await;
    let s = h
        .wait_sync("preview", "a preview", |s| {
            s.status.as_ref().is_some_and(|st| st.plan.is_some())
        })
        .await;
    let plan = s.status.clone().unwrap().plan.unwrap();
    assert_eq!(
        (plan.add, plan.change, plan.remove, plan.unchanged),
        (12, 0, 0, 0)
    );
    assert_eq!(Some(plan.generation), s.metadata.generation);
    assert!(!plan.samples.is_empty() && plan.samples.iter().all(|p| p.operation == "upsert"));
    assert_eq!(condition(&s, "Ready").unwrap().reason, "Previewed");
    assert_eq!(h.webhook.request_count(), 0);
    assert!(
        s.status.unwrap().last_successful_sync_time.is_none(),
        "a preview is not a sync"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_scheduled_after_another_runs_when_that_one_succeeded() {
    let mut h = Harness::start(4).await;
    h.run_operator(config());
    h.apply_sync("downstream", json!({"schedule": {"after": ["upstream"]}}))
        .await;
    // A new sync that follows another does not run on creation: it waits for the upstream.
    let waiting = h
        .wait_sync("downstream", "WaitingForUpstream", |s| {
            condition(s, "Reconciling").is_some_and(|c| c.reason == "WaitingForUpstream")
        })
        .await;
    assert!(runs(&waiting).is_none(), "ran before its upstream");
    h.apply_sync("upstream", json!({})).await;
    h.wait_sync("upstream", "the upstream run", |s| is(s, "Ready", "True"))
        .await;
    let s = h
        .wait_sync("downstream", "a run after the upstream", |s| {
            runs(s).is_some_and(|r| r.trigger.as_deref() == Some("After") && r.end.is_some())
        })
        .await;
    assert_eq!(runs(&s).unwrap().rows_added, 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_sync_removes_its_state_and_the_finalizer() {
    let mut h = Harness::start(6).await;
    h.run_operator(config());
    h.apply_sync("customers", json!({})).await;
    h.wait_sync("customers", "the first run", |s| is(s, "Ready", "True"))
        .await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), NS);
    let labels = ListParams::default().labels("backflow.dev/sync=customers");
    assert!(!cms.list(&labels).await.unwrap().items.is_empty());

    h.syncs()
        .delete("customers", &DeleteParams::default())
        .await
        .unwrap();
    for _ in 0..200 {
        if h.syncs().get_opt("customers").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        h.syncs().get_opt("customers").await.unwrap().is_none(),
        "the finalizer was removed"
    );
    assert!(cms.list(&labels).await.unwrap().items.is_empty(), "state deleted");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_mode_creates_a_run_job_and_reflects_its_failure() {
    let mut h = Harness::start(2).await;
    let mut config = config();
    config.job.allow_placement = true;
    config.job.tmp_size_limit = Some("4Gi".into());
    h.run_operator(config);
    h.apply_sync(
        "in-a-job",
        json!({"execution": {"mode": "Job", "jobTemplate": {"nodeSelector": {"pool": "etl"}}}}),
    )
    .await;
    let s = h
        .wait_sync("in-a-job", "a Job", |s| {
            s.status.as_ref().is_some_and(|st| st.active_job.is_some())
        })
        .await;
    assert!(is(&s, "Reconciling", "True"));
    let job_name = s.status.unwrap().active_job.unwrap();
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), NS);
    let job = jobs.get(&job_name).await.unwrap();
    let pod = job.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(
        pod.containers[0].args.clone().unwrap(),
        [
            "run",
            "--namespace",
            NS,
            "--sync",
            "in-a-job",
            "--trigger",
            "SpecChanged",
            "--secret-access=granted",
            "--allow-sqlite"
        ]
    );
    assert_eq!(pod.containers[0].image.as_deref(), Some("backflow:test"));
    assert_eq!(pod.service_account_name.as_deref(), Some("backflow-run"));
    assert_eq!(pod.node_selector.unwrap()["pool"], "etl");
    let tmp = pod.volumes.unwrap()[0].empty_dir.clone().unwrap();
    assert_eq!(tmp.size_limit.unwrap().0, "4Gi", "a bounded /tmp");
    assert_eq!(
        h.webhook.request_count(),
        0,
        "the operator itself sends nothing in Job mode"
    );

    // Kubernetes reports the Job failed before its pod recorded anything.
    let failed = json!({"status": {"failed": 1, "conditions": [{
        "type": "Failed", "status": "True", "reason": "DeadlineExceeded",
        "message": "Job was active longer than specified deadline"}]}});
    jobs.patch_status(&job_name, &PatchParams::default(), &Patch::Merge(&failed))
        .await
        .unwrap();
    let s = h
        .wait_sync("in-a-job", "the failure reflected", |s| {
            s.status.as_ref().is_some_and(|st| st.active_job.is_none()) && is(s, "Ready", "False")
        })
        .await;
    let c = condition(&s, "Ready").unwrap();
    assert_eq!(c.reason, "JobFailed");
    assert!(
        c.message.contains("DeadlineExceeded") && c.message.contains(&job_name),
        "{}",
        c.message
    );
    assert_eq!(s.status.unwrap().consecutive_failures, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_template_outside_the_operators_allow_lists_stalls_and_creates_no_job() {
    let mut h = Harness::start(2).await;
    let mut config = config();
    config.job.allowed_images = vec!["backflow-tools:1".into()];
    h.run_operator(config);
    let cases = [
        (
            "own-image",
            json!({"image": "attacker/miner:latest"}),
            "JobImageNotAllowed",
        ),
        (
            "admin-sa",
            json!({"serviceAccountName": "namespace-admin"}),
            "JobServiceAccountNotAllowed",
        ),
        (
            "on-masters",
            json!({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}),
            "JobPlacementNotAllowed",
        ),
        (
            "allowed",
            json!({"image": "backflow-tools:1", "serviceAccountName": "backflow-run"}),
            "",
        ),
    ];
    for (name, template, _) in &cases {
        h.apply_sync(
            name,
            json!({"execution": {"mode": "Job", "jobTemplate": template}}),
        )
        .await;
    }
    for (name, _, reason) in &cases {
        if reason.is_empty() {
            let s = h
                .wait_sync(name, "a Job", |s| {
                    s.status.as_ref().is_some_and(|st| st.active_job.is_some())
                })
                .await;
            let job: Job = Api::namespaced(h.client.clone(), NS)
                .get(&s.status.unwrap().active_job.unwrap())
                .await
                .unwrap();
            let pod = job.spec.unwrap().template.spec.unwrap();
            assert_eq!(pod.containers[0].image.as_deref(), Some("backflow-tools:1"));
            continue;
        }
        let s = h.wait_sync(name, "Stalled", |s| is(s, "Stalled", "True")).await;
        let c = condition(&s, "Stalled").unwrap();
        assert_eq!(c.reason, *reason, "{}", c.message);
        assert!(c.message.contains("spec.execution.jobTemplate"), "{}", c.message);
        assert!(s.status.unwrap().active_job.is_none());
    }
    let jobs = Api::<Job>::namespaced(h.client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(jobs.items.len(), 1, "only the allowed template got a Job");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_watching_secrets_the_operator_only_gets_the_secrets_specs_name() {
    let mut h = Harness::start(3).await;
    h.apply_secret("unrelated", json!({"password": "not-for-backflow"}))
        .await;
    let mut config = config();
    config.watch_secrets = false;
    let before = h._server.requests().len();
    h.run_operator(config);
    h.apply_sync("customers", json!({})).await;
    h.wait_sync("customers", "a run", |s| is(s, "Ready", "True"))
        .await;
    // Every Secret call from here on is the operator's.
    let reads: Vec<_> = h._server.requests()[before..]
        .iter()
        .filter(|r| r.path.contains("/secrets"))
        .cloned()
        .collect();
    assert!(
        reads.iter().any(|r| r.verb == "get"),
        "the sync's Secrets were read"
    );
    for call in &reads {
        assert_eq!(call.verb, "get", "{} {}", call.method, call.path);
        assert!(!call.path.contains("unrelated"), "{}", call.path);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_pod_command_runs_the_sync_and_writes_status_and_state() {
    let h = Harness::start(7).await;
    h.apply_sync("customers", json!({"execution": {"mode": "Job"}}))
        .await;
    let outcome = backflow::controller::cluster_run::run_in_cluster(
        h.client.clone(),
        NS,
        "customers",
        backflow::controller::schedule::Trigger::Schedule,
        "pod-1",
        sqlite_policy(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(!outcome.failed, "{}", outcome.message);
    let s = h.syncs().get("customers").await.unwrap();
    let run = runs(&s).unwrap();
    assert_eq!((run.rows_added, run.trigger.as_deref()), (7, Some("Schedule")));
    assert!(is(&s, "Ready", "True"));
    assert_eq!(h.webhook.accepted_records().len(), 7);

    // A second run finds the state the first one wrote.
    let outcome = backflow::controller::cluster_run::run_in_cluster(
        h.client.clone(),
        NS,
        "customers",
        backflow::controller::schedule::Trigger::Schedule,
        "pod-2",
        sqlite_policy(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(!outcome.failed);
    assert_eq!(
        runs(&h.syncs().get("customers").await.unwrap())
            .unwrap()
            .rows_unchanged,
        7
    );

    let missing = backflow::controller::cluster_run::run_in_cluster(
        h.client.clone(),
        NS,
        "nope",
        backflow::controller::schedule::Trigger::Schedule,
        "pod-3",
        sqlite_policy(),
        CancellationToken::new(),
    )
    .await;
    assert!(missing.unwrap_err().to_string().contains("\"nope\""));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_report_ready_or_why_not() {
    let mut h = Harness::start(1).await;
    h.apply_destination(
        "no-creds",
        json!({
            "type": "http",
            "credentialsSecretRef": {"name": "missing"},
            "http": {"url": h.webhook.url_for("/x")}
        }),
    )
    .await;
    h.run_operator(config());
    let api: Api<Destination> = Api::namespaced(h.client.clone(), NS);
    let ready = |d: &Destination, status: &str| {
        d.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == status)
    };
    let mut ok = None;
    let mut bad = None;
    for _ in 0..300 {
        let a = api.get("webhook").await.unwrap();
        let b = api.get("no-creds").await.unwrap();
        if ready(&a, "True") && ready(&b, "False") {
            ok = Some(a);
            bad = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, bad) = (ok.expect("webhook Ready"), bad.expect("no-creds not Ready"));
    assert_eq!(ok.status.unwrap().observed_generation, ok.metadata.generation);
    let c = bad
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Stalled")
        .unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "SecretNotFound"));
    assert!(
        h.metrics
            .render()
            .contains("backflow_destination_ready{destination=\"webhook\",namespace=\"team-a\"} 1")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_are_served_on_one_port_and_readiness_follows_the_caches() {
    let mut h = Harness::start(1).await;
    let metrics = h.metrics.clone();
    let health = h.health.clone();
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(backflow::controller::server::serve(
        listener,
        metrics,
        health.clone(),
        stop.clone(),
    ));
    let get = |path: &str| {
        let url = format!("http://{addr}{path}");
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await.0, 503, "no controller runs yet");
    // Nothing sets readiness by hand: the controllers' watches reach it.
    h.run_operator(config());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = get("/readyz").await;
        if code == 200 {
            assert!(body.contains("synced"), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get("/healthz").await.0, 200);
    let (code, body) = get("/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("backflow_build_info"), "{body}");
    h.stop_operator().await;
    let (code, body) = get("/readyz").await;
    assert_eq!(code, 503, "stopped controllers are not ready: {body}");
    assert_eq!(get("/healthz").await.0, 200, "a shutdown is no crash");
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_run_in_flight_commit() {
    // Slow destination: each request takes a while, so shutdown lands mid-run.
    let mut h = Harness::start_with(
        600,
        Behaviour::accept_all().with_delay(Duration::from_millis(150)),
    )
    .await;
    h.apply_destination(
        "slow",
        json!({
            "type": "http", "batchSize": 10, "maxConcurrency": 1,
            "http": {"url": h.webhook.url_for("/slow")}
        }),
    )
    .await;
    h.run_operator(config());
    h.apply_sync("slow-sync", json!({"destinationRef": {"name": "slow"}}))
        .await;
    h.wait_sync("slow-sync", "the run to start", |s| is(s, "Reconciling", "True"))
        .await;
    while h.webhook.request_count() < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop_operator().await;
    let s = h.syncs().get("slow-sync").await.unwrap();
    let run = runs(&s).unwrap();
    assert_eq!(run.result, "Failed");
    assert!(
        run.error.as_deref().unwrap_or_default().contains("cancelled"),
        "{run:?}"
    );
    assert!(is(&s, "Reconciling", "False"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_only_the_lease_holder_reconciles_and_the_other_takes_over() {
    let h = Harness::start(3).await;
    let lease_config = |identity: &str| OperatorConfig {
        leader_election: true,
        identity: identity.into(),
        ..config()
    };
    let holder = |h: &Harness| {
        h._server
            .object(
                "coordination.k8s.io/v1/leases",
                "backflow-system",
                "backflow-operator",
            )
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };
    let stop_a = CancellationToken::new();
    let a = tokio::spawn(backflow::controller::run_operator(
        h.client.clone(),
        lease_config("op-a"),
        stop_a.clone(),
    ));
    for _ in 0..100 {
        if holder(&h).as_deref() == Some("op-a") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(holder(&h).as_deref(), Some("op-a"));
    let stop_b = CancellationToken::new();
    let b = tokio::spawn(backflow::controller::run_operator(
        h.client.clone(),
        lease_config("op-b"),
        stop_b.clone(),
    ));
    h.apply_sync("first", json!({})).await;
    h.wait_sync("first", "a run by the leader", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(
        holder(&h).as_deref(),
        Some("op-a"),
        "the standby did not take the lease"
    );

    // The leader shuts down and releases the lease; the standby takes over and reconciles.
    stop_a.cancel();
    tokio::time::timeout(Duration::from_secs(20), a)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    h.apply_sync("second", json!({})).await;
    h.wait_sync("second", "a run by the new leader", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(holder(&h).as_deref(), Some("op-b"));
    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(20), b)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_one_percent_changed_and_a_request_sends_exactly_those_rows_and_a_spec_edit_reruns() {
    let pg = support::db::TestDb::postgres("operator").await;
    pg.exec(
        "CREATE TABLE customers (id INT PRIMARY KEY, email TEXT, plan TEXT);
         INSERT INTO customers SELECT g, 'user' || g || '@example.com', 'free' FROM generate_series(1, 1000) g;",
    )
    .await;
    let mut h = Harness::start(1).await;
    h.apply_secret("pg", json!({"url": pg.url})).await;
    h.run_operator(config());
    h.apply_sync(
        "pg-sync",
        json!({"source": {"connectionSecretRef": {"name": "pg"}}}),
    )
    .await;
    let s = h
        .wait_sync("pg-sync", "the first run", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(runs(&s).unwrap().rows_added, 1000);
    // The test login is the superuser: the run goes on, with a warning.
    let privileged = condition(&s, "SourcePrivileged").expect("the source login was checked");
    assert_eq!(
        (privileged.status.as_str(), privileged.reason.as_str()),
        ("True", "PrivilegedSourceUser")
    );
    assert!(privileged.message.contains("superuser"), "{}", privileged.message);
    let warnings = h
        .wait_event("PrivilegedSourceUser", |e| {
            e.reason.as_deref() == Some("PrivilegedSourceUser")
        })
        .await;
    let warning = warnings
        .iter()
        .find(|e| e.reason.as_deref() == Some("PrivilegedSourceUser"))
        .expect("a PrivilegedSourceUser event");
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let first_fingerprint = runs(&s).unwrap().fingerprint.clone();

    pg.exec("UPDATE customers SET plan = 'pro' WHERE id % 100 = 0")
        .await;
    let before = h.webhook.accepted_records().len();
    let patch = json!({"metadata": {"annotations": {"backflow.dev/requested-at": "one-percent"}}});
    h.patch_sync("pg-sync", patch).await;
    let s = h
        .wait_sync("pg-sync", "the requested run", |s| {
            runs(s).is_some_and(|r| r.trigger.as_deref() == Some("Requested"))
                && is(s, "Reconciling", "False")
        })
        .await;
    let run = runs(&s).unwrap();
    assert_eq!(
        (run.rows_changed, run.rows_unchanged, run.rows_added),
        (10, 990, 0)
    );
    assert_ne!(run.fingerprint, first_fingerprint);
    let sent: Vec<_> = h.webhook.accepted_records()[before..].to_vec();
    assert_eq!(sent.len(), 10);
    assert!(
        sent.iter()
            .all(|r| r["plan"] == "pro" && r["id"].as_i64().unwrap() % 100 == 0),
        "{sent:?}"
    );

    // A new mapping is a new spec: it runs again and sends every row in the new shape.
    let mut edited = h.syncs().get("pg-sync").await.unwrap();
    edited
        .spec
        .mappings
        .push(serde_json::from_value(json!({"template": "{{plan}}-tier", "to": "tier"})).unwrap());
    h.syncs()
        .replace("pg-sync", &PostParams::default(), &edited)
        .await
        .unwrap();
    let s = h
        .wait_sync("pg-sync", "a run for the edited spec", |s| {
            runs(s).is_some_and(|r| r.generation == Some(2) && r.end.is_some())
                && is(s, "Reconciling", "False")
        })
        .await;
    let run = runs(&s).unwrap();
    assert_eq!(
        (run.trigger.as_deref(), run.rows_changed),
        (Some("SpecChanged"), 1000)
    );
    assert!(
        h.webhook.accepted_records().last().unwrap()["tier"]
            .as_str()
            .unwrap()
            .ends_with("-tier")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sql_and_a_destination_that_is_not_ready_say_why_and_recover_when_fixed() {
    let mut h = Harness::start(4).await;
    h.apply_destination(
        "down",
        json!({
            "type": "http",
            "http": {
                "url": "http://127.0.0.1:9/unreachable",
                "checkUrl": "http://127.0.0.1:9/health"
            },
            "retry": {"maxAttempts": 1}
        }),
    )
    .await;
    h.run_operator(config());
    h.apply_sync(
        "bad-sql",
        json!({"source": {"query": "SELECT id, email, plan FROM no_such_table"}}),
    )
    .await;
    h.apply_sync("to-down", json!({"destinationRef": {"name": "down"}}))
        .await;

    let s = h
        .wait_sync("bad-sql", "Stalled", |s| is(s, "Stalled", "True"))
        .await;
    let c = condition(&s, "Ready").unwrap();
    assert_eq!(c.status, "False");
    assert!(c.message.contains("no_such_table"), "{}", c.message);
    let s = h
        .wait_sync("to-down", "Ready=False", |s| is(s, "Ready", "False"))
        .await;
    let c = condition(&s, "Ready").unwrap();
    assert_eq!(c.reason, "DestinationNotReady", "{}", c.message);
    assert!(
        h.events()
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("DestinationNotReady"))
    );

    // Fixing the query (a new spec) recovers.
    let mut fixed = h.syncs().get("bad-sql").await.unwrap();
    fixed.spec.source.query = "SELECT id, email, plan FROM customers".into();
    h.syncs()
        .replace("bad-sql", &PostParams::default(), &fixed)
        .await
        .unwrap();
    let s = h
        .wait_sync("bad-sql", "recovery", |s| is(s, "Ready", "True"))
        .await;
    assert!(is(&s, "Stalled", "False"));
    assert_eq!(s.status.unwrap().consecutive_failures, 0);
    h.stop().await;
}

/// A PostgreSQL source of `rows` customers for the Warehouse store tests.
async fn postgres_customers(rows: u32) -> support::db::TestDb {
    let pg = support::db::TestDb::postgres("opwh").await;
    pg.exec(&format!(
        "CREATE TABLE customers (id INT PRIMARY KEY, email TEXT, plan TEXT);
         INSERT INTO customers SELECT g, 'user' || g || '@example.com', 'free' FROM generate_series(1, {rows}) g;"
    ))
    .await;
    pg
}

/// Rows of `sync_id` in a Warehouse store table (0 when the table does not exist).
async fn warehouse_rows(pg: &support::db::TestDb, schema: &str, table: &str, sync_id: &str) -> i64 {
    support::db::pg_sync_rows(&pg.url, schema, table, sync_id)
        .await
        .unwrap_or(0)
}

async fn state_configmaps(h: &Harness, sync: &str) -> usize {
    Api::<ConfigMap>::namespaced(h.client.clone(), NS)
        .list(&ListParams::default().labels(&format!("backflow.dev/sync={sync}")))
        .await
        .unwrap()
        .items
        .len()
}

/// Waits for the end of the run of the sync's generation `generation`.
/// The last run succeeded with all `rows` unchanged, none added and no request sent.
fn assert_nothing_resent(s: &ReverseSync, rows: u64) {
    let run = runs(s).unwrap();
    assert_eq!(
        (
            run.result.as_str(),
            run.rows_unchanged,
            run.rows_added,
            run.requests
        ),
        ("Succeeded", rows, 0, 0),
        "{run:?}"
    );
}

async fn wait_generation_run(h: &Harness, name: &str, generation: i64) -> ReverseSync {
    h.wait_sync(name, &format!("the run of generation {generation}"), |s| {
        runs(s).is_some_and(|r| r.generation == Some(generation) && r.end.is_some())
            && is(s, "Reconciling", "False")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_store_sync_keeps_its_state_in_the_source_database_and_a_requested_run_sends_nothing() {
    let pg = postgres_customers(50).await;
    let mut h = Harness::start(1).await;
    h.apply_secret("pg", json!({"url": pg.url})).await;
    h.run_operator(config());
    h.apply_sync(
        "wh",
        json!({"source": {"connectionSecretRef": {"name": "pg"}}, "state": {"store": "Warehouse"}}),
    )
    .await;
    let s = h
        .wait_sync("wh", "the first run", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(runs(&s).unwrap().rows_added, 50);
    assert_eq!(
        warehouse_rows(&pg, "backflow", "backflow_state", "team-a/wh").await,
        50
    );
    assert_eq!(
        warehouse_rows(&pg, "backflow", "backflow_syncs", "team-a/wh").await,
        1
    );
    assert_eq!(state_configmaps(&h, "wh").await, 0, "no state in ConfigMaps");

    let patch = json!({"metadata": {"annotations": {"backflow.dev/requested-at": "again"}}});
    h.patch_sync("wh", patch).await;
    let s = h
        .wait_sync("wh", "the requested run", |s| {
            runs(s).is_some_and(|r| r.trigger.as_deref() == Some("Requested") && r.end.is_some())
                && is(s, "Reconciling", "False")
        })
        .await;
    let run = runs(&s).unwrap();
    assert_eq!((run.rows_unchanged, run.rows_added, run.requests), (50, 0, 0));
    assert_eq!(h.webhook.accepted_records().len(), 50, "nothing new was sent");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_a_sync_from_configmaps_to_the_warehouse_and_back_sends_nothing_extra() {
    let pg = postgres_customers(30).await;
    let mut h = Harness::start(1).await;
    h.apply_secret("pg", json!({"url": pg.url})).await;
    h.run_operator(config());
    h.apply_sync(
        "moving",
        json!({"source": {"connectionSecretRef": {"name": "pg"}}}),
    )
    .await;
    let s = wait_generation_run(&h, "moving", 1).await;
    assert_eq!(runs(&s).unwrap().rows_added, 30);
    assert!(state_configmaps(&h, "moving").await > 0);

    let to_warehouse = json!({"spec": {"state": {"store": "Warehouse"}}});
    h.patch_sync("moving", to_warehouse).await;
    let s = wait_generation_run(&h, "moving", 2).await;
    assert_nothing_resent(&s, 30);
    assert_eq!(
        warehouse_rows(&pg, "backflow", "backflow_state", "team-a/moving").await,
        30
    );
    assert_eq!(
        state_configmaps(&h, "moving").await,
        0,
        "the imported ConfigMaps are discarded"
    );

    let back = json!({"spec": {"state": null}});
    h.patch_sync("moving", back).await;
    let s = wait_generation_run(&h, "moving", 3).await;
    assert_nothing_resent(&s, 30);
    assert!(
        state_configmaps(&h, "moving").await > 0,
        "state is back in ConfigMaps"
    );
    assert_eq!(
        warehouse_rows(&pg, "backflow", "backflow_state", "team-a/moving").await,
        0,
        "the warehouse copy is discarded"
    );
    assert_eq!(h.webhook.accepted_records().len(), 30, "nothing was sent again");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_warehouse_store_sync_deletes_its_state_rows_keeps_its_sync_logs_and_never_sticks() {
    let pg = postgres_customers(20).await;
    let mut h = Harness::start(1).await;
    h.apply_secret("pg", json!({"url": pg.url})).await;
    h.apply_secret("pg-state", json!({"url": pg.url})).await;
    h.run_operator(config());
    let state = json!({
        "store": "Warehouse", "schema": "bf_state", "syncLogs": true,
        "connectionSecretRef": {"name": "pg-state"}
    });
    for name in ["doomed", "kept"] {
        h.apply_sync(
            name,
            json!({"source": {"connectionSecretRef": {"name": "pg"}}, "state": state}),
        )
        .await;
    }
    for name in ["doomed", "kept"] {
        h.wait_sync(name, "the first run", |s| is(s, "Ready", "True"))
            .await;
    }
    assert_eq!(
        warehouse_rows(&pg, "bf_state", "backflow_state", "team-a/doomed").await,
        20
    );
    assert_eq!(
        warehouse_rows(&pg, "bf_state", "backflow_runs", "team-a/doomed").await,
        1
    );

    // The state Secret is gone first: resolving the URL fails, the finalizer lets go anyway.
    h.apply_sync(
        "orphan",
        json!({"source": {"connectionSecretRef": {"name": "pg"}},
               "state": {"store": "Warehouse", "connectionSecretRef": {"name": "no-such-secret"}}}),
    )
    .await;
    h.wait_sync("orphan", "a failed run", |s| is(s, "Ready", "False"))
        .await;

    for name in ["doomed", "orphan"] {
        h.syncs().delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["doomed", "orphan"] {
        for _ in 0..300 {
            if h.syncs().get_opt(name).await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            h.syncs().get_opt(name).await.unwrap().is_none(),
            "the finalizer of {name} was removed"
        );
    }
    assert_eq!(
        warehouse_rows(&pg, "bf_state", "backflow_state", "team-a/doomed").await,
        0
    );
    assert_eq!(
        warehouse_rows(&pg, "bf_state", "backflow_syncs", "team-a/doomed").await,
        0
    );
    assert_eq!(
        warehouse_rows(&pg, "bf_state", "backflow_runs", "team-a/doomed").await,
        1,
        "sync logs are history and stay"
    );
    assert_eq!(
        warehouse_rows(&pg, "bf_state", "backflow_state", "team-a/kept").await,
        20,
        "another sync's rows are untouched"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_pod_command_runs_a_warehouse_store_sync() {
    let pg = postgres_customers(7).await;
    let h = Harness::start(1).await;
    h.apply_secret("pg", json!({"url": pg.url})).await;
    h.apply_sync(
        "in-pod",
        json!({"source": {"connectionSecretRef": {"name": "pg"}},
               "state": {"store": "Warehouse"}, "execution": {"mode": "Job"}}),
    )
    .await;
    let run_pod = |pod: &'static str| {
        backflow::controller::cluster_run::run_in_cluster(
            h.client.clone(),
            NS,
            "in-pod",
            backflow::controller::schedule::Trigger::Schedule,
            pod,
            sqlite_policy(),
            CancellationToken::new(),
        )
    };
    let outcome = run_pod("pod-1").await.unwrap();
    assert!(!outcome.failed, "{}", outcome.message);
    assert_eq!(
        runs(&h.syncs().get("in-pod").await.unwrap()).unwrap().rows_added,
        7
    );
    assert_eq!(
        warehouse_rows(&pg, "backflow", "backflow_state", "team-a/in-pod").await,
        7
    );
    assert_eq!(state_configmaps(&h, "in-pod").await, 0);

    let outcome = run_pod("pod-2").await.unwrap();
    assert!(!outcome.failed, "{}", outcome.message);
    let run = runs(&h.syncs().get("in-pod").await.unwrap()).unwrap().clone();
    assert_eq!((run.rows_unchanged, run.requests), (7, 0));
    assert_eq!(h.webhook.accepted_records().len(), 7);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collapsed_model_holds_deletes_back_and_says_why_until_the_annotation_approves_its_plan() {
    let mut h = Harness::start(40).await;
    h.run_operator(config());
    h.apply_sync("mirrored", json!({"mode": "mirror"})).await;
    h.wait_sync("mirrored", "the first run", |s| is(s, "Ready", "True"))
        .await;
    let deletes_sent = |h: &Harness| {
        h.webhook
            .requests()
            .iter()
            .filter(|r| r.path == "/hook/delete")
            .count()
    };

    // 30 of 40 rows vanish upstream; a requested run plans 30 deletes.
    h.warehouse.exec("DELETE FROM customers WHERE id > 10").await;
    let request = |at: &str| json!({"metadata": {"annotations": {"backflow.dev/requested-at": at}}});
    h.patch_sync("mirrored", request("2026-12-01T10:00:00Z")).await;
    let s = h
        .wait_sync("mirrored", "the held-back run", |s| {
            condition(s, "Ready").is_some_and(|c| c.reason == "DeletesHeldBack")
        })
        .await;
    assert!(is(&s, "Ready", "False") && is(&s, "Stalled", "False"));
    let message = condition(&s, "Ready").unwrap().message.clone();
    assert!(message.contains("30 of 40 stored records (75%)"), "{message}");
    let held = runs(&s).unwrap().deletes_held_back.clone().unwrap();
    assert_eq!((held.deletes, held.stored_records), (30, 40));
    assert!(
        message.contains(&format!("backflow.dev/approve-deletes={}", held.plan_id)),
        "{message}"
    );
    assert_eq!(deletes_sent(&h), 0, "nothing was deleted");
    let events = h.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("DeletesHeldBack")
                && e.note.as_deref().is_some_and(|n| n.contains("30 of 40"))),
        "{events:?}"
    );
    let exposition = h.metrics.render();
    assert!(
        exposition.contains("backflow_sync_deletes_held_back{namespace=\"team-a\",sync=\"mirrored\"} 30"),
        "{exposition}"
    );

    // A preview shows the same guard in status.plan.
    h.patch_sync("mirrored", json!({"spec": {"dryRun": true}})).await;
    let s = h
        .wait_sync("mirrored", "the preview", |s| {
            s.status
                .as_ref()
                .and_then(|st| st.plan.as_ref())
                .is_some_and(|p| p.deletes_held_back.is_some())
        })
        .await;
    let preview = s.status.unwrap().plan.unwrap().deletes_held_back.unwrap();
    assert_eq!(preview.plan_id, held.plan_id);

    // Approving that plan lets exactly its deletes through.
    h.patch_sync(
        "mirrored",
        json!({
            "spec": {"dryRun": false},
            "metadata": {"annotations": {"backflow.dev/approve-deletes": held.plan_id}}
        }),
    )
    .await;
    let s = h
        .wait_sync("mirrored", "the approved run", |s| {
            is(s, "Ready", "True")
                && s.status.as_ref().is_some_and(|st| st.plan.is_none())
                && runs(s).is_some_and(|r| {
                    r.generation == s.metadata.generation && r.rows_removed == 30 && r.end.is_some()
                })
        })
        .await;
    let run = runs(&s).unwrap();
    assert_eq!(run.result, "Succeeded");
    assert!(run.deletes_held_back.is_none());
    assert!(deletes_sent(&h) > 0);
    let exposition = h.metrics.render();
    assert!(
        exposition.contains("backflow_sync_deletes_held_back{namespace=\"team-a\",sync=\"mirrored\"} 0"),
        "{exposition}"
    );
    h.stop().await;
}

/// The Destination `name`'s condition `type_`, once it has one with `status`.
async fn wait_destination(h: &Harness, name: &str, type_: &str, status: &str) -> Destination {
    let api: Api<Destination> = Api::namespaced(h.client.clone(), NS);
    for _ in 0..300 {
        let d = api.get(name).await.unwrap();
        let found = d
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .is_some_and(|c| c.status == status);
        if found {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for Destination {name} {type_}={status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_serves_only_the_objects_it_grants_and_an_ungranted_check_url_sends_nothing() {
    let mut h = Harness::start(3).await;
    // The reported attack: a Destination's checkUrl carrying a key of a Secret it was not given.
    h.apply_secret_granting("payments-db", json!({"password": "hunter2-payments"}), None)
        .await;
    let collector = HttpDouble::start(Behaviour::accept_all()).await;
    h.apply_destination(
        "exfil",
        json!({
            "type": "http",
            "credentialsSecretRef": {"name": "payments-db"},
            "http": {
                "url": collector.url_for("/x"),
                "checkUrl": collector.url_for("/collect?d={{secret.password}}")
            }
        }),
    )
    .await;
    // A sync whose source Secret grants another sync only.
    h.apply_secret_granting(
        "shared-warehouse",
        json!({"url": h.warehouse.url}),
        Some("ReverseSync/someone-else"),
    )
    .await;
    h.apply_sync(
        "customers",
        json!({"source": {"connectionSecretRef": {"name": "shared-warehouse"}}}),
    )
    .await;
    h.run_operator(config());

    let d = wait_destination(&h, "exfil", "Stalled", "True").await;
    let c = d
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "SecretNotGranted")
    );
    for needle in [
        "\"payments-db\"",
        "backflow.dev/allowed-references",
        "Destination/exfil",
    ] {
        assert!(c.message.contains(needle), "{needle} in {}", c.message);
    }
    let s = h
        .wait_sync("customers", "Stalled", |s| is(s, "Stalled", "True"))
        .await;
    let c = condition(&s, "Ready").unwrap();
    assert_eq!(c.reason, "SecretNotGranted");
    assert!(c.message.contains("ReverseSync/customers"), "{}", c.message);
    let refused_on = |name: &'static str| {
        move |e: &Event| {
            e.reason.as_deref() == Some("SecretNotGranted")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        }
    };
    h.wait_event("SecretNotGranted on exfil", refused_on("exfil"))
        .await;
    let events = h
        .wait_event("SecretNotGranted on customers", refused_on("customers"))
        .await;
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SecretNotGranted"))
        .collect();
    assert!(refused.iter().all(|e| {
        e.note
            .as_deref()
            .is_some_and(|n| n.contains("allowed-references"))
    }));
    assert_eq!(collector.request_count(), 0, "the checkUrl was never fetched");
    assert_eq!(h.webhook.request_count(), 0);
    let everything = format!("{:?}{events:?}", s.status);
    assert!(!everything.contains("hunter2-payments"));

    // Granting the sync lets it run.
    h.apply_secret_granting(
        "shared-warehouse",
        json!({"url": h.warehouse.url}),
        Some("ReverseSync/someone-else, ReverseSync/customers"),
    )
    .await;
    h.wait_sync("customers", "a run once granted", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(h.webhook.accepted_records().len(), 3);
    assert_eq!(collector.request_count(), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_namespace_secret_access_a_secret_without_a_grant_is_used() {
    let mut h = Harness::start(2).await;
    h.apply_secret_granting("plain", json!({"url": h.warehouse.url}), None)
        .await;
    h.apply_sync(
        "customers",
        json!({"source": {"connectionSecretRef": {"name": "plain"}}}),
    )
    .await;
    h.run_operator(OperatorConfig {
        policy: backflow::controller::runner::RunPolicy {
            secret_access: SecretAccess::Namespace,
            ..sqlite_policy()
        },
        ..config()
    });
    h.wait_sync("customers", "a run", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(h.webhook.accepted_records().len(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connector_fails_its_own_sync_and_destination_and_frees_the_only_run_slot() {
    use backflow::engine::setup::CustomConnectors;
    use support::fake_connector::Panicking;
    let mut h = Harness::start(4).await;
    for name in ["panics-on-check", "panics-on-send"] {
        h.apply_destination(
            name,
            json!({"type": "http", "credentialsSecretRef": {"name": "webhook-token"},
                   "http": {"url": h.webhook.url_for("/never")}}),
        )
        .await;
    }
    h.apply_sync("boom", json!({"destinationRef": {"name": "panics-on-send"}}))
        .await;
    h.run_operator(OperatorConfig {
        max_concurrent_runs: 1,
        custom_connectors: CustomConnectors::new(|d| {
            let panicking = match d.metadata.name.as_deref() {
                Some("panics-on-check") => Panicking::InCheck,
                Some("panics-on-send") => Panicking::InSend,
                _ => return None,
            };
            Some(std::sync::Arc::new(panicking))
        }),
        ..config()
    });

    let s = h
        .wait_sync("boom", "the panicked run recorded", |s| {
            condition(s, "Ready").is_some_and(|c| c.reason == "InternalError")
        })
        .await;
    let run = runs(&s).unwrap();
    assert_eq!(run.result, "Failed");
    assert!(
        run.error.as_deref().unwrap().contains("internal error"),
        "{run:?}"
    );
    assert!(
        !condition(&s, "Ready").unwrap().message.contains("panics in send"),
        "the panic's text stays in the log"
    );
    let d = wait_destination(&h, "panics-on-check", "Ready", "False").await;
    let ready = d
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "InternalError");

    // The one run slot was released: another sync runs, and the operator serves it.
    h.apply_sync("fine", json!({})).await;
    h.wait_sync("fine", "a run after the panic", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(h.webhook.accepted_records().len(), 4);
    // The panicked sync's own slot is free too: a requested run starts.
    h.patch_sync(
        "boom",
        json!({"metadata": {"annotations": {"backflow.dev/requested-at": "again"}}}),
    )
    .await;
    h.wait_sync("boom", "a second run", |s| {
        runs(s).is_some_and(|r| r.trigger.as_deref() == Some("Requested") && r.result == "Failed")
    })
    .await;
    for (object, reason) in [("boom", "SyncFailed"), ("panics-on-check", "InternalError")] {
        h.wait_event(reason, |e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object)
        })
        .await;
    }
    assert!(h.metrics.render().contains("backflow_sync_runs_in_flight 0"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sources_and_destinations_are_refused_in_the_cluster() {
    let mut h = Harness::start(2).await;
    h.apply_destination(
        "file-crm",
        json!({"type": "sqlite", "credentialsSecretRef": {"name": "warehouse"},
               "sqlite": {"table": "contacts"}}),
    )
    .await;
    h.apply_sync("from-sqlite", json!({})).await;
    h.run_operator(OperatorConfig {
        policy: backflow::controller::runner::RunPolicy {
            allow_sqlite: false,
            ..sqlite_policy()
        },
        ..config()
    });
    let s = h
        .wait_sync("from-sqlite", "Stalled", |s| is(s, "Stalled", "True"))
        .await;
    let c = condition(&s, "Ready").unwrap();
    assert_eq!(c.reason, "InvalidSpec");
    assert!(c.message.contains("sqlite://"), "{}", c.message);
    let d = wait_destination(&h, "file-crm", "Stalled", "True").await;
    let c = d
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(c.reason, "InvalidDestination");
    assert!(c.message.contains("type sqlite"), "{}", c.message);
    assert_eq!(h.webhook.request_count(), 0);
    h.stop().await;
}

/// A Destination answering each one-record request after `delay`: a run of `rows` rows takes
/// about `rows × delay` to deliver, long enough to watch.
async fn slow_destination(h: &Harness, name: &str) {
    h.apply_destination(
        name,
        json!({
            "type": "http",
            "credentialsSecretRef": {"name": "webhook-token"},
            "batchSize": 1,
            "maxConcurrency": 1,
            "http": {"url": h.webhook.url_for("/slow/{{operation}}")}
        }),
    )
    .await;
}

/// What a watcher of the sync saw of its run in flight: each progress it read, with the
/// records the metrics counted as written at that moment, until the run recorded its end.
async fn watch_progress(
    h: &Harness,
    name: &str,
) -> (
    Vec<(backflow::api::reverse_sync::RunProgress, Option<f64>)>,
    ReverseSync,
) {
    let written = format!(
        "backflow_sync_rows_total{{namespace=\"{NS}\",op=\"write\",outcome=\"sent\",sync=\"{name}\"}}"
    );
    let mut seen = Vec::new();
    for _ in 0..600 {
        let s = h.syncs().get(name).await.unwrap();
        if runs(&s).is_some() {
            return (seen, s);
        }
        let metric = h
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with(&written))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        if let Some(p) = s.status.and_then(|s| s.progress) {
            seen.push((p, metric));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the run of {name} did not end in 30 s");
}

/// Checks what a watcher saw of a run of `rows` rows: progress moving through delivery, counts
/// that only grow, an estimate once the rate is known.
fn assert_progress_moved(seen: &[(backflow::api::reverse_sync::RunProgress, Option<f64>)], rows: u64) {
    let delivering: Vec<_> = seen
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.phase == "Delivering")
        .collect();
    let sent: Vec<u64> = delivering.iter().map(|p| p.records_sent).collect();
    assert!(
        sent.windows(2).all(|w| w[0] <= w[1]),
        "records sent only grow: {sent:?}"
    );
    let distinct: std::collections::BTreeSet<_> = sent.iter().filter(|n| (1..rows).contains(*n)).collect();
    assert!(distinct.len() >= 2, "watched the count move mid-run: {sent:?}");
    for p in &delivering {
        assert_eq!(
            (p.rows_read, p.rows_planned, p.records_to_send),
            (rows, rows, rows)
        );
        assert_eq!(p.records_accepted + p.records_rejected, p.records_sent, "{p:?}");
        assert!(p.started_at <= p.updated_at, "{p:?}");
    }
    assert!(
        delivering
            .iter()
            .any(|p| p.estimated_seconds_left.is_some_and(|s| s > 0)),
        "an estimate once the rate is known: {delivering:?}"
    );
    let updates: std::collections::BTreeSet<_> = delivering.iter().map(|p| &p.updated_at).collect();
    assert!(updates.len() >= 2, "written again and again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_flight_reports_its_progress_and_live_metrics_until_its_end_takes_over() {
    const ROWS: u64 = 30;
    let mut h = Harness::start_with(
        ROWS as usize,
        Behaviour::accept_all().with_delay(Duration::from_millis(120)),
    )
    .await;
    slow_destination(&h, "slow").await;
    h.apply_sync("watched", json!({"destinationRef": {"name": "slow"}}))
        .await;
    h.run_operator(OperatorConfig {
        policy: backflow::controller::runner::RunPolicy {
            progress_interval: Duration::from_millis(200),
            ..sqlite_policy()
        },
        ..config()
    });

    let (seen, s) = watch_progress(&h, "watched").await;
    assert_progress_moved(&seen, ROWS);
    // The metrics moved during the run, not in one jump at its end.
    let mid_run: Vec<f64> = seen
        .iter()
        .filter_map(|(_, m)| *m)
        .filter(|m| *m > 0.0 && *m < ROWS as f64)
        .collect();
    assert!(!mid_run.is_empty(), "records counted mid-run: {seen:?}");

    // The end takes over: no progress, the summary, and each record counted once.
    let status = s.status.clone().unwrap();
    assert_eq!(status.progress, None);
    assert_eq!(runs(&s).unwrap().rows_added, ROWS);
    // The run records its metrics just after its status: give it a moment. The progress
    // reports may have counted every row already, so the end shows as the gauge gone.
    let written = format!(
        "backflow_sync_rows_total{{namespace=\"{NS}\",op=\"write\",outcome=\"sent\",sync=\"watched\"}} {ROWS}\n"
    );
    let mut exposition = h.metrics.render();
    for _ in 0..50 {
        if exposition.contains(&written) && !exposition.contains("backflow_sync_run_progress_ratio{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        exposition = h.metrics.render();
    }
    assert!(exposition.contains(&written), "{exposition}");
    assert!(exposition.contains(&format!(
        "backflow_sync_rows_read_total{{namespace=\"{NS}\",sync=\"watched\"}} {ROWS}\n"
    )));
    assert!(!exposition.contains("backflow_sync_run_progress_ratio{"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_pod_command_reports_progress_on_the_status_through_failed_writes_and_removes_it_at_the_end()
{
    const ROWS: u64 = 25;
    let h = Harness::start_with(
        ROWS as usize,
        Behaviour::accept_all().with_delay(Duration::from_millis(120)),
    )
    .await;
    slow_destination(&h, "slow").await;
    h.apply_sync(
        "job-watched",
        json!({"destinationRef": {"name": "slow"}, "execution": {"mode": "Job"}}),
    )
    .await;
    let client = h.client.clone();
    let pod = tokio::spawn(async move {
        backflow::controller::cluster_run::run_in_cluster(
            client,
            NS,
            "job-watched",
            backflow::controller::schedule::Trigger::Schedule,
            "pod-1",
            backflow::controller::runner::RunPolicy {
                progress_interval: Duration::from_millis(200),
                ..sqlite_policy()
            },
            CancellationToken::new(),
        )
        .await
        .unwrap()
    });
    // Once the run has started, its first progress writes fail: the run goes on regardless.
    h.wait_sync("job-watched", "the run started", |s| is(s, "Reconciling", "True"))
        .await;
    for _ in 0..3 {
        h._server.fail_next(
            "PUT",
            &format!("/apis/backflow.dev/v1alpha1/namespaces/{NS}/reversesyncs/job-watched/status"),
            500,
        );
    }
    let (seen, s) = watch_progress(&h, "job-watched").await;
    assert!(!pod.await.unwrap().failed);
    assert!(is(&s, "Ready", "True"));
    assert_progress_moved(&seen, ROWS);
    assert_eq!(s.status.unwrap().progress, None);
    h.stop().await;
}

/// The `observedGeneration` the double holds in a ReverseSync's status.
fn stored_generation(server: &ApiServer, name: &str) -> serde_json::Value {
    server
        .object("backflow.dev/v1alpha1/reversesyncs", "default", name)
        .unwrap()["status"]["observedGeneration"]
        .clone()
}

/// Writes `generation` as the `observedGeneration` of ReverseSync `name`'s status.
async fn write_generation(
    api: &Api<ReverseSync>,
    name: &str,
    generation: i64,
) -> Option<backflow::api::reverse_sync::ReverseSyncStatus> {
    backflow::controller::status::update(api, name, |s, _| s.observed_generation = Some(generation))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_status_write_lands_through_an_api_server_restart_and_the_refusals_of_a_server_starting() {
    let server = ApiServer::start().await;
    let api: Api<ReverseSync> = Api::namespaced(server.client(), "default");
    for name in ["restarted", "later"] {
        api.create(&PostParams::default(), &support::apiserver::reverse_sync(name))
            .await
            .unwrap();
    }
    let path = |name: &str| format!("/apis/backflow.dev/v1alpha1/namespaces/default/reversesyncs/{name}");

    // Down (500), then starting: refusing until its RBAC caches are filled (403), and not
    // serving the custom resource until its CRD informer has synced (plain-text 404), for
    // the read and for the write.
    server.fail_next("GET", &path("restarted"), 500);
    server.fail_next("GET", &path("restarted"), 403);
    server.not_serving_next("GET", &path("restarted"));
    server.not_serving_next("PUT", &path("restarted"));
    let written = write_generation(&api, "restarted", 7).await;
    assert_eq!(written.unwrap().observed_generation, Some(7));
    assert_eq!(stored_generation(&server, "restarted"), 7);

    // A write that starts once the server answers again meets its refusals first: the
    // outage this process met in the write above (as in a watch) makes them "not yet".
    server.fail_next("GET", &path("later"), 403);
    server.not_serving_next("PUT", &path("later"));
    let written = write_generation(&api, "later", 8).await;
    assert_eq!(written.unwrap().observed_generation, Some(8));
    assert_eq!(stored_generation(&server, "later"), 8);

    // An object that is gone is not a refusal: nothing is written, at once.
    api.delete("later", &DeleteParams::default()).await.unwrap();
    let started = std::time::Instant::now();
    let written = write_generation(&api, "later", 9).await;
    assert_eq!(written, None);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

//! The cluster commands (`backflow get`, `trigger`, `preview`, `suspend`, `resume`,
//! `describe`) on a real control plane (`support::cluster`), run as a data team runs them:
//! the `backflow` binary under a ServiceAccount bound to the shipped `backflow-data-team`
//! ClusterRole in its namespace only, with the namespace taken from the kubeconfig context.
//! The operator runs out of cluster as in `tests/cluster.rs`; PostgreSQL is warehouse and
//! destination.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use backflow::api::ReverseSync;
use support::cluster::{ControlPlane, Process, control_plane};
use support::cluster_manifests::{Manifests, count, customers_warehouse};
use support::db::TestDb;

/// A PostgreSQL database with `rows` customers and an empty `crm` table to sync them into.
async fn warehouse(rows: u32) -> TestDb {
    customers_warehouse("cli", rows).await
}

/// The Secret, Destination and ReverseSync `sync`; `extra` is appended to its spec.
fn manifests(namespace: &str, url: &str, sync: &str, extra: &str) -> String {
    Manifests::all(namespace, url, sync, extra).yaml()
}

fn apply(plane: &ControlPlane, yaml: &str) {
    plane.kubectl_stdin(&["apply", "-f", "-"], yaml);
}

/// A kubeconfig for ServiceAccount `data-team` of `namespace`, bound there (and only there)
/// to the shipped `backflow-data-team` ClusterRole, its context's namespace set to
/// `namespace` as `kubectl config set-context --current --namespace` does.
async fn data_team(plane: &ControlPlane, namespace: &str) -> PathBuf {
    plane.kubectl(&["create", "serviceaccount", "data-team", "-n", namespace]);
    plane.kubectl(&[
        "create",
        "rolebinding",
        "data-team-backflow",
        "-n",
        namespace,
        "--clusterrole=backflow-data-team",
        &format!("--serviceaccount={namespace}:data-team"),
    ]);
    let path = plane.service_account_kubeconfig(namespace, "data-team").await;
    let status = std::process::Command::new(plane.bin.join("kubectl"))
        .args([
            "config",
            "set-context",
            "--current",
            "--namespace",
            namespace,
            "--kubeconfig",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("kubectl runs");
    assert!(status.success(), "kubectl config set-context");
    path
}

/// What one `backflow` invocation did.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit ok={}\nstdout:\n{}\nstderr:\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// Runs `backflow ARGS` with `kubeconfig`, its output piped (not a terminal: plain lines).
async fn backflow(kubeconfig: &Path, args: &[&str]) -> Ran {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backflow"))
        .args(args)
        .env_clear()
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", "/usr/bin:/bin")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("the backflow binary starts");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `name` until `done` holds, or panics with its status and the operator's log.
async fn wait_sync(
    api: &Api<ReverseSync>,
    name: &str,
    what: &str,
    operator: &Process,
    done: impl Fn(&ReverseSync) -> bool,
) -> ReverseSync {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = api.get_opt(name).await.ok().flatten();
        if let Some(s) = &last
            && done(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {what} did not happen within 60s; status: {:#?}\noperator log:\n{}",
            last.and_then(|s| s.status),
            operator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn ready(s: &ReverseSync) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// A namespace with a data-team kubeconfig, a warehouse of `rows`, an operator watching it,
/// and sync `customers` after its first run.
struct Team {
    ns: String,
    kubeconfig: PathBuf,
    db: TestDb,
    operator: Process,
    api: Api<ReverseSync>,
    client: Client,
}

async fn team(prefix: &str, rows: u32, operator_args: &[&str], extra: &str) -> Team {
    let plane = control_plane();
    let ns = plane.namespace(prefix);
    let kubeconfig = data_team(plane, &ns).await;
    let db = warehouse(rows).await;
    let mut args = vec!["--watch-namespace", ns.as_str()];
    args.extend_from_slice(operator_args);
    let operator = Process::operator(&plane.operator_kubeconfig(), prefix, &args);
    apply(plane, &manifests(&ns, &db.url, "customers", extra));
    let client = plane.admin().await;
    let api: Api<ReverseSync> = Api::namespaced(client.clone(), &ns);
    Team {
        ns,
        kubeconfig,
        db,
        operator,
        api,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_lists_syncs_and_destinations_of_the_contexts_namespace_within_the_data_team_role() {
    let t = team("cli-get", 5, &[], "").await;
    wait_sync(&t.api, "customers", "Ready", &t.operator, ready).await;

    let syncs = backflow(&t.kubeconfig, &["get", "syncs"]).await;
    assert!(syncs.ok, "{syncs}");
    let lines: Vec<&str> = syncs.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{syncs}");
    assert!(
        lines[0].starts_with("NAME        READY   MODE     LAST RUN"),
        "{syncs}"
    );
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &cells[..8],
        ["customers", "True", "upsert", "Succeeded", "5", "0", "0", "0"],
        "{syncs}"
    );

    let destinations = backflow(&t.kubeconfig, &["get", "destinations", "-n", &t.ns]).await;
    assert!(destinations.ok, "{destinations}");
    assert!(
        destinations
            .stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("crm    postgres   True")),
        "{destinations}"
    );

    let json = backflow(&t.kubeconfig, &["get", "rsync", "-o", "json"]).await;
    assert!(json.ok, "{json}");
    let list: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["status"]["lastRun"]["rowsAdded"], 5, "{json}");
    let yaml = backflow(&t.kubeconfig, &["get", "syncs", "-o", "yaml"]).await;
    assert!(yaml.ok && yaml.stdout.contains("name: customers"), "{yaml}");

    // The Role is namespaced: other namespaces stay closed, and the command says why.
    let all = backflow(&t.kubeconfig, &["get", "syncs", "-A"]).await;
    assert!(!all.ok, "{all}");
    assert!(
        all.stderr
            .contains("failed to list ReverseSyncs in all namespaces")
            && all.stderr.contains("forbidden"),
        "{all}"
    );
    // As a kubectl plugin: a `kubectl-backflow` link on PATH, run by kubectl itself.
    let plugins = std::env::temp_dir().join(format!("backflow-plugin-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&plugins).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_backflow"), plugins.join("kubectl-backflow")).unwrap();
    let plane = control_plane();
    let out = tokio::process::Command::new(plane.bin.join("kubectl"))
        .args(["backflow", "get", "syncs"])
        .env_clear()
        .env("KUBECONFIG", &t.kubeconfig)
        .env("PATH", format!("{}:/usr/bin:/bin", plugins.display()))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.lines().nth(1).is_some_and(|l| l.starts_with("customers ")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = std::process::Command::new(plugins.join("kubectl-backflow"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: kubectl backflow [OPTIONS] <COMMAND>"));
    std::fs::remove_dir_all(&plugins).unwrap();

    let missing = backflow(&t.kubeconfig, &["trigger", "nope"]).await;
    assert!(
        !missing.ok
            && missing.stderr.contains(&format!(
                "failed to find ReverseSync \"nope\" in namespace \"{}\"",
                t.ns
            )),
        "{missing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_wait_follows_the_run_it_started_and_a_full_resync_sends_every_row_again() {
    let t = team("cli-trigger", 6, &[], "").await;
    wait_sync(&t.api, "customers", "Ready", &t.operator, ready).await;
    // Someone edits the destination behind the sync's back: an ordinary run does not see it.
    t.db.exec("UPDATE crm SET plan = 'edited'").await;

    let run = backflow(
        &t.kubeconfig,
        &["trigger", "customers", "--wait", "--timeout", "60s"],
    )
    .await;
    assert!(run.ok, "{run}");
    assert!(
        run.stdout.starts_with(&format!(
            "{}/customers: Succeeded: 6 rows, added 0, changed 0, removed 0, unchanged 6",
            t.ns
        )),
        "{run}"
    );
    assert!(run.stdout.contains("trigger Requested, started"), "{run}");
    let s = t.api.get("customers").await.unwrap();
    let value = s.annotations().get("backflow.dev/requested-at").cloned().unwrap();
    assert_eq!(
        s.status.unwrap().last_run.unwrap().requested_at.as_deref(),
        Some(value.as_str())
    );
    assert_eq!(
        count(&t.db, "SELECT count(*) FROM crm WHERE plan = 'edited'").await,
        6
    );

    let full = backflow(
        &t.kubeconfig,
        &["trigger", "customers", "--full-resync", "--wait"],
    )
    .await;
    assert!(full.ok, "{full}");
    assert!(full.stderr.contains("requested a full resync"), "{full}");
    assert!(full.stdout.contains("trigger Requested, full resync"), "{full}");
    assert_eq!(
        count(&t.db, "SELECT count(*) FROM crm WHERE plan = 'free'").await,
        6,
        "every row sent again"
    );

    // One-shot: the next request is an ordinary run again.
    t.db.exec("UPDATE crm SET plan = 'edited' WHERE id = 1").await;
    let again = backflow(&t.kubeconfig, &["trigger", "customers", "--wait"]).await;
    assert!(again.ok && !again.stdout.contains("full resync"), "{again}");
    assert_eq!(
        count(&t.db, "SELECT count(*) FROM crm WHERE plan = 'edited'").await,
        1
    );

    // A run that fails: the model's table is gone. The command exits non-zero with the error.
    t.db.exec("ALTER TABLE customers RENAME TO customers_gone").await;
    let failed = backflow(
        &t.kubeconfig,
        &["trigger", "customers", "--wait", "--timeout", "60s"],
    )
    .await;
    assert!(!failed.ok, "{failed}");
    assert!(
        failed.stdout.contains("customers: Failed:") && failed.stdout.contains("error: "),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_wait_gives_up_at_its_timeout_when_no_run_answers() {
    let plane = control_plane();
    let ns = plane.namespace("cli-timeout");
    let kubeconfig = data_team(plane, &ns).await;
    // No operator watches this namespace: nothing answers the request.
    apply(plane, &manifests(&ns, "postgres://nowhere/db", "customers", ""));
    let started = Instant::now();
    let ran = backflow(
        &kubeconfig,
        &["trigger", "customers", "--wait", "--timeout", "3s"],
    )
    .await;
    assert!(!ran.ok, "{ran}");
    assert!(
        ran.stderr
            .contains("timed out after 3s waiting for the run of ReverseSync"),
        "{ran}"
    );
    assert!(
        ran.stderr.contains("waiting for the operator to start the run"),
        "plain progress lines: {ran}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_prints_the_plan_and_leaves_the_spec_the_generation_and_the_destination_alone() {
    let t = team("cli-preview", 4, &[], "").await;
    let before = wait_sync(&t.api, "customers", "Ready", &t.operator, ready).await;
    t.db
        .exec("INSERT INTO customers VALUES (5, 'user5@example.com', 'pro'), (6, 'user6@example.com', 'pro'); UPDATE customers SET plan = 'pro' WHERE id = 1")
        .await;

    let preview = backflow(&t.kubeconfig, &["preview", "customers", "--timeout", "60s"]).await;
    assert!(preview.ok, "{preview}");
    assert!(
        preview.stdout.starts_with(&format!(
            "{}/customers: plan: added 2, changed 1, removed 0, unchanged 3, rejected 0",
            t.ns
        )),
        "{preview}"
    );
    assert!(
        preview.stdout.contains("  would ") && preview.stdout.contains(" 5\n"),
        "sample keys: {preview}"
    );

    let after = t.api.get("customers").await.unwrap();
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "the spec was not edited"
    );
    assert_eq!(after.spec, before.spec);
    let (was, now) = (before.status.unwrap(), after.status.clone().unwrap());
    assert_eq!(now.last_run, was.last_run, "a preview is not a run");
    assert_eq!(
        count(&t.db, "SELECT count(*) FROM crm").await,
        4,
        "nothing was sent"
    );
    let plan = now.plan.unwrap();
    assert_eq!(
        plan.requested_at.as_deref(),
        after
            .annotations()
            .get("backflow.dev/preview-requested-at")
            .map(String::as_str)
    );

    // The next run sends what the preview announced: state was kept.
    let run = backflow(&t.kubeconfig, &["trigger", "customers", "--wait"]).await;
    assert!(run.ok && run.stdout.contains("added 2, changed 1"), "{run}");

    let json = backflow(&t.kubeconfig, &["preview", "customers", "-o", "json"]).await;
    assert!(json.ok, "{json}");
    let plan: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        (plan["add"].as_u64(), plan["unchanged"].as_u64()),
        (Some(0), Some(6)),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_resume_set_spec_suspend_and_a_suspended_sync_refuses_a_trigger() {
    let t = team("cli-suspend", 3, &[], "").await;
    wait_sync(&t.api, "customers", "Ready", &t.operator, ready).await;
    let suspended = backflow(&t.kubeconfig, &["suspend", "customers"]).await;
    assert!(
        suspended.ok && suspended.stdout.contains("suspended"),
        "{suspended}"
    );
    let s = wait_sync(&t.api, "customers", "Suspended", &t.operator, |s| {
        s.status
            .as_ref()
            .is_some_and(|st| st.conditions.iter().any(|c| c.reason == "Suspended"))
    })
    .await;
    assert!(s.spec.suspend);
    let get = backflow(&t.kubeconfig, &["get", "syncs"]).await;
    assert!(
        get.stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("suspended") && l.ends_with("Suspended")),
        "{get}"
    );
    let refused = backflow(&t.kubeconfig, &["trigger", "customers", "--wait"]).await;
    assert!(
        !refused.ok && refused.stderr.contains("is suspended"),
        "{refused}"
    );

    let resumed = backflow(&t.kubeconfig, &["resume", "customers"]).await;
    assert!(resumed.ok, "{resumed}");
    assert!(!t.api.get("customers").await.unwrap().spec.suspend);
    let run = backflow(&t.kubeconfig, &["trigger", "customers", "--wait"]).await;
    assert!(run.ok, "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_conditions_the_last_run_the_state_size_and_events() {
    let t = team("cli-describe", 5, &[], "").await;
    wait_sync(&t.api, "customers", "Ready", &t.operator, ready).await;
    let described = backflow(&t.kubeconfig, &["describe", "customers"]).await;
    assert!(described.ok, "{described}");
    let text = &described.stdout;
    for expected in [
        "Name:          customers\n",
        &format!("Namespace:     {}\n", t.ns),
        "Execution:     InProcess\n",
        "Conditions:\n  TYPE",
        "  Ready ",
        "Run in flight:\n  none\n",
        "Succeeded: 5 rows, added 5",
        "State store:\n  ConfigMap: ",
        "SyncSucceeded",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{described}");
    }
    assert!(!text.contains("ConfigMap: size unknown"), "{described}");
    let _ = &t.client;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_job_mode_trigger_follows_the_job_run_and_a_full_resync_reaches_the_pod() {
    let plane = control_plane();
    let t = team(
        "cli-job",
        4,
        &["--job-service-account", "backflow-run"],
        "  execution: {mode: Job}\n",
    )
    .await;
    plane.kubectl(&["create", "serviceaccount", "backflow-run", "-n", &t.ns]);
    plane.kubectl(&[
        "create",
        "rolebinding",
        "backflow-run",
        "-n",
        &t.ns,
        "--clusterrole=backflow-run",
        &format!("--serviceaccount={}:backflow-run", t.ns),
    ]);
    run_next_job(plane, &t, None).await;
    wait_sync(&t.api, "customers", "Ready", &t.operator, |s| {
        ready(s) && s.status.as_ref().is_some_and(|st| st.active_job.is_none())
    })
    .await;
    t.db.exec("UPDATE crm SET plan = 'edited'").await;

    let kubeconfig = t.kubeconfig.clone();
    let trigger = tokio::spawn(async move {
        backflow(
            &kubeconfig,
            &[
                "trigger",
                "customers",
                "--full-resync",
                "--wait",
                "--timeout",
                "90s",
            ],
        )
        .await
    });
    let first = t
        .api
        .get("customers")
        .await
        .unwrap()
        .status
        .unwrap()
        .last_run
        .unwrap()
        .start;
    run_next_job(plane, &t, Some(&first)).await;
    let ran = trigger.await.unwrap();
    assert!(ran.ok, "{ran}\noperator log:\n{}", t.operator.log_text());
    assert!(ran.stdout.contains("trigger Requested, full resync"), "{ran}");
    assert_eq!(
        count(&t.db, "SELECT count(*) FROM crm WHERE plan = 'free'").await,
        4
    );

    let described = backflow(&t.kubeconfig, &["describe", "customers"]).await;
    assert!(
        described.stdout.contains("Last run Job:\n  customers-"),
        "{described}"
    );
}

/// Waits for a run Job newer than the run that started at `after`, plays its kubelet, and
/// marks its pod Succeeded so the Job controller completes the Job.
async fn run_next_job(plane: &ControlPlane, t: &Team, after: Option<&str>) {
    let s = wait_sync(&t.api, "customers", "a run Job", &t.operator, |s| {
        s.status.as_ref().is_some_and(|st| {
            st.active_job.is_some()
                && after.is_none_or(|a| st.last_run.as_ref().is_some_and(|r| r.start == a))
        })
    })
    .await;
    let job_name = s.status.unwrap().active_job.unwrap();
    let jobs: Api<Job> = Api::namespaced(t.client.clone(), &t.ns);
    let job = jobs.get(&job_name).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    let pod = loop {
        let list = pods
            .list(&ListParams::default().labels(&format!("job-name={job_name}")))
            .await
            .unwrap();
        if let Some(p) = list.items.into_iter().next() {
            break p;
        }
        assert!(Instant::now() < deadline, "the Job controller created no pod");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (ok, out) = plane.run_job_like_a_kubelet(&job).await;
    assert!(ok, "the run pod failed:\n{out}");
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "run", "image": "backflow:e2e", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}})),
    )
    .await
    .unwrap();
}

//! Job mode: the run Job on real API validation, the test playing the kubelet under the run
//! ServiceAccount; a missing ServiceAccount, or a Job that cannot create its pod, on the sync.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::support::cluster::{Process, control_plane};
use crate::support::cluster_manifests::wait_until;
use crate::{apply, condition, count, is, manifests, shared, syncs, wait_sync, warehouse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_mode_without_the_run_service_account_says_why_and_runs_once_it_exists() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("jobs");
    let db = warehouse(20).await;
    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "jobs",
        &["--watch-namespace", &ns, "--job-service-account", "backflow-run"],
    );
    apply(
        plane,
        &manifests(&ns, &db, "in-a-job", "  execution: {mode: Job}\n"),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    let s = wait_sync(
        &api,
        "in-a-job",
        "RunServiceAccountMissing",
        Duration::from_secs(30),
        &operator,
        |s| condition(s, "Ready").is_some_and(|c| c.reason == "RunServiceAccountMissing"),
    )
    .await;
    let message = &condition(&s, "Ready").unwrap().message;
    assert!(
        message.contains(&format!("{ns}/backflow-run")) && message.contains("ClusterRole backflow-run"),
        "names the cause and the fix: {message}"
    );
    assert!(is(&s, "Stalled", "True"));
    let events = plane.kubectl(&["get", "events", "-n", &ns]);
    assert!(events.contains("RunServiceAccountMissing"), "{events}");

    // The fix the message gives: the ServiceAccount and its RoleBinding.
    plane.kubectl(&["create", "serviceaccount", "backflow-run", "-n", &ns]);
    plane.kubectl(&[
        "create",
        "rolebinding",
        "backflow-run",
        "-n",
        &ns,
        "--clusterrole=backflow-run",
        &format!("--serviceaccount={ns}:backflow-run"),
    ]);
    let s = wait_sync(
        &api,
        "in-a-job",
        "a run Job",
        Duration::from_secs(40),
        &operator,
        |s| s.status.as_ref().is_some_and(|st| st.active_job.is_some()),
    )
    .await;
    let job_name = s.status.unwrap().active_job.unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = jobs.get(&job_name).await.unwrap();

    // The kube-controller-manager's Job controller created the pod; play its kubelet.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = wait_until(
        "the Job controller creating a pod",
        Duration::from_secs(30),
        || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("job-name={job_name}")))
                .await
                .unwrap();
            list.items.into_iter().next().ok_or_else(|| "no pod".to_owned())
        },
    )
    .await;
    let (ok, out) = plane.run_job_like_a_kubelet(&job).await;
    assert!(
        ok,
        "the run pod's command failed under the run ServiceAccount:\n{out}"
    );
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "run", "image": "backflow:e2e", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}})),
    )
    .await
    .unwrap();
    let s = wait_sync(
        &api,
        "in-a-job",
        "Ready after the Job",
        Duration::from_secs(60),
        &operator,
        |s| is(s, "Ready", "True") && s.status.as_ref().is_some_and(|st| st.active_job.is_none()),
    )
    .await;
    assert!(is(&s, "Stalled", "False"), "{:?}", s.status);
    assert_eq!(count(&db, "SELECT count(*) FROM crm").await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_create_its_pod_says_so_on_the_sync() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("quota");
    let db = warehouse(1).await;
    plane.kubectl(&["create", "quota", "no-pods", "-n", &ns, "--hard=pods=0"]);
    // Admission enforces a quota once the controller manager has computed its status.
    wait_until("the quota's status", Duration::from_secs(30), || async {
        let hard = plane.kubectl(&[
            "get",
            "quota",
            "no-pods",
            "-n",
            &ns,
            "-o",
            "jsonpath={.status.hard.pods}",
        ]);
        if hard == "0" {
            Ok(())
        } else {
            Err(format!("status.hard.pods {hard:?}"))
        }
    })
    .await;
    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "quota",
        // The namespace's default ServiceAccount exists: the up-front check passes.
        &["--watch-namespace", &ns],
    );
    apply(
        plane,
        &manifests(&ns, &db, "blocked", "  execution: {mode: Job}\n"),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    let s = wait_sync(
        &api,
        "blocked",
        "RunPodNotCreated",
        Duration::from_secs(60),
        &operator,
        |s| condition(s, "Ready").is_some_and(|c| c.reason == "RunPodNotCreated"),
    )
    .await;
    let message = &condition(&s, "Ready").unwrap().message;
    assert!(
        message.contains("quota") && message.contains("cannot create its pod"),
        "{message}"
    );
    let events = plane.kubectl(&[
        "get",
        "events",
        "-n",
        &ns,
        "--field-selector",
        "involvedObject.kind=ReverseSync",
    ]);
    assert!(events.contains("RunPodNotCreated"), "{events}");
}

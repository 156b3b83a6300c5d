//! Deletion (the finalizer, the garbage collector, a namespace holding syncs) and ConfigMap
//! state at scale.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};

use crate::support::cluster::{Process, control_plane};
use crate::support::cluster_manifests::{Manifests, wait_until};
use crate::{
    apply, count, finished_by, finished_run, is, manifests, ready, shared, syncs, wait_sync, warehouse,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_syncs_and_their_namespace_leaves_nothing_and_the_garbage_collector_removes_owned_state() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("delete");
    let db = warehouse(5).await;
    let mut operator = Process::operator(
        &plane.operator_kubeconfig(),
        "delete",
        &["--watch-namespace", &ns],
    );
    apply(
        plane,
        &Manifests::all(&ns, &db.url, "customers", "")
            .sync("orphaned", "")
            .sync("in-namespace", "")
            .yaml(),
    );
    for name in ["customers", "orphaned", "in-namespace"] {
        ready(plane, &ns, name);
    }
    let client = plane.admin().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let state_of = |sync: &str| ListParams::default().labels(&format!("backflow.dev/sync={sync}"));
    assert!(!maps.list(&state_of("customers")).await.unwrap().items.is_empty());

    // With the operator: the finalizer cancels, removes state, and lets go.
    plane.kubectl(&["delete", "-n", &ns, "rsync/customers", "--timeout=60s"]);
    assert!(maps.list(&state_of("customers")).await.unwrap().items.is_empty());

    // Without it (finalizer removed by hand): the garbage collector deletes the owned state.
    operator.terminate();
    plane.kubectl(&[
        "patch",
        "-n",
        &ns,
        "rsync/orphaned",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    plane.kubectl(&["delete", "-n", &ns, "rsync/orphaned", "--timeout=30s"]);
    wait_until(
        "the garbage collector deleting the state ConfigMaps",
        Duration::from_secs(60),
        || async {
            let left = maps.list(&state_of("orphaned")).await.unwrap().items;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} ConfigMaps left", left.len()))
            }
        },
    )
    .await;

    // A namespace holding a sync deletes cleanly with the operator running.
    let _operator = Process::operator(
        &plane.operator_kubeconfig(),
        "delete-2",
        &["--watch-namespace", &ns],
    );
    let out = plane.kubectl(&["delete", "namespace", &ns, "--timeout=120s"]);
    assert!(out.contains("deleted"), "{out}");
    let (_, out) = plane.kubectl_result(&["get", "namespace", &ns]);
    assert!(out.contains("NotFound"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_state_of_300_000_rows_fits_real_etcd_and_a_second_run_sends_nothing() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("scale");
    let db = warehouse(300_000).await;
    let operator = Process::operator(&plane.operator_kubeconfig(), "scale", &["--watch-namespace", &ns]);
    apply(plane, &manifests(&ns, &db, "big", ""));
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    let s = wait_sync(
        &api,
        "big",
        "the first run",
        Duration::from_secs(300),
        &operator,
        finished_run,
    )
    .await;
    assert!(is(&s, "Ready", "True"), "{:?}", s.status);
    assert_eq!(count(&db, "SELECT count(*) FROM crm").await, 300_000);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let state = maps
        .list(&ListParams::default().labels("backflow.dev/sync=big"))
        .await
        .unwrap();
    let largest = state
        .items
        .iter()
        .map(|m| serde_json::to_vec(m).unwrap().len())
        .max()
        .unwrap();
    // etcd's default --max-request-bytes is 1.5 MiB.
    assert!(largest < 1_572_864, "a state ConfigMap of {largest} bytes");
    plane.kubectl(&[
        "annotate",
        "-n",
        &ns,
        "rsync/big",
        "backflow.dev/requested-at=again",
    ]);
    let s = wait_sync(
        &api,
        "big",
        "the requested run",
        Duration::from_secs(300),
        &operator,
        |s| finished_by(s, "Requested"),
    )
    .await;
    let run = s.status.unwrap().last_run.unwrap();
    assert_eq!(
        (run.rows_added, run.rows_changed, run.rows_unchanged),
        (0, 0, 300_000)
    );
}

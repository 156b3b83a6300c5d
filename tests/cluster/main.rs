//! The operator on a real Kubernetes control plane (etcd, kube-apiserver and
//! kube-controller-manager v1.20.2, `support::cluster`): installed as users install it, driven
//! with the real `kubectl`, the `backflow` binary run out of cluster under the operator
//! ServiceAccount's identity, PostgreSQL as warehouse and destination.
//!
//! One test binary, so the control plane starts once; its tests, one module per concern:
//! - [`install`]: the CRDs, `kubectl get`/`explain`, `config/default` and the Helm chart;
//! - [`schedule`]: `kubectl apply`/`wait`, intervals, requested runs, edits, suspend, `after`;
//! - [`jobs`]: Job mode, its ServiceAccount and pod creation;
//! - [`lifecycle`]: deletion and the garbage collector, ConfigMap state at scale;
//! - [`rbac`]: watch-namespace mode and a role that is too small;
//! - [`replicas`]: two replicas and the lease;
//! - [`faults`]: API server restarts and outages, etcd compaction, a second status writer.
//!
//! Tests share the control plane and each works in namespaces of its own. Tests that run an
//! operator over every namespace, or stop the API server, hold [`exclusive`]; the others,
//! whose operators watch only their namespaces, hold [`shared`].

#[path = "../support/mod.rs"]
mod support;

mod deliveries;
mod faults;
mod install;
mod jobs;
mod lifecycle;
mod rbac;
mod replicas;
mod schedule;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, Client};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use backflow::api::ReverseSync;
use support::cluster::{ControlPlane, Process};
use support::cluster_manifests::{Manifests, count, customers_warehouse, tail, wait_until};
use support::db::TestDb;

static LOCK: RwLock<()> = RwLock::const_new(());

/// For a test whose operator watches only its own namespaces.
async fn shared() -> RwLockReadGuard<'static, ()> {
    LOCK.read().await
}

/// For a test that watches every namespace or stops the API server.
async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOCK.write().await
}

/// A PostgreSQL database with `rows` customers and an empty `crm` table to sync them into.
async fn warehouse(rows: u32) -> TestDb {
    customers_warehouse("e2e", rows).await
}

/// The Secret, Destination and ReverseSync `sync` of [`Manifests::all`], as one YAML stream.
fn manifests(namespace: &str, db: &TestDb, sync: &str, extra: &str) -> String {
    Manifests::all(namespace, &db.url, sync, extra).yaml()
}

/// `kubectl apply -f FILE` of `yaml`, as a user applies a file.
fn apply(plane: &ControlPlane, yaml: &str) -> String {
    let file = plane
        .dir
        .join(format!("manifest-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, yaml).unwrap();
    plane.kubectl(&["apply", "-f", &file.to_string_lossy()])
}

/// `kubectl wait --for=condition=Ready rsync/NAME` (60 s), as a user waits; its output.
fn ready(plane: &ControlPlane, namespace: &str, sync: &str) -> String {
    plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "-n",
        namespace,
        &format!("rsync/{sync}"),
    ])
}

fn syncs(client: &Client, namespace: &str) -> Api<ReverseSync> {
    Api::namespaced(client.clone(), namespace)
}

fn condition<'a>(s: &'a ReverseSync, type_: &str) -> Option<&'a Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == type_))
}

fn is(s: &ReverseSync, type_: &str, status: &str) -> bool {
    condition(s, type_).is_some_and(|c| c.status == status)
}

/// Polls ReverseSync `name` until `done` holds, or panics with its status and the log.
async fn wait_sync(
    api: &Api<ReverseSync>,
    name: &str,
    what: &str,
    within: Duration,
    operator: &Process,
    done: impl Fn(&ReverseSync) -> bool,
) -> ReverseSync {
    wait_until(&format!("{name}: {what}"), within, || async {
        match api.get_opt(name).await.ok().flatten() {
            Some(s) if done(&s) => Ok(s),
            last => Err(format!(
                "status: {:#?}\noperator log:\n{}",
                last.and_then(|s| s.status),
                tail(&operator.log_text(), 60)
            )),
        }
    })
    .await
}

fn run_start(s: &ReverseSync) -> Option<String> {
    s.status
        .as_ref()
        .and_then(|st| st.last_run.as_ref())
        .map(|r| r.start.clone())
}

fn finished_run(s: &ReverseSync) -> bool {
    s.status
        .as_ref()
        .and_then(|st| st.last_run.as_ref())
        .is_some_and(|r| r.end.is_some())
}

/// The last run ended, with this trigger.
fn finished_by(s: &ReverseSync, trigger: &str) -> bool {
    s.status
        .as_ref()
        .and_then(|st| st.last_run.as_ref())
        .is_some_and(|r| r.trigger.as_deref() == Some(trigger) && r.end.is_some())
}

//! The ConfigMap state store over the in-memory API server double: sharding under the object
//! limit, checkpoints that survive a crash, damaged checkpoints skipped, the atomic switch
//! at `finish`, scope changes, concurrent writers, cleanup, and a full engine run.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use backflow::api::ReverseSyncSpec;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::state::configmap::ConfigMapStore;
use backflow::state::configmap::gc::delete_all;
use backflow::state::configmap::names::index_name;
use backflow::state::{StateChange, StateError, StateStore, stored_key_hash};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::Value;
use support::apiserver::ApiServer;
use support::fake_connector::FakeConnector;
use support::sqlite::TempSqlite;

const NS: &str = "default";
const SCOPE: &str = "default/crm";

fn owner(sync: &str) -> OwnerReference {
    OwnerReference {
        api_version: "backflow.dev/v1alpha1".into(),
        kind: "ReverseSync".into(),
        name: sync.into(),
        uid: format!("uid-{sync}"),
        controller: Some(false),
        block_owner_deletion: None,
    }
}

fn store(server: &ApiServer, sync: &str) -> ConfigMapStore {
    ConfigMapStore::new(server.client(), NS, sync, owner(sync))
}

fn put(i: usize, fingerprint: u64) -> StateChange {
    StateChange::Put {
        key: format!("customer-{i}"),
        fingerprint,
        identity: format!("{{\"email\":\"user{i}@example.com\"}}"),
    }
}

fn remove(i: usize) -> StateChange {
    StateChange::Remove {
        key: format!("customer-{i}"),
    }
}

/// The state ConfigMaps of `sync` (by its label), as stored.
fn state_objects(server: &ApiServer, sync: &str) -> Vec<Value> {
    server
        .objects("v1/configmaps", Some(NS))
        .into_iter()
        .filter(|o| o["metadata"]["labels"]["backflow.dev/sync"] == sync)
        .collect()
}

/// Names of the state ConfigMaps of `sync` of one kind (`index`, `shard`, `journal`).
fn names(server: &ApiServer, sync: &str, kind: &str) -> BTreeSet<String> {
    state_objects(server, sync)
        .into_iter()
        .filter(|o| o["metadata"]["labels"]["backflow.dev/state"] == kind)
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Rewrites a stored ConfigMap's binary payload (delete and create, as its data is
/// immutable), keeping its labels and annotations: the damage a checksum must catch.
async fn tamper(server: &ApiServer, name: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let api: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let mut cm = api.get(name).await.unwrap();
    let data = cm.binary_data.as_mut().unwrap();
    let bytes = &mut data.values_mut().next().unwrap().0;
    edit(bytes);
    api.delete(name, &DeleteParams::default()).await.unwrap();
    cm.metadata = ObjectMeta {
        name: cm.metadata.name.take(),
        labels: cm.metadata.labels.take(),
        annotations: cm.metadata.annotations.take(),
        owner_references: cm.metadata.owner_references.take(),
        ..ObjectMeta::default()
    };
    api.create(&PostParams::default(), &cm).await.unwrap();
}

#[tokio::test]
async fn three_hundred_thousand_rows_round_trip_through_several_shards_each_under_a_mebibyte() {
    let server = ApiServer::start().await;
    let mut s = store(&server, "big");
    assert!(s.load(SCOPE).await.unwrap().is_empty());
    let rows = 300_000;
    let fingerprint = |i: usize| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
    for chunk in (0..rows).collect::<Vec<_>>().chunks(10_000) {
        let changes: Vec<_> = chunk.iter().map(|&i| put(i, fingerprint(i))).collect();
        s.commit(SCOPE, &changes).await.unwrap();
    }
    assert_eq!(names(&server, "big", "journal").len(), rows / 10_000);
    s.finish(SCOPE).await.unwrap();

    let shards = names(&server, "big", "shard");
    assert!(shards.len() >= 3, "{shards:?}");
    assert!(names(&server, "big", "journal").is_empty());
    for o in state_objects(&server, "big") {
        let size = serde_json::to_vec(&o).unwrap().len();
        assert!(size < 1024 * 1024, "{} is {size} bytes", o["metadata"]["name"]);
        assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "uid-big");
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "backflow"
        );
    }

    let set = store(&server, "big").load(SCOPE).await.unwrap();
    assert_eq!(set.len(), rows);
    for i in 0..rows {
        let e = set.get(set.position(&format!("customer-{i}")).unwrap()).unwrap();
        assert_eq!(e.fingerprint, fingerprint(i));
        assert_eq!(e.identity, format!("{{\"email\":\"user{i}@example.com\"}}"));
    }
}

#[tokio::test]
async fn checkpoints_survive_a_crash_without_finish_and_fold_at_the_next_finish() {
    let server = ApiServer::start().await;
    let mut s = store(&server, "crash");
    s.load(SCOPE).await.unwrap();
    s.commit(SCOPE, &[put(1, 1), put(2, 2)]).await.unwrap();
    s.commit(SCOPE, &[remove(1), put(3, 3)]).await.unwrap();
    drop(s); // a crash: no finish

    let mut again = store(&server, "crash");
    let set = again.load(SCOPE).await.unwrap();
    assert_eq!(set.len(), 2);
    assert!(set.position("customer-1").is_none());
    // Finishing a run that committed nothing still folds what the crashed one left.
    again.finish(SCOPE).await.unwrap();
    assert!(names(&server, "crash", "journal").is_empty());
    assert_eq!(names(&server, "crash", "shard").len(), 1);

    let set = store(&server, "crash").load(SCOPE).await.unwrap();
    assert_eq!(
        set.get(set.position("customer-3").unwrap()).unwrap().fingerprint,
        3
    );
    assert_eq!(set.len(), 2);
}

fn pairs(rows: &[(usize, u64)]) -> Vec<(u128, u64)> {
    rows.iter()
        .map(|(i, fp)| (stored_key_hash(&format!("customer-{i}")), *fp))
        .collect()
}

#[tokio::test]
async fn the_diff_reads_a_crashed_runs_checkpoints_and_finish_packs_what_it_read_plus_this_runs() {
    let server = ApiServer::start().await;
    let mut s = store(&server, "bucketed");
    s.load(SCOPE).await.unwrap();
    s.commit(SCOPE, &(0..10).map(|i| put(i, 1)).collect::<Vec<_>>())
        .await
        .unwrap();
    s.finish(SCOPE).await.unwrap();

    // A run that diffs, checkpoints, and crashes before finish.
    let mut crashed = store(&server, "bucketed");
    let diff = crashed.store_diff().unwrap();
    assert!(diff.begin(SCOPE).await.unwrap());
    assert!(diff.holds_state(SCOPE));
    diff.stage(&pairs(&[(0, 1), (1, 1)])).await.unwrap();
    diff.diff(SCOPE, false).await.unwrap();
    crashed.commit(SCOPE, &[put(10, 1), remove(0)]).await.unwrap();
    drop(crashed);

    // The next run sees the base with those checkpoints applied.
    let mut next = store(&server, "bucketed");
    let diff = next.store_diff().unwrap();
    diff.begin(SCOPE).await.unwrap();
    let run: Vec<(usize, u64)> = (1..=10).map(|i| (i, 1)).chain([(11, 1), (5, 1)]).collect();
    diff.stage(&pairs(&run)).await.unwrap();
    let found = diff.diff(SCOPE, false).await.unwrap();
    assert!(!found.all_added);
    assert_eq!(
        found.changed.len(),
        1,
        "only customer-11 is new: {:?}",
        found.changed
    );
    assert_eq!(found.change(stored_key_hash("customer-11")), Some(true));
    assert_eq!(found.duplicates.get(&stored_key_hash("customer-5")), Some(&2));
    assert!(found.removed.is_empty(), "{:?}", found.removed);
    next.commit(SCOPE, &[put(11, 1), put(3, 7), remove(9)])
        .await
        .unwrap();
    next.finish(SCOPE).await.unwrap();
    assert!(names(&server, "bucketed", "journal").is_empty());

    let set = store(&server, "bucketed").load(SCOPE).await.unwrap();
    let mut keys: Vec<(String, u64)> = set.iter().map(|e| (e.key.to_owned(), e.fingerprint)).collect();
    keys.sort();
    let mut expected: Vec<(String, u64)> = [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]
        .iter()
        .map(|i| (format!("customer-{i}"), if *i == 3 { 7 } else { 1 }))
        .collect();
    expected.sort();
    assert_eq!(keys, expected);
}

#[tokio::test]
async fn a_garbled_or_misplaced_checkpoint_is_ignored_and_the_others_kept() {
    let server = ApiServer::start().await;
    let mut s = store(&server, "torn");
    s.load(SCOPE).await.unwrap();
    s.commit(SCOPE, &[put(1, 1)]).await.unwrap();
    s.commit(SCOPE, &[put(2, 2)]).await.unwrap();
    s.commit(SCOPE, &[put(3, 3)]).await.unwrap();
    drop(s);
    let index = index_name("torn");
    tamper(&server, &format!("{index}-0-j2"), |b| {
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
    })
    .await;
    // A checkpoint whose header says seq 1 under the name and label of seq 4.
    let api: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let mut copy = api.get(&format!("{index}-0-j1")).await.unwrap();
    copy.metadata = ObjectMeta {
        name: Some(format!("{index}-0-j4")),
        labels: copy.metadata.labels.take().map(|mut l| {
            l.insert("backflow.dev/seq".into(), "4".into());
            l
        }),
        annotations: copy.metadata.annotations.take(),
        ..ObjectMeta::default()
    };
    api.create(&PostParams::default(), &copy).await.unwrap();

    let mut again = store(&server, "torn");
    let set = again.load(SCOPE).await.unwrap();
    let keys: BTreeSet<_> = set.iter().map(|e| e.key.to_owned()).collect();
    assert_eq!(keys, BTreeSet::from(["customer-1".into(), "customer-3".into()]));
    // New checkpoints go after every seq present, damaged ones included.
    again.commit(SCOPE, &[put(5, 5)]).await.unwrap();
    assert!(names(&server, "torn", "journal").contains(&format!("{index}-0-j5")));
    again.finish(SCOPE).await.unwrap();
    assert!(names(&server, "torn", "journal").is_empty());
    assert_eq!(store(&server, "torn").load(SCOPE).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_damaged_shard_is_an_error_that_names_it_not_an_empty_state() {
    let server = ApiServer::start().await;
    let mut s = store(&server, "dmg");
    s.load(SCOPE).await.unwrap();
    s.commit(SCOPE, &[put(1, 1)]).await.unwrap();
    s.finish(SCOPE).await.unwrap();
    let shard = names(&server, "dmg", "shard").pop_first().unwrap();
    tamper(&server, &shard, |b| {
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
    })
    .await;

    let err = store(&server, "dmg").load(SCOPE).await.unwrap_err();
    assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("configmap default/{shard}")), "{text}");
    assert!(
        !text.contains("customer-1") && !text.contains("example.com"),
        "{text}"
    );
}

#[tokio::test]
async fn a_crash_between_the_new_shards_and_the_index_switch_keeps_the_old_state_and_the_next_finish_cleans_up()
 {
    let server = ApiServer::start().await;
    let index = index_name("atomic");
    let mut first = store(&server, "atomic");
    first.load(SCOPE).await.unwrap();
    first.commit(SCOPE, &[put(1, 1), put(2, 2)]).await.unwrap();
    first.finish(SCOPE).await.unwrap();
    let gen1 = names(&server, "atomic", "shard");
    assert_eq!(gen1, BTreeSet::from([format!("{index}-1-0")]));

    let mut second = store(&server, "atomic");
    second.load(SCOPE).await.unwrap();
    second.commit(SCOPE, &[remove(1), put(3, 3)]).await.unwrap();
    // The index update fails as if the process died right before it.
    server.fail_next("PUT", &format!("/api/v1/namespaces/{NS}/configmaps/{index}"), 500);
    let err = second.finish(SCOPE).await.unwrap_err();
    assert!(matches!(err, StateError::Io { .. }), "{err}");
    drop(second);
    let shards = names(&server, "atomic", "shard");
    assert!(
        shards.contains(&format!("{index}-2-0")),
        "new shards written: {shards:?}"
    );

    // The index still names generation 1; its checkpoints are still replayed on it.
    let mut third = store(&server, "atomic");
    let set = third.load(SCOPE).await.unwrap();
    let keys: BTreeSet<_> = set.iter().map(|e| e.key.to_owned()).collect();
    assert_eq!(keys, BTreeSet::from(["customer-2".into(), "customer-3".into()]));
    third.finish(SCOPE).await.unwrap();
    // Generation 3 alone is left: the old base, the orphans and the checkpoints are gone.
    assert_eq!(
        names(&server, "atomic", "shard"),
        BTreeSet::from([format!("{index}-3-0")])
    );
    assert!(names(&server, "atomic", "journal").is_empty());
    let set = store(&server, "atomic").load(SCOPE).await.unwrap();
    assert_eq!(set.len(), 2);
    assert!(set.position("customer-3").is_some());
}

#[tokio::test]
async fn state_of_another_destination_loads_empty() {
    let server = ApiServer::start().await;
    let mut s = store(&server, "moved");
    s.load("default/old").await.unwrap();
    s.commit("default/old", &[put(1, 1)]).await.unwrap();
    s.finish("default/old").await.unwrap();

    let mut s = store(&server, "moved");
    assert!(s.load("default/new").await.unwrap().is_empty());
    s.commit("default/new", &[put(2, 2)]).await.unwrap();
    drop(s);
    // Checkpoints of the new destination replay alone, without the old base.
    let set = store(&server, "moved").load("default/new").await.unwrap();
    assert_eq!(set.iter().map(|e| e.key).collect::<Vec<_>>(), ["customer-2"]);
    let mut s = store(&server, "moved");
    s.load("default/new").await.unwrap();
    s.finish("default/new").await.unwrap();
    assert!(
        store(&server, "moved")
            .load("default/old")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store(&server, "moved").load("default/new").await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn a_concurrent_writer_is_detected_and_named() {
    let server = ApiServer::start().await;
    let mut seed = store(&server, "twice");
    seed.load(SCOPE).await.unwrap();
    seed.commit(SCOPE, &[put(1, 1)]).await.unwrap();
    seed.finish(SCOPE).await.unwrap();

    // Both load the same index; the first to commit claims it, the other is refused.
    let mut a = store(&server, "twice");
    let mut b = store(&server, "twice");
    a.load(SCOPE).await.unwrap();
    b.load(SCOPE).await.unwrap();
    a.commit(SCOPE, &[put(2, 2)]).await.unwrap();
    let err = b.commit(SCOPE, &[put(3, 3)]).await.unwrap_err();
    assert!(matches!(err, StateError::Locked(_)), "{err}");
    assert!(err.to_string().contains("configmap default/twice-state"), "{err}");
    assert_eq!(err.category(), "RunInProgress");

    // A run that starts later takes over; the older one fails at its next step.
    let mut c = store(&server, "twice");
    c.load(SCOPE).await.unwrap();
    c.commit(SCOPE, &[put(4, 4)]).await.unwrap();
    assert!(matches!(
        a.commit(SCOPE, &[put(5, 5)]).await,
        Err(StateError::Locked(_))
    ));
    assert!(matches!(a.finish(SCOPE).await, Err(StateError::Locked(_))));
    c.finish(SCOPE).await.unwrap();
    let set = store(&server, "twice").load(SCOPE).await.unwrap();
    let keys: BTreeSet<_> = set.iter().map(|e| e.key.to_owned()).collect();
    // What `a` committed before `c` loaded was delivered and is kept.
    assert_eq!(
        keys,
        BTreeSet::from(["customer-1".into(), "customer-2".into(), "customer-4".into()])
    );
}

#[tokio::test]
async fn delete_all_removes_every_state_configmap_of_the_sync_and_nothing_else() {
    let server = ApiServer::start().await;
    for sync in ["gone", "kept"] {
        let mut s = store(&server, sync);
        s.load(SCOPE).await.unwrap();
        s.commit(SCOPE, &[put(1, 1)]).await.unwrap();
        s.finish(SCOPE).await.unwrap();
        s.commit(SCOPE, &[put(2, 2)]).await.unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let unrelated = ConfigMap {
        metadata: ObjectMeta {
            name: Some("gone-settings".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    api.create(&PostParams::default(), &unrelated).await.unwrap();
    assert_eq!(state_objects(&server, "gone").len(), 3);

    let deleted = delete_all(server.client(), NS, "gone").await.unwrap();
    assert_eq!(deleted, 3);
    assert!(state_objects(&server, "gone").is_empty());
    assert_eq!(state_objects(&server, "kept").len(), 3);
    assert!(server.object("v1/configmaps", NS, "gone-settings").is_some());
    assert!(store(&server, "gone").load(SCOPE).await.unwrap().is_empty());
}

const SETUP: &str = "
CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, plan TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1200)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'free' FROM n;
";

fn spec() -> ReverseSyncSpec {
    serde_yaml_ng::from_str(
        r#"
source: {connectionSecretRef: {name: wh}, query: "SELECT id, email, plan FROM customers", primaryKey: [id]}
destinationRef: {name: fake}
mode: mirror
mappings:
  - {from: id, to: id}
  - {from: email, to: email}
  - {from: plan, to: plan}
"#,
    )
    .unwrap()
}

async fn engine_run(server: &ApiServer, db: &TempSqlite, fake: Arc<FakeConnector>) -> RunReport {
    let spec = spec();
    let config = DeliveryConfig {
        max_batch_bytes: backflow::destination::delivery::DEFAULT_MAX_BATCH_BYTES,
        batch_size: fake.max_batch,
        max_concurrency: 2,
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        requests_per_second: 100_000.0,
        burst: 100_000,
    };
    let job = SyncRun {
        namespace: NS,
        name: "customers",
        spec: &spec,
        source_url: &db.url,
        source_credentials: Default::default(),
        delivery: Delivery::new(fake, Arc::new(RateLimiter::new(100_000.0, 100_000)), config),
        scope: SCOPE.into(),
    };
    let options = RunOptions {
        checkpoint_records: 500,
        ..RunOptions::default()
    };
    run(job, &mut store(server, "customers"), &options).await
}

#[tokio::test]
async fn an_engine_run_with_the_configmap_store_sends_nothing_the_second_time() {
    let server = ApiServer::start().await;
    let db = TempSqlite::new(SETUP).await;
    let first = engine_run(&server, &db, Arc::new(FakeConnector::new(100))).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!((first.plan.added, first.accepted), (1200, 1200));
    assert!(names(&server, "customers", "journal").is_empty());
    assert_eq!(names(&server, "customers", "shard").len(), 1);

    let fake = Arc::new(FakeConnector::new(100));
    let second = engine_run(&server, &db, fake.clone()).await;
    assert_eq!(second.result, RunResult::Succeeded);
    assert_eq!((second.plan.unchanged, second.plan.added), (1200, 0));
    assert_eq!(fake.call_count(), 0);

    db.exec("UPDATE customers SET plan = 'pro' WHERE id = 7; DELETE FROM customers WHERE id = 9")
        .await;
    let fake = Arc::new(FakeConnector::new(100));
    let third = engine_run(&server, &db, fake.clone()).await;
    assert_eq!((third.plan.changed, third.plan.removed), (1, 1));
    assert_eq!(
        fake.sent_keys().into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from(["7".into(), "9".into()])
    );
    let fake = Arc::new(FakeConnector::new(100));
    engine_run(&server, &db, fake.clone()).await;
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn deleting_the_sync_deletes_its_state_through_the_owner_references() {
    use backflow::api::ReverseSync;
    let server = ApiServer::start().await;
    let syncs: Api<ReverseSync> = Api::namespaced(server.client(), NS);
    let sync = syncs
        .create(&PostParams::default(), &ReverseSync::new("owned", spec()))
        .await
        .unwrap();
    let owner = backflow::state::configmap::names::owner_reference(&sync).unwrap();
    assert_eq!(owner.controller, Some(false));
    let mut s = ConfigMapStore::new(server.client(), NS, "owned", owner);
    s.load(SCOPE).await.unwrap();
    s.commit(SCOPE, &[put(1, 1)]).await.unwrap();
    s.finish(SCOPE).await.unwrap();
    s.commit(SCOPE, &[put(2, 2)]).await.unwrap();
    assert_eq!(state_objects(&server, "owned").len(), 3);

    syncs.delete("owned", &DeleteParams::default()).await.unwrap();
    assert!(state_objects(&server, "owned").is_empty());
}

//! The API server double, driven through a real `kube::Client`, kube-runtime's watcher,
//! controller, finalizer helper and event recorder, and kube-lease-manager.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backflow::api::ReverseSync;
use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as RecordedEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::json;
use support::apiserver::{ApiServer, reverse_sync};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "backflow"}},
        "data": {"k": "v"},
    }))
    .unwrap()
}

fn api_error(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn generation<K: Resource>(object: &K) -> Option<i64> {
    object.meta().generation
}

async fn next_event<S, K>(events: &mut S) -> watcher::Event<K>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    timeout(WAIT, events.next())
        .await
        .expect("a watch event within 5s")
        .expect("the watch stream goes on")
        .expect("no watcher error")
}

#[tokio::test]
async fn config_maps_are_created_read_listed_replaced_and_deleted() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let pp = PostParams::default();

    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    api.create(&dry, &config_map("settings")).await.unwrap();
    assert!(
        server.objects("v1/configmaps", None).is_empty(),
        "a dry run stores nothing"
    );

    let created = api.create(&pp, &config_map("settings")).await.unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));
    let again = api.create(&pp, &config_map("settings")).await.unwrap_err();
    assert_eq!(api_error(again), (409, "AlreadyExists".to_owned()));

    let read = api.get("settings").await.unwrap();
    assert_eq!(read, created);
    assert_eq!(api.list(&ListParams::default()).await.unwrap().items.len(), 1);

    let mut stale = read.clone();
    let mut current = read.clone();
    current.data = Some([("k".to_owned(), "w".to_owned())].into());
    let replaced = api.replace("settings", &pp, &current).await.unwrap();
    assert_ne!(replaced.resource_version(), read.resource_version());
    stale.data = Some([("k".to_owned(), "x".to_owned())].into());
    let conflict = api.replace("settings", &pp, &stale).await.unwrap_err();
    assert_eq!(api_error(conflict), (409, "Conflict".to_owned()));

    let deleted = api.delete("settings", &DeleteParams::default()).await.unwrap();
    assert!(
        deleted.is_right(),
        "a built-in resource answers a delete with a Status"
    );
    let missing = api.get("settings").await.unwrap_err();
    assert_eq!(api_error(missing), (404, "NotFound".to_owned()));
    assert!(server.objects("v1/configmaps", Some("default")).is_empty());
    assert_eq!(server.request_count("create"), 3);
}

#[tokio::test]
async fn generation_moves_with_the_spec_and_status_only_through_its_subresource() {
    let server = ApiServer::start().await;
    let api: Api<ReverseSync> = Api::default_namespaced(server.client());
    let pp = PostParams::default();

    let created = api.create(&pp, &reverse_sync("orders")).await.unwrap();
    assert_eq!(generation(&created), Some(1));
    assert_eq!(created.status, None, "status in a create is dropped");

    let labelled = api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "growth"}}})),
        )
        .await
        .unwrap();
    assert_eq!(generation(&labelled), Some(1));
    assert_ne!(labelled.resource_version(), created.resource_version());

    let suspended = api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    assert_eq!(generation(&suspended), Some(2));

    let status = json!({
        "apiVersion": "backflow.dev/v1alpha1",
        "kind": "ReverseSync",
        "status": {"observedGeneration": 2},
    });
    let with_status = api
        .patch_status("orders", &PatchParams::apply("backflow"), &Patch::Apply(status))
        .await
        .unwrap();
    assert_eq!(generation(&with_status), Some(2));
    assert_eq!(with_status.status.as_ref().unwrap().observed_generation, Some(2));

    // A main-resource write leaves status alone.
    let mut edited = with_status.clone();
    edited.spec.suspend = false;
    edited.status.as_mut().unwrap().observed_generation = Some(99);
    let replaced = api.replace("orders", &pp, &edited).await.unwrap();
    assert_eq!(generation(&replaced), Some(3));
    assert_eq!(replaced.status.as_ref().unwrap().observed_generation, Some(2));

    // A status write leaves the spec alone.
    let mut edited = replaced.clone();
    edited.spec.suspend = true;
    edited.status.as_mut().unwrap().observed_generation = Some(3);
    let status_replaced = api.replace_status("orders", &pp, &edited).await.unwrap();
    assert_eq!(generation(&status_replaced), Some(3));
    assert!(!status_replaced.spec.suspend);
    assert_eq!(
        status_replaced.status.as_ref().unwrap().observed_generation,
        Some(3)
    );

    // Writing what is already there is not a write.
    let unchanged = api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "growth"}}})),
        )
        .await
        .unwrap();
    assert_eq!(unchanged.resource_version(), status_replaced.resource_version());
}

#[tokio::test]
async fn the_finalizer_helper_adds_runs_and_removes_its_finalizer() {
    const NAME: &str = "backflow.dev/cleanup";
    let server = ApiServer::start().await;
    let api: Api<ReverseSync> = Api::default_namespaced(server.client());
    let ran: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let run = |object: ReverseSync| {
        let ran = ran.clone();
        let api = api.clone();
        async move {
            finalizer(&api, NAME, Arc::new(object), |event| async move {
                ran.lock().unwrap().push(match event {
                    finalizer::Event::Apply(_) => "apply",
                    finalizer::Event::Cleanup(_) => "cleanup",
                });
                Ok::<_, Infallible>(Action::await_change())
            })
            .await
        }
    };

    let created = api
        .create(&PostParams::default(), &reverse_sync("orders"))
        .await
        .unwrap();
    run(created.clone()).await.unwrap();
    assert_eq!(api.get("orders").await.unwrap().finalizers(), [NAME]);

    // The stale copy still has no finalizers: its `test` op fails.
    let stale = run(created).await.unwrap_err();
    let finalizer::Error::AddFinalizer(error) = stale else {
        panic!("expected AddFinalizer, got {stale:?}");
    };
    assert_eq!(api_error(error), (422, "Invalid".to_owned()));

    run(api.get("orders").await.unwrap()).await.unwrap();
    assert_eq!(*ran.lock().unwrap(), ["apply"]);

    let deleting = api.delete("orders", &DeleteParams::default()).await.unwrap();
    let deleting = deleting.left().expect("the object, still there");
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert!(
        server
            .object("backflow.dev/v1alpha1/reversesyncs", "default", "orders")
            .is_some()
    );

    run(api.get("orders").await.unwrap()).await.unwrap();
    assert_eq!(*ran.lock().unwrap(), ["apply", "cleanup"]);
    assert_eq!(api_error(api.get("orders").await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn deleting_an_owner_deletes_its_dependents() {
    let server = ApiServer::start().await;
    let client = server.client();
    let syncs: Api<ReverseSync> = Api::default_namespaced(client.clone());
    let jobs: Api<Job> = Api::default_namespaced(client.clone());
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PostParams::default();

    let owner = syncs.create(&pp, &reverse_sync("orders")).await.unwrap();
    let reference = owner.controller_owner_ref(&()).unwrap();
    let mut job: Job = serde_json::from_value(json!({
        "metadata": {"name": "orders-run-1"},
        "spec": {"template": {"spec": {"containers": [{"name": "run", "image": "backflow"}], "restartPolicy": "Never"}}},
    }))
    .unwrap();
    job.metadata.owner_references = Some(vec![reference.clone()]);
    jobs.create(&pp, &job).await.unwrap();
    let mut kept = config_map("orders-state");
    kept.metadata.owner_references = Some(vec![reference]);
    kept.metadata.finalizers = Some(vec!["backflow.dev/keep".to_owned()]);
    maps.create(&pp, &kept).await.unwrap();
    maps.create(&pp, &config_map("unrelated")).await.unwrap();

    syncs.delete("orders", &DeleteParams::default()).await.unwrap();

    assert!(server.objects("batch/v1/jobs", None).is_empty());
    let state = maps.get("orders-state").await.unwrap();
    assert!(
        state.metadata.deletion_timestamp.is_some(),
        "a dependent's finalizer holds it"
    );
    assert!(maps.get("unrelated").await.is_ok());
    maps.patch(
        "orders-state",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_error(maps.get("orders-state").await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn a_watcher_sees_the_initial_list_then_added_modified_and_deleted() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let pp = PostParams::default();
    api.create(&pp, &config_map("before")).await.unwrap();

    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next_event(&mut events).await, watcher::Event::Init));
    match next_event(&mut events).await {
        watcher::Event::InitApply(cm) => assert_eq!(cm.name_any(), "before"),
        other => panic!("expected InitApply, got {other:?}"),
    }
    assert!(matches!(next_event(&mut events).await, watcher::Event::InitDone));

    api.create(&pp, &config_map("after")).await.unwrap();
    match next_event(&mut events).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.name_any(), "after"),
        other => panic!("expected Apply, got {other:?}"),
    }
    api.patch(
        "after",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "changed"}})),
    )
    .await
    .unwrap();
    match next_event(&mut events).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.data.unwrap()["k"], "changed"),
        other => panic!("expected Apply, got {other:?}"),
    }
    api.delete("after", &DeleteParams::default()).await.unwrap();
    match next_event(&mut events).await {
        watcher::Event::Delete(cm) => assert_eq!(cm.name_any(), "after"),
        other => panic!("expected Delete, got {other:?}"),
    }
    assert_eq!(server.request_count("list"), 1);
}

#[tokio::test]
async fn a_watch_that_times_out_resumes_from_its_bookmark_without_relisting() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut events = watcher(api.clone(), watcher::Config::default().timeout(1)).boxed();
    assert!(matches!(next_event(&mut events).await, watcher::Event::Init));
    assert!(matches!(next_event(&mut events).await, watcher::Event::InitDone));

    // Polled past the 1s watch timeout: the stream ends with a bookmark and is re-opened.
    let quiet = timeout(Duration::from_millis(1500), events.next()).await;
    assert!(quiet.is_err(), "no event while nothing changes: {quiet:?}");
    api.create(&PostParams::default(), &config_map("late"))
        .await
        .unwrap();
    match next_event(&mut events).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.name_any(), "late"),
        other => panic!("expected Apply, got {other:?}"),
    }
    assert_eq!(server.request_count("list"), 1);
    assert!(server.request_count("watch") >= 2);
}

#[tokio::test]
async fn a_watch_from_before_the_kept_history_is_gone() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let first = api
        .create(&PostParams::default(), &config_map("a"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &config_map("b"))
        .await
        .unwrap();
    server.compact_history();

    let version = first.resource_version().unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &version)
        .await
        .unwrap()
        .boxed();
    match timeout(WAIT, stream.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Error(status) => assert_eq!(status.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn a_controller_reconciles_each_reverse_sync() {
    let server = ApiServer::start().await;
    let api: Api<ReverseSync> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &reverse_sync("orders"))
        .await
        .unwrap();
    let (seen, mut reconciled) = tokio::sync::mpsc::unbounded_channel::<String>();

    let controller = Controller::new(api.clone(), watcher::Config::default())
        .run(
            |object: Arc<ReverseSync>, seen: Arc<tokio::sync::mpsc::UnboundedSender<String>>| async move {
                seen.send(object.name_any()).unwrap();
                Ok::<_, kube::Error>(Action::await_change())
            },
            |_, _, _| Action::await_change(),
            Arc::new(seen),
        )
        .for_each(|_| async {});
    let controller = tokio::spawn(controller);

    assert_eq!(timeout(WAIT, reconciled.recv()).await.unwrap().unwrap(), "orders");
    api.create(&PostParams::default(), &reverse_sync("invoices"))
        .await
        .unwrap();
    assert_eq!(
        timeout(WAIT, reconciled.recv()).await.unwrap().unwrap(),
        "invoices"
    );
    controller.abort();
}

#[tokio::test]
async fn lists_page_with_limit_and_continue_and_filter_by_selectors() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    for i in 0..5 {
        let mut cm = config_map(&format!("cm-{i}"));
        cm.labels_mut()
            .insert("tier".into(), if i < 2 { "gold" } else { "silver" }.into());
        api.create(&PostParams::default(), &cm).await.unwrap();
    }

    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = api.list(&params).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = ListParams::default().limit(2).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);

    let names_for = |params: ListParams| {
        let api = api.clone();
        async move {
            api.list(&params)
                .await
                .unwrap()
                .items
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        names_for(ListParams::default().labels("tier=gold")).await,
        ["cm-0", "cm-1"]
    );
    assert_eq!(
        names_for(ListParams::default().labels("tier!=gold,app"))
            .await
            .len(),
        3
    );
    assert_eq!(
        names_for(ListParams::default().labels("tier in (gold,bronze)"))
            .await
            .len(),
        2
    );
    assert!(names_for(ListParams::default().labels("!app")).await.is_empty());
    assert_eq!(
        names_for(ListParams::default().fields("metadata.name=cm-3")).await,
        ["cm-3"]
    );
    let everywhere: Api<ConfigMap> = Api::all(server.client());
    assert_eq!(
        everywhere.list(&ListParams::default()).await.unwrap().items.len(),
        5
    );
}

#[tokio::test]
async fn apply_conflicts_on_fields_another_manager_owns_unless_forced() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let apply = |value: &str| {
        Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"owner": value}}))
    };

    let created = api
        .patch("shared", &PatchParams::apply("alice"), &apply("alice"))
        .await
        .unwrap();
    assert_eq!(created.data.unwrap()["owner"], "alice");
    // The same value is shared ownership, not a conflict.
    api.patch("shared", &PatchParams::apply("bob"), &apply("alice"))
        .await
        .unwrap();
    let conflict = api
        .patch("shared", &PatchParams::apply("carol"), &apply("carol"))
        .await
        .unwrap_err();
    assert_eq!(api_error(conflict), (409, "Conflict".to_owned()));
    let forced = api
        .patch("shared", &PatchParams::apply("carol").force(), &apply("carol"))
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["owner"], "carol");

    // A manager's omitted field goes when nobody else owns it.
    let two = Patch::Apply(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"owner": "carol", "extra": "1"}}),
    );
    api.patch("shared", &PatchParams::apply("carol"), &two)
        .await
        .unwrap();
    let one = api
        .patch("shared", &PatchParams::apply("carol"), &apply("carol"))
        .await
        .unwrap();
    assert!(!one.data.unwrap().contains_key("extra"));
}

#[tokio::test]
async fn events_from_the_recorder_are_created_then_patched() {
    let server = ApiServer::start().await;
    let client = server.client();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm = api
        .create(&PostParams::default(), &config_map("subject"))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "backflow".into(),
            instance: None,
        },
    );
    let event = RecordedEvent {
        type_: EventType::Normal,
        reason: "RunSucceeded".into(),
        note: Some("sent 3 rows".into()),
        action: "Sync".into(),
        secondary: None,
    };
    let reference = cm.object_ref(&());
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let events = server.objects("events.k8s.io/v1/events", Some("default"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["reason"], "RunSucceeded");
    assert_eq!(events[0]["series"]["count"], 2);
    assert_eq!(server.request_count("create"), 2);
    assert_eq!(server.request_count("patch"), 1);
}

#[tokio::test]
async fn injected_faults_answer_once_and_the_client_retries_503_by_itself() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &config_map("a"))
        .await
        .unwrap();

    server.fail_next("GET", "/api/v1/namespaces/default/configmaps", 500);
    assert_eq!(api_error(api.get("a").await.unwrap_err()).0, 500);
    assert!(api.get("a").await.is_ok());

    server.fail_next("GET", "/api/v1/namespaces/default/configmaps", 503);
    let before = server.request_count("get");
    assert!(api.get("a").await.is_ok(), "kube retries 503 on its own");
    assert_eq!(server.request_count("get") - before, 2);
}

#[tokio::test]
async fn one_lease_manager_holds_the_lease_until_it_releases_it() {
    let server = ApiServer::start().await;
    let manager = |identity: &str| {
        LeaseManagerBuilder::new(server.client(), "backflow-leader")
            .with_identity(identity)
            .with_duration(2)
            .with_grace(1)
            .build()
    };
    let a = manager("a").await.unwrap();
    let b = manager("b").await.unwrap();

    assert!(timeout(WAIT, a.changed()).await.unwrap().unwrap());
    // For longer than a lease duration, `a` renews and `b` keeps trying: nobody's state moves.
    let contest = timeout(Duration::from_millis(2500), async {
        tokio::select! {
            changed = a.changed() => ("a", changed.unwrap()),
            changed = b.changed() => ("b", changed.unwrap()),
        }
    })
    .await;
    assert!(contest.is_err(), "the lease changed hands: {contest:?}");
    let holder = |server: &ApiServer| {
        server
            .object("coordination.k8s.io/v1/leases", "default", "backflow-leader")
            .unwrap()["spec"]["holderIdentity"]
            .clone()
    };
    assert_eq!(holder(&server), "a");

    // What kube-lease-manager relies on: another manager's apply of the holder conflicts.
    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let grab = Patch::Apply(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "spec": {"holderIdentity": "intruder"},
    }));
    let conflict = leases
        .patch("backflow-leader", &PatchParams::apply("intruder"), &grab)
        .await
        .unwrap_err();
    assert_eq!(api_error(conflict), (409, "Conflict".to_owned()));

    a.release().await.unwrap();
    assert!(timeout(WAIT, b.changed()).await.unwrap().unwrap());
    assert_eq!(holder(&server), "b");
    let lease: Lease = Api::default_namespaced(server.client())
        .get("backflow-leader")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(2));
}

#[tokio::test]
async fn metadata_only_gets_and_lists_carry_no_data() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &config_map("a"))
        .await
        .unwrap();
    let listed = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items[0].metadata.name.as_deref(), Some("a"));
    assert_eq!(
        api.get_metadata("a").await.unwrap().metadata.name.as_deref(),
        Some("a")
    );

    let http = reqwest::Client::new();
    for (path, accept, kind) in [
        (
            "",
            "as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
            "PartialObjectMetadataList",
        ),
        (
            "/a",
            "as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
            "PartialObjectMetadata",
        ),
    ] {
        let body: serde_json::Value = http
            .get(format!(
                "{}/api/v1/namespaces/default/configmaps{path}",
                server.url()
            ))
            .header("Accept", format!("application/json;{accept}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["kind"], kind);
        let text = body.to_string();
        assert!(text.contains("\"name\":\"a\""), "{text}");
        assert!(!text.contains("\"data\""), "{text}");
    }
}

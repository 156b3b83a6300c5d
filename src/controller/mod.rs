//! `backflow operator`: the controllers that turn ReverseSyncs and Destinations into scheduled,
//! observable syncs. The engine knows nothing of Kubernetes; this module drives it.
//!
//! ```text
//!  watch ReverseSync ─┐                        ┌─ InProcess: engine on a bounded pool
//!  watch Destination ─┤ reconcile ─▶ decide ──▶┤
//!  watch Job/ConfigMap│ (status,    (schedule, └─ Job: batch/v1 Job running
//!  (Secret: opt-in) ──┘  events)     after...)     `backflow run --namespace --sync`
//! ```

pub mod api_server;
pub mod cluster_run;
pub mod conditions;
pub mod destination;
pub mod health;
pub mod job;
pub mod leader;
pub mod panics;
pub mod resolve;
pub mod reverse_sync;
pub mod runner;
pub mod schedule;
pub mod server;
pub mod status;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::{Destination, ReverseSync};
use crate::destination::delivery::rate_limit::Limiters;
use crate::metrics::Metrics;
pub use health::Health;
use job::JobDefaults;
use runner::RunEnv;

/// Name of the controller in Events and logs.
pub const CONTROLLER_NAME: &str = "backflow";

/// Settings of `backflow operator`.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Namespaces to watch; all when empty.
    pub namespaces: Vec<String>,
    /// Take a Lease before reconciling, so one replica of several works at a time.
    pub leader_election: bool,
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long the lease lasts without renewal; a new leader takes over at most this long
    /// after the old one died (at once when it shut down cleanly).
    pub lease_duration: Duration,
    /// Runs in flight at once, across all syncs (InProcess mode).
    pub max_concurrent_runs: usize,
    /// Defaults of Job-mode runs.
    pub job: JobDefaults,
    /// Longest wait on shutdown for in-flight runs to reach a checkpoint.
    pub shutdown_grace: Duration,
    /// What runs may do (`--secret-access`, `--allow-sqlite`, `--cluster-name`), in the
    /// operator and in Job pods.
    pub policy: runner::RunPolicy,
    /// Connectors used instead of the Destinations' own; empty in `backflow operator`, set by
    /// tests that inject faults.
    pub custom_connectors: crate::engine::setup::CustomConnectors,
    /// Watch Secrets (their metadata), so a changed Secret wakes the syncs and Destinations
    /// that use it at once. Watching needs `list` and `watch` on Secrets, which lets the
    /// operator read every Secret in scope; without it the operator only `get`s the Secrets
    /// that specs name, and a fixed Secret is picked up at the next retry or scheduled run.
    pub watch_secrets: bool,
}

/// Why a reconcile failed; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API call failed.
    #[error("{0}")]
    Kube(String),
    /// Adding or removing the finalizer failed.
    #[error("{0}")]
    Finalizer(String),
    /// The reconcile panicked; the panic was contained and logged.
    #[error("{0}")]
    Panicked(String),
}

impl ReconcileError {
    /// A stable label for `backflow_reconcile_errors_total`.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "ApiError",
            ReconcileError::Finalizer(_) => "FinalizerError",
            ReconcileError::Panicked(_) => panics::INTERNAL_ERROR,
        }
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The metrics registry could not be built.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The HTTP port could not be opened.
    #[error("failed to listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Leader election failed.
    #[error("leader election failed: {0}")]
    Leader(String),
    /// Leadership was lost while reconciling; the process exits so a fresh start waits for it.
    #[error("lost the leader lease {0}; exiting so that only the new leader reconciles")]
    LostLease(String),
}

/// A namespaced object's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SyncKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl SyncKey {
    /// The key of an object.
    pub fn of<K: Resource>(object: &K) -> SyncKey {
        SyncKey {
            namespace: object.meta().namespace.clone().unwrap_or_default(),
            name: object.meta().name.clone().unwrap_or_default(),
        }
    }
}

/// A run in flight.
pub struct RunHandle {
    /// Cancels the run: it stops taking new batches and commits what landed.
    pub cancel: CancellationToken,
}

/// A run in flight: its cancel token and the signal of its end.
type RunEntry = (CancellationToken, Arc<tokio::sync::Notify>);

/// The runs in flight, one per sync at most.
#[derive(Clone)]
pub struct RunRegistry {
    inner: Arc<Mutex<HashMap<SyncKey, RunEntry>>>,
    finished: tokio::sync::broadcast::Sender<SyncKey>,
}

impl Default for RunRegistry {
    fn default() -> Self {
        RunRegistry {
            inner: Arc::default(),
            finished: tokio::sync::broadcast::channel(1024).0,
        }
    }
}

impl RunRegistry {
    /// True while a run of `key` is in flight.
    pub fn is_running(&self, key: &SyncKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Registers a run of `key`; `None` when one is in flight already.
    pub fn register(&self, key: &SyncKey, parent: &CancellationToken) -> Option<RunHandle> {
        let mut runs = self.lock();
        if runs.contains_key(key) {
            return None;
        }
        let cancel = parent.child_token();
        runs.insert(
            key.clone(),
            (cancel.clone(), Arc::new(tokio::sync::Notify::new())),
        );
        Some(RunHandle { cancel })
    }

    /// Marks the run of `key` as over, and with `wake` wakes its reconcile: the one its final
    /// status write woke may have come while the run was still registered, and deciding the
    /// next run must not wait for the resync.
    pub fn finish(&self, key: &SyncKey, wake: bool) {
        if let Some((_, done)) = self.lock().remove(key) {
            done.notify_waiters();
        }
        if wake {
            // No receiver (no controller running) is not an error.
            let _ = self.finished.send(key.clone());
        }
    }

    /// The syncs whose runs end from now on.
    pub fn finished(&self) -> impl futures::Stream<Item = SyncKey> + Send + 'static {
        futures::stream::unfold(self.finished.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(key) => return Some((key, rx)),
                    // A lagging receiver missed some ends; the resync catches those.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// Cancels the run of `key` and waits up to `grace` for it to commit and stop.
    pub async fn cancel_and_wait(&self, key: &SyncKey, grace: Duration) {
        let entry = self.lock().get(key).map(|(c, d)| (c.clone(), Arc::clone(d)));
        if let Some((cancel, done)) = entry {
            let notified = done.notified();
            cancel.cancel();
            if self.is_running(key) && tokio::time::timeout(grace, notified).await.is_err() {
                tracing::warn!(sync = %key.name, "the run did not stop within the grace period");
            }
        }
    }

    /// Waits up to `grace` for every run to stop (after the shutdown token was cancelled).
    pub async fn wait_all(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while !self.lock().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.lock().len();
        if left > 0 {
            tracing::warn!(
                runs = left,
                "runs still in flight at exit; they continue from their last checkpoint next time"
            );
        }
    }

    /// The number of runs in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no run is in flight.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SyncKey, RunEntry>> {
        // A panic while holding this lock leaves a map that is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The ReverseSyncs seen by the watch, for lookups across syncs (`schedule.after`, which syncs
/// use a Destination or Secret).
#[derive(Clone, Default)]
pub struct SyncIndex {
    stores: Arc<Mutex<Vec<Store<ReverseSync>>>>,
}

impl SyncIndex {
    fn add(&self, store: Store<ReverseSync>) {
        self.stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(store);
    }

    fn all(&self) -> Vec<Arc<ReverseSync>> {
        self.stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .flat_map(|s| s.state())
            .collect()
    }

    /// Syncs of `namespace` that send to Destination `name`.
    pub fn using_destination(&self, namespace: &str, name: &str) -> Vec<SyncKey> {
        self.all()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(namespace) && s.spec.destination_ref.name == name)
            .map(|s| SyncKey::of(&**s))
            .collect()
    }

    /// Syncs of `namespace` that read Secret `name` or send to a Destination in `destinations`.
    fn using_secret(&self, namespace: &str, name: &str, destinations: &[String]) -> Vec<SyncKey> {
        self.all()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(namespace))
            .filter(|s| {
                s.spec.source.connection_secret_ref.name == name
                    || destinations.contains(&s.spec.destination_ref.name)
            })
            .map(|s| SyncKey::of(&**s))
            .collect()
    }

    /// Syncs of `namespace` that list `name` in `schedule.after`.
    fn downstream_of(&self, namespace: &str, name: &str) -> Vec<SyncKey> {
        self.all()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(namespace))
            .filter(|s| {
                s.spec
                    .schedule
                    .as_ref()
                    .is_some_and(|sc| sc.after.iter().any(|a| a == name))
            })
            .map(|s| SyncKey::of(&**s))
            .collect()
    }
}

/// Everything reconcilers share.
pub struct Context {
    /// Client, Events, metrics, rate limiters.
    pub env: RunEnv,
    /// Runs in flight.
    pub runs: RunRegistry,
    /// Bounds runs in flight across all syncs.
    pub pool: Arc<Semaphore>,
    /// Job-mode defaults.
    pub job_defaults: JobDefaults,
    /// Cancelled on shutdown: runs stop taking batches and commit.
    pub shutdown: CancellationToken,
    /// The syncs seen by the watch.
    pub syncs: SyncIndex,
    pokes: Mutex<HashSet<(&'static str, SyncKey)>>,
}

impl Context {
    /// Marks a sync as worth retrying now: something it uses changed.
    pub fn poke(&self, key: &SyncKey) {
        self.pokes_lock().insert(("ReverseSync", key.clone()));
    }

    /// Marks a destination as worth checking now: its Secret changed.
    fn poke_destination(&self, key: &SyncKey) {
        self.pokes_lock().insert(("Destination", key.clone()));
    }

    /// Takes the poke of a sync or destination, if any.
    pub fn take_poke(&self, key: &SyncKey) -> bool {
        let mut pokes = self.pokes_lock();
        pokes.remove(&("ReverseSync", key.clone())) | pokes.remove(&("Destination", key.clone()))
    }

    fn pokes_lock(&self) -> std::sync::MutexGuard<'_, HashSet<(&'static str, SyncKey)>> {
        self.pokes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The default name of this cluster in shared warehouse state: the uid of namespace
/// `kube-system`, which lives as long as the cluster. `None` (with a warning) when it cannot be
/// read, for instance without RBAC to get namespaces: set `--cluster-name` then.
pub async fn default_cluster_name(client: &Client) -> Option<String> {
    use k8s_openapi::api::core::v1::Namespace;
    match Api::<Namespace>::all(client.clone()).get("kube-system").await {
        Ok(ns) => ns.metadata.uid,
        // The usual case with namespaced RBAC, and no RBAC gap: say what to set instead.
        Err(kube::Error::Api(e)) if e.code == 403 => {
            tracing::warn!(
                "this operator may not read namespace kube-system, whose uid names the cluster \
                 in warehouse state; set --cluster-name (keys stay namespace/name until then)"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "failed to read the uid of namespace kube-system to name this cluster in warehouse \
                 state; set --cluster-name (keys stay namespace/name until then)"
            );
            None
        }
    }
}

/// Runs the operator until `shutdown` is cancelled: the HTTP port, leader election when
/// asked, then the controllers.
pub async fn run_operator(
    client: Client,
    config: OperatorConfig,
    shutdown: CancellationToken,
) -> Result<(), OperatorError> {
    let metrics = Metrics::new()?;
    let health = Health::default();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| OperatorError::Listen {
            addr: config.listen,
            reason: e.to_string(),
        })?;
    tracing::info!(addr = %config.listen, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let lease = if config.leader_election {
        let lease = leader::Leadership::acquire(&client, &config, &health, &shutdown).await?;
        match lease {
            Some(l) => Some(l),
            None => {
                let _ = server.await;
                return Ok(());
            }
        }
    } else {
        None
    };
    let mut lease = lease;
    let work = shutdown.child_token();
    if let Some(l) = lease.as_mut() {
        l.watch_loss(work.clone());
    }
    run_controllers(client, &config, metrics, health.clone(), work.clone()).await;
    let result = match &lease {
        Some(l) if l.was_lost() => Err(OperatorError::LostLease(config.lease_name.clone())),
        _ => Ok(()),
    };
    if let Some(lease) = lease {
        lease.release().await;
    }
    shutdown.cancel();
    let _ = server.await;
    result
}

/// Runs both controllers for every watched namespace until `shutdown` is cancelled, then
/// lets runs in flight reach a checkpoint.
pub async fn run_controllers(
    client: Client,
    config: &OperatorConfig,
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
) {
    let reporter = Reporter {
        controller: CONTROLLER_NAME.to_owned(),
        instance: Some(config.identity.clone()),
    };
    let ctx = Arc::new(Context {
        env: RunEnv {
            client: client.clone(),
            recorder: Recorder::new(client.clone(), reporter),
            metrics,
            limiters: Arc::new(Limiters::default()),
            policy: config.policy.clone(),
            custom_connectors: config.custom_connectors.clone(),
        },
        runs: RunRegistry::default(),
        pool: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
        job_defaults: config.job.clone(),
        shutdown: shutdown.clone(),
        syncs: SyncIndex::default(),
        pokes: Mutex::new(HashSet::new()),
    });
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let mut controllers: Vec<ControllerFuture> = Vec::new();
    for scope in scopes {
        let (dest_ctrl, dest_store) = destination_controller(
            &client,
            scope.as_deref(),
            &ctx,
            &health,
            config.watch_secrets,
            shutdown.clone(),
        );
        let sync_ctrl = sync_controller(
            &client,
            scope.as_deref(),
            &ctx,
            &health,
            dest_store,
            config.watch_secrets,
            shutdown.clone(),
        );
        let suffix = scope.map(|ns| format!(" in {ns}")).unwrap_or_default();
        for (kind, fut) in [("ReverseSync", sync_ctrl), ("Destination", dest_ctrl)] {
            let name = format!("{kind} controller{suffix}");
            let health = health.clone();
            let shutdown = shutdown.clone();
            controllers.push(Box::pin(async move {
                fut.await;
                // Loops end on shutdown and on a lost lease (which cancels `shutdown` too);
                // any other end is a crash /healthz reports.
                if !shutdown.is_cancelled() {
                    tracing::error!(controller = %name, "a controller loop stopped");
                    health.controller_stopped(&name);
                }
            }));
        }
    }
    // Not ready from the moment stopping begins, while runs reach their checkpoints.
    tokio::spawn({
        let health = health.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            health.set_stopping();
        }
    });
    let readiness = {
        let health = health.clone();
        let shutdown = shutdown.clone();
        async move {
            while !health.is_ready() && !shutdown.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if health.is_ready() {
                tracing::info!("caches synced; reconciling");
            }
        }
    };
    tokio::spawn(readiness);
    futures::future::join_all(controllers).await;
    health.set_stopping();
    tracing::info!(
        runs = ctx.runs.len(),
        "controllers stopped; letting runs in flight reach a checkpoint"
    );
    ctx.shutdown.cancel();
    ctx.runs.wait_all(config.shutdown_grace).await;
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What a controller's stream yields per reconcile.
type ReconcileResult<K, E> =
    Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<ReconcileError, E>>;

/// Log a reconcile's result; count errors.
fn log_result<K: Resource, E: std::fmt::Display>(
    kind: &'static str,
    metrics: Metrics,
) -> impl Fn(ReconcileResult<K, E>) -> futures::future::Ready<()>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    move |result| {
        if let Err(e) = result {
            let reason = match &e {
                kube::runtime::controller::Error::ReconcilerFailed(err, _) => err.category(),
                kube::runtime::controller::Error::ObjectNotFound(_) => "ObjectNotFound",
                _ => "WatchError",
            };
            metrics.reconcile_errors.with_label_values(&[kind, reason]).inc();
            tracing::warn!(kind, reason, error = %e, "reconcile failed");
        }
        futures::future::ready(())
    }
}

/// After a failed reconcile (the error is logged and counted by `log_result`), try again soon.
fn error_policy<K>(_: Arc<K>, error: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::debug!(reason = error.category(), "retrying after a reconcile error");
    Action::requeue(Duration::from_secs(15))
}

type ControllerFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The name of a watch in logs and `/readyz`: its kind and, in watch-namespace mode, namespace.
fn watch_name(kind: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{kind} in {ns}"),
        None => kind.to_owned(),
    }
}

fn sync_controller(
    client: &Client,
    namespace: Option<&str>,
    ctx: &Arc<Context>,
    health: &Health,
    destination_store: Store<Destination>,
    watch_secrets: bool,
    shutdown: CancellationToken,
) -> ControllerFuture {
    let name = |kind: &str| watch_name(kind, namespace);
    let syncs: Api<ReverseSync> = api_for(client, namespace);
    let (store, writer) = reflector::store();
    let main = reflector::reflector(
        writer,
        watch::events(
            syncs.clone(),
            watch::config(),
            name("ReverseSync"),
            health.clone(),
        ),
    )
    .applied_objects();
    let controller = Controller::for_stream(main, store.clone());
    ctx.syncs.add(store);
    let managed = watch::config().labels("app.kubernetes.io/managed-by=backflow");
    let index = ctx.syncs.clone();
    let index_for_destinations = ctx.syncs.clone();
    let index_for_secrets = ctx.syncs.clone();
    let ctx_for_destinations = Arc::clone(ctx);
    let ctx_for_secrets = Arc::clone(ctx);
    let destinations: Api<Destination> = api_for(client, namespace);
    let secrets = api_for::<PartialObjectMeta<Secret>>(client, namespace);
    let scope = namespace.map(str::to_owned);
    let finished = ctx
        .runs
        .finished()
        .filter(move |k| futures::future::ready(scope.as_ref().is_none_or(|ns| *ns == k.namespace)))
        .map(|k| ObjectRef::new(&k.name).within(&k.namespace));
    // A Secret that changed wakes the syncs that read it, directly or through their
    // Destination (with --watch-secrets). Only metadata is kept: the values the API server
    // sends are dropped as each Secret is decoded into `PartialObjectMeta`.
    let controller = if watch_secrets {
        controller.watches_stream(
            watch::objects(secrets, watch::config(), name("Secret"), health.clone()),
            move |secret: PartialObjectMeta<Secret>| {
                let ns = secret.namespace().unwrap_or_default();
                let name = secret.name_any();
                let using: Vec<String> = destination_store
                    .state()
                    .iter()
                    .filter(|d| d.namespace().as_deref() == Some(ns.as_str()))
                    .filter(|d| {
                        d.spec
                            .credentials_secret_ref
                            .as_ref()
                            .is_some_and(|r| r.name == name)
                    })
                    .map(|d| d.name_any())
                    .collect();
                index_for_secrets
                    .using_secret(&ns, &name, &using)
                    .into_iter()
                    .inspect(|k| ctx_for_secrets.poke(k))
                    .map(|k| ObjectRef::new(&k.name).within(&k.namespace))
                    .collect::<Vec<_>>()
            },
        )
    } else {
        controller
    };
    let fut = controller
        .owns_stream(watch::objects(
            api_for::<Job>(client, namespace),
            managed,
            name("Job"),
            health.clone(),
        ))
        // Only the state index: a checkpoint writes a journal ConfigMap, which need not wake
        // the sync; a changed or deleted index should.
        .owns_stream(watch::objects(
            api_for::<ConfigMap>(client, namespace),
            watch::config().labels("app.kubernetes.io/managed-by=backflow,backflow.dev/state=index"),
            name("ConfigMap"),
            health.clone(),
        ))
        // A run that ended decides the next one at once.
        .reconcile_on(finished)
        // A sync that finished wakes the syncs that run after it.
        .watches_stream(
            watch::objects(
                syncs,
                watch::config(),
                name("ReverseSync upstream"),
                health.clone(),
            ),
            move |s: ReverseSync| {
                let ns = s.namespace().unwrap_or_default();
                index
                    .downstream_of(&ns, &s.name_any())
                    .into_iter()
                    .map(|k| ObjectRef::new(&k.name).within(&k.namespace))
            },
        )
        // A Destination that changed wakes the syncs that send to it.
        .watches_stream(
            watch::objects(
                destinations,
                watch::config(),
                name("Destination of syncs"),
                health.clone(),
            ),
            move |d: Destination| {
                let ns = d.namespace().unwrap_or_default();
                index_for_destinations
                    .using_destination(&ns, &d.name_any())
                    .into_iter()
                    .inspect(|k| ctx_for_destinations.poke(k))
                    .map(|k| ObjectRef::new(&k.name).within(&k.namespace))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reverse_sync::reconcile, error_policy, Arc::clone(ctx))
        .for_each(log_result("ReverseSync", ctx.env.metrics.clone()));
    Box::pin(fut)
}

fn destination_controller(
    client: &Client,
    namespace: Option<&str>,
    ctx: &Arc<Context>,
    health: &Health,
    watch_secrets: bool,
    shutdown: CancellationToken,
) -> (ControllerFuture, Store<Destination>) {
    let name = |kind: &str| watch_name(kind, namespace);
    let destinations: Api<Destination> = api_for(client, namespace);
    let (store, writer) = reflector::store();
    let main = reflector::reflector(
        writer,
        watch::events(destinations, watch::config(), name("Destination"), health.clone()),
    )
    .applied_objects();
    let controller = Controller::for_stream(main, store.clone());
    let for_secrets = store.clone();
    let ctx_for_secrets = Arc::clone(ctx);
    let secrets = api_for::<PartialObjectMeta<Secret>>(client, namespace);
    // A Secret that changed wakes the Destinations that use it (see `sync_controller`).
    let controller = if !watch_secrets {
        controller
    } else {
        controller.watches_stream(
            watch::objects(
                secrets,
                watch::config(),
                name("Secret of destinations"),
                health.clone(),
            ),
            move |secret: PartialObjectMeta<Secret>| {
                let ns = secret.namespace().unwrap_or_default();
                let name = secret.name_any();
                for_secrets
                    .state()
                    .into_iter()
                    .filter(|d| d.namespace().as_deref() == Some(ns.as_str()))
                    .filter(|d| {
                        d.spec
                            .credentials_secret_ref
                            .as_ref()
                            .is_some_and(|r| r.name == name)
                    })
                    .map(|d| {
                        let key = SyncKey::of(&*d);
                        ctx_for_secrets.poke_destination(&key);
                        ObjectRef::from_obj(&*d)
                    })
                    .collect::<Vec<_>>()
            },
        )
    };
    let fut = controller
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(destination::reconcile, error_policy, Arc::clone(ctx))
        .for_each(log_result("Destination", ctx.env.metrics.clone()));
    (Box::pin(fut), store)
}

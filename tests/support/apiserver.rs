//! An in-memory Kubernetes API server double, spoken to over HTTP by a real `kube::Client`.
//!
//! `ApiServer::start()` listens on `127.0.0.1:0`; `client()` gives a `kube::Client` for it
//! (plain HTTP, no auth, default namespace `default`). Objects are JSON values in one store
//! keyed by (group/version, plural, namespace, name), so any resource works; a small table
//! knows the kinds of the resources the operator touches and which have a status subresource.
//!
//! What it reproduces:
//!
//! - Paths `/api/v1[/namespaces/{ns}]/{plural}[/{name}[/status]]` and
//!   `/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/status]]`; a collection
//!   path without a namespace lists and watches across namespaces (or holds cluster-scoped
//!   objects). Namespaces are implicit: every namespace exists.
//! - get, list, create (with `generateName`), replace, patch, delete, delete-collection.
//!   Errors are `Status` objects with the real reasons (`NotFound`, `AlreadyExists`,
//!   `Conflict`, `Invalid`, `BadRequest`, `MethodNotAllowed`, `Expired`), which kube turns
//!   into `kube::Error::Api`.
//! - One global `resourceVersion` counter, bumped on every write; a write that changes
//!   nothing is not a write (no bump, no watch event). `uid`, `creationTimestamp`, and
//!   `generation` (for resources with a status subresource: starts at 1, bumped when
//!   anything outside `metadata` and `status` changes).
//! - The status subresource (ReverseSync, Destination, Job, Pod, Deployment, …): writes to
//!   `/status` change only `.status`; writes to the main resource, creates included, leave
//!   `.status` alone.
//! - Optimistic concurrency: a replace (or patch) carrying a `metadata.resourceVersion` other
//!   than the current one gets 409 `Conflict`; delete preconditions are checked too.
//! - Patches: JSON merge patch; JSON Patch (the `json-patch` crate; a failing `test` is 422
//!   `Invalid`; a `test` for `null` passes on a missing path, as on a real server, which
//!   kube's finalizer helper relies on); strategic merge patch, handled as a JSON merge
//!   patch; server-side apply (`application/apply-patch+yaml`, JSON or YAML body), creating
//!   the object when missing.
//! - Field ownership by leaf path per (field manager, apply or update, main or status): an
//!   apply that sets a field another manager owns to a different value gets 409 `Conflict`
//!   (with `FieldManagerConflict` causes) unless `force=true`; updates and non-apply patches
//!   take over the fields they change; fields a manager applied before and omits now are
//!   removed unless another manager owns them. Writes without `fieldManager` are owned by
//!   the `User-Agent` product, or `unknown` (kube sends no `User-Agent`).
//! - Deletion: with finalizers, DELETE sets `deletionTimestamp` (202, MODIFIED) and the
//!   object goes when its last finalizer is removed (DELETED); without finalizers it goes at
//!   once. Then dependents in the same namespace whose `ownerReferences` name its uid are
//!   deleted too (cascading, honouring their finalizers), unless `propagationPolicy` is
//!   `Orphan`; a dependent with another live owner only loses the reference.
//! - List: `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`),
//!   `fieldSelector` (`=`, `==`, `!=` on any dotted path, like `metadata.name`), `limit` and
//!   `continue` (later pages report the first page's resourceVersion); items carry
//!   `apiVersion` and `kind`.
//! - Watch: newline-delimited `ADDED`/`MODIFIED`/`DELETED` events after the requested
//!   resourceVersion, replayed from a bounded history and then live; without a
//!   resourceVersion (or `0`) the current objects come first as `ADDED`. Selectors apply, and
//!   an object that starts or stops matching arrives as `ADDED` or `DELETED`. A version older
//!   than the kept history gets an `ERROR` event with a 410 `Expired` Status. The stream
//!   closes after `timeoutSeconds`, with a `BOOKMARK` first when `allowWatchBookmarks=true`.
//! - `dryRun=All`: answered as the write would be, nothing stored.
//! - Metadata-only gets and lists (`Accept: ...;as=PartialObjectMetadata[List]`): answered
//!   with `PartialObjectMetadata` items, as kube's `get_metadata`/`list_metadata` expect. A
//!   watch always sends whole objects.
//! - Test-side access that bypasses the API: `objects`, `object`, `set_status`, injected
//!   faults (`fail_next`), the request log and per-verb counts, `compact_history`.
//!
//! What it does NOT reproduce: admission of any kind (no validation against the CRD's
//! OpenAPI schema or its CEL `x-kubernetes-validations`, no defaulting, no pruning of unknown
//! fields, no immutability rules), RBAC and authentication, real strategic merge (no patch
//! merge keys: lists are replaced whole) and server-side apply beyond leaf ownership (lists
//! are atomic, no `listType=map` merging, no `managedFields` in responses, no type-aware
//! field sets, conflicts are not reported against a manager's own other entries), the
//! stricter update rules (a replace without `resourceVersion` is accepted, also for custom
//! resources; PUT never creates; finalizers may be added to an object being deleted;
//! `generation` exists only where status is a subresource), consistent pages (later pages of
//! a list show current objects, under the first page's resourceVersion), the watch
//! cache (no periodic bookmarks, no `sendInitialEvents` streaming lists — kube-runtime's
//! default `ListWatch` strategy does not use them), `resourceVersion`/`resourceVersionMatch`
//! semantics on get and list (always the latest state), foreground deletion
//! (treated as background) and the orphan finalizer, graceful pod termination, the relation
//! between core `v1` and `events.k8s.io/v1` Events (two separate stores here), controllers
//! (nothing runs Jobs or Pods: tests set their status), discovery beyond `/version`, and
//! name validation.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many changes the watch history keeps; a watch from before them gets 410 Gone.
const HISTORY_LIMIT: usize = 10_000;

/// The watch timeout when a client sends none (real servers pick 30–60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Metadata the server owns: kept from the stored object on every write, never owned by a
/// field manager.
const SERVER_METADATA: [&str; 8] = [
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
];

/// A resource the double knows by plural.
struct Known {
    group_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    /// Has a status subresource, hence `generation` and status-preserving main writes.
    status_subresource: bool,
}

const KNOWN: &[Known] = &[
    known("v1", "configmaps", "ConfigMap", false),
    known("v1", "secrets", "Secret", false),
    known("v1", "events", "Event", false),
    known("v1", "namespaces", "Namespace", false),
    known("v1", "serviceaccounts", "ServiceAccount", false),
    known("v1", "pods", "Pod", true),
    known("v1", "services", "Service", true),
    known("apps/v1", "deployments", "Deployment", true),
    known("batch/v1", "jobs", "Job", true),
    known("batch/v1", "cronjobs", "CronJob", true),
    known("coordination.k8s.io/v1", "leases", "Lease", false),
    known("events.k8s.io/v1", "events", "Event", false),
    known("backflow.dev/v1alpha1", "reversesyncs", "ReverseSync", true),
    known("backflow.dev/v1alpha1", "destinations", "Destination", true),
];

const fn known(
    group_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    status_subresource: bool,
) -> Known {
    Known {
        group_version,
        plural,
        kind,
        status_subresource,
    }
}

/// The type of the resource a request is about.
#[derive(Debug, Clone)]
struct ResourceType {
    group_version: String,
    plural: String,
    /// From the table; unknown plurals learn their kind from what clients send.
    kind: Option<&'static str>,
    status_subresource: bool,
}

impl ResourceType {
    fn new(group_version: &str, plural: &str) -> Self {
        let known = KNOWN
            .iter()
            .find(|k| k.group_version == group_version && k.plural == plural);
        ResourceType {
            group_version: group_version.to_owned(),
            plural: plural.to_owned(),
            kind: known.map(|k| k.kind),
            status_subresource: known.is_some_and(|k| k.status_subresource),
        }
    }

    /// Parses `v1/configmaps` or `batch/v1/jobs`.
    fn parse(resource: &str) -> Self {
        let (group_version, plural) = resource
            .rsplit_once('/')
            .unwrap_or_else(|| panic!("resource {resource:?} is not <group/version>/<plural>"));
        ResourceType::new(group_version, plural)
    }

    fn id(&self) -> String {
        format!("{}/{}", self.group_version, self.plural)
    }

    fn group(&self) -> &str {
        self.group_version.rsplit_once('/').map_or("", |(g, _)| g)
    }

    /// Built-in resources answer a finished DELETE with a `Status`; custom resources and
    /// pods answer with the object, as their registries do.
    fn delete_returns_object(&self) -> bool {
        self.plural == "pods" || self.group() == "backflow.dev" || self.kind.is_none()
    }
}

/// Where in a store an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    resource: String,
    namespace: String,
    name: String,
}

impl Key {
    fn new(ty: &ResourceType, namespace: &str, name: &str) -> Self {
        Key {
            resource: ty.id(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// The leaf paths one field manager owns, per operation and subresource (as the
/// `managedFields` entries of a real server).
#[derive(Debug, Clone)]
struct ManagedFields {
    manager: String,
    apply: bool,
    status: bool,
    /// JSON Pointers to owned leaves (scalars and whole lists).
    fields: BTreeSet<String>,
}

/// Who writes, for field ownership.
#[derive(Debug, Clone)]
struct Writer {
    manager: String,
    apply: bool,
    status: bool,
}

impl Writer {
    fn owns_entry(&self, entry: &ManagedFields) -> bool {
        entry.manager == self.manager && entry.apply == self.apply && entry.status == self.status
    }

    fn scope(&self, ty: &ResourceType) -> Scope {
        if self.status {
            Scope::Status
        } else {
            Scope::Main {
                without_status: ty.status_subresource,
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Stored {
    object: Value,
    managers: Vec<ManagedFields>,
}

/// One committed change, kept for watches.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    event: &'static str,
    object: Value,
    /// The object before a MODIFIED change, to tell when it starts or stops matching a
    /// selector.
    previous: Option<Value>,
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The Kubernetes verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, or `other` (unknown paths).
    pub verb: String,
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string without `?`, if any.
    pub query: Option<String>,
    /// `Content-Type`, if any (tells the patch types apart).
    pub content_type: Option<String>,
}

#[derive(Debug)]
struct Fault {
    method: Method,
    path_prefix: String,
    status: u16,
    /// Answered as plain text rather than as a `Status`.
    plain_text: Option<&'static str>,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Stored>,
    rv: u64,
    history: VecDeque<Change>,
    /// Every change after this version is in `history`.
    compacted_through: u64,
    /// Kinds of unknown plurals, learnt from request bodies.
    kinds: HashMap<String, String>,
    faults: VecDeque<Fault>,
    requests: Vec<RecordedRequest>,
}

struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion, to wake watches.
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock already failed; keep serving.
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        let rv = self.store().rv;
        self.changes.send_replace(rv);
    }
}

/// A running API server double; it stops when dropped.
pub struct ApiServer {
    url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ApiServer {
    /// Starts the double on a free port of 127.0.0.1 in the current tokio runtime.
    pub async fn start() -> ApiServer {
        // Real servers never answer resourceVersion "0", which means "any version" to a
        // watch; start above it.
        let store = Store {
            rv: 1,
            ..Store::default()
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changes: watch::channel(1).0,
            shutdown: watch::channel(false).0,
        });
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API server double to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("read the API server double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        ApiServer {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// Base URL without a trailing slash, like `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client for this server: plain HTTP, no auth, default namespace `default`, and
    /// otherwise kube's defaults (including its retry of 429/503/504 answers).
    pub fn client(&self) -> kube::Client {
        let url = self.url.parse().expect("the double's URL is a valid URI");
        kube::Client::try_from(kube::Config::new(url)).expect("build a kube client for the double")
    }

    /// The stored objects of `resource` (`v1/configmaps`, `batch/v1/jobs`,
    /// `backflow.dev/v1alpha1/reversesyncs`, …) in `namespace`, or in every namespace with
    /// `None` (cluster-scoped objects have namespace `""`), ordered by namespace and name.
    pub fn objects(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let id = ResourceType::parse(resource).id();
        self.shared
            .store()
            .objects
            .iter()
            .filter(|(k, _)| k.resource == id && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, s)| s.object.clone())
            .collect()
    }

    /// One stored object, if it exists.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = Key::new(&ResourceType::parse(resource), namespace, name);
        self.shared.store().objects.get(&key).map(|s| s.object.clone())
    }

    /// Replaces an object's `.status` as a controller would (a Job's `succeeded`, `failed`,
    /// `conditions`), bumping its resourceVersion and telling watches. Panics when the object
    /// does not exist.
    pub fn set_status(&self, resource: &str, namespace: &str, name: &str, status: Value) -> Value {
        let key = Key::new(&ResourceType::parse(resource), namespace, name);
        let object = {
            let mut store = self.shared.store();
            let stored = store
                .objects
                .get(&key)
                .cloned()
                .unwrap_or_else(|| panic!("set_status: no {resource} {namespace}/{name}"));
            let mut object = stored.object.clone();
            object["status"] = status;
            if object == stored.object {
                object
            } else {
                store.store_modified(key, object, stored.managers, stored.object)
            }
        };
        self.shared.notify();
        object
    }

    /// The next request with this HTTP method whose path starts with `path_prefix` is
    /// answered with a `Status` of this code instead of being served. Calls queue up. Note
    /// that kube's client retries 429, 503 and 504 by itself.
    pub fn fail_next(&self, method: &str, path_prefix: &str, status: u16) {
        self.push_fault(method, path_prefix, status, None);
    }

    /// The next request with this HTTP method whose path starts with `path_prefix` is
    /// answered `404 page not found` in plain text, as a kube-apiserver that has just started
    /// answers for a custom resource until its CRD informer has synced. Calls queue up with
    /// those of [`ApiServer::fail_next`].
    pub fn not_serving_next(&self, method: &str, path_prefix: &str) {
        self.push_fault(method, path_prefix, 404, Some("404 page not found\n"));
    }

    fn push_fault(&self, method: &str, path_prefix: &str, status: u16, plain_text: Option<&'static str>) {
        let method = Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        self.shared.store().faults.push_back(Fault {
            method,
            path_prefix: path_prefix.to_owned(),
            status,
            plain_text,
        });
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.store().requests.clone()
    }

    /// How many requests had this verb (`get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`).
    pub fn request_count(&self, verb: &str) -> usize {
        self.shared
            .store()
            .requests
            .iter()
            .filter(|r| r.verb == verb)
            .count()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.store().rv.to_string()
    }

    /// Forgets the watch history: a watch or `continue` from any version before now gets
    /// 410 Gone, as after an etcd compaction.
    pub fn compact_history(&self) {
        let mut store = self.shared.store();
        store.history.clear();
        store.compacted_through = store.rv;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// A failure answered as a Kubernetes `Status`.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, ty: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": ty.group(), "kind": ty.plural}));
        self
    }

    fn not_found(ty: &ResourceType, name: &str) -> Self {
        ApiError::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", resource_name(ty)),
        )
        .with_details(ty, name)
    }

    fn already_exists(ty: &ResourceType, name: &str) -> Self {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", resource_name(ty)),
        )
        .with_details(ty, name)
    }

    fn conflict(ty: &ResourceType, name: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
                 please apply your changes to the latest version and try again",
                resource_name(ty)
            ),
        )
        .with_details(ty, name)
    }

    fn invalid(ty: &ResourceType, name: &str, message: impl Into<String>) -> Self {
        ApiError::new(422, "Invalid", message).with_details(ty, name)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    fn injected(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        ApiError::new(code, reason, format!("injected failure ({code})"))
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status())
    }
}

/// `configmaps` or `reversesyncs.backflow.dev`, as real messages name resources.
fn resource_name(ty: &ResourceType) -> String {
    if ty.group().is_empty() {
        ty.plural.clone()
    } else {
        format!("{}.{}", ty.plural, ty.group())
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(body).expect("JSON values serialize"),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Requests

/// What a path names.
#[derive(Debug, Clone)]
struct Target {
    ty: ResourceType,
    /// `None` on a collection path without a namespace (all namespaces, or cluster-scoped).
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn key(&self, name: &str) -> Key {
        Key::new(&self.ty, self.namespace.as_deref().unwrap_or(""), name)
    }
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let namespaced = rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"));
    let (namespace, rest) = if namespaced {
        (Some(rest[1].to_owned()), &rest[2..])
    } else {
        (None, rest)
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    // An object path without a namespace is a cluster-scoped object: namespace "".
    let namespace = namespace.or_else(|| name.map(|_| String::new()));
    Some(Target {
        ty: ResourceType::new(&group_version, plural),
        namespace,
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
    })
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn verb(method: &Method, target: Option<&Target>, query: &HashMap<String, String>) -> &'static str {
    let Some(target) = target else {
        return "other";
    };
    let named = target.name.is_some();
    match *method {
        Method::GET if named => "get",
        Method::GET if is_true(query.get("watch")) => "watch",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

fn is_true(value: Option<&String>) -> bool {
    value.is_some_and(|v| v == "true" || v == "1")
}

/// One request, parsed.
struct Req<'a> {
    method: Method,
    target: Target,
    query: HashMap<String, String>,
    content_type: String,
    body: &'a [u8],
    /// The manager of writes without `fieldManager`: the `User-Agent` product.
    default_manager: String,
}

impl Req<'_> {
    fn writer(&self, apply: bool) -> Writer {
        Writer {
            manager: self
                .query
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| self.default_manager.clone()),
            apply,
            status: self.target.subresource.as_deref() == Some("status"),
        }
    }

    fn body_object(&self) -> Result<Value, ApiError> {
        let value: Value = serde_json::from_slice(self.body)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(ApiError::bad_request("the body is not a JSON object"))
        }
    }

    /// Only `/status` is a subresource here; others are unknown paths.
    fn check_subresource(&self) -> Result<(), ApiError> {
        match self.target.subresource.as_deref() {
            None => Ok(()),
            Some("status") if self.target.ty.status_subresource => Ok(()),
            Some(_) => Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = parse_query(uri.query());
    let path = uri.path();
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-backflow-double"}),
        );
    }
    let target = parse_path(path);
    let header_text =
        |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = header_text(header::CONTENT_TYPE);
    let metadata_only = header_text(header::ACCEPT).is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    {
        let mut store = shared.store();
        store.requests.push(RecordedRequest {
            verb: verb(&method, target.as_ref(), &query).to_owned(),
            method: method.to_string(),
            path: path.to_owned(),
            query: uri.query().map(str::to_owned),
            content_type: content_type.clone(),
        });
        if let Some(i) = store
            .faults
            .iter()
            .position(|f| f.method == method && path.starts_with(&f.path_prefix))
        {
            let fault = store.faults.remove(i).expect("the position is in range");
            if let Some(text) = fault.plain_text {
                let code = StatusCode::from_u16(fault.status).expect("a status code");
                return (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response();
            }
            return ApiError::injected(fault.status).into_response();
        }
    }
    let Some(target) = target else {
        return ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .into_response();
    };
    if method == Method::GET && target.name.is_none() && is_true(query.get("watch")) {
        return watch(shared, target, &query);
    }
    let default_manager = header_text(header::USER_AGENT)
        .and_then(|ua| ua.split('/').next().map(str::to_owned))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    let req = Req {
        method,
        target,
        query,
        content_type: content_type.unwrap_or_default(),
        body: &body,
        default_manager,
    };
    let result = if req.method != Method::GET && req.query.get("dryRun").is_some_and(|d| d == "All") {
        dry_run(&mut shared.store(), &req)
    } else {
        dispatch(&mut shared.store(), &req)
    };
    shared.notify();
    match result {
        Ok((code, value)) if metadata_only && req.method == Method::GET => {
            json_response(code, &partial_object_metadata(value))
        }
        Ok((code, value)) => json_response(code, &value),
        Err(error) => error.into_response(),
    }
}

/// An object or a list as `PartialObjectMetadata(List)`: what a real server answers a get or
/// list asking for `Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`
/// (<https://kubernetes.io/docs/reference/using-api/api-concepts/#receiving-resources-as-tables>
/// describes the `as=` negotiation; kube's `get_metadata`/`list_metadata` send it).
fn partial_object_metadata(value: Value) -> Value {
    let partial = |object: &Value| {
        json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object.get("metadata").cloned().unwrap_or(Value::Null),
        })
    };
    match value.get("items").and_then(Value::as_array) {
        Some(items) => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": value.get("metadata").cloned().unwrap_or(Value::Null),
            "items": items.iter().map(partial).collect::<Vec<_>>(),
        }),
        None => partial(&value),
    }
}

/// Answers as the write would, then puts the store back as it was.
fn dry_run(store: &mut Store, req: &Req) -> Result<(StatusCode, Value), ApiError> {
    let saved = (
        store.objects.clone(),
        store.rv,
        store.history.clone(),
        store.compacted_through,
    );
    let result = dispatch(store, req);
    (store.objects, store.rv, store.history, store.compacted_through) = saved;
    result
}

fn dispatch(store: &mut Store, req: &Req) -> Result<(StatusCode, Value), ApiError> {
    let named = req.target.name.is_some();
    match req.method {
        Method::GET if named => store.get(req).map(|v| (StatusCode::OK, v)),
        Method::GET => store.list(req).map(|v| (StatusCode::OK, v)),
        Method::POST if !named => store.create(req),
        Method::PUT if named => store.replace(req),
        Method::PATCH if named => store.patch(req),
        Method::DELETE if named => store.delete(req),
        Method::DELETE => store.delete_collection(req).map(|v| (StatusCode::OK, v)),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({})",
                req.method
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// The store

impl Store {
    fn kind(&self, ty: &ResourceType) -> String {
        if let Some(kind) = ty.kind {
            return kind.to_owned();
        }
        if let Some(kind) = self.kinds.get(&ty.id()) {
            return kind.clone();
        }
        let singular = ty.plural.strip_suffix('s').unwrap_or(&ty.plural);
        let mut chars = singular.chars();
        chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default()
    }

    fn learn_kind(&mut self, ty: &ResourceType, body: &Value) {
        if ty.kind.is_none()
            && let Some(kind) = body.get("kind").and_then(Value::as_str)
        {
            self.kinds.insert(ty.id(), kind.to_owned());
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, key: &Key, event: &'static str, object: Value, previous: Option<Value>) {
        self.history.push_back(Change {
            rv: self.rv,
            resource: key.resource.clone(),
            namespace: key.namespace.clone(),
            event,
            object,
            previous,
        });
        while self.history.len() > HISTORY_LIMIT {
            if let Some(change) = self.history.pop_front() {
                self.compacted_through = change.rv;
            }
        }
    }

    fn insert_new(&mut self, key: Key, mut object: Value, managers: Vec<ManagedFields>) -> Value {
        let rv = self.next_rv();
        meta_mut(&mut object).insert("resourceVersion".into(), rv.to_string().into());
        self.record(&key, "ADDED", object.clone(), None);
        self.objects.insert(
            key,
            Stored {
                object: object.clone(),
                managers,
            },
        );
        object
    }

    fn store_modified(
        &mut self,
        key: Key,
        mut object: Value,
        managers: Vec<ManagedFields>,
        previous: Value,
    ) -> Value {
        let rv = self.next_rv();
        meta_mut(&mut object).insert("resourceVersion".into(), rv.to_string().into());
        self.record(&key, "MODIFIED", object.clone(), Some(previous));
        self.objects.insert(
            key,
            Stored {
                object: object.clone(),
                managers,
            },
        );
        object
    }

    /// Removes an object for good, then collects its dependents unless `orphan`.
    fn remove(&mut self, key: &Key, orphan: bool) -> Option<Value> {
        let stored = self.objects.remove(key)?;
        let mut object = stored.object;
        let rv = self.next_rv();
        meta_mut(&mut object).insert("resourceVersion".into(), rv.to_string().into());
        self.record(key, "DELETED", object.clone(), None);
        if !orphan && let Some(uid) = meta_str(&object, "uid") {
            self.collect_dependents(uid, &key.namespace);
        }
        Some(object)
    }

    /// Deletes as a DELETE request does: marks objects with finalizers, removes the others.
    /// Returns the object afterwards and whether it is gone.
    fn delete_object(&mut self, key: &Key, orphan: bool) -> Option<(Value, bool)> {
        let stored = self.objects.get(key)?.clone();
        if !has_finalizers(&stored.object) {
            return self.remove(key, orphan).map(|object| (object, true));
        }
        if meta_str(&stored.object, "deletionTimestamp").is_some() {
            return Some((stored.object, false));
        }
        let mut object = stored.object.clone();
        let meta = meta_mut(&mut object);
        meta.insert("deletionTimestamp".into(), now().into());
        meta.insert("deletionGracePeriodSeconds".into(), 0.into());
        let object = self.store_modified(key.clone(), object, stored.managers, stored.object);
        Some((object, false))
    }

    /// The garbage collector's part: dependents of a removed owner are deleted, or lose the
    /// reference when another owner of theirs still exists.
    fn collect_dependents(&mut self, owner_uid: &str, owner_namespace: &str) {
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, s)| {
                (owner_namespace.is_empty() || k.namespace == owner_namespace)
                    && owner_uids(&s.object).any(|uid| uid == owner_uid)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in dependents {
            // An earlier cascade may have removed it.
            let Some(stored) = self.objects.get(&key).cloned() else {
                continue;
            };
            let other_owner_lives = owner_uids(&stored.object)
                .filter(|uid| *uid != owner_uid)
                .any(|uid| self.uid_exists(uid));
            if other_owner_lives {
                let mut object = stored.object.clone();
                if let Some(refs) = meta_mut(&mut object)
                    .get_mut("ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
                }
                self.store_modified(key, object, stored.managers, stored.object);
            } else {
                self.delete_object(&key, false);
            }
        }
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .any(|s| meta_str(&s.object, "uid") == Some(uid))
    }

    fn existing(&self, req: &Req) -> Result<(Key, Stored), ApiError> {
        let name = req.target.name.as_deref().unwrap_or_default();
        let key = req.target.key(name);
        match self.objects.get(&key) {
            Some(stored) => Ok((key, stored.clone())),
            None => Err(ApiError::not_found(&req.target.ty, name)),
        }
    }

    fn get(&self, req: &Req) -> Result<Value, ApiError> {
        req.check_subresource()?;
        self.existing(req).map(|(_, stored)| stored.object)
    }

    fn list(&self, req: &Req) -> Result<Value, ApiError> {
        let filter = Filter::new(&req.target, &req.query)?;
        let (snapshot_rv, after) = match req.query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let (rv, namespace, name) = decode_continue(token)?;
                if rv < self.compacted_through {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent \
                         list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some((namespace, name)))
            }
            None => (self.rv, None),
        };
        let limit = req
            .query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let matching: Vec<(&Key, &Stored)> = self
            .objects
            .iter()
            .filter(|(k, s)| filter.matches(k, &s.object))
            .filter(|(k, _)| {
                after
                    .as_ref()
                    .is_none_or(|(ns, name)| (&k.namespace, &k.name) > (ns, name))
            })
            .collect();
        let page = &matching[..limit.map_or(matching.len(), |l| l.min(matching.len()))];
        let items: Vec<Value> = page.iter().map(|(_, s)| s.object.clone()).collect();
        let mut metadata = json!({"resourceVersion": snapshot_rv.to_string()});
        let remaining = matching.len() - page.len();
        if remaining > 0
            && let Some((last, _)) = page.last()
        {
            metadata["continue"] = encode_continue(snapshot_rv, last).into();
            metadata["remainingItemCount"] = remaining.into();
        }
        Ok(json!({
            "kind": format!("{}List", self.kind(&req.target.ty)),
            "apiVersion": req.target.ty.group_version,
            "metadata": metadata,
            "items": items,
        }))
    }

    fn create(&mut self, req: &Req) -> Result<(StatusCode, Value), ApiError> {
        let ty = &req.target.ty;
        if req.target.subresource.is_some() {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "create is not allowed here",
            ));
        }
        let body = req.body_object()?;
        let namespace = req.target.namespace.clone().unwrap_or_default();
        if let Some(ns) = meta_str(&body, "namespace").filter(|ns| !ns.is_empty())
            && ns != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let name = match meta_str(&body, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_owned(),
            None => match meta_str(&body, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(ApiError::invalid(
                        ty,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        self.learn_kind(ty, &body);
        let key = Key::new(ty, &namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(ty, &name));
        }
        let object = self.new_object(ty, &namespace, &name, body);
        let writer = req.writer(false);
        let fields = leaves(&object, writer.scope(ty)).into_keys().collect();
        let managers = vec![ManagedFields {
            manager: writer.manager,
            apply: false,
            status: false,
            fields,
        }];
        Ok((StatusCode::CREATED, self.insert_new(key, object, managers)))
    }

    /// A new object from a create or an apply body: server metadata set, status dropped
    /// where it is a subresource.
    fn new_object(&self, ty: &ResourceType, namespace: &str, name: &str, mut body: Value) -> Value {
        let object = body.as_object_mut().expect("bodies are checked to be objects");
        object.insert("apiVersion".into(), ty.group_version.clone().into());
        object.insert("kind".into(), self.kind(ty).into());
        if ty.status_subresource {
            object.remove("status");
        }
        let meta = meta_mut(&mut body);
        for field in SERVER_METADATA {
            meta.remove(field);
        }
        meta.remove("managedFields");
        meta.insert("name".into(), name.into());
        if !namespace.is_empty() {
            meta.insert("namespace".into(), namespace.into());
        }
        meta.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
        meta.insert("creationTimestamp".into(), now().into());
        if ty.status_subresource {
            meta.insert("generation".into(), 1.into());
        }
        body
    }

    fn replace(&mut self, req: &Req) -> Result<(StatusCode, Value), ApiError> {
        req.check_subresource()?;
        let ty = &req.target.ty;
        let (key, old) = self.existing(req)?;
        let body = req.body_object()?;
        if let Some(name) = meta_str(&body, "name")
            && name != key.name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        if let Some(rv) = meta_str(&body, "resourceVersion")
            && Some(rv) != meta_str(&old.object, "resourceVersion")
        {
            return Err(ApiError::conflict(ty, &key.name));
        }
        let writer = req.writer(false);
        let new = scoped_write(ty, &writer, &old.object, body);
        let managers = update_ownership(ty, &writer, &old, &new);
        Ok(self.finish_write(ty, key, old, new, managers))
    }

    fn patch(&mut self, req: &Req) -> Result<(StatusCode, Value), ApiError> {
        req.check_subresource()?;
        let ty = &req.target.ty;
        let content_type = req.content_type.split(';').next().unwrap_or("").trim();
        if content_type == "application/apply-patch+yaml" {
            return self.apply(req);
        }
        let (key, old) = self.existing(req)?;
        let mut patched = old.object.clone();
        match content_type {
            "application/json-patch+json" => {
                let patch: json_patch::Patch = serde_json::from_slice(req.body)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON Patch: {e}")))?;
                apply_json_patch(&mut patched, &patch)
                    .map_err(|message| ApiError::invalid(ty, &key.name, message))?;
            }
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                let patch: Value = serde_json::from_slice(req.body)
                    .map_err(|e| ApiError::bad_request(format!("the patch is not JSON: {e}")))?;
                json_patch::merge(&mut patched, &patch);
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format: {other}"),
                ));
            }
        }
        if !patched.is_object() {
            return Err(ApiError::bad_request("the patch did not leave an object"));
        }
        // A resourceVersion in the patched object is a precondition, as on a real server.
        if let Some(rv) = meta_str(&patched, "resourceVersion")
            && Some(rv) != meta_str(&old.object, "resourceVersion")
        {
            return Err(ApiError::conflict(ty, &key.name));
        }
        let writer = req.writer(false);
        let new = scoped_write(ty, &writer, &old.object, patched);
        let managers = update_ownership(ty, &writer, &old, &new);
        Ok(self.finish_write(ty, key, old, new, managers))
    }

    fn apply(&mut self, req: &Req) -> Result<(StatusCode, Value), ApiError> {
        let ty = &req.target.ty;
        let name = req.target.name.clone().unwrap_or_default();
        let Some(manager) = req.query.get("fieldManager").filter(|m| !m.is_empty()) else {
            return Err(ApiError::invalid(
                ty,
                &name,
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: \
                 is required for apply patch",
            ));
        };
        let force = is_true(req.query.get("force"));
        let body: Value = serde_json::from_slice(req.body)
            .or_else(|_| serde_yaml_ng::from_slice(req.body))
            .map_err(|e| ApiError::bad_request(format!("the apply body is not YAML: {e}")))?;
        if !body.is_object() {
            return Err(ApiError::bad_request("the apply body is not an object"));
        }
        if let Some(body_name) = meta_str(&body, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        self.learn_kind(ty, &body);
        let writer = Writer {
            manager: manager.clone(),
            apply: true,
            status: req.target.subresource.as_deref() == Some("status"),
        };
        let scope = writer.scope(ty);
        let scoped_body = scope.restrict(&body);
        let applied = leaves(&scoped_body, scope);
        let key = req.target.key(&name);
        let Some(old) = self.objects.get(&key).cloned() else {
            if writer.status {
                return Err(ApiError::not_found(ty, &name));
            }
            let namespace = key.namespace.clone();
            let object = self.new_object(ty, &namespace, &name, scoped_body);
            let managers = vec![ManagedFields {
                manager: writer.manager,
                apply: true,
                status: false,
                fields: applied.into_keys().collect(),
            }];
            return Ok((StatusCode::CREATED, self.insert_new(key, object, managers)));
        };

        let conflicts = apply_conflicts(&old, &writer, &applied);
        if !conflicts.is_empty() && !force {
            return Err(apply_conflict_error(ty, &name, &conflicts));
        }
        let mut managers = old.managers.clone();
        for (other, path) in &conflicts {
            for entry in managers.iter_mut().filter(|e| &e.manager == other) {
                entry.fields.retain(|owned| !related(owned, path));
            }
        }
        let mut new = old.object.clone();
        // Fields this manager applied before and leaves out now go, unless someone else
        // owns them too.
        if let Some(previous) = managers.iter().find(|e| writer.owns_entry(e)) {
            let dropped: Vec<String> = previous
                .fields
                .iter()
                .filter(|path| !applied.contains_key(*path))
                .filter(|path| {
                    !managers
                        .iter()
                        .any(|e| !writer.owns_entry(e) && e.fields.contains(*path))
                })
                .cloned()
                .collect();
            for path in dropped {
                remove_pointer(&mut new, &path);
            }
        }
        json_patch::merge(&mut new, &scoped_body);
        let fields: BTreeSet<String> = applied.into_keys().collect();
        match managers.iter_mut().find(|e| writer.owns_entry(e)) {
            Some(entry) => entry.fields = fields,
            None => managers.push(ManagedFields {
                manager: writer.manager.clone(),
                apply: true,
                status: writer.status,
                fields,
            }),
        }
        Ok(self.finish_write(ty, key, old, new, managers))
    }

    /// Commits an update of an existing object: server metadata kept, generation bumped on
    /// spec changes, nothing written when nothing changed, and the object removed when it is
    /// being deleted and has no finalizers left.
    fn finish_write(
        &mut self,
        ty: &ResourceType,
        key: Key,
        old: Stored,
        mut new: Value,
        mut managers: Vec<ManagedFields>,
    ) -> (StatusCode, Value) {
        let kind = self.kind(ty);
        let object = new.as_object_mut().expect("writes are objects");
        object.insert("apiVersion".into(), ty.group_version.clone().into());
        object.insert("kind".into(), kind.into());
        let old_meta = old.object.get("metadata").cloned().unwrap_or_default();
        let meta = meta_mut(&mut new);
        for field in SERVER_METADATA {
            match old_meta.get(field) {
                Some(value) => meta.insert(field.into(), value.clone()),
                None => meta.remove(field),
            };
        }
        meta.remove("managedFields");
        if ty.status_subresource && without_meta_and_status(&old.object) != without_meta_and_status(&new) {
            let generation = meta_i64(&old.object, "generation").unwrap_or(0) + 1;
            meta_mut(&mut new).insert("generation".into(), generation.into());
        }
        let present = leaves(
            &new,
            Scope::Main {
                without_status: false,
            },
        );
        for entry in &mut managers {
            entry.fields.retain(|path| present.contains_key(path));
        }
        managers.retain(|e| !e.fields.is_empty());

        if new == old.object {
            self.objects.insert(
                key,
                Stored {
                    object: new.clone(),
                    managers,
                },
            );
            return (StatusCode::OK, new);
        }
        if meta_str(&new, "deletionTimestamp").is_some() && !has_finalizers(&new) {
            self.objects.insert(
                key.clone(),
                Stored {
                    object: new,
                    managers,
                },
            );
            let gone = self.remove(&key, false).expect("the object was just stored");
            return (StatusCode::OK, gone);
        }
        let object = self.store_modified(key, new, managers, old.object);
        (StatusCode::OK, object)
    }

    fn delete(&mut self, req: &Req) -> Result<(StatusCode, Value), ApiError> {
        if req.target.subresource.is_some() {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "delete is not allowed here",
            ));
        }
        let ty = &req.target.ty;
        let (key, stored) = self.existing(req)?;
        let options: Value = if req.body.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(req.body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
        };
        for (field, current) in [
            ("resourceVersion", meta_str(&stored.object, "resourceVersion")),
            ("uid", meta_str(&stored.object, "uid")),
        ] {
            if let Some(wanted) = options
                .pointer(&format!("/preconditions/{field}"))
                .and_then(Value::as_str)
                && Some(wanted) != current
            {
                return Err(ApiError::conflict(ty, &key.name));
            }
        }
        let orphan = options.get("propagationPolicy").and_then(Value::as_str) == Some("Orphan")
            || req.query.get("propagationPolicy").map(String::as_str) == Some("Orphan");
        let (object, gone) = self
            .delete_object(&key, orphan)
            .expect("the object exists: it was just read");
        if !gone {
            return Ok((StatusCode::ACCEPTED, object));
        }
        if ty.delete_returns_object() {
            return Ok((StatusCode::OK, object));
        }
        Ok((
            StatusCode::OK,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": key.name,
                    "group": ty.group(),
                    "kind": ty.plural,
                    "uid": meta_str(&object, "uid"),
                },
            }),
        ))
    }

    fn delete_collection(&mut self, req: &Req) -> Result<Value, ApiError> {
        let filter = Filter::new(&req.target, &req.query)?;
        let keys: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, s)| filter.matches(k, &s.object))
            .map(|(k, _)| k.clone())
            .collect();
        let items: Vec<Value> = keys
            .iter()
            .filter_map(|key| self.delete_object(key, false).map(|(object, _)| object))
            .collect();
        Ok(json!({
            "kind": format!("{}List", self.kind(&req.target.ty)),
            "apiVersion": req.target.ty.group_version,
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        }))
    }

    /// The watch lines for changes after `since`, and the version they run up to; `Err`
    /// with an ERROR line when `since` is older than the history.
    fn changes_since(&self, since: u64, filter: &Filter) -> Result<(u64, Vec<Bytes>), Bytes> {
        if since < self.compacted_through {
            let gone = ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {since} ({})", self.compacted_through),
            );
            return Err(watch_line("ERROR", &gone.status()));
        }
        let start = self.history.partition_point(|c| c.rv <= since);
        let lines = self
            .history
            .range(start..)
            .filter_map(|change| filter.event_for(change))
            .map(|(event, object)| watch_line(event, object))
            .collect();
        Ok((self.rv, lines))
    }

    fn current_as_added(&self, filter: &Filter) -> Vec<Bytes> {
        self.objects
            .iter()
            .filter(|(k, s)| filter.matches(k, &s.object))
            .map(|(_, s)| watch_line("ADDED", &s.object))
            .collect()
    }
}

/// The object a write to the main resource or to `/status` leaves: only `.status` from a
/// status write, everything but `.status` from a main write where status is a subresource.
fn scoped_write(ty: &ResourceType, writer: &Writer, old: &Value, mut written: Value) -> Value {
    if writer.status {
        let mut new = old.clone();
        match written.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                new.as_object_mut().map(|o| o.remove("status"));
            }
        }
        new
    } else {
        if ty.status_subresource {
            let object = written.as_object_mut().expect("writes are objects");
            match old.get("status") {
                Some(status) => object.insert("status".into(), status.clone()),
                None => object.remove("status"),
            };
        }
        written
    }
}

// ---------------------------------------------------------------------------------------
// Field ownership

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Main { without_status: bool },
    Status,
}

impl Scope {
    fn includes(self, path: &str) -> bool {
        let under_status = path == "/status" || path.starts_with("/status/");
        match self {
            Scope::Status => under_status,
            Scope::Main { without_status } => !(without_status && under_status),
        }
    }

    /// The part of an apply body in scope.
    fn restrict(self, body: &Value) -> Value {
        let mut body = body.clone();
        let object = body.as_object_mut().expect("apply bodies are objects");
        match self {
            Scope::Status => {
                object.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"))
            }
            Scope::Main { without_status: true } => {
                object.remove("status");
            }
            Scope::Main {
                without_status: false,
            } => {}
        }
        body
    }
}

/// The leaves of an object by JSON Pointer: scalars and whole lists (lists are atomic
/// here), without server metadata, within `scope`.
fn leaves(object: &Value, scope: Scope) -> BTreeMap<String, Value> {
    fn walk(value: &Value, path: String, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    walk(child, format!("{path}/{}", escape_pointer(key)), out);
                }
            }
            Value::Null => {}
            _ => {
                out.insert(path, value.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(object, String::new(), &mut out);
    out.retain(|path, _| {
        scope.includes(path)
            && !matches!(path.as_str(), "/apiVersion" | "/kind")
            && !path.starts_with("/metadata/managedFields")
            && !SERVER_METADATA.iter().any(|f| path == &format!("/metadata/{f}"))
    });
    out
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// One path is the other or lies under it.
fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// Updates and non-apply patches take over the leaves they change.
fn update_ownership(ty: &ResourceType, writer: &Writer, old: &Stored, new: &Value) -> Vec<ManagedFields> {
    let scope = writer.scope(ty);
    let before = leaves(&old.object, scope);
    let changed: BTreeSet<String> = leaves(new, scope)
        .into_iter()
        .filter(|(path, value)| before.get(path) != Some(value))
        .map(|(path, _)| path)
        .collect();
    let mut managers = old.managers.clone();
    if changed.is_empty() {
        return managers;
    }
    for entry in managers.iter_mut().filter(|e| !writer.owns_entry(e)) {
        entry
            .fields
            .retain(|owned| !changed.iter().any(|c| related(owned, c)));
    }
    match managers.iter_mut().find(|e| writer.owns_entry(e)) {
        Some(entry) => entry.fields.extend(changed),
        None => managers.push(ManagedFields {
            manager: writer.manager.clone(),
            apply: writer.apply,
            status: writer.status,
            fields: changed,
        }),
    }
    managers
}

/// (other manager, path) for each applied leaf that another manager owns with a different
/// value.
fn apply_conflicts(
    old: &Stored,
    writer: &Writer,
    applied: &BTreeMap<String, Value>,
) -> Vec<(String, String)> {
    let mut conflicts = Vec::new();
    for (path, value) in applied {
        if old.object.pointer(path) == Some(value) {
            continue;
        }
        for entry in old.managers.iter().filter(|e| e.manager != writer.manager) {
            if entry.fields.iter().any(|owned| related(owned, path)) {
                conflicts.push((entry.manager.clone(), path.clone()));
            }
        }
    }
    conflicts
}

fn apply_conflict_error(ty: &ResourceType, name: &str, conflicts: &[(String, String)]) -> ApiError {
    let dotted = |path: &str| path.replace('/', ".").replace("~1", "/").replace("~0", "~");
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(manager, path)| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {manager:?} using {}", ty.group_version),
                "field": dotted(path),
            })
        })
        .collect();
    let listed: Vec<String> = conflicts
        .iter()
        .map(|(manager, path)| {
            format!(
                "conflict with {manager:?} using {}: {}",
                ty.group_version,
                dotted(path)
            )
        })
        .collect();
    let plural = if conflicts.len() == 1 { "" } else { "s" };
    let mut error = ApiError::new(
        409,
        "Conflict",
        format!(
            "Apply failed with {} conflict{plural}: {}",
            conflicts.len(),
            listed.join("\n")
        ),
    );
    error.details = Some(json!({"name": name, "group": ty.group(), "kind": ty.plural, "causes": causes}));
    error
}

fn remove_pointer(object: &mut Value, path: &str) {
    let Some((parent, last)) = path.rsplit_once('/') else {
        return;
    };
    let key = last.replace("~1", "/").replace("~0", "~");
    if let Some(map) = object.pointer_mut(parent).and_then(Value::as_object_mut) {
        map.remove(&key);
    }
}

/// Applies a JSON Patch to a copy, op by op. A `test` for `null` passes on a missing path,
/// as the API server's patch library does (kube's finalizer helper tests
/// `/metadata/finalizers` for `null` before adding the first one).
fn apply_json_patch(object: &mut Value, patch: &json_patch::Patch) -> Result<(), String> {
    let mut patched = object.clone();
    for (i, op) in patch.0.iter().enumerate() {
        if let json_patch::PatchOperation::Test(test) = op
            && test.value.is_null()
        {
            match patched.pointer(test.path.as_str()) {
                None | Some(Value::Null) => continue,
                Some(_) => return Err(format!("the test operation {i} at {} failed", test.path)),
            }
        }
        json_patch::patch(&mut patched, std::slice::from_ref(op)).map_err(|e| match e.kind {
            json_patch::PatchErrorKind::TestFailed => {
                format!("the test operation {i} at {} failed: value did not match", e.path)
            }
            _ => format!("the JSON Patch could not be applied: operation {i}: {e}"),
        })?;
    }
    *object = patched;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Selectors and watches

#[derive(Debug)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelRequirement {
    fn matches(&self, labels: &Map<String, Value>) -> bool {
        let value = |k: &String| labels.get(k).and_then(Value::as_str);
        match self {
            LabelRequirement::Equals(k, v) => value(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => value(k) != Some(v),
            LabelRequirement::In(k, vs) => value(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::NotIn(k, vs) => value(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::NotExists(k) => !labels.contains_key(k),
        }
    }
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    let invalid = || ApiError::bad_request(format!("unable to parse requirement: {selector:?}"));
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let set = |s: &str| -> Result<Vec<String>, ApiError> {
        let inner = s
            .trim()
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(invalid)?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    let mut requirements = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some(key) = term.strip_prefix('!') {
            LabelRequirement::NotExists(key.trim().to_owned())
        } else if let Some((key, values)) = term.split_once(" notin ") {
            LabelRequirement::NotIn(key.trim().to_owned(), set(values)?)
        } else if let Some((key, values)) = term.split_once(" in ") {
            LabelRequirement::In(key.trim().to_owned(), set(values)?)
        } else if let Some((key, value)) = term.split_once("!=") {
            LabelRequirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(key.trim().to_owned(), value.trim().to_owned())
        } else if term.contains(char::is_whitespace) || term.contains(['(', ')']) {
            return Err(invalid());
        } else {
            LabelRequirement::Exists(term.to_owned())
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// `path=value` or `path!=value` on a dotted path, compared as text.
#[derive(Debug)]
struct FieldRequirement {
    pointer: String,
    value: String,
    equal: bool,
}

fn parse_field_selector(selector: &str) -> Result<Vec<FieldRequirement>, ApiError> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|term| {
            let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, v, true)
            } else {
                return Err(ApiError::bad_request(format!("invalid field selector: {term:?}")));
            };
            Ok(FieldRequirement {
                pointer: format!("/{}", path.trim().replace('.', "/")),
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

/// Which objects a list or watch sees.
#[derive(Debug)]
struct Filter {
    resource: String,
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    fn new(target: &Target, query: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(Filter {
            resource: target.ty.id(),
            namespace: target.namespace.clone(),
            labels: parse_label_selector(query.get("labelSelector").map_or("", String::as_str))?,
            fields: parse_field_selector(query.get("fieldSelector").map_or("", String::as_str))?,
        })
    }

    fn matches(&self, key: &Key, object: &Value) -> bool {
        key.resource == self.resource
            && self.namespace.as_ref().is_none_or(|ns| &key.namespace == ns)
            && self.matches_object(object)
    }

    fn matches_object(&self, object: &Value) -> bool {
        let empty = Map::new();
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        self.labels.iter().all(|r| r.matches(labels))
            && self.fields.iter().all(|f| {
                let actual = match object.pointer(&f.pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (actual == f.value) == f.equal
            })
    }

    /// The event a watch with this filter gets for a change, if any: objects that start or
    /// stop matching arrive as ADDED or DELETED.
    fn event_for<'c>(&self, change: &'c Change) -> Option<(&'static str, &'c Value)> {
        if change.resource != self.resource
            || self.namespace.as_ref().is_some_and(|ns| &change.namespace != ns)
        {
            return None;
        }
        let now = self.matches_object(&change.object);
        match change.event {
            "MODIFIED" => {
                let before = change.previous.as_ref().is_some_and(|p| self.matches_object(p));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", &change.object)),
                    (false, true) => Some(("ADDED", &change.object)),
                    (true, false) => Some(("DELETED", &change.object)),
                    (false, false) => None,
                }
            }
            event => now.then_some((event, &change.object)),
        }
    }
}

fn watch_line(event: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": event, "object": object})).expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

fn watch(shared: Arc<Shared>, target: Target, query: &HashMap<String, String>) -> Response {
    let filter = match Filter::new(&target, query) {
        Ok(filter) => filter,
        Err(error) => return error.into_response(),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let bookmarks = is_true(query.get("allowWatchBookmarks"));
    let since = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse::<u64>().ok())
        .filter(|rv| *rv > 0);
    let kind = shared.store().kind(&target.ty);
    let bookmark = move |rv: u64| {
        watch_line(
            "BOOKMARK",
            &json!({
                "kind": kind,
                "apiVersion": target.ty.group_version,
                "metadata": {"resourceVersion": rv.to_string()},
            }),
        )
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let deadline = Instant::now() + timeout;
        let mut changes = shared.changes.subscribe();
        let mut shutdown = shared.shutdown.subscribe();
        let mut seen = match since {
            Some(rv) => rv,
            None => {
                let (rv, lines) = {
                    let store = shared.store();
                    (store.rv, store.current_as_added(&filter))
                };
                for line in lines {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                rv
            }
        };
        loop {
            let batch = shared.store().changes_since(seen, &filter);
            match batch {
                Ok((upto, lines)) => {
                    seen = upto;
                    for line in lines {
                        if tx.send(line).await.is_err() {
                            return;
                        }
                    }
                }
                Err(gone) => {
                    let _ = tx.send(gone).await;
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(bookmark(seen)).await;
                    }
                    return;
                }
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("a streaming response builds")
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    let object = object.as_object_mut().expect("stored objects are objects");
    let meta = object
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut().expect("metadata was just made an object")
}

fn meta_str<'v>(object: &'v Value, field: &str) -> Option<&'v str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn meta_i64(object: &Value, field: &str) -> Option<i64> {
    object.get("metadata")?.get(field)?.as_i64()
}

fn has_finalizers(object: &Value) -> bool {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

fn owner_uids(object: &Value) -> impl Iterator<Item = &str> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("uid").and_then(Value::as_str))
}

fn without_meta_and_status(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    object
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Five characters from the alphabet real generated names use.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn encode_continue(rv: u64, after: &Key) -> String {
    let token = json!([rv, after.namespace, after.name]).to_string();
    URL_SAFE_NO_PAD.encode(token)
}

fn decode_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let invalid = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let (rv, namespace, name): (u64, String, String) =
        serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    Ok((rv, namespace, name))
}

/// A ReverseSync with a small valid spec, and a status a create must drop
/// (`observedGeneration: 42`).
pub fn reverse_sync(name: &str) -> backflow::api::ReverseSync {
    serde_json::from_value(json!({
        "apiVersion": "backflow.dev/v1alpha1",
        "kind": "ReverseSync",
        "metadata": {"name": name},
        "spec": {
            "source": {
                "connectionSecretRef": {"name": "warehouse"},
                "query": "select id, email from users",
                "primaryKey": ["id"],
            },
            "destinationRef": {"name": "crm"},
            "mappings": [{"from": "email", "to": "email"}],
        },
        "status": {"observedGeneration": 42},
    }))
    .unwrap()
}

//! `ReverseSync`: one warehouse model pushed to one destination.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LocalObjectRef, SecretKeyRef};

/// Pushes the rows of a SQL model to a Destination, sending only what changed.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "backflow.dev",
    version = "v1alpha1",
    kind = "ReverseSync",
    plural = "reversesyncs",
    shortname = "rsync",
    category = "backflow",
    namespaced,
    status = "ReverseSyncStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Last Sync","type":"date","jsonPath":".status.lastSuccessfulSyncTime"}"#,
    printcolumn = r#"{"name":"Rows","type":"integer","jsonPath":".status.lastRun.rowsInModel"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","priority":1,"jsonPath":".status.progress.phase"}"#,
    printcolumn = r#"{"name":"Sent","type":"integer","priority":1,"jsonPath":".status.progress.recordsSent"}"#,
    printcolumn = r#"{"name":"To Send","type":"integer","priority":1,"jsonPath":".status.progress.recordsToSend"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReverseSyncSpec {
    /// Where the rows come from: a connection Secret, a SQL query and its primary key.
    pub source: SourceSpec,
    /// The Destination (same namespace) the rows are sent to.
    pub destination_ref: LocalObjectRef,
    /// How rows are applied: upsert (create or update), update (only records synced before),
    /// insert (only new records), mirror (upsert, and delete what left the model).
    #[serde(default)]
    pub mode: SyncMode,
    /// Which columns are sent and under which destination field names. Columns that are not
    /// mapped are not sent.
    #[schemars(length(min = 1, max = 1000))]
    pub mappings: Vec<Mapping>,
    /// The destination fields that identify a record (for example `email`). Defaults to the
    /// targets of the mappings whose `from` is a primary key column.
    #[serde(rename = "match", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_fields: Vec<String>,
    /// When to run: a fixed `interval` or a `cron` expression. Without a schedule the sync runs
    /// when its spec changes or when the `backflow.dev/requested-at` annotation changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Pause the sync: no run starts while true.
    #[serde(default)]
    pub suspend: bool,
    /// Where a run executes: inside the operator or as a Kubernetes Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<Execution>,
    /// Where the per-row fingerprints that detect changes are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateSpec>,
    /// Preview: plan each run without sending anything or changing state, and write the
    /// counts and a few sample keys to `status.plan`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The mass-delete guard (mirror mode): how much one run may delete. A run that would
    /// delete more sends its adds and updates but holds every delete back, until the model
    /// recovers or the plan is approved once with the `backflow.dev/approve-deletes`
    /// annotation. On by default: above 50% of the stored records (from 10 stored records
    /// on), and always when every stored record would go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_limit: Option<DeleteLimit>,
    /// Read only the rows past a high-water mark of a column that grows whenever a row
    /// changes (like `updated_at`), and run a full diff on its own schedule to catch deletes
    /// and changes that did not move the column. Without it every run reads the whole model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<CursorSpec>,
}

/// Cursor mode: runs read only the rows whose cursor column reached the stored high-water
/// mark; a full diff on its own schedule keeps deletes and unmoved changes in sync.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CursorSpec {
    /// A column of the model that never goes down when a row changes: an integer, decimal,
    /// date or timestamp (timestamps compare in UTC), like `updated_at`. A run reads the rows
    /// where it is at or past the mark (`>=`: rows at the mark are read again and those
    /// delivered already are skipped by their fingerprint); rows where it is NULL are read
    /// by full diffs only.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub column: String,
    /// When a run reads the whole model instead (a full diff, which also deletes in mirror
    /// mode): every `interval` or at the times of a `cron` expression, counted from the last
    /// full diff (default: every `24h`). A run asked for by the `backflow.dev/requested-at`
    /// annotation or a changed spec is a full diff too, as is `backflow run --full-diff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_diff: Option<FullDiffSchedule>,
}

/// When cursor mode reads the whole model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.interval) != has(self.cron)",
    "message": "set interval or cron, exactly one"
}]))]
pub struct FullDiffSchedule {
    /// A full diff once this long has passed since the last one, like `6h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+ ?[a-zA-Zµ]+( ?[0-9]+ ?[a-zA-Zµ]+)*$")
    )]
    pub interval: Option<String>,
    /// A full diff at the first run after each time of this cron expression (5 fields, UTC)
    /// since the last one, like `0 3 * * *`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub cron: Option<String>,
}

/// How much one run may delete before its deletes are held back.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteLimit {
    /// Largest share of the stored records one run may delete, in percent (default 50);
    /// 100 turns the share check off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_percent: Option<u32>,
    /// Largest number of records one run may delete (no limit by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
    /// Below this many stored records the share is not checked, so ordinary churn in a tiny
    /// sync is not held back (default 10). An emptied model is held back whatever the size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_stored_records: Option<u64>,
    /// Let a run delete every stored record (a model that returns no rows, or none of the
    /// keys synced before). Off by default: that is what a broken model or a revoked grant
    /// looks like.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_delete_all: bool,
}

/// The model: a SQL query over a warehouse connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// Secret key (default key `url`) holding the connection URL: `postgres://…`,
    /// `mysql://…`, `sqlite://…`, `clickhouse://…` (`clickhouses://…` for HTTPS),
    /// `redshift://…`, `snowflake://USER@ACCOUNT/DATABASE/SCHEMA?warehouse=…&role=…`,
    /// `databricks://HOST/sql/1.0/warehouses/ID?catalog=…&schema=…` or
    /// `bigquery://PROJECT/DATASET?location=…&maximumBytesBilled=…`. Credentials that do not
    /// fit in a URL come from other keys of the same Secret: `private_key` or `token`
    /// (Snowflake), `token` or `client_secret` (Databricks), `service_account_json` (BigQuery).
    /// See docs/sources/.
    pub connection_secret_ref: SecretKeyRef,
    /// The model query. It runs read-only (a read-only transaction; ClickHouse's `readonly`
    /// setting); a statement that writes fails.
    #[schemars(length(min = 1))]
    pub query: String,
    /// Columns that identify a row of the model. A row with a NULL or duplicate key is
    /// rejected with a reason; the run goes on.
    #[schemars(length(min = 1, max = 16))]
    pub primary_key: Vec<String>,
    /// Longest time the model query may run, like `10m` (default `10m`, at most `1d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+ ?[a-zA-Zµ]+( ?[0-9]+ ?[a-zA-Zµ]+)*$")
    )]
    pub statement_timeout: Option<String>,
}

/// How rows are applied to the destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Create new records and update changed ones.
    #[default]
    Upsert,
    /// Update records this sync created or updated before; new rows are skipped.
    Update,
    /// Create records for new rows only; changed rows are skipped.
    Insert,
    /// Upsert, and delete the records whose rows left the model.
    Mirror,
}

impl SyncMode {
    /// The name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Upsert => "upsert",
            SyncMode::Update => "update",
            SyncMode::Insert => "insert",
            SyncMode::Mirror => "mirror",
        }
    }
}

/// One destination field and where its value comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.from) != has(self.template)",
    "message": "a mapping needs exactly one of from or template"
}, {
    "rule": "!has(self.templateType) || self.templateType == 'text' || has(self.template)",
    "message": "templateType applies only to a template mapping"
}]))]
pub struct Mapping {
    /// Source column to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// A Jinja template over the row's columns instead of `from`, like
    /// `"{{ first_name | title }} {{ last_name | title }}"` (see docs/templates.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// What `template` produces: `text` (default; NULL columns print empty) or `json` (each
    /// `{{ … }}` writes a JSON value and the result is parsed as JSON: an object, a list, a
    /// number…).
    #[serde(default, skip_serializing_if = "TemplateType::is_text")]
    pub template_type: TemplateType,
    /// Destination field. Dots make nested objects: `properties.email`.
    #[schemars(length(min = 1))]
    pub to: String,
    /// Transforms applied in order: `lowercase`, `uppercase`, `trim`, `to_string`,
    /// `to_number`, `round(N)`, `format("%Y-%m-%d")`, `default(VALUE)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub transforms: Vec<String>,
}

/// The type of a template mapping's result.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TemplateType {
    /// The rendered text.
    #[default]
    Text,
    /// The rendered text parsed as JSON (numbers kept exact).
    Json,
}

impl TemplateType {
    /// True for [`TemplateType::Text`], the default.
    pub fn is_text(&self) -> bool {
        *self == TemplateType::Text
    }
}

/// When a sync runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.interval) && has(self.cron))",
    "message": "set interval or cron, not both"
}]))]
pub struct Schedule {
    /// Run every interval, like `15m` or `1h` (at least `1s`, at most a year).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+ ?[a-zA-Zµ]+( ?[0-9]+ ?[a-zA-Zµ]+)*$")
    )]
    pub interval: Option<String>,
    /// Run at the times of a cron expression (5 fields, UTC; no seconds field), like
    /// `*/15 * * * *`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub cron: Option<String>,
    /// Run right after these syncs (same namespace) have all succeeded since this sync's
    /// last run; combines with `interval` or `cron`, or stands alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub after: Vec<String>,
}

/// Where a run executes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Execution {
    /// `InProcess` runs inside the operator; `Job` runs each sync as a Kubernetes Job.
    #[serde(default)]
    pub mode: ExecutionMode,
    /// Overrides of the run Job's pod for this sync (Job mode); unset fields keep the
    /// operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_template: Option<JobTemplate>,
}

/// Per-sync overrides of the Job that runs a sync in Job mode.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobTemplate {
    /// Container image (default: the operator's `--job-image`). Any other image must be in
    /// the operator's `--job-allowed-images`, or the sync is Stalled (`JobImageNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Service account of the run pod (default: the operator's `--job-service-account`). Any
    /// other must be in `--job-allowed-service-accounts`, or the sync is Stalled
    /// (`JobServiceAccountNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Compute resources of the run container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Node labels the run pod must match; honoured only when the operator runs with
    /// `--job-allow-placement` (otherwise the sync is Stalled, `JobPlacementNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
    /// Tolerations of the run pod; honoured only with `--job-allow-placement`, like
    /// `nodeSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
    /// Seconds the Job may run before Kubernetes stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<i64>,
    /// Pod retries before the Job fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<i32>,
}

/// Where a run executes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ExecutionMode {
    /// Inside the operator, on its bounded worker pool.
    #[default]
    InProcess,
    /// In a `batch/v1` Job running `backflow run --namespace NS --sync NAME`.
    Job,
}

/// Where per-row fingerprints live.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateSpec {
    /// `ConfigMap` (in the cluster, owned by the sync), `Warehouse` (a table in the source
    /// database) or `File` (a local directory, for `backflow run -f`).
    #[serde(default)]
    pub store: StateStoreKind,
    /// Warehouse store: the schema (a database on MySQL/MariaDB) holding the state tables
    /// `backflow_syncs` and `backflow_state` (and, with `syncLogs`, `backflow_runs` and
    /// `backflow_rejections`). Created on first use when missing. Default `backflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Warehouse store: a Secret key (default key `url`) holding a separate, write-capable
    /// connection URL for the state tables. Default: the source's connection URL. The model
    /// query always runs read-only on its own connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret_ref: Option<SecretKeyRef>,
    /// Warehouse store: also write one row per run to `backflow_runs` and one per rejected
    /// row to `backflow_rejections` in the state schema, for analysts to query with SQL.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync_logs: bool,
}

impl StateSpec {
    /// The schema of the Warehouse store's tables.
    pub fn schema_or_default(&self) -> &str {
        self.schema.as_deref().unwrap_or(DEFAULT_STATE_SCHEMA)
    }
}

/// The schema of the Warehouse store's tables when `spec.state.schema` is not set.
pub const DEFAULT_STATE_SCHEMA: &str = "backflow";

/// The home of a sync's fingerprints.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StateStoreKind {
    /// Compressed, sharded ConfigMaps owned by the ReverseSync.
    #[default]
    ConfigMap,
    /// A state table in the source database.
    Warehouse,
    /// A local directory.
    File,
}

/// What the operator observed of a sync.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReverseSyncStatus {
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`, and `Degraded` when rows were
    /// rejected; `SourcePrivileged` when the source login can escape the read-only transaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The most recent run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunSummary>,
    /// When a run last finished without failing (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_sync_time: Option<String>,
    /// When the next scheduled run starts (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_time: Option<String>,
    /// A few rows the last run rejected, with the reason (keys only, never payload values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_samples: Vec<RejectedRow>,
    /// With `spec.dryRun`: what the last preview would send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanPreview>,
    /// Failed runs in a row; retries back off as it grows. 0 after a run that did not fail.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub consecutive_failures: u32,
    /// The value of the `backflow.dev/requested-at` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_requested_at: Option<String>,
    /// Name of the Job of the run in flight (Job mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_job: Option<String>,
    /// Name of the ConfigMap indexing the sync's fingerprints (ConfigMap store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_ref: Option<String>,
    /// How far the run in flight has got: written every few seconds while a run goes on
    /// (the operator's `--progress-interval`), removed when it ends, when `lastRun` takes
    /// over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<RunProgress>,
}

/// How far the run in flight has got.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunProgress {
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// When this progress was written (RFC 3339); it moves every few seconds while the run
    /// is alive.
    pub updated_at: String,
    /// The step the run is in: `Reading` (the model's rows), `Planning` (comparing them with
    /// the stored fingerprints), `Delivering` (sending records), `Committing` (the last
    /// checkpoint of state).
    pub phase: String,
    /// Rows read from the model so far.
    #[serde(default)]
    pub rows_read: u64,
    /// Rows the plan has decided so far (when the state store compares fingerprints itself,
    /// all of them at once when it answers).
    #[serde(default)]
    pub rows_planned: u64,
    /// Records the plan sends (writes and deletes); 0 until the plan is complete.
    #[serde(default)]
    pub records_to_send: u64,
    /// Records sent that the destination has answered for: accepted, rejected, or failed
    /// after every retry.
    #[serde(default)]
    pub records_sent: u64,
    /// Records the destination accepted (written or deleted).
    #[serde(default)]
    pub records_accepted: u64,
    /// Records the destination rejected (they are sent again next run).
    #[serde(default)]
    pub records_rejected: u64,
    /// Seconds delivery was held back by the Destination's rate limit or by its throttling
    /// answers (429 and the like); waits that overlap count once.
    #[serde(default)]
    pub throttled_seconds: f64,
    /// Seconds until every record is sent at the rate seen so far; absent until it can be
    /// told (before delivery, or in its first second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_seconds_left: Option<u64>,
}

/// What a dry run would send: counts per operation and a few sample keys.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanPreview {
    /// When the preview was computed (RFC 3339).
    pub computed_at: String,
    /// The `metadata.generation` previewed.
    pub generation: i64,
    /// Rows that would be created.
    pub add: u64,
    /// Rows that would be updated.
    pub change: u64,
    /// Records that would be deleted (mirror).
    pub remove: u64,
    /// Rows that would be left alone.
    pub unchanged: u64,
    /// Rows that would be rejected.
    pub rejected: u64,
    /// A few keys per operation (keys only, never payload values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<PlanSampleKey>,
    /// Set when the deletes would pass the delete limit and be held back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletes_held_back: Option<DeletesHeldBack>,
    /// The `backflow.dev/preview-requested-at` value this preview answers; absent for the
    /// previews of `spec.dryRun` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<String>,
    /// Why the requested preview could not be computed (never a secret value); the counts
    /// are then zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Deletes the mass-delete guard held back (or would, in a preview).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletesHeldBack {
    /// Records the plan would delete.
    pub deletes: u64,
    /// Records synced before (stored fingerprints).
    pub stored_records: u64,
    /// Which limit the plan passes, in words.
    pub reason: String,
    /// The plan's identity: the delete count and a hash of the deleted keys. Setting the
    /// `backflow.dev/approve-deletes` annotation to it lets exactly these deletes through.
    pub plan_id: String,
}

/// One sample of a preview.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanSampleKey {
    /// The operation that would be sent.
    pub operation: String,
    /// The row's key.
    pub key: String,
}

/// Counts and outcome of one run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// Start of the run (RFC 3339).
    pub start: String,
    /// End of the run (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// `Succeeded`, `PartiallySucceeded` (some rows rejected or failed) or `Failed`.
    pub result: String,
    /// Rows returned by the model query.
    pub rows_in_model: u64,
    /// Rows new since the previous run that were sent.
    pub rows_added: u64,
    /// Rows that changed since the previous run and were sent.
    pub rows_changed: u64,
    /// Records deleted because their rows left the model (mirror mode).
    pub rows_removed: u64,
    /// Rows identical to what was last sent (nothing sent).
    pub rows_unchanged: u64,
    /// Rows rejected by the planner or the destination; retried next run.
    pub rows_rejected: u64,
    /// Rows that could not be delivered after all retries; retried next run.
    pub rows_failed: u64,
    /// Requests made to the destination.
    pub requests: u64,
    /// Fingerprint of the whole synced result set (changes when any row changes); absent
    /// when the run read no result.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
    /// The `metadata.generation` of the spec the run used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// What started the run: `Schedule`, `SpecChanged`, `Requested`, `After` or `Retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The `backflow.dev/requested-at` value this run answered (trigger `Requested`), so a
    /// client that set it knows the run it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<String>,
    /// True when the run ignored the stored fingerprints and sent every row (the
    /// `backflow.dev/full-resync` annotation).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_resync: bool,
    /// Why the run failed, when it did (never a secret value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set when the mass-delete guard held the run's deletes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletes_held_back: Option<DeletesHeldBack>,
}

/// A rejected row: its key, the operation and the reason. Never payload values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RejectedRow {
    /// The primary key of the row.
    pub key: String,
    /// The operation that was refused (`upsert`, `delete`, …).
    pub operation: String,
    /// Why, in the planner's or the destination's words.
    pub reason: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

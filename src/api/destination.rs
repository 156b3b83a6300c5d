//! `Destination`: where rows go and how to talk to it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;

/// A system rows are sent to: a REST endpoint or webhook, or a database table.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "backflow.dev",
    version = "v1alpha1",
    kind = "Destination",
    plural = "destinations",
    shortname = "dest",
    category = "backflow",
    namespaced,
    status = "DestinationStatus",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.http) == (self.type == 'http')", "message": "type http needs the http block, and only type http may have it"},
    {"rule": "has(self.postgres) == (self.type == 'postgres')", "message": "type postgres needs the postgres block, and only type postgres may have it"},
    {"rule": "has(self.mysql) == (self.type == 'mysql')", "message": "type mysql needs the mysql block, and only type mysql may have it"},
    {"rule": "has(self.sqlite) == (self.type == 'sqlite')", "message": "type sqlite needs the sqlite block, and only type sqlite may have it"},
    {"rule": "has(self.slack) == (self.type == 'slack')", "message": "type slack needs the slack block, and only type slack may have it"},
    {"rule": "has(self.hubspot) == (self.type == 'hubspot')", "message": "type hubspot needs the hubspot block, and only type hubspot may have it"},
    {"rule": "has(self.redis) == (self.type == 'redis')", "message": "type redis needs the redis block, and only type redis may have it"},
    {"rule": "has(self.braze) == (self.type == 'braze')", "message": "type braze needs the braze block, and only type braze may have it"},
    {"rule": "has(self.intercom) == (self.type == 'intercom')", "message": "type intercom needs the intercom block, and only type intercom may have it"},
    {"rule": "has(self.customerio) == (self.type == 'customerio')", "message": "type customerio needs the customerio block, and only type customerio may have it"},
    {"rule": "has(self.mailchimp) == (self.type == 'mailchimp')", "message": "type mailchimp needs the mailchimp block, and only type mailchimp may have it"},
    {"rule": "has(self.zendesk) == (self.type == 'zendesk')", "message": "type zendesk needs the zendesk block, and only type zendesk may have it"},
    {"rule": "has(self.salesforce) == (self.type == 'salesforce')", "message": "type salesforce needs the salesforce block, and only type salesforce may have it"}
]))]
pub struct DestinationSpec {
    /// The kind of destination; the block of the same name configures it.
    #[serde(rename = "type")]
    pub destination_type: DestinationType,
    /// Secret (same namespace) with the credentials: a connection URL for database
    /// destinations (key `url`), a vendor API token (key `token`), or values used in HTTP
    /// header templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
    /// Requests per second and burst allowed to this destination, shared by every sync that
    /// uses it. Defaults per type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Records per request (capped at the destination's own limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub batch_size: Option<u32>,
    /// Requests in flight at once per sync run (at most 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrency: Option<u32>,
    /// Retries of transient failures (429, 5xx, timeouts, lost connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Settings for `type: http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// Settings for `type: postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<TableSpec>,
    /// Settings for `type: mysql` (MySQL, MariaDB and compatible servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<TableSpec>,
    /// Settings for `type: sqlite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite: Option<TableSpec>,
    /// Settings for `type: slack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackSpec>,
    /// Settings for `type: hubspot` (HubSpot CRM v3 objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hubspot: Option<HubspotSpec>,
    /// Settings for `type: redis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// Settings for `type: braze` (Braze user profiles through `/users/track`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub braze: Option<BrazeSpec>,
    /// Settings for `type: intercom` (Intercom contacts, API version 2.11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercom: Option<IntercomSpec>,
    /// Settings for `type: customerio` (people in a Customer.io workspace, Track API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customerio: Option<CustomerioSpec>,
    /// Settings for `type: mailchimp` (members of a Mailchimp audience).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailchimp: Option<MailchimpSpec>,
    /// Settings for `type: zendesk` (Zendesk Support users or organizations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zendesk: Option<ZendeskSpec>,
    /// Settings for `type: salesforce` (Salesforce sObjects, upserted on an external id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salesforce: Option<SalesforceSpec>,
}

/// The kinds of destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DestinationType {
    /// A REST API or webhook receiving JSON batches.
    Http,
    /// A PostgreSQL table (also CockroachDB, AlloyDB, …).
    Postgres,
    /// A MySQL or MariaDB table.
    Mysql,
    /// A SQLite table.
    Sqlite,
    /// Slack messages (`chat.postMessage`), one per added or changed row.
    Slack,
    /// HubSpot CRM v3 objects (contacts, companies, deals, custom objects).
    Hubspot,
    /// Redis: one hash per record.
    Redis,
    /// Braze user profiles, written with `/users/track` and matched on `external_id`.
    Braze,
    /// Intercom contacts (users or leads), found by `external_id` or email.
    Intercom,
    /// Customer.io people, identified (created or updated) through the Track API.
    Customerio,
    /// Mailchimp Marketing API 3.0: members of one audience.
    Mailchimp,
    /// Zendesk Support users or organizations, through the asynchronous bulk endpoints.
    Zendesk,
    /// Salesforce sObjects, upserted on an external id field through sObject Collections or
    /// Bulk API 2.0.
    Salesforce,
}

impl DestinationType {
    /// Every type, in the order of the enum.
    pub const ALL: &'static [DestinationType] = &[
        DestinationType::Http,
        DestinationType::Postgres,
        DestinationType::Mysql,
        DestinationType::Sqlite,
        DestinationType::Slack,
        DestinationType::Hubspot,
        DestinationType::Redis,
        DestinationType::Braze,
        DestinationType::Intercom,
        DestinationType::Customerio,
        DestinationType::Mailchimp,
        DestinationType::Zendesk,
        DestinationType::Salesforce,
    ];

    /// The name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationType::Http => "http",
            DestinationType::Postgres => "postgres",
            DestinationType::Mysql => "mysql",
            DestinationType::Sqlite => "sqlite",
            DestinationType::Slack => "slack",
            DestinationType::Hubspot => "hubspot",
            DestinationType::Redis => "redis",
            DestinationType::Braze => "braze",
            DestinationType::Intercom => "intercom",
            DestinationType::Customerio => "customerio",
            DestinationType::Mailchimp => "mailchimp",
            DestinationType::Zendesk => "zendesk",
            DestinationType::Salesforce => "salesforce",
        }
    }
}

impl DestinationSpec {
    /// What the destination writes to, for telling state apart: a sync whose destination
    /// target changes starts from empty state and sends every row. Settings that do not change
    /// where records land (limits, headers, templates of the body) are left out.
    pub fn target(&self) -> String {
        let table = |t: &Option<TableSpec>| {
            t.as_ref()
                .map(|t| format!("{}.{}", t.schema.as_deref().unwrap_or_default(), t.table))
        };
        let target = match self.destination_type {
            DestinationType::Http => self.http.as_ref().map(|h| h.url.clone()),
            DestinationType::Postgres => table(&self.postgres),
            DestinationType::Mysql => table(&self.mysql),
            DestinationType::Sqlite => table(&self.sqlite),
            DestinationType::Slack => self.slack.as_ref().map(|s| s.channel.clone()),
            DestinationType::Hubspot => self
                .hubspot
                .as_ref()
                .map(|h| format!("{}/{}", h.object, h.id_property)),
            DestinationType::Redis => self.redis.as_ref().map(|r| r.key.clone()),
            DestinationType::Braze => self.braze.as_ref().map(|b| b.base_url.clone()),
            DestinationType::Intercom => self.intercom.as_ref().map(|i| {
                format!(
                    "{}/{}",
                    i.role.unwrap_or_default().as_str(),
                    i.identify_by.unwrap_or_default().as_str()
                )
            }),
            DestinationType::Customerio => self.customerio.as_ref().map(|c| {
                c.base_url
                    .clone()
                    .unwrap_or_else(|| c.region.unwrap_or_default().as_str().to_owned())
            }),
            DestinationType::Mailchimp => self.mailchimp.as_ref().map(|m| m.list_id.clone()),
            DestinationType::Zendesk => self
                .zendesk
                .as_ref()
                .map(|z| format!("{}/{}", z.subdomain, z.object.as_str())),
            DestinationType::Salesforce => self.salesforce.as_ref().map(|s| {
                format!(
                    "{}/{}/{}",
                    s.base_url.as_deref().unwrap_or(&s.login_url),
                    s.object,
                    s.external_id_field
                )
            }),
        };
        format!(
            "{}/{}",
            self.destination_type.as_str(),
            target.unwrap_or_default()
        )
    }
}

/// A token bucket: a steady rate and a burst.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    #[schemars(range(min = 0.001))]
    pub requests_per_second: f64,
    /// Requests allowed at once above the steady rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

/// Retry policy for transient failures: exponential backoff with jitter, honouring
/// `Retry-After`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts per request including the first (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_attempts: Option<u32>,
    /// Wait before the first retry, like `500ms` (default `500ms`, at most `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+ ?[a-zA-Zµ]+( ?[0-9]+ ?[a-zA-Zµ]+)*$")
    )]
    pub initial_backoff: Option<String>,
    /// Longest wait between retries, like `30s` (default `30s`, at most `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+ ?[a-zA-Zµ]+( ?[0-9]+ ?[a-zA-Zµ]+)*$")
    )]
    pub max_backoff: Option<String>,
}

/// A generic JSON-over-HTTP destination (REST API or webhook).
///
/// Templates are Jinja (docs/templates.md): `{{ secret.KEY }}` is a key of the credentials
/// Secret (headers and URL only), `{{ operation }}` is `upsert`, `update`, `insert` or
/// `delete`, `{{ records }}` (body only) is the JSON array of the batch's records, each its
/// mapped fields or what the `record` template renders from them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSpec {
    /// URL template for upserts, updates and inserts, like `https://api.example.com/{{operation}}`.
    #[schemars(length(min = 1))]
    pub url: String,
    /// HTTP method (default `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header templates, like `Authorization: "Bearer {{secret.token}}"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Body template: the envelope around the batch (default
    /// `{"operation":"{{operation}}","records":{{records}}}`). Text: its JSON is written as
    /// it is; `{{ records }}` is the JSON array of the records, `{{ count }}` their number; a
    /// body naming `{{ record }}` is sent once per record, as that record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Per-record template: the JSON each record becomes, like
    /// `{"email": {{ email }}, "name": {{ first ~ " " ~ last }}}`. Each `{{ … }}` writes a
    /// JSON value; variables are the record's fields, `record` and `operation`. Without it a
    /// record is its mapped fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// How deletes are sent (mirror mode). Without it, deletes go to `url` with the same
    /// method and `{{operation}}` = `delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<HttpDeleteSpec>,
    /// How to read per-record outcomes from a 2xx response. Without it, a 2xx accepts the
    /// whole batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<HttpResultsSpec>,
    /// Request timeout, like `30s` (default `30s`, at most `1d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+ ?[a-zA-Zµ]+( ?[0-9]+ ?[a-zA-Zµ]+)*$")
    )]
    pub timeout: Option<String>,
    /// Path of a connection check (GET, relative to the URL's origin or absolute; may use
    /// `{{secret.KEY}}`). Without it the check only resolves templates and the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_url: Option<String>,
}

/// Where and how deletes are sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDeleteSpec {
    /// URL template for deletes.
    #[schemars(length(min = 1))]
    pub url: String,
    /// HTTP method for deletes (default `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Body template for deletes (default: `spec.http.body`); `{{records}}` holds only the
    /// match fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Per-record template for deletes: the JSON each deleted record becomes, from its match
    /// fields (dotted ones nested: `{{ properties.email }}`). Without it a record is its
    /// match fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
}

/// Per-record outcomes in a response body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpResultsSpec {
    /// JSON Pointer to an array with one entry per record, in request order, like `/results`.
    pub path: String,
    /// Field of an entry holding an error message; a value other than null, false, `""`,
    /// `{}` or `[]` rejects that record (an object or array is sent back as its JSON).
    #[serde(default = "default_error_field")]
    pub error_field: String,
}

fn default_error_field() -> String {
    "error".to_owned()
}

/// A database table destination. The connection URL comes from the credentials Secret
/// (key `url` unless `credentialsSecretRef.key` says otherwise).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TableSpec {
    /// Table name. Rows are upserted on the sync's match fields, which need a unique index.
    #[schemars(length(min = 1))]
    pub table: String,
    /// Schema (PostgreSQL) or database (MySQL) holding the table; default the connection's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
}

/// Slack: one message per added or changed row, sent with `chat.postMessage`. The bot
/// token (`xoxb-…`) comes from the credentials Secret (key `token` unless
/// `credentialsSecretRef.key` says otherwise).
///
/// `channel` and `text` are templates over the record's mapped fields: `{{score}}`, and
/// dotted names for nested fields (`{{properties.name}}`). A NULL renders empty; a field the
/// record does not have rejects that record with a reason naming the field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlackSpec {
    /// Channel to post to: a name like `#alerts`, an ID like `C0123456789`, or a template
    /// like `{{owner_channel}}`.
    #[schemars(length(min = 1))]
    pub channel: String,
    /// Message text template (Slack `mrkdwn`), like `{{name}}'s score is now {{score}}`.
    #[schemars(length(min = 1))]
    pub text: String,
    /// Slack Web API base URL (default `https://slack.com/api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// HubSpot CRM v3: records of one object type, matched on a unique property. The private-app
/// token comes from the credentials Secret (key `token` unless `credentialsSecretRef.key`
/// says otherwise).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HubspotSpec {
    /// The object type: `contacts`, `companies`, `deals`, another standard object, or a
    /// custom object's type id like `2-12345`.
    #[schemars(length(min = 1))]
    pub object: String,
    /// The unique property records are matched on, like `email` for contacts or a custom
    /// unique property; the sync's match field holds its value.
    #[schemars(length(min = 1))]
    pub id_property: String,
    /// API base URL (default `https://api.hubapi.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// A Redis destination: one hash per record, under a key rendered from the record. The
/// connection URL (`redis://[user:password@]host:port/db`) comes from the credentials Secret
/// (key `url` unless `credentialsSecretRef.key` says otherwise).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisSpec {
    /// Key template of each record's hash, like `customer:{{id}}`; variables are the sync's
    /// match fields (needed for mirror deletes) or other mapped fields.
    #[schemars(length(min = 1))]
    pub key: String,
    /// Expiry set on a hash each time it is written, like `30d`; without it hashes never
    /// expire (at most ten years). Unchanged rows are not rewritten, so their TTL is not
    /// refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+ ?[a-zA-Zµ]+( ?[0-9]+ ?[a-zA-Zµ]+)*$")
    )]
    pub ttl: Option<String>,
}

/// Braze: one user profile per record, written with `POST /users/track` and matched on
/// `external_id` (the sync's match field). The REST API key comes from the credentials Secret
/// (key `apiKey` unless `credentialsSecretRef.key` says otherwise).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrazeSpec {
    /// The REST endpoint of your Braze instance, like `https://rest.iad-01.braze.com` (it
    /// differs per cluster: see Braze's "API overview" page, or the dashboard's API settings).
    #[schemars(length(min = 1))]
    pub base_url: String,
}

/// Intercom contacts (API version 2.11): each record is found through the contact search
/// endpoint by its identifier, then updated, or created with the role. The access token comes
/// from the credentials Secret (key `token` unless `credentialsSecretRef.key` says otherwise).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntercomSpec {
    /// The contact attribute records are found by: `external_id` (default) or `email`; the
    /// sync's match field holds its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identify_by: Option<IntercomIdentifier>,
    /// The role of contacts Backflow creates: `user` (default) or `lead`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<IntercomRole>,
    /// API base URL (default `https://api.intercom.io`; `https://api.eu.intercom.io` for
    /// workspaces hosted in Europe, `https://api.au.intercom.io` for Australia).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// Zendesk Support: users or organizations, written through `create_or_update_many` (an
/// asynchronous job the connector follows to its end). The agent's email and API token come
/// from the credentials Secret (keys `email` and `token`; `credentialsSecretRef.key` renames
/// the token key).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZendeskSpec {
    /// The account's subdomain: `acme` for `https://acme.zendesk.com`.
    #[schemars(length(min = 1))]
    pub subdomain: String,
    /// What each row becomes: `users` (default) or `organizations`.
    #[serde(default)]
    pub object: ZendeskObject,
    /// API base URL (default `https://{subdomain}.zendesk.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// Salesforce: records of one sObject, upserted on an external id field through sObject
/// Collections (200 records a call), or Bulk API 2.0 ingest jobs for large runs, and deleted
/// by Id for mirror. An OAuth 2.0 access token is obtained from the Secret's `clientId` and
/// `clientSecret` (client credentials flow), or from `clientId`, `username` and `privateKey`
/// (JWT bearer flow).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SalesforceSpec {
    /// The sObject's API name, like `Contact`, `Account` or `Customer__c`.
    #[schemars(length(min = 1))]
    pub object: String,
    /// The External ID field records are upserted on, like `Email__c`; the sync's match field
    /// holds its value.
    #[schemars(length(min = 1))]
    pub external_id_field: String,
    /// Where tokens are obtained (default `https://login.salesforce.com`;
    /// `https://test.salesforce.com` for sandboxes, or the org's My Domain URL).
    #[serde(default = "default_salesforce_login_url")]
    pub login_url: String,
    /// REST API version (default `v61.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// The OAuth 2.0 flow: `clientCredentials` (default) or `jwtBearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SalesforceAuth>,
    /// Instance URL override for data calls (default: the `instance_url` the token endpoint
    /// answers); tests point it at a double.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// When Bulk API 2.0 ingest jobs are used instead of sObject Collections: `auto` (default)
    /// for runs that send at least `bulkThreshold` records, `always`, or `never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<SalesforceBulk>,
    /// With `bulk: auto`, the number of records a run sends (upserts and deletes together) at
    /// or above which it uses Bulk API 2.0 (default 10000; 0 means the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_threshold: Option<u64>,
}

/// When a Salesforce destination uses Bulk API 2.0 ingest jobs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SalesforceBulk {
    /// Runs that send at least `bulkThreshold` records use Bulk API 2.0; smaller runs use
    /// sObject Collections.
    #[default]
    Auto,
    /// Every run uses Bulk API 2.0, whatever its size.
    Always,
    /// No run uses Bulk API 2.0.
    Never,
}

fn default_salesforce_login_url() -> String {
    "https://login.salesforce.com".to_owned()
}

/// The OAuth 2.0 flow a Salesforce destination obtains its token with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SalesforceAuth {
    /// Client credentials: the Secret's `clientId` and `clientSecret`.
    #[default]
    ClientCredentials,
    /// JWT bearer: an RS256 assertion signed with the Secret's `privateKey` (PEM) for the
    /// Secret's `username`, issued by `clientId`.
    JwtBearer,
}

/// Mailchimp Marketing API 3.0: members of one audience (list), matched on their email
/// address. The API key (like `0123…-us21`, its suffix naming the data centre) comes from the
/// credentials Secret (key `apiKey` unless `credentialsSecretRef.key` says otherwise).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MailchimpSpec {
    /// The audience's id (Audience → Settings → "Audience name and defaults" → Audience ID).
    #[schemars(length(min = 1))]
    pub list_id: String,
    /// The status a new member gets (default `subscribed`); existing members keep theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MailchimpStatus>,
    /// API base URL including `/3.0` (default `https://<dc>.api.mailchimp.com/3.0`, the data
    /// centre taken from the API key's suffix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// Customer.io: people of one workspace, created or updated with the Track API's identify call
/// and deleted in mirror mode. The credentials Secret holds the workspace's Site ID (key
/// `siteId`) and Track API key (key `apiKey`, or the key `credentialsSecretRef.key` names).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomerioSpec {
    /// The workspace's data center: `us` (default, `https://track.customer.io`) or `eu`
    /// (`https://track-eu.customer.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<CustomerioRegion>,
    /// Track API base URL, overriding the region's (for proxies and tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// The Intercom contact attribute a record is found by.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IntercomIdentifier {
    /// The contact's `external_id` (your own user id).
    #[default]
    ExternalId,
    /// The contact's `email`.
    Email,
}

impl IntercomIdentifier {
    /// The attribute name in Intercom's API.
    pub fn as_str(self) -> &'static str {
        match self {
            IntercomIdentifier::ExternalId => "external_id",
            IntercomIdentifier::Email => "email",
        }
    }
}

/// The role of an Intercom contact.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IntercomRole {
    /// A user (signed-up customer).
    #[default]
    User,
    /// A lead (a prospect).
    Lead,
}

impl IntercomRole {
    /// The role name in Intercom's API.
    pub fn as_str(self) -> &'static str {
        match self {
            IntercomRole::User => "user",
            IntercomRole::Lead => "lead",
        }
    }
}

/// A Customer.io data center.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CustomerioRegion {
    /// The US data center.
    #[default]
    Us,
    /// The EU data center.
    Eu,
}

impl CustomerioRegion {
    /// The name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerioRegion::Us => "us",
            CustomerioRegion::Eu => "eu",
        }
    }
}

/// The status Mailchimp gives a member added by a sync.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MailchimpStatus {
    /// Subscribed to marketing email (the audience must have consent to do so).
    Subscribed,
    /// Sent a double opt-in confirmation email first.
    Pending,
    /// Transactional only: known to the audience, not subscribed to marketing email.
    Transactional,
}

impl MailchimpStatus {
    /// The value Mailchimp's API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            MailchimpStatus::Subscribed => "subscribed",
            MailchimpStatus::Pending => "pending",
            MailchimpStatus::Transactional => "transactional",
        }
    }
}

/// The Zendesk Support object a row becomes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ZendeskObject {
    /// End users (and agents), matched on `external_id` or `email`.
    #[default]
    Users,
    /// Organizations, matched on `external_id` or `name`.
    Organizations,
}

impl ZendeskObject {
    /// The name as written in manifests and in Zendesk's API paths.
    pub fn as_str(self) -> &'static str {
        match self {
            ZendeskObject::Users => "users",
            ZendeskObject::Organizations => "organizations",
        }
    }
}

/// What the operator observed of a destination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStatus {
    /// `Ready` after a successful connection check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the connection was last checked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<String>,
}

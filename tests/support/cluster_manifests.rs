//! What the real-cluster tests apply and how they wait: the Secret, Destination and
//! ReverseSync manifests a user writes ([`Manifests`]), and one polling helper
//! ([`wait_until`]) for every "until this holds, or fail with what was last seen".

use std::future::Future;
use std::time::{Duration, Instant};

use super::db::TestDb;

/// The query every test sync reads (the `customers` table of the test warehouses).
pub const CUSTOMERS_QUERY: &str = "SELECT id, email, plan FROM customers";

/// A PostgreSQL database (named after `prefix`) with `rows` customers and an empty `crm`
/// table to sync them into: what [`Manifests`] point at.
pub async fn customers_warehouse(prefix: &str, rows: u32) -> TestDb {
    let db = TestDb::postgres(prefix).await;
    db.exec(&format!(
        "CREATE TABLE customers (id INT PRIMARY KEY, email TEXT, plan TEXT);
         INSERT INTO customers SELECT g, 'user' || g || '@example.com', 'free' FROM generate_series(1, {rows}) g;
         CREATE TABLE crm (id INT PRIMARY KEY, email TEXT, plan TEXT);"
    ))
    .await;
    db
}

/// One number from the database (`SELECT count(*) …`).
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
}

/// A YAML stream of the objects a user applies for syncs from a PostgreSQL warehouse into a
/// PostgreSQL table `crm`: the `warehouse` Secret (granted to every Destination and
/// ReverseSync of its namespace), the `crm` Destination, and ReverseSyncs.
///
/// ```ignore
/// let yaml = Manifests::new(&ns).secret(&db.url).destination("").sync("customers", "").yaml();
/// ```
#[derive(Debug, Clone)]
pub struct Manifests {
    namespace: String,
    documents: Vec<String>,
}

impl Manifests {
    /// An empty stream for `namespace`.
    pub fn new(namespace: &str) -> Manifests {
        Manifests {
            namespace: namespace.to_owned(),
            documents: Vec::new(),
        }
    }

    /// All three: the Secret with `url`, the Destination `crm` and the ReverseSync `sync`
    /// (`extra` appended to its spec, indented two spaces).
    pub fn all(namespace: &str, url: &str, sync: &str, extra: &str) -> Manifests {
        Manifests::new(namespace)
            .secret(url)
            .destination("")
            .sync(sync, extra)
    }

    /// The Secret `warehouse` holding connection URL `url`, granted to every Destination and
    /// ReverseSync of the namespace.
    pub fn secret(mut self, url: &str) -> Manifests {
        self.documents.push(format!(
            r#"apiVersion: v1
kind: Secret
metadata:
  name: warehouse
  namespace: {namespace}
  annotations: {{backflow.dev/allowed-references: "Destination/*, ReverseSync/*"}}
stringData: {{url: "{url}"}}
"#,
            namespace = self.namespace
        ));
        self
    }

    /// The Destination `crm`: table `crm` through the `warehouse` Secret; `extra` is appended
    /// to its spec (indented two spaces), e.g. `"  batchSize: 100\n"`.
    pub fn destination(mut self, extra: &str) -> Manifests {
        self.documents.push(format!(
            r#"apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {{name: crm, namespace: {namespace}}}
spec:
  type: postgres
  credentialsSecretRef: {{name: warehouse}}
  postgres: {{table: crm}}
{extra}"#,
            namespace = self.namespace
        ));
        self
    }

    /// A ReverseSync `name` of `customers` (id, email, plan) into `crm`, matched on `id`;
    /// `extra` is appended to its spec (indented two spaces), e.g. `"  suspend: true\n"`.
    pub fn sync(mut self, name: &str, extra: &str) -> Manifests {
        self.documents.push(format!(
            r#"apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  source:
    connectionSecretRef: {{name: warehouse}}
    query: {CUSTOMERS_QUERY}
    primaryKey: [id]
  destinationRef: {{name: crm}}
  mappings:
    - {{from: id, to: id}}
    - {{from: email, to: email}}
    - {{from: plan, to: plan}}
  match: [id]
{extra}"#,
            namespace = self.namespace
        ));
        self
    }

    /// The stream, documents separated by `---`.
    pub fn yaml(&self) -> String {
        self.documents.join("---\n")
    }
}

/// Polls `probe` every 250 ms until it returns `Ok`, and returns that value; after `within`
/// panics naming `what` with the last `Err` (what was seen: a status, a count, a log tail).
pub async fn wait_until<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        let seen = match probe().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}; last seen:\n{seen}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `before` lines of `text` up to and including the first line holding `needle` (the
/// last `before` lines when none does): what led to a message a test forbids.
pub fn around(text: &str, needle: &str, before: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let end = all
        .iter()
        .position(|l| l.contains(needle))
        .map_or(all.len(), |i| i + 1);
    all[end.saturating_sub(before)..end].join("\n")
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

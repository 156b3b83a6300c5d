//! The egress policy against real listeners: a denied address is refused before any
//! connection, whether the URL names it as an IP literal or through a name that resolves into
//! a denied range, for HTTP destinations, vendor connectors, database sources and
//! destinations, and Redis.
//!
//! Every test of this binary shares one process-wide policy ([`policy`]): link-local, and
//! the loopback addresses 127.0.0.1, 127.0.0.2 and ::1, so `localhost` resolves only into
//! denied addresses. 127.0.0.3 stays allowed, for the control that shows a listener does
//! count the connections it gets.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::{self, DestinationError, SendError};
use backflow::egress::{self, EgressError, Policy};
use backflow::engine::run::RunError;
use backflow::model::secret::SecretData;
use backflow::source::{SourceError, SourceOptions, extract};
use serde_json::json;
use tokio::net::TcpListener;

/// Installs this binary's policy (every test asks; the result is the same).
fn policy() {
    egress::install(Policy::parse(&["link-local", "127.0.0.1/32", "127.0.0.2", "::1/128"]).unwrap());
}

/// A TCP listener that counts the connections it accepts and answers none of them.
struct Listener {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Listener {
    async fn on(address: &str) -> Listener {
        let listener = TcpListener::bind((address, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Listener { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn http_destination(url: &str, check_url: Option<&str>) -> DestinationSpec {
    let mut http = json!({"url": url, "timeout": "2s"});
    if let Some(check) = check_url {
        http["checkUrl"] = json!(check);
    }
    serde_json::from_value(json!({"type": "http", "http": http, "retry": {"maxAttempts": 1}})).unwrap()
}

fn secret(url: &str) -> SecretData {
    SecretData::new(BTreeMap::from([("url".to_owned(), url.to_owned())]))
}

#[tokio::test]
async fn an_http_destination_or_check_url_aimed_at_the_metadata_service_is_refused_when_built() {
    policy();
    for spec in [
        http_destination("http://169.254.169.254/latest/meta-data/", None),
        http_destination("http://127.0.0.3:1/hook", Some("http://169.254.169.254/health")),
        http_destination("http://[::ffff:169.254.169.254]/hook", None),
    ] {
        let err = destination::build(&spec, None).await.err().expect("refused");
        let text = err.to_string();
        assert!(matches!(err, DestinationError::Invalid(_)), "{text}");
        assert!(
            text.contains("169.254.169.254") && text.contains("169.254.0.0/16"),
            "{text}"
        );
    }
    let hubspot: DestinationSpec = serde_json::from_value(json!({
        "type": "hubspot",
        "credentialsSecretRef": {"name": "hubspot", "key": "token"},
        "hubspot": {"object": "contacts", "idProperty": "email", "baseUrl": "http://169.254.169.254"}
    }))
    .unwrap();
    let token = SecretData::new(BTreeMap::from([("token".to_owned(), "pat-1".to_owned())]));
    let err = destination::build(&hubspot, Some(&token))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("spec.hubspot.baseUrl"), "{err}");
}

#[tokio::test]
async fn a_denied_address_or_a_name_resolving_into_one_gets_no_connection_and_an_allowed_one_does() {
    policy();
    let denied = Listener::on("127.0.0.2").await;
    let by_name = Listener::on("127.0.0.1").await;
    let allowed = Listener::on("127.0.0.3").await;

    let literal = http_destination(&format!("http://127.0.0.2:{}/hook", denied.port), None);
    let err = destination::build(&literal, None).await.err().expect("refused");
    assert!(
        err.to_string()
            .contains("its address 127.0.0.2 is in 127.0.0.2/32"),
        "{err}"
    );

    // A name is checked after resolution: localhost resolves only into denied addresses.
    let url = format!("http://localhost:{}/hook", by_name.port);
    let named = destination::build(&http_destination(&url, Some(&url)), None)
        .await
        .unwrap();
    match named.check().await {
        Err(SendError::Fatal(reason)) => assert!(
            reason.contains("failed to connect to localhost")
                && (reason.contains("127.0.0.1/32") || reason.contains("::1/128")),
            "{reason}"
        ),
        other => panic!("expected a fatal refusal, got {other:?}"),
    }

    let control = format!("http://127.0.0.3:{}/hook", allowed.port);
    let reachable = destination::build(&http_destination(&control, Some(&control)), None)
        .await
        .unwrap();
    assert!(reachable.check().await.is_err(), "the listener answers nothing");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(allowed.accepted() >= 1, "the control listener counts connections");
    assert_eq!(denied.accepted(), 0, "127.0.0.2 was connected to");
    assert_eq!(by_name.accepted(), 0, "localhost was connected to");
}

#[tokio::test]
async fn a_run_to_a_name_in_a_denied_range_fails_for_good_and_sends_nothing() {
    policy();
    let hook = Listener::on("127.0.0.1").await;
    let warehouse = support::sqlite::TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT);
         INSERT INTO customers VALUES (1, 'a@example.com');",
    )
    .await;
    let spec: ReverseSyncSpec = serde_json::from_value(json!({
        "source": {"connectionSecretRef": {"name": "w"}, "query": "SELECT id, email FROM customers", "primaryKey": ["id"]},
        "destinationRef": {"name": "hook"},
        "mappings": [{"from": "id", "to": "id"}, {"from": "email", "to": "email"}]
    }))
    .unwrap();
    let dest = http_destination(&format!("http://localhost:{}/hook", hook.port), None);
    let state = tempfile::tempdir().unwrap();
    let report =
        support::engine::run_sync_once(&warehouse.url, &spec, &dest, &secret("unused"), state.path()).await;
    let error = report.error.expect("the run fails");
    assert!(error.is_permanent(), "a refusal stalls the sync: {error}");
    assert!(matches!(error, RunError::Delivery(_)), "{error:?}");
    assert!(error.to_string().contains("egress policy denies"), "{error}");
    assert_eq!(hook.accepted(), 0);
}

#[tokio::test]
async fn database_sources_and_destinations_and_redis_in_a_denied_range_are_refused_before_connecting() {
    policy();
    let postgres = Listener::on("127.0.0.2").await;
    let options = SourceOptions::default();
    for url in [
        format!("postgres://postgres@127.0.0.2:{}/db", postgres.port),
        format!("mysql://root@127.0.0.2:{}/db", postgres.port),
        format!("postgres://postgres@localhost:{}/db", postgres.port),
    ] {
        let err = extract(&url, "SELECT 1", &options).await.unwrap_err();
        assert!(
            matches!(&err, SourceError::Egress(EgressError::Denied { .. })),
            "{url}: {err:?}"
        );
        assert_eq!(err.category(), "EgressDenied");
        assert!(err.is_permanent());
    }
    for (kind, url) in [
        (
            "postgres",
            format!("postgres://postgres@127.0.0.2:{}/db", postgres.port),
        ),
        ("mysql", format!("mysql://root@127.0.0.2:{}/db", postgres.port)),
        ("redis", format!("redis://127.0.0.2:{}/0", postgres.port)),
    ] {
        let block = if kind == "redis" {
            json!({"key": "customer:{{id}}"})
        } else {
            json!({"table": "customers"})
        };
        let spec: DestinationSpec = serde_json::from_value(json!({
            "type": kind,
            "credentialsSecretRef": {"name": "db"},
            kind: block
        }))
        .unwrap();
        let connector = destination::build(&spec, Some(&secret(&url))).await.unwrap();
        match connector.check().await {
            Err(SendError::Fatal(reason)) => {
                assert!(reason.contains("egress policy denies"), "{kind}: {reason}");
            }
            other => panic!("{kind}: expected a fatal refusal, got {other:?}"),
        }
    }
    assert_eq!(postgres.accepted(), 0);
}

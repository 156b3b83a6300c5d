//! Throwaway databases on the real ClickHouse server of the machine (Debian's 18.16, started
//! by `.ci/run` on 127.0.0.1:8123), created and dropped over its HTTP interface.
//!
//! Override the server with `BACKFLOW_TEST_CLICKHOUSE_URL` (default
//! `http://127.0.0.1:8123`, user `default` without a password). `.ci/run` also installs the
//! logins of `.ci/clickhouse-users.xml`: `backflow_reader` (profile `readonly = 2`) and
//! `backflow_locked` (profile `readonly = 1`).

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Password of the `backflow_reader` login.
pub const READER_PASSWORD: &str = "Sup3r-S3cret";
/// Password of the `backflow_locked` login (profile `readonly = 1`).
pub const LOCKED_PASSWORD: &str = "L0cked-S3cret";

/// The HTTP address of the test server.
pub fn http_url() -> String {
    std::env::var("BACKFLOW_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".to_owned())
}

/// Runs one statement as the `default` user and returns the body; panics on an error.
pub async fn exec(sql: &str) -> String {
    let response = reqwest::Client::new()
        .post(http_url())
        .body(sql.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("ClickHouse test server not reachable ({e}); .ci/run starts it"));
    let status = response.status();
    let text = response.text().await.expect("read ClickHouse answer");
    assert!(status.is_success(), "{sql}: {text}");
    text
}

/// A uniquely named ClickHouse database, dropped when the fixture is dropped.
pub struct TestClickHouse {
    /// Database name.
    pub name: String,
}

impl TestClickHouse {
    /// Creates a fresh database.
    pub async fn new(prefix: &str) -> TestClickHouse {
        let name = format!(
            "bf_{prefix}_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple().to_string().get(..8).unwrap_or("x")
        );
        exec(&format!("CREATE DATABASE {name}")).await;
        TestClickHouse { name }
    }

    /// The `clickhouse://` URL of this database for `user:password` (`default` has none).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let host = http_url().trim_start_matches("http://").to_owned();
        if password.is_empty() {
            format!("clickhouse://{user}@{host}/{}", self.name)
        } else {
            format!("clickhouse://{user}:{password}@{host}/{}", self.name)
        }
    }

    /// The URL of this database for the `backflow_reader` login.
    pub fn url(&self) -> String {
        self.url_as("backflow_reader", READER_PASSWORD)
    }

    /// Runs statements separated by `;` at line ends in this database.
    pub async fn exec(&self, sql: &str) {
        for statement in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            let statement = statement.trim_end_matches(';');
            let response = reqwest::Client::new()
                .post(format!("{}/?database={}", http_url(), self.name))
                .body(statement.to_owned())
                .send()
                .await
                .expect("ClickHouse test server not reachable");
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            assert!(status.is_success(), "{statement}: {text}");
        }
    }
}

impl Drop for TestClickHouse {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {}", self.name);
        // Drop runs outside any async context guarantee: use a private runtime on a thread.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async {
                    let _ = reqwest::Client::new().post(http_url()).body(sql).send().await;
                });
            }
        })
        .join();
    }
}

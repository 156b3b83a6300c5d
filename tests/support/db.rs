//! Throwaway databases on the real PostgreSQL and MariaDB servers of the machine.
//!
//! Each fixture creates a uniquely named database and drops it on `drop`, so tests run in
//! parallel and leave nothing behind. Override the servers with `BACKFLOW_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`) and `BACKFLOW_TEST_MYSQL_URL`
//! (default `mysql://root@127.0.0.1:3306/mysql`).

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The admin URL of the PostgreSQL test server.
pub fn postgres_admin_url() -> String {
    std::env::var("BACKFLOW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The admin URL of the MySQL/MariaDB test server.
pub fn mysql_admin_url() -> String {
    std::env::var("BACKFLOW_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".to_owned())
}

fn unique_name(prefix: &str) -> String {
    format!(
        "bf_{prefix}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::new_v4().simple().to_string().get(..8).unwrap_or("x")
    )
}

fn replace_database(admin_url: &str, db: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let prefix = base.rsplit_once('/').map(|(p, _)| p).unwrap_or(base);
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

/// Which server a [`TestDb`] lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

/// A uniquely named database, dropped when the fixture is dropped.
pub struct TestDb {
    /// Which server.
    pub server: Server,
    /// Database name.
    pub name: String,
    /// URL of the new database.
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// Creates a fresh PostgreSQL database.
    pub async fn postgres(prefix: &str) -> TestDb {
        Self::create(Server::Postgres, prefix).await
    }

    /// Creates a fresh MySQL/MariaDB database.
    pub async fn mysql(prefix: &str) -> TestDb {
        Self::create(Server::Mysql, prefix).await
    }

    async fn create(server: Server, prefix: &str) -> TestDb {
        let admin_url = match server {
            Server::Postgres => postgres_admin_url(),
            Server::Mysql => mysql_admin_url(),
        };
        let name = unique_name(prefix);
        let create = match server {
            Server::Postgres => format!("CREATE DATABASE \"{name}\""),
            Server::Mysql => format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"),
        };
        exec_admin(server, &admin_url, &create).await;
        let url = replace_database(&admin_url, &name);
        TestDb {
            server,
            name,
            url,
            admin_url,
        }
    }

    /// Runs statements (separated by `;` at line ends) in the database.
    pub async fn exec(&self, sql: &str) {
        match self.server {
            Server::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect to test postgres");
                sqlx::raw_sql(sql).execute(&mut c).await.expect("run test SQL");
            }
            Server::Mysql => {
                let mut c = sqlx::MySqlConnection::connect(&self.url)
                    .await
                    .expect("connect to test mysql");
                sqlx::raw_sql(sql).execute(&mut c).await.expect("run test SQL");
            }
        }
    }
}

async fn exec_admin(server: Server, admin_url: &str, sql: &str) {
    match server {
        Server::Postgres => {
            let mut c = sqlx::PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
                panic!("PostgreSQL test server not reachable ({e}); set BACKFLOW_TEST_POSTGRES_URL")
            });
            sqlx::raw_sql(sql)
                .execute(&mut c)
                .await
                .expect("admin SQL on postgres");
        }
        Server::Mysql => {
            let mut c = sqlx::MySqlConnection::connect(admin_url)
                .await
                .unwrap_or_else(|e| {
                    panic!("MySQL test server not reachable ({e}); set BACKFLOW_TEST_MYSQL_URL")
                });
            sqlx::raw_sql(sql)
                .execute(&mut c)
                .await
                .expect("admin SQL on mysql");
        }
    }
}

/// Rows of `sync_id` in the Warehouse store's `table` of `schema` on PostgreSQL (`None`: the
/// table does not exist). For `backflow_state`, the state's rows: those of the table and those
/// packed in `backflow_state_blocks`; for `backflow_journal`, the changes not folded yet: its
/// rows and those packed in `backflow_checkpoints`.
pub async fn pg_sync_rows(url: &str, schema: &str, table: &str, sync_id: &str) -> Option<i64> {
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let exists =
        |table: String| sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL").bind(table);
    if !exists(format!("{schema}.{table}"))
        .fetch_one(&mut c)
        .await
        .unwrap()
    {
        return None;
    }
    let packed = match table {
        "backflow_state" => Some(("backflow_state_blocks", "row_count")),
        "backflow_journal" => Some(("backflow_checkpoints", "changes")),
        _ => None,
    };
    let packed = match packed {
        Some((packed, count)) => exists(format!("{schema}.{packed}"))
            .fetch_one(&mut c)
            .await
            .unwrap()
            .then_some((packed, count)),
        None => None,
    };
    let sql = if let Some((packed, count)) = packed {
        format!(
            "SELECT (SELECT count(*) FROM {schema}.{table} WHERE sync_id = $1) \
             + (SELECT COALESCE(sum({count}), 0) FROM {schema}.{packed} WHERE sync_id = $1)"
        )
    } else {
        format!("SELECT count(*) FROM {schema}.{table} WHERE sync_id = $1")
    };
    Some(
        sqlx::query_scalar(&sql)
            .bind(sync_id)
            .fetch_one(&mut c)
            .await
            .unwrap(),
    )
}

/// Runs a statement as the PostgreSQL admin (server-wide objects such as roles).
pub async fn exec_admin_postgres(sql: &str) {
    exec_admin(Server::Postgres, &postgres_admin_url(), sql).await;
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let drop_sql = match self.server {
            Server::Postgres => format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
            Server::Mysql => format!("DROP DATABASE IF EXISTS `{}`", self.name),
        };
        let server = self.server;
        let admin_url = self.admin_url.clone();
        // Drop runs outside any async context guarantee: use a private runtime on a thread.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(exec_admin(server, &admin_url, &drop_sql));
            }
        })
        .join();
    }
}

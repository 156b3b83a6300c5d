//! SQLite warehouses in temporary directories.

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

/// A SQLite database file in its own temporary directory (removed on drop).
pub struct TempSqlite {
    /// The directory.
    pub dir: tempfile::TempDir,
    /// `sqlite://…` URL of the database.
    pub url: String,
    path: std::path::PathBuf,
}

impl TempSqlite {
    /// Creates the database and runs `setup` in it.
    pub async fn new(setup: &str) -> TempSqlite {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warehouse.db");
        let db = TempSqlite {
            url: format!("sqlite://{}", path.display()),
            dir,
            path,
        };
        db.exec(setup).await;
        db
    }

    /// Runs statements in the database.
    pub async fn exec(&self, sql: &str) {
        let mut c = SqliteConnection::connect_with(
            &SqliteConnectOptions::new()
                .filename(&self.path)
                .create_if_missing(true),
        )
        .await
        .unwrap();
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
    }

    /// The first column of the first row of `sql`, as an integer.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let mut c = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&self.path))
            .await
            .unwrap();
        let n = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
        c.close().await.unwrap();
        n
    }
}

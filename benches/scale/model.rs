//! The model: a `customers` table in a PostgreSQL database of its own, created per size and
//! dropped afterwards (the Warehouse store's tables live in it too, schema `backflow`).

use sqlx::Connection;

/// The model query every phase runs (and COPY copies).
pub const QUERY: &str =
    "SELECT id, email, first_name, last_name, plan, mrr, signed_up_at, is_active, score FROM customers";

/// A database created for one size of model.
pub struct Model {
    admin_url: String,
    name: String,
    pub url: String,
}

impl Model {
    /// Creates the database and fills `customers` with `rows` rows.
    pub async fn create(admin_url: &str, rows: u64) -> Model {
        let name = format!("bf_bench_{}_{rows}", std::process::id());
        execute(admin_url, &format!("CREATE DATABASE {name}")).await;
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(p, _)| p);
        let model = Model {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        };
        execute(
            &model.url,
            &format!(
                "CREATE TABLE customers (id bigint PRIMARY KEY, email text, first_name text, last_name text, plan text,
                   mrr numeric(12,2), signed_up_at timestamptz, is_active boolean, score float8);
                 INSERT INTO customers SELECT i, 'User' || i || '@Example.com', 'First' || (i % 1000), 'Last' || (i % 777),
                   (ARRAY['free','starter','growth','enterprise'])[1 + i % 4], (i % 5000) / 100.0,
                   timestamptz '2021-01-01' + i * interval '1 minute', i % 10 <> 0, i * 0.37
                 FROM generate_series(1, {rows}) AS i;"
            ),
        )
        .await;
        model.vacuum().await;
        model
    }

    /// Changes 1% of the rows (a mapped column), then vacuums so COPY and the runs read the
    /// same clean heap.
    pub async fn change_one_percent(&self) {
        self.change_percent(1).await;
    }

    /// Changes `percent`% of the rows (a mapped column, rows spread over the table), then
    /// vacuums so COPY and the runs read the same clean heap.
    pub async fn change_percent(&self, percent: u8) {
        let percent = percent.clamp(1, 100);
        execute(
            &self.url,
            &format!("UPDATE customers SET plan = 'changed' WHERE id % 100 < {percent}"),
        )
        .await;
        self.vacuum().await;
    }

    /// Runs statements in the model's database, then vacuums.
    pub async fn exec(&self, sql: &str) {
        execute(&self.url, sql).await;
        self.vacuum().await;
    }

    async fn vacuum(&self) {
        // VACUUM refuses any transaction, even the implicit one of a simple-protocol string.
        let mut c = sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect to PostgreSQL");
        sqlx::query("VACUUM ANALYZE customers")
            .execute(&mut c)
            .await
            .expect("vacuum");
    }

    /// A phase of `kind` on this model's query, with its state in `state_dir` (and the API
    /// server double at `api_server` for the ConfigMap store, or empty).
    pub fn phase(
        &self,
        kind: crate::phase::Kind,
        state_dir: &std::path::Path,
        api_server: &str,
    ) -> crate::phase::Phase {
        crate::phase::Phase {
            kind,
            database_url: self.url.clone(),
            query: QUERY.to_owned(),
            state_dir: state_dir.to_string_lossy().into_owned(),
            api_server: api_server.to_owned(),
        }
    }

    pub async fn drop_database(self) {
        execute(
            &self.admin_url,
            &format!("DROP DATABASE {} WITH (FORCE)", self.name),
        )
        .await;
    }
}

async fn execute(url: &str, sql: &str) {
    let mut c = sqlx::PgConnection::connect(url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::raw_sql(sql).execute(&mut c).await.expect("bench SQL");
}

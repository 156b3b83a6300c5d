//! One sync run through a real connector and the shared delivery machinery, as the vendor
//! tests drive it: the Destination's own batch size and concurrency, but a fast limiter and
//! short retry waits so throttling tests finish quickly.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::destination::{self, Connector};
use backflow::engine::run::{RunOptions, RunReport, SyncRun, run};
use backflow::model::secret::SecretData;
use backflow::state::file::FileStore;

/// Runs `spec` once from `source_url` into the destination, keeping state under `state`.
pub async fn run_sync_once(
    source_url: &str,
    spec: &ReverseSyncSpec,
    dest: &DestinationSpec,
    secret: &SecretData,
    state: &Path,
) -> RunReport {
    let connector = destination::build(dest, Some(secret)).await.unwrap();
    run_with_connector(source_url, spec, dest, connector, state).await
}

/// Like [`run_sync_once`], with a connector the test built itself (to shorten a vendor's job
/// polling, say).
pub async fn run_with_connector(
    source_url: &str,
    spec: &ReverseSyncSpec,
    dest: &DestinationSpec,
    connector: Arc<dyn Connector>,
    state: &Path,
) -> RunReport {
    let mut config = DeliveryConfig::resolve(dest, &connector.capabilities()).unwrap();
    config.initial_backoff = Duration::from_millis(10);
    config.max_backoff = Duration::from_millis(100);
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec,
        source_url,
        source_credentials: Default::default(),
        delivery: Delivery::new(connector, Arc::new(RateLimiter::new(1000.0, 1000)), config),
        scope: "default/destination".into(),
    };
    run(
        job,
        &mut FileStore::new(state, "default", "customers"),
        &RunOptions::default(),
    )
    .await
}

//! Finding and deleting a sync's state ConfigMaps: listing them by label, deleting stale
//! generations after a switch, and deleting them all when the sync goes.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams};
use kube::core::PartialObjectMeta;

use super::blob::Index;
use super::names::{GENERATION_LABEL, SEQ_LABEL, SYNC_NAME_ANNOTATION, index_name};
use super::{ConfigMapStore, api_error, describe, status_code};
use crate::model::labels::{MANAGED_BY, MANAGED_BY_LABEL, STATE_LABEL, SYNC_LABEL, sync_label_value};
use crate::state::StateError;

/// Deletes every state ConfigMap of a sync (the finalizer's cleanup); returns how many.
pub async fn delete_all(client: kube::Client, namespace: &str, sync_name: &str) -> Result<usize, StateError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let location = format!("configmap {namespace}/{}", index_name(sync_name));
    let objects = list_objects(&api, sync_name, None)
        .await
        .map_err(|e| api_error(location.clone(), &e))?;
    let mut deleted = 0;
    for o in &objects {
        match api.delete(&o.name, &DeleteParams::default()).await {
            Ok(_) => deleted += 1,
            Err(e) if status_code(&e) == Some(404) => {}
            Err(e) => return Err(api_error(format!("configmap {namespace}/{}", o.name), &e)),
        }
    }
    tracing::info!(namespace, sync = sync_name, deleted, "sync state deleted");
    Ok(deleted)
}

/// Which state object a listed ConfigMap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Index,
    Shard,
    Journal,
}

/// A state ConfigMap as listed (metadata only).
#[derive(Debug, Clone)]
pub(super) struct Listed {
    pub(super) name: String,
    pub(super) kind: Option<Kind>,
    pub(super) generation: Option<u64>,
    pub(super) seq: Option<u64>,
}

/// Lists the state ConfigMaps of a sync (metadata only: their data is fetched one at a time),
/// optionally narrowed by more label requirements.
pub(super) async fn list_objects(
    api: &Api<ConfigMap>,
    sync_name: &str,
    extra: Option<&str>,
) -> Result<Vec<Listed>, kube::Error> {
    let mut selector = format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{SYNC_LABEL}={}",
        sync_label_value(sync_name)
    );
    if let Some(extra) = extra {
        selector.push(',');
        selector.push_str(extra);
    }
    let list = api
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|o: &PartialObjectMeta<ConfigMap>| {
            // A cut label may be shared by two long names; the annotation tells them apart.
            o.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SYNC_NAME_ANNOTATION))
                .is_some_and(|n| n == sync_name)
        })
        .map(|o| {
            let labels = o.metadata.labels.unwrap_or_default();
            let number = |key: &str| labels.get(key).and_then(|v| v.parse::<u64>().ok());
            Listed {
                name: o.metadata.name.unwrap_or_default(),
                kind: match labels.get(STATE_LABEL).map(String::as_str) {
                    Some("index") => Some(Kind::Index),
                    Some("shard") => Some(Kind::Shard),
                    Some("journal") => Some(Kind::Journal),
                    _ => None,
                },
                generation: number(GENERATION_LABEL),
                seq: number(SEQ_LABEL),
            }
        })
        .collect())
}

impl ConfigMapStore {
    /// Deletes shards and journals of generations before `below` that `keep` does not list.
    /// Nothing can switch the index back to an older generation, so they are unreachable;
    /// newer ones may be another writer's work in progress and are left alone. A failure
    /// only leaves leftovers for the next `finish`.
    pub(super) async fn delete_stale(&self, objects: &[Listed], below: u64, keep: &Index) {
        for o in objects {
            let stale = matches!(o.kind, Some(Kind::Shard | Kind::Journal))
                && o.generation.is_none_or(|g| g < below)
                && !keep.shards.iter().any(|s| s.name == o.name);
            if !stale {
                continue;
            }
            match self.api.delete(&o.name, &DeleteParams::default()).await {
                Ok(_) => tracing::debug!(configmap = %self.location(&o.name), "stale state deleted"),
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => tracing::warn!(
                    configmap = %self.location(&o.name),
                    error = %describe(&e),
                    "failed to delete stale state; the next run retries"
                ),
            }
        }
    }
}

//! The `ConfigMap` state store: a sync's fingerprints in ConfigMaps beside it, owned by the
//! ReverseSync so garbage collection deletes them with it. This file is the store; the objects'
//! names and labels are in [`names`], their bytes (index JSON, zstd shards and checkpoints) in
//! `blob`, listing and deleting them in [`gc`], and the diff against the stored state in `diff`.
//!
//! Objects of sync `S` (all labelled `app.kubernetes.io/managed-by: backflow`,
//! `backflow.dev/sync: S` and `backflow.dev/state: index|shard|journal`, annotated with the
//! full sync name):
//! - `S-state`, the index: `data["index.json"]` = format, scope, base generation, row count
//!   and the name, row count and xxh3 checksum of every base shard.
//! - `S-state-GEN-N`, base shards: `binaryData["entries.zst"]`, zstd over a header (scope,
//!   generation, shard number) and the entry records of the File store's state file. Each
//!   stays under ~640 KiB compressed, so well under the 1 MiB object limit once base64'd.
//! - `S-state-GEN-jSEQ`, checkpoints written by `commit`: `binaryData["changes.zst"]`, zstd
//!   over a header (scope, generation, seq) and the change records of the File store's
//!   journal, with the blob's checksum in an annotation.
//!
//! Crash safety: the index is the only thing a reader trusts, and it changes in one guarded
//! update. `load` reads the shards the index lists (a bad checksum is an error, not an empty
//! state) and replays the journals of the index's generation in seq order (a damaged one is
//! skipped, like the File store's torn tail: its rows are sent again). `finish` writes the
//! shards of a fresh generation, then switches the index to them with one `replace` guarded by
//! its resourceVersion, then deletes older generations. A crash before the switch leaves the
//! old index, old shards and journals (new shards are unreferenced orphans); a crash after it
//! leaves the new state plus unreferenced leftovers. Either way no reader mixes generations,
//! and the next `finish` deletes what is left of older generations.
//!
//! Concurrent writers: the first `commit` of a run claims the index (an update guarded by the
//! resourceVersion seen at load); each later commit checks that the resourceVersion is still
//! its own, journal names are created (never replaced) so two writers cannot share a seq, and
//! the final switch is guarded too. Whichever check fails reports [`StateError::Locked`].

mod blob;
mod diff;
pub mod gc;
pub mod names;

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};

use super::change_buckets::ChangeBuckets;
use super::codec::{Replay, encode_change, put_entry};
use super::{Fingerprints, StateChange, StateError, StateStore, StoreDiff};
use crate::model::labels::{MANAGED_BY, MANAGED_BY_LABEL, STATE_LABEL, SYNC_LABEL, sync_label_value};
use blob::{
    BLOB_LIMIT, Blob, CursorEntry, FORMAT, InMemory, Index, Packer, Reading, ShardError, ShardRef, checksum,
    decode_journal, decode_shard, journal_header, shard_header,
};
use gc::{Kind, Listed, delete_all, list_objects};
use names::{
    CHECKSUM_ANNOTATION, GENERATION_LABEL, INDEX_KEY, JOURNAL_KEY, SEQ_LABEL, SHARD_KEY,
    SYNC_NAME_ANNOTATION, WRITER_ANNOTATION, index_name, journal_name, shard_name,
};

/// What a run knows of the stored state since its last look at the index.
#[derive(Debug, Clone)]
struct View {
    /// The index's resourceVersion; `None` when there is no index yet.
    resource_version: Option<String>,
    index: Index,
    /// Journals of the index's generation, in seq order.
    journals: Vec<Listed>,
    next_seq: u64,
    /// This run's claim on the index stands (set by its first commit).
    claimed: bool,
}

/// Fingerprints of one sync in ConfigMaps of its namespace.
pub struct ConfigMapStore {
    api: Api<ConfigMap>,
    namespace: String,
    sync_name: String,
    index_name: String,
    label: String,
    owner: OwnerReference,
    /// Written into the index when this run claims it, to tell runs apart in `kubectl`.
    writer: String,
    view: Option<View>,
    diffing: Option<diff::Diffing>,
    /// The state this run diffed against, in buckets, with this run's checkpoints added:
    /// what `finish` packs into new shards without reading the old ones again.
    folding: Option<ChangeBuckets>,
}

impl std::fmt::Debug for ConfigMapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMapStore")
            .field("namespace", &self.namespace)
            .field("index", &self.index_name)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl ConfigMapStore {
    /// The store of sync `sync_name` in `namespace`; every object it writes carries `owner`
    /// (see [`owner_reference`](names::owner_reference)). Nothing is read until `load`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        sync_name: &str,
        owner: OwnerReference,
    ) -> ConfigMapStore {
        ConfigMapStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            sync_name: sync_name.to_owned(),
            index_name: index_name(sync_name),
            label: sync_label_value(sync_name),
            owner,
            writer: uuid::Uuid::new_v4().to_string(),
            view: None,
            diffing: None,
            folding: None,
        }
    }

    /// A store for the same sync that shares nothing of this run (no view, no diff): to read
    /// the state on a task of its own.
    fn detached(&self) -> ConfigMapStore {
        ConfigMapStore {
            api: self.api.clone(),
            namespace: self.namespace.clone(),
            sync_name: self.sync_name.clone(),
            index_name: self.index_name.clone(),
            label: self.label.clone(),
            owner: self.owner.clone(),
            writer: self.writer.clone(),
            view: None,
            diffing: None,
            folding: None,
        }
    }

    /// Name of the index ConfigMap.
    pub fn index_name(&self) -> &str {
        &self.index_name
    }

    fn location(&self, name: &str) -> String {
        format!("configmap {}/{}", self.namespace, name)
    }

    fn corrupt(&self, name: &str, reason: impl Into<String>) -> StateError {
        StateError::Corrupt {
            location: self.location(name),
            reason: reason.into(),
        }
    }

    fn io(&self, name: &str, reason: impl Into<String>) -> StateError {
        StateError::Io {
            location: self.location(name),
            reason: reason.into(),
        }
    }

    fn api_error(&self, name: &str, e: &kube::Error) -> StateError {
        api_error(self.location(name), e)
    }

    /// Metadata of a new object of this sync.
    fn meta(&self, name: &str, kind: &str, generation: Option<u64>, seq: Option<u64>) -> ObjectMeta {
        let mut labels = BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            (SYNC_LABEL.to_owned(), self.label.clone()),
            (STATE_LABEL.to_owned(), kind.to_owned()),
        ]);
        if let Some(g) = generation {
            labels.insert(GENERATION_LABEL.to_owned(), g.to_string());
        }
        if let Some(s) = seq {
            labels.insert(SEQ_LABEL.to_owned(), s.to_string());
        }
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                SYNC_NAME_ANNOTATION.to_owned(),
                self.sync_name.clone(),
            )])),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn post_params() -> PostParams {
        PostParams {
            dry_run: false,
            field_manager: Some("backflow".to_owned()),
        }
    }

    /// Reads the index; `None` when there is none.
    async fn read_index(&self) -> Result<Option<(Index, String)>, StateError> {
        let name = &self.index_name;
        let Some(cm) = self
            .api
            .get_opt(name)
            .await
            .map_err(|e| self.api_error(name, &e))?
        else {
            return Ok(None);
        };
        let managed = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY);
        if !managed {
            return Err(self.corrupt(
                name,
                format!(
                    "it exists but is not managed by Backflow (no label {MANAGED_BY_LABEL}={MANAGED_BY})"
                ),
            ));
        }
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(INDEX_KEY))
            .ok_or_else(|| self.corrupt(name, format!("no {INDEX_KEY} in its data")))?;
        // The decoder's message may quote the text; the position is enough.
        let index: Index = serde_json::from_str(text).map_err(|e| {
            self.corrupt(
                name,
                format!(
                    "{INDEX_KEY} does not decode (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        if index.format != FORMAT {
            return Err(self.corrupt(
                name,
                format!(
                    "written in format {}, this version reads format {FORMAT}",
                    index.format
                ),
            ));
        }
        let rv = cm.metadata.resource_version.unwrap_or_default();
        Ok(Some((index, rv)))
    }

    /// The index's current resourceVersion (`None`: no index).
    async fn current_resource_version(&self) -> Result<Option<String>, StateError> {
        let name = &self.index_name;
        let cm = self
            .api
            .get_opt(name)
            .await
            .map_err(|e| self.api_error(name, &e))?;
        Ok(cm.map(|c| c.metadata.resource_version.unwrap_or_default()))
    }

    /// Reads the index and lists the journals of its generation.
    async fn refresh(&mut self) -> Result<(), StateError> {
        let (index, resource_version) = match self.read_index().await? {
            Some((index, rv)) => (index, Some(rv)),
            None => (
                Index {
                    format: FORMAT,
                    ..Index::default()
                },
                None,
            ),
        };
        let selector = format!("{STATE_LABEL}=journal,{GENERATION_LABEL}={}", index.generation);
        let mut journals = list_objects(&self.api, &self.sync_name, Some(&selector))
            .await
            .map_err(|e| self.api_error(&self.index_name, &e))?;
        journals.retain(|j| {
            let ok = j.kind == Some(Kind::Journal) && j.seq.is_some();
            if !ok {
                tracing::warn!(configmap = %j.name, "checkpoint without a readable seq label ignored");
            }
            ok
        });
        journals.sort_by_key(|j| j.seq);
        let next_seq = journals.iter().filter_map(|j| j.seq).max().map_or(1, |s| s + 1);
        self.view = Some(View {
            resource_version,
            index,
            journals,
            next_seq,
            claimed: false,
        });
        Ok(())
    }

    fn view(&self) -> Result<&View, StateError> {
        // Every caller refreshes first when there is no view.
        self.view
            .as_ref()
            .ok_or_else(|| self.io(&self.index_name, "state not loaded"))
    }

    /// The error for an object the index or a listing named but that is gone: another
    /// writer's `finish` deleted it when the index moved on; damage when it did not.
    async fn vanished(&self, name: &str, view: &View, what: &str) -> StateError {
        match self.current_resource_version().await {
            Ok(rv) if rv != view.resource_version => StateError::Locked(self.location(&self.index_name)),
            Ok(_) => self.corrupt(name, format!("{what} is missing")),
            Err(e) => e,
        }
    }

    /// The state `view` describes, for `scope`, in memory: base shards (when of this scope)
    /// with the journals of this scope replayed on top.
    async fn read_state(&self, view: &View, scope: &str) -> Result<Fingerprints, StateError> {
        let index = &view.index;
        let rows = usize::try_from(index.rows).unwrap_or(0).min(1 << 28);
        let raw: u64 = index.shards.iter().map(|s| s.bytes).sum();
        let arena = usize::try_from(raw).unwrap_or(0).saturating_sub(rows * 16);
        let mut state = InMemory {
            set: Fingerprints::with_capacity(rows, arena),
            replay: Replay::default(),
        };
        self.read_into(view, scope, &mut state).await?;
        Ok(state.replay.finish(state.set))
    }

    /// The state `view` describes, for `scope`, into disk buckets by key hash: nothing of it
    /// is held in memory.
    async fn read_changes(&self, view: &View, scope: &str) -> Result<ChangeBuckets, StateError> {
        let mut changes = ChangeBuckets::new().map_err(|e| self.temp_file_error(&e))?;
        self.read_into(view, scope, &mut changes).await?;
        Ok(changes)
    }

    fn temp_file_error(&self, e: &std::io::Error) -> StateError {
        self.io(
            &self.index_name,
            format!("failed to use a local temporary file of state: {e}"),
        )
    }

    /// Feeds `into` the base shards (when of `scope`), then the journals of `scope` in seq
    /// order. Only one shard's bytes are held at a time.
    async fn read_into(&self, view: &View, scope: &str, into: &mut dyn Reading) -> Result<(), StateError> {
        if view.resource_version.is_some() {
            if view.index.scope == scope {
                self.read_shards(view, into).await?;
            } else {
                tracing::info!(
                    configmap = %self.location(&self.index_name),
                    "state belongs to another destination; every row will be sent"
                );
            }
        }
        into.shards_read();
        for j in &view.journals {
            self.replay_journal(view, j, scope, into).await?;
        }
        Ok(())
    }

    async fn read_shards(&self, view: &View, into: &mut dyn Reading) -> Result<(), StateError> {
        let index = &view.index;
        for (n, shard) in index.shards.iter().enumerate() {
            let name = &shard.name;
            let Some(cm) = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| self.api_error(name, &e))?
            else {
                return Err(self.vanished(name, view, "this shard listed by the index").await);
            };
            let blob = cm
                .binary_data
                .as_ref()
                .and_then(|b| b.get(SHARD_KEY))
                .ok_or_else(|| self.corrupt(name, format!("no {SHARD_KEY} in its binaryData")))?;
            if checksum(&blob.0) != shard.checksum {
                return Err(self.corrupt(name, "checksum mismatch"));
            }
            let decoded =
                decode_shard(&blob.0, &index.scope, index.generation, n, into).map_err(|e| match e {
                    ShardError::Undecodable(reason) => self.corrupt(name, reason),
                    ShardError::Reading(e) => self.temp_file_error(&e),
                })?;
            if decoded != shard.rows {
                return Err(self.corrupt(
                    name,
                    format!("{decoded} rows where the index says {}", shard.rows),
                ));
            }
        }
        Ok(())
    }

    /// Applies one checkpoint ConfigMap. One that is damaged, out of place or of another
    /// scope is skipped: its rows are sent again, as after the File store's torn tail.
    async fn replay_journal(
        &self,
        view: &View,
        j: &Listed,
        scope: &str,
        into: &mut dyn Reading,
    ) -> Result<(), StateError> {
        let name = &j.name;
        let Some(cm) = self
            .api
            .get_opt(name)
            .await
            .map_err(|e| self.api_error(name, &e))?
        else {
            return match self.vanished(name, view, "this checkpoint").await {
                StateError::Corrupt { .. } => {
                    tracing::warn!(configmap = %self.location(name), "checkpoint deleted while reading; ignored");
                    Ok(())
                }
                e => Err(e),
            };
        };
        let skip = |reason: &str| {
            tracing::warn!(configmap = %self.location(name), reason, "damaged checkpoint ignored; its rows will be sent again");
            Ok(())
        };
        let Some(blob) = cm.binary_data.as_ref().and_then(|b| b.get(JOURNAL_KEY)) else {
            return skip("no changes in its binaryData");
        };
        let stated = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHECKSUM_ANNOTATION));
        if stated != Some(&checksum(&blob.0)) {
            return skip("checksum mismatch");
        }
        let (header, payload) = match decode_journal(&blob.0) {
            Ok(decoded) => decoded,
            Err(reason) => return skip(&reason),
        };
        if header.generation != view.index.generation || Some(header.seq) != j.seq {
            return skip("its header does not match its generation and seq");
        }
        if header.scope != scope {
            tracing::debug!(configmap = %self.location(name), "checkpoint of another destination ignored");
            return Ok(());
        }
        match into.changes(&payload[header.len..]) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.corrupt(name, "undecodable checkpoint")),
            Err(e) => Err(self.temp_file_error(&e)),
        }
    }

    /// Claims the index for this run on its first commit, and checks the claim on later ones.
    async fn claim(&mut self, scope: &str) -> Result<(), StateError> {
        let view = self.view()?.clone();
        if view.claimed {
            if self.current_resource_version().await? != view.resource_version {
                return Err(StateError::Locked(self.location(&self.index_name)));
            }
            return Ok(());
        }
        let index = match view.resource_version {
            Some(_) => view.index.clone(),
            None => Index {
                format: FORMAT,
                scope: scope.to_owned(),
                ..Index::default()
            },
        };
        let rv = self.write_index(&index, view.resource_version.as_deref()).await?;
        tracing::debug!(configmap = %self.location(&self.index_name), writer = %self.writer, "state claimed");
        if let Some(v) = self.view.as_mut() {
            v.resource_version = Some(rv);
            v.index = index;
            v.claimed = true;
        }
        Ok(())
    }

    /// Creates the index (`resource_version` None) or replaces it when it is still at
    /// `resource_version`; returns the new resourceVersion. A conflict means another writer.
    async fn write_index(&self, index: &Index, resource_version: Option<&str>) -> Result<String, StateError> {
        let name = &self.index_name;
        let text = serde_json::to_string(index).map_err(|e| self.io(name, e.to_string()))?;
        let mut meta = self.meta(name, "index", None, None);
        meta.resource_version = resource_version.map(str::to_owned);
        if let Some(a) = meta.annotations.as_mut() {
            a.insert(WRITER_ANNOTATION.to_owned(), self.writer.clone());
        }
        let cm = ConfigMap {
            metadata: meta,
            data: Some(BTreeMap::from([(INDEX_KEY.to_owned(), text)])),
            ..ConfigMap::default()
        };
        let written = match resource_version {
            None => self.api.create(&Self::post_params(), &cm).await,
            Some(_) => self.api.replace(name, &Self::post_params(), &cm).await,
        };
        let written = written.map_err(|e| self.api_error(name, &e))?;
        Ok(written.metadata.resource_version.unwrap_or_default())
    }

    /// Creates one shard or journal ConfigMap. A name taken means another writer.
    async fn create_blob(&self, meta: ObjectMeta, key: &str, blob: &Blob) -> Result<(), StateError> {
        let name = meta.name.clone().unwrap_or_default();
        if blob.bytes.len() > BLOB_LIMIT {
            return Err(self.io(
                &name,
                format!(
                    "{} compressed bytes do not fit in one ConfigMap (a row's key or identity is too large)",
                    blob.bytes.len()
                ),
            ));
        }
        let mut meta = meta;
        if let Some(a) = meta.annotations.as_mut() {
            a.insert(CHECKSUM_ANNOTATION.to_owned(), checksum(&blob.bytes));
        }
        let cm = ConfigMap {
            metadata: meta,
            binary_data: Some(BTreeMap::from([(key.to_owned(), ByteString(blob.bytes.clone()))])),
            immutable: Some(true),
            ..ConfigMap::default()
        };
        self.api
            .create(&Self::post_params(), &cm)
            .await
            .map_err(|e| self.api_error(&name, &e))?;
        Ok(())
    }

    /// Writes the live entries of `changes` as the shards of `generation`, bucket by bucket
    /// (so in key-hash order); returns the shards and the row count.
    async fn write_shards(
        &self,
        scope: &str,
        generation: u64,
        changes: &ChangeBuckets,
    ) -> Result<(Vec<ShardRef>, u64), StateError> {
        let mut shards = Vec::new();
        let mut packer = Packer::default();
        let mut record = Vec::with_capacity(256);
        let mut rows = 0u64;
        let zstd_error = |e: std::io::Error| self.io(&self.index_name, format!("failed to compress: {e}"));
        for n in 0..=u8::MAX {
            let bucket = changes.bucket(n).map_err(|e| self.temp_file_error(&e))?;
            for entry in bucket.entries() {
                let (_, e) = entry.map_err(|e| self.temp_file_error(&e))?;
                record.clear();
                put_entry(&mut record, e);
                if packer.is_full_for(record.len()) {
                    let blob = packer.finish().map_err(zstd_error)?;
                    shards.push(self.write_shard(generation, shards.len(), blob).await?);
                }
                if !packer.is_open() {
                    packer
                        .open(&shard_header(scope, generation, shards.len()))
                        .map_err(zstd_error)?;
                }
                packer.push(&record).map_err(zstd_error)?;
                rows += 1;
            }
        }
        if packer.is_open() {
            let blob = packer.finish().map_err(zstd_error)?;
            shards.push(self.write_shard(generation, shards.len(), blob).await?);
        }
        Ok((shards, rows))
    }

    async fn write_shard(&self, generation: u64, n: usize, blob: Blob) -> Result<ShardRef, StateError> {
        let name = shard_name(&self.index_name, generation, n);
        self.create_blob(
            self.meta(&name, "shard", Some(generation), None),
            SHARD_KEY,
            &blob,
        )
        .await?;
        Ok(ShardRef {
            checksum: checksum(&blob.bytes),
            name,
            rows: blob.records as u64,
            bytes: blob.raw as u64,
        })
    }
}

#[async_trait]
impl StateStore for ConfigMapStore {
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        self.folding = None;
        self.refresh().await?;
        let view = self.view()?;
        let set = self.read_state(view, scope).await?;
        tracing::debug!(
            configmap = %self.location(&self.index_name),
            generation = view.index.generation,
            shards = view.index.shards.len(),
            checkpoints = view.journals.len(),
            rows = set.len(),
            "state loaded"
        );
        Ok(set)
    }

    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        if self.view.is_none() {
            self.refresh().await?;
        }
        self.claim(scope).await?;
        let view = self.view()?;
        let (generation, first_seq) = (view.index.generation, view.next_seq);
        // Usually one journal per checkpoint; a large one is split, and a crash between the
        // parts keeps the first: it is as if the checkpoint had been two.
        let mut blobs = Vec::new();
        let mut packer = Packer::default();
        let mut record = Vec::with_capacity(256);
        let zstd_error = |e: std::io::Error| self.io(&self.index_name, format!("failed to compress: {e}"));
        for c in changes {
            record.clear();
            encode_change(c, &mut record);
            if packer.is_full_for(record.len()) {
                blobs.push(packer.finish().map_err(zstd_error)?);
            }
            if !packer.is_open() {
                let seq = first_seq + blobs.len() as u64;
                packer
                    .open(&journal_header(scope, generation, seq))
                    .map_err(zstd_error)?;
            }
            packer.push(&record).map_err(zstd_error)?;
        }
        blobs.push(packer.finish().map_err(zstd_error)?);
        for blob in &blobs {
            let seq = self.view()?.next_seq;
            let name = journal_name(&self.index_name, generation, seq);
            let meta = self.meta(&name, "journal", Some(generation), Some(seq));
            self.create_blob(meta, JOURNAL_KEY, blob).await?;
            if let Some(v) = self.view.as_mut() {
                v.next_seq += 1;
                v.journals.push(Listed {
                    name,
                    kind: Some(Kind::Journal),
                    generation: Some(generation),
                    seq: Some(seq),
                });
            }
        }
        if let Some(folding) = self.folding.as_mut()
            && let Err(e) = changes.iter().try_for_each(|c| folding.push(c.as_change_ref()))
        {
            tracing::warn!(error = %e, "failed to keep a checkpoint in local buckets; finish reads the state again");
            self.folding = None;
        }
        tracing::debug!(
            configmap = %self.location(&self.index_name),
            changes = changes.len(),
            parts = blobs.len(),
            "checkpoint committed"
        );
        Ok(())
    }

    async fn finish(&mut self, scope: &str) -> Result<(), StateError> {
        let mut folding = self.folding.take();
        if self.view.is_none() {
            folding = None;
            self.refresh().await?;
        }
        let seen = self.view()?.resource_version.clone();
        let objects = list_objects(&self.api, &self.sync_name, None)
            .await
            .map_err(|e| self.api_error(&self.index_name, &e))?;
        let base = self.view()?.index.clone();
        let unfolded = objects
            .iter()
            .any(|o| o.kind == Some(Kind::Journal) && o.generation == Some(base.generation));
        if !unfolded {
            // This run's checkpoints are gone only if another writer folded them.
            let claimed = self.view()?.claimed;
            if claimed && self.current_resource_version().await? != seen {
                return Err(StateError::Locked(self.location(&self.index_name)));
            }
            self.delete_stale(&objects, base.generation, &base).await;
            self.view = None;
            return Ok(());
        }
        // Look again at what is stored now (every checkpoint, this run's included).
        self.refresh().await?;
        let view = self.view()?.clone();
        if view.resource_version != seen {
            return Err(StateError::Locked(self.location(&self.index_name)));
        }
        // What this run diffed against plus its checkpoints is what is stored now: the
        // resourceVersion shows no other writer claimed the index since.
        let changes = match folding {
            Some(changes) => changes,
            None => self.read_changes(&view, scope).await?,
        };
        // Past every generation stored, so no name of an orphan or of a concurrent writer's
        // shards is reused.
        let generation = objects
            .iter()
            .filter_map(|o| o.generation)
            .chain([view.index.generation])
            .max()
            .unwrap_or(0)
            + 1;
        let (shards, rows) = self.write_shards(scope, generation, &changes).await?;
        drop(changes);
        let index = Index {
            format: FORMAT,
            scope: scope.to_owned(),
            generation,
            rows,
            shards,
            cursor: view.index.cursor.clone(),
        };
        // The switch: one guarded update. Before it, readers see the old base and journals;
        // after it, the new base alone.
        self.write_index(&index, view.resource_version.as_deref()).await?;
        tracing::info!(
            configmap = %self.location(&self.index_name),
            generation,
            rows,
            shards = index.shards.len(),
            checkpoints = view.journals.len(),
            "checkpoints folded into new state shards"
        );
        self.view = None;
        match list_objects(&self.api, &self.sync_name, None).await {
            Ok(objects) => self.delete_stale(&objects, generation, &index).await,
            Err(e) => {
                tracing::warn!(error = %describe(&e), "failed to list stale state; the next run retries")
            }
        }
        Ok(())
    }

    async fn cursor(&mut self, scope: &str) -> Result<Option<String>, StateError> {
        Ok(self
            .read_index()
            .await?
            .and_then(|(index, _)| index.cursor)
            .filter(|c| c.scope == scope)
            .map(|c| c.record))
    }

    async fn commit_cursor(&mut self, scope: &str, record: &str) -> Result<(), StateError> {
        let (mut index, rv) = match self.read_index().await? {
            Some((index, rv)) => (index, Some(rv)),
            None => (
                Index {
                    format: FORMAT,
                    scope: scope.to_owned(),
                    ..Index::default()
                },
                None,
            ),
        };
        index.cursor = Some(CursorEntry {
            scope: scope.to_owned(),
            record: record.to_owned(),
        });
        self.write_index(&index, rv.as_deref()).await?;
        self.view = None;
        Ok(())
    }

    async fn discard(&mut self) -> Result<(), StateError> {
        delete_all(self.api.clone().into_client(), &self.namespace, &self.sync_name).await?;
        self.view = None;
        Ok(())
    }

    fn store_diff(&mut self) -> Option<&mut dyn StoreDiff> {
        Some(self)
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The API's answer in a line: code, reason and message, which name objects, not data.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

/// A conflict (a stale resourceVersion, a name already taken) means another writer.
fn api_error(location: String, e: &kube::Error) -> StateError {
    if status_code(e) == Some(409) {
        StateError::Locked(location)
    } else {
        StateError::Io {
            location,
            reason: describe(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_read_as_another_writer_and_other_errors_name_the_configmap() {
        let status = |code: u16, reason: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                reason: reason.into(),
                message: "configmaps \"s-state\" whatever".into(),
                ..Default::default()
            }))
        };
        let locked = api_error("configmap ns/s-state".into(), &status(409, "Conflict"));
        assert!(matches!(locked, StateError::Locked(_)), "{locked}");
        let io = api_error("configmap ns/s-state".into(), &status(403, "Forbidden"));
        assert!(
            io.to_string()
                .starts_with("failed to access sync state at configmap ns/s-state: 403 Forbidden"),
            "{io}"
        );
    }
}

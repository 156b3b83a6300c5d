//! The bytes the ConfigMap store keeps: the JSON index, and the zstd blobs of shards and
//! checkpoints with their headers, packed under a size budget and decoded back.

use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::state::change_buckets::ChangeBuckets;
use crate::state::codec::{Replay, put_str, read_entry, read_string, read_u32, read_u64};
use crate::state::{EntryRef, Fingerprints};

/// Version of the index and shard layout; a newer one is refused, not misread.
pub(super) const FORMAT: u32 = 1;
pub(super) const SHARD_MAGIC: &[u8; 5] = b"BFSH1";
pub(super) const JOURNAL_MAGIC: &[u8; 5] = b"BFCK1";

/// zstd's default level. Measured on 100k entries (integer keys, email identities, 5.8 MB):
/// zstd 3 packs 4.6x at ~350 MB/s and unpacks in 9 ms; flate2 (miniz) packs 3.3x at level 1
/// (290 MB/s) and 3.8x at level 6 (26 MB/s). With UUID keys: 2.86x against 2.69x.
pub(super) const ZSTD_LEVEL: i32 = 3;
/// Target compressed size of one shard or journal. base64 makes 640 KiB about 853 KiB of
/// JSON, well under the 1 MiB object limit with the metadata.
pub(super) const BLOB_BUDGET: usize = 640 * 1024;
/// Input zstd may hold before it emits a block (one 128 KiB block, plus slack): the most a
/// blob can still grow by when it is finished.
pub(super) const ZSTD_PENDING: usize = 129 * 1024;
/// Compressed size no blob may exceed (only one row with a huge key or identity can).
pub(super) const BLOB_LIMIT: usize = 700 * 1024;

pub(super) fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", xxh3_64(bytes))
}

/// The index: what a reader of the state trusts.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(super) struct Index {
    pub(super) format: u32,
    /// What the base shards were delivered to.
    pub(super) scope: String,
    /// Generation of the base shards; 0 before the first `finish` (no shards).
    pub(super) generation: u64,
    /// Rows in the base shards.
    pub(super) rows: u64,
    pub(super) shards: Vec<ShardRef>,
    /// Cursor mode's record, with the scope it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) cursor: Option<CursorEntry>,
}

/// Cursor mode's record in the index: written after a run's last checkpoint, in one guarded
/// update like every change of the index.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(super) struct CursorEntry {
    pub(super) scope: String,
    pub(super) record: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(super) struct ShardRef {
    pub(super) name: String,
    /// xxh3 of the compressed bytes, 16 hex digits.
    pub(super) checksum: String,
    pub(super) rows: u64,
    /// Size before compression.
    pub(super) bytes: u64,
}

pub(super) fn shard_header(scope: &str, generation: u64, n: usize) -> Vec<u8> {
    let mut h = SHARD_MAGIC.to_vec();
    put_str(&mut h, scope);
    h.extend_from_slice(&generation.to_le_bytes());
    h.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    h
}

/// What reading the stored state feeds: a set in memory ([`InMemory`], for `load`) or disk
/// buckets ([`ChangeBuckets`], for the diff and `finish`).
pub(super) trait Reading: Send {
    /// An entry of a base shard (the shards' keys are distinct).
    fn entry(&mut self, e: EntryRef<'_>) -> std::io::Result<()>;
    /// Every base shard has been read.
    fn shards_read(&mut self) {}
    /// One checkpoint's change records, in order; `Ok(false)` when they do not decode.
    fn changes(&mut self, payload: &[u8]) -> std::io::Result<bool>;
}

/// The state in memory.
pub(super) struct InMemory {
    pub(super) set: Fingerprints,
    pub(super) replay: Replay,
}

impl Reading for InMemory {
    fn entry(&mut self, e: EntryRef<'_>) -> std::io::Result<()> {
        self.set.push_unindexed(e);
        Ok(())
    }

    fn shards_read(&mut self) {
        self.set.build_index();
    }

    fn changes(&mut self, payload: &[u8]) -> std::io::Result<bool> {
        Ok(self.replay.apply_payload(&mut self.set, payload).is_ok())
    }
}

impl Reading for ChangeBuckets {
    fn entry(&mut self, e: EntryRef<'_>) -> std::io::Result<()> {
        self.push_entry(e)
    }

    fn changes(&mut self, payload: &[u8]) -> std::io::Result<bool> {
        self.push_payload(payload)
    }
}

/// Why a shard was not read.
#[derive(Debug)]
pub(super) enum ShardError {
    /// The shard is damaged or not the one expected.
    Undecodable(String),
    /// What it was read into failed (a local temporary file).
    Reading(std::io::Error),
}

/// Decodes a shard into `into`; returns its row count. The header must say it is shard `n`
/// of `generation` for `scope`, so an index can never pick up a stray object.
pub(super) fn decode_shard(
    blob: &[u8],
    scope: &str,
    generation: u64,
    n: usize,
    into: &mut dyn Reading,
) -> Result<u64, ShardError> {
    let undecodable = |e: std::io::Error| ShardError::Undecodable(format!("undecodable shard: {e}"));
    let decoder = zstd::stream::read::Decoder::with_buffer(blob).map_err(undecodable)?;
    let mut r = BufReader::with_capacity(64 * 1024, decoder);
    let mut magic = [0u8; SHARD_MAGIC.len()];
    r.read_exact(&mut magic).map_err(undecodable)?;
    if &magic != SHARD_MAGIC {
        return Err(ShardError::Undecodable("not a Backflow state shard".into()));
    }
    let mut text = String::new();
    read_string(&mut r, &mut text).map_err(undecodable)?;
    let (g, number) = (
        read_u64(&mut r).map_err(undecodable)?,
        read_u32(&mut r).map_err(undecodable)?,
    );
    if text != scope || g != generation || number as usize != n {
        return Err(ShardError::Undecodable(format!(
            "its header says shard {number} of generation {g}, not shard {n} of generation {generation}"
        )));
    }
    let (mut key, mut identity) = (String::new(), String::new());
    let mut rows = 0;
    while !r.fill_buf().map_err(undecodable)?.is_empty() {
        let fingerprint = read_entry(&mut r, &mut key, &mut identity).map_err(undecodable)?;
        into.entry(EntryRef {
            key: &key,
            fingerprint,
            identity: &identity,
        })
        .map_err(ShardError::Reading)?;
        rows += 1;
    }
    Ok(rows)
}

pub(super) fn journal_header(scope: &str, generation: u64, seq: u64) -> Vec<u8> {
    let mut h = JOURNAL_MAGIC.to_vec();
    put_str(&mut h, scope);
    h.extend_from_slice(&generation.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h
}

/// What a checkpoint says it is; `len` is where its changes start in the decoded bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct JournalHeader {
    pub(super) scope: String,
    pub(super) generation: u64,
    pub(super) seq: u64,
    pub(super) len: usize,
}

/// Decompresses a checkpoint (small: one checkpoint's changes) and reads its header.
pub(super) fn decode_journal(blob: &[u8]) -> Result<(JournalHeader, Vec<u8>), String> {
    let bytes = zstd::stream::decode_all(blob).map_err(|e| format!("undecodable checkpoint: {e}"))?;
    let mut r: &[u8] = &bytes;
    let bad = |e: std::io::Error| format!("undecodable checkpoint: {e}");
    let mut magic = [0u8; JOURNAL_MAGIC.len()];
    r.read_exact(&mut magic).map_err(bad)?;
    if &magic != JOURNAL_MAGIC {
        return Err("not a Backflow checkpoint".into());
    }
    let mut scope = String::new();
    read_string(&mut r, &mut scope).map_err(bad)?;
    let generation = read_u64(&mut r).map_err(bad)?;
    let seq = read_u64(&mut r).map_err(bad)?;
    let len = bytes.len() - r.len();
    let header = JournalHeader {
        scope,
        generation,
        seq,
        len,
    };
    Ok((header, bytes))
}

/// One compressed shard or checkpoint.
#[derive(Debug)]
pub(super) struct Blob {
    pub(super) bytes: Vec<u8>,
    /// Size before compression.
    pub(super) raw: usize,
    pub(super) records: usize,
}

/// Packs records into zstd blobs that each stay under [`BLOB_BUDGET`]: a blob is closed
/// before a record that could carry it past, counting what zstd still holds unemitted.
#[derive(Default)]
pub(super) struct Packer {
    pub(super) encoder: Option<zstd::stream::write::Encoder<'static, Vec<u8>>>,
    pub(super) raw: usize,
    pub(super) records: usize,
}

impl Packer {
    pub(super) fn is_open(&self) -> bool {
        self.encoder.is_some()
    }

    /// True when the open blob holds records and one of `len` bytes could overflow it.
    pub(super) fn is_full_for(&self, len: usize) -> bool {
        self.records > 0
            && self
                .encoder
                .as_ref()
                .is_some_and(|e| e.get_ref().len() + ZSTD_PENDING + len > BLOB_BUDGET)
    }

    pub(super) fn open(&mut self, header: &[u8]) -> std::io::Result<()> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::with_capacity(BLOB_BUDGET), ZSTD_LEVEL)?;
        encoder.write_all(header)?;
        self.encoder = Some(encoder);
        self.raw = header.len();
        self.records = 0;
        Ok(())
    }

    pub(super) fn push(&mut self, record: &[u8]) -> std::io::Result<()> {
        if let Some(e) = self.encoder.as_mut() {
            e.write_all(record)?;
            self.raw += record.len();
            self.records += 1;
        }
        Ok(())
    }

    /// Closes the open blob (an empty one when none is open).
    pub(super) fn finish(&mut self) -> std::io::Result<Blob> {
        let bytes = match self.encoder.take() {
            Some(e) => e.finish()?,
            None => Vec::new(),
        };
        let blob = Blob {
            bytes,
            raw: self.raw,
            records: self.records,
        };
        self.raw = 0;
        self.records = 0;
        Ok(blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateChange;
    use crate::state::codec::{encode_change, put_entry};

    fn entries(n: usize, identity: impl Fn(usize) -> String) -> Vec<(String, u64, String)> {
        (0..n)
            .map(|i| {
                (
                    format!("{}", 1_000_000 + i),
                    xxh3_64(&i.to_le_bytes()),
                    identity(i),
                )
            })
            .collect()
    }

    fn pack_shards(scope: &str, generation: u64, rows: &[(String, u64, String)]) -> Vec<Blob> {
        let mut blobs = Vec::new();
        let mut packer = Packer::default();
        let mut record = Vec::new();
        for (key, fingerprint, identity) in rows {
            record.clear();
            put_entry(
                &mut record,
                EntryRef {
                    key,
                    fingerprint: *fingerprint,
                    identity,
                },
            );
            if packer.is_full_for(record.len()) {
                blobs.push(packer.finish().unwrap());
            }
            if !packer.is_open() {
                packer
                    .open(&shard_header(scope, generation, blobs.len()))
                    .unwrap();
            }
            packer.push(&record).unwrap();
        }
        blobs.push(packer.finish().unwrap());
        blobs
    }

    #[test]
    fn shards_stay_under_the_budget_even_for_incompressible_rows_and_decode_back() {
        // Identities of random hex compress badly: the worst case for the budget.
        let rows = entries(60_000, |i| {
            let (a, b) = (xxh3_64(&i.to_le_bytes()), xxh3_64(&(i + (1 << 32)).to_le_bytes()));
            format!("{{\"h\":\"{a:016x}{b:016x}\"}}")
        });
        let blobs = pack_shards("ns/dest", 4, &rows);
        assert!(blobs.len() >= 3, "{} shards", blobs.len());
        for b in &blobs {
            assert!(b.bytes.len() <= BLOB_BUDGET, "{} bytes", b.bytes.len());
        }
        assert_eq!(blobs.iter().map(|b| b.records).sum::<usize>(), rows.len());

        let mut state = InMemory {
            set: Fingerprints::default(),
            replay: Replay::default(),
        };
        for (n, b) in blobs.iter().enumerate() {
            let decoded = decode_shard(&b.bytes, "ns/dest", 4, n, &mut state).unwrap();
            assert_eq!(decoded as usize, b.records);
        }
        state.shards_read();
        let set = state.set;
        assert_eq!(set.len(), rows.len());
        for (key, fingerprint, identity) in rows.iter().step_by(997) {
            let e = set.get(set.position(key).unwrap()).unwrap();
            assert_eq!((e.fingerprint, e.identity), (*fingerprint, identity.as_str()));
        }
    }

    #[test]
    fn a_shard_is_refused_under_another_name_scope_or_generation() {
        let rows = entries(10, |_| "{}".into());
        let blob = &pack_shards("s", 2, &rows)[0];
        let mut state = InMemory {
            set: Fingerprints::default(),
            replay: Replay::default(),
        };
        assert!(decode_shard(&blob.bytes, "s", 3, 0, &mut state).is_err());
        assert!(decode_shard(&blob.bytes, "s", 2, 1, &mut state).is_err());
        assert!(decode_shard(&blob.bytes, "other", 2, 0, &mut state).is_err());
        let mut garbled = blob.bytes.clone();
        let mid = garbled.len() / 2;
        garbled[mid] ^= 0xff;
        // zstd may decode a flipped byte to other rows: the index's checksum is what catches it.
        assert_ne!(checksum(&garbled), checksum(&blob.bytes));
    }

    #[test]
    fn a_checkpoint_says_its_scope_generation_and_seq() {
        let mut packer = Packer::default();
        packer.open(&journal_header("ns/d", 7, 12)).unwrap();
        let mut record = Vec::new();
        encode_change(&StateChange::Remove { key: "k".into() }, &mut record);
        packer.push(&record).unwrap();
        let blob = packer.finish().unwrap();
        let (header, bytes) = decode_journal(&blob.bytes).unwrap();
        assert_eq!(
            (header.scope.as_str(), header.generation, header.seq),
            ("ns/d", 7, 12)
        );
        assert_eq!(&bytes[header.len..], &record[..]);
        assert!(decode_journal(&blob.bytes[..blob.bytes.len() - 2]).is_err());
    }

    #[test]
    fn the_index_round_trips_through_json() {
        let index = Index {
            format: FORMAT,
            scope: "default/crm".into(),
            generation: 3,
            rows: 2,
            shards: vec![ShardRef {
                name: "s-state-3-0".into(),
                checksum: checksum(b"x"),
                rows: 2,
                bytes: 40,
            }],
            cursor: Some(CursorEntry {
                scope: "default/crm".into(),
                record: "{\"mark\":1}".into(),
            }),
        };
        let text = serde_json::to_string(&index).unwrap();
        assert!(text.contains("\"generation\":3"), "{text}");
        assert_eq!(serde_json::from_str::<Index>(&text).unwrap(), index);
    }
}

//! A base state and the checkpoints after it, partitioned by key hash on local disk and
//! resolved one bucket at a time into the live entries: how the File and ConfigMap stores read
//! their state for a diff and fold checkpoints into a new base, without holding it in memory.
//!
//! Each change goes to one of 256 buckets ([`DiskBuckets`]) by the top byte of its key's
//! [`stored_key_hash`], with the hash in front. [`ChangeBuckets::bucket`] reads one bucket,
//! keeps the last change of each key and returns the keys whose last change is a put, sorted
//! by key hash: memory holds the bucket buffers (8 MiB) and one bucket (1/256 of the rows).

use super::codec::{ChangeRef, decode_change_ref, encode_change_ref, skip_change};
use super::hash_buckets::{DiskBuckets, HashBuckets, RemovedHashes, bucket_of};
use super::stored_pairs::{StoredBuckets, StoredPairsSample};
use super::{EntryRef, RemovedRows, stored_key_hash};

/// Bytes each of the 256 buckets buffers before writing.
const CHUNK: usize = 32 * 1024;

/// A base state's entries and later changes, by key hash, on disk.
#[derive(Debug)]
pub(crate) struct ChangeBuckets {
    buckets: DiskBuckets,
    record: Vec<u8>,
}

impl ChangeBuckets {
    /// Empty buckets backed by an anonymous temporary file.
    pub(crate) fn new() -> std::io::Result<ChangeBuckets> {
        Ok(ChangeBuckets {
            buckets: DiskBuckets::new(CHUNK)?,
            record: Vec::with_capacity(256),
        })
    }

    /// Adds a change; a later change of the same key wins over earlier ones.
    pub(crate) fn push(&mut self, change: ChangeRef<'_>) -> std::io::Result<()> {
        let (ChangeRef::Put { key, .. } | ChangeRef::Remove { key }) = change;
        let hash = self.start_record(key);
        encode_change_ref(change, &mut self.record);
        self.buckets.push(bucket_of(hash), &self.record)
    }

    /// Adds a change of `key` already encoded as [`encode_change_ref`] writes it.
    fn push_encoded(&mut self, key: &str, encoded: &[u8]) -> std::io::Result<()> {
        let hash = self.start_record(key);
        self.record.extend_from_slice(encoded);
        self.buckets.push(bucket_of(hash), &self.record)
    }

    /// Starts the bucket record of a change of `key` with its hash; returns the hash.
    fn start_record(&mut self, key: &str) -> u128 {
        let hash = stored_key_hash(key);
        self.record.clear();
        self.record.extend_from_slice(&hash.to_le_bytes());
        hash
    }

    /// Adds an entry of the base state.
    pub(crate) fn push_entry(&mut self, e: EntryRef<'_>) -> std::io::Result<()> {
        self.push(ChangeRef::Put {
            key: e.key,
            fingerprint: e.fingerprint,
            identity: e.identity,
        })
    }

    /// Adds every change record of a checkpoint's payload, in order. `Ok(false)` when one
    /// does not decode (the changes before it are added).
    pub(crate) fn push_payload(&mut self, mut payload: &[u8]) -> std::io::Result<bool> {
        while !payload.is_empty() {
            let before = payload;
            let Some(change) = decode_change_ref(&mut payload) else {
                return Ok(false);
            };
            // The record goes into its bucket as it is in the payload, not encoded again.
            let (ChangeRef::Put { key, .. } | ChangeRef::Remove { key }) = change;
            self.push_encoded(key, &before[..before.len() - payload.len()])?;
        }
        Ok(true)
    }

    /// The live entries of bucket `n`.
    pub(crate) fn bucket(&self, n: u8) -> std::io::Result<LiveBucket> {
        let mut bytes = Vec::new();
        self.buckets.read_bucket(usize::from(n), &mut bytes)?;
        // Every change: its key hash, where it starts (so in the order pushed) and whether it
        // is a put. Sorted by hash, then by where it starts, the last of each run of equal
        // hashes is the change that wins. The records were checked on the way in (`push`
        // takes text): only their lengths are read here.
        let mut changes: Vec<(u128, usize, bool)> = Vec::new();
        let mut at = 0;
        while let Some((hash, tail)) = bytes[at..].split_first_chunk::<16>() {
            let start = at + 16;
            let mut rest = tail;
            let put = skip_change(&mut rest).ok_or(std::io::ErrorKind::InvalidData)?;
            at = bytes.len() - rest.len();
            changes.push((u128::from_le_bytes(*hash), start, put));
        }
        changes.sort_unstable_by_key(|(hash, start, _)| (*hash, *start));
        let live = changes
            .chunk_by(|a, b| a.0 == b.0)
            .filter_map(|key_changes| key_changes.last())
            .filter(|(_, _, put)| *put)
            .map(|(hash, start, _)| (*hash, *start))
            .collect();
        Ok(LiveBucket { bytes, live })
    }

    /// Every live (key hash, fingerprint), for a diff, also into `sample`.
    pub(crate) fn live_pairs(&self, sample: StoredPairsSample) -> std::io::Result<HashBuckets> {
        let mut pairs = StoredBuckets::new(Some(sample))?;
        for n in 0..=u8::MAX {
            for entry in self.bucket(n)?.entries() {
                let (hash, e) = entry?;
                pairs.push(hash, e.fingerprint)?;
            }
        }
        Ok(pairs.finish())
    }

    /// Key and identity of the live entries whose key hash is in `hashes`, reading only the
    /// buckets they fall in, one at a time.
    pub(crate) fn entries_of(&self, hashes: &RemovedHashes) -> std::io::Result<RemovedRows> {
        let mut found = RemovedRows::new();
        for bucket in hashes.buckets() {
            let (n, wanted) = bucket?;
            for entry in self.bucket(n)?.entries() {
                let (hash, e) = entry?;
                if wanted.binary_search(&hash).is_ok() {
                    found.push(e.key.to_owned(), e.identity.to_owned())?;
                }
            }
        }
        found.finish()
    }
}

/// One bucket's live entries, sorted by key hash.
pub(crate) struct LiveBucket {
    bytes: Vec<u8>,
    /// Key hash, and where the entry's put record starts in `bytes`.
    live: Vec<(u128, usize)>,
}

impl LiveBucket {
    /// The entries with their key hashes, in key-hash order; an entry whose text does not
    /// decode (the temporary file was damaged) is an `InvalidData` error.
    pub(crate) fn entries(&self) -> impl Iterator<Item = std::io::Result<(u128, EntryRef<'_>)>> {
        self.live.iter().map(|&(hash, start)| {
            // Only puts are live, and reading the bucket checked their lengths.
            match decode_change_ref(&mut &self.bytes[start..]) {
                Some(ChangeRef::Put {
                    key,
                    fingerprint,
                    identity,
                }) => Ok((
                    hash,
                    EntryRef {
                        key,
                        fingerprint,
                        identity,
                    },
                )),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a record of a temporary bucket file does not decode",
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, fingerprint: u64) -> ChangeRef<'_> {
        ChangeRef::Put {
            key,
            fingerprint,
            identity: "{}",
        }
    }

    #[test]
    fn the_last_change_of_each_key_wins_and_entries_come_sorted_by_key_hash() {
        let mut changes = ChangeBuckets::new().unwrap();
        let keys: Vec<String> = (0..5_000).map(|i| format!("k{i}")).collect();
        for k in &keys {
            changes.push(put(k, 1)).unwrap();
        }
        changes.push(ChangeRef::Remove { key: "k1" }).unwrap();
        changes.push(put("k2", 2)).unwrap();
        changes.push(ChangeRef::Remove { key: "k3" }).unwrap();
        changes.push(put("k3", 3)).unwrap();
        changes.push(ChangeRef::Remove { key: "absent" }).unwrap();

        let mut all = Vec::new();
        for n in 0..=u8::MAX {
            let bucket = changes.bucket(n).unwrap();
            let entries: Vec<(u128, EntryRef<'_>)> = bucket.entries().map(Result::unwrap).collect();
            assert!(entries.windows(2).all(|w| w[0].0 < w[1].0), "bucket {n} sorted");
            all.extend(entries.iter().map(|(_, e)| (e.key.to_owned(), e.fingerprint)));
        }
        assert_eq!(all.len(), 4_999);
        let fp = |k: &str| all.iter().find(|(key, _)| key == k).map(|(_, fp)| *fp);
        assert_eq!(
            (fp("k0"), fp("k1"), fp("k2"), fp("k3")),
            (Some(1), None, Some(2), Some(3))
        );

        assert_eq!(
            changes.live_pairs(StoredPairsSample::new(0).0).unwrap().len(),
            4_999
        );
        let mut wanted = [
            stored_key_hash("k2"),
            stored_key_hash("k1"),
            stored_key_hash("k7"),
        ];
        wanted.sort_unstable();
        let mut hashes = RemovedHashes::default();
        hashes.extend(&wanted).unwrap();
        let found = changes.entries_of(&hashes).unwrap();
        let found: Vec<(String, String)> = found.iter().map(Result::unwrap).collect();
        assert_eq!(
            found,
            vec![
                ("k2".to_owned(), "{}".to_owned()),
                ("k7".to_owned(), "{}".to_owned())
            ]
        );
    }

    #[test]
    fn a_payload_that_does_not_decode_stops_where_it_breaks() {
        let mut changes = ChangeBuckets::new().unwrap();
        let mut payload = Vec::new();
        encode_change_ref(put("a", 1), &mut payload);
        payload.extend_from_slice(&[9, 9, 9]);
        assert!(!changes.push_payload(&payload).unwrap());
        let live: usize = (0..=u8::MAX)
            .map(|n| changes.bucket(n).unwrap().entries().count())
            .sum();
        assert_eq!(live, 1);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_missing_entry() {
        let mut changes = ChangeBuckets::new().unwrap();
        changes.push(put("k", 1)).unwrap();
        let n = bucket_of(stored_key_hash("k"));
        let mut bucket = changes.bucket(n).unwrap();
        // The key's one byte, after the record's kind and length, is no longer UTF-8.
        let start = bucket.live[0].1;
        bucket.bytes[start + 5] = 0xFF;
        let entries: Vec<_> = bucket.entries().collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].as_ref().err().map(std::io::Error::kind),
            Some(std::io::ErrorKind::InvalidData)
        );
    }
}

//! Key hashes and fingerprints partitioned on local disk, and the merge that compares two
//! such sets: the diff of the Warehouse and File stores, without holding either side in memory.
//!
//! Pairs go to one of 256 buckets by the top byte of their 128-bit key hash ([`DiskBuckets`],
//! which the File store's fold also uses for whole records). Each bucket collects in a 12 KiB
//! buffer that is appended to one anonymous temporary file when full, so memory stays at 256
//! buffers (3 MiB) whatever the row count, and a bucket holds about 1/256 of the rows: 39,000
//! at 10 million, 940 KiB. [`compare`] reads one bucket of each side at a time, sorts both
//! and walks them together; the keys it finds changed come out sorted ([`ChangedKeys`], 16
//! bytes a key).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;

mod removed;
pub use removed::RemovedHashes;

/// Buckets per set (the top byte of the key hash).
const BUCKETS: usize = 256;
/// Bytes per pair: key hash and fingerprint, big-endian.
const ENTRY: usize = 24;
/// Bytes a bucket of pairs buffers before they are appended to the file.
const CHUNK: usize = ENTRY * 512;

/// Byte records partitioned into 256 buckets in one anonymous temporary file: each bucket
/// collects in a buffer of `chunk` bytes that is appended to the file when full, so memory
/// stays at 256 buffers whatever the volume, and a bucket's records read back in the order
/// they were pushed.
#[derive(Debug)]
pub struct DiskBuckets {
    file: File,
    /// Bytes written to `file`.
    end: u64,
    chunk: usize,
    /// Per bucket, what is not written yet.
    buffers: Vec<Vec<u8>>,
    /// Per bucket, the (offset, length) of its chunks in `file`.
    chunks: Vec<Vec<(u64, usize)>>,
}

impl DiskBuckets {
    /// Empty buckets that buffer `chunk` bytes each, backed by an anonymous temporary file
    /// (deleted when dropped).
    pub fn new(chunk: usize) -> std::io::Result<DiskBuckets> {
        Ok(DiskBuckets {
            file: tempfile::tempfile()?,
            end: 0,
            chunk,
            buffers: vec![Vec::new(); BUCKETS],
            chunks: vec![Vec::new(); BUCKETS],
        })
    }

    /// Appends `record` to `bucket`.
    pub fn push(&mut self, bucket: u8, record: &[u8]) -> std::io::Result<()> {
        let bucket = usize::from(bucket);
        let buffer = &mut self.buffers[bucket];
        if buffer.capacity() == 0 {
            buffer.reserve_exact(self.chunk);
        }
        buffer.extend_from_slice(record);
        if buffer.len() >= self.chunk {
            self.file.write_all(buffer)?;
            self.chunks[bucket].push((self.end, buffer.len()));
            self.end += buffer.len() as u64;
            buffer.clear();
        }
        Ok(())
    }

    /// Bytes pushed to `bucket`.
    pub fn bucket_bytes(&self, bucket: usize) -> usize {
        self.chunks[bucket].iter().map(|(_, n)| n).sum::<usize>() + self.buffers[bucket].len()
    }

    /// Appends every byte pushed to `bucket`, in order, to `out`.
    pub fn read_bucket(&self, bucket: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.reserve(self.bucket_bytes(bucket));
        self.read_bucket_chunks(bucket, |chunk| out.extend_from_slice(chunk))
    }

    /// Hands every byte pushed to `bucket` to `each`, in order, one chunk at a time: memory
    /// holds one chunk, not the bucket.
    pub fn read_bucket_chunks(&self, bucket: usize, mut each: impl FnMut(&[u8])) -> std::io::Result<()> {
        let mut chunk = Vec::new();
        for &(offset, n) in &self.chunks[bucket] {
            chunk.resize(n, 0);
            self.file.read_exact_at(&mut chunk, offset)?;
            each(&chunk);
        }
        each(&self.buffers[bucket]);
        Ok(())
    }
}

/// Buckets a 128-bit key hash belongs to: its top byte.
pub fn bucket_of(hash: u128) -> u8 {
    (hash >> 120) as u8
}

/// A set of (key hash, fingerprint) pairs, partitioned by key hash on local disk.
#[derive(Debug)]
pub struct HashBuckets {
    buckets: DiskBuckets,
    len: u64,
}

impl HashBuckets {
    /// An empty set backed by an anonymous temporary file (deleted when dropped).
    pub fn new() -> std::io::Result<HashBuckets> {
        Ok(HashBuckets {
            buckets: DiskBuckets::new(CHUNK)?,
            len: 0,
        })
    }

    /// Adds one pair.
    pub fn push(&mut self, hash: u128, fingerprint: u64) -> std::io::Result<()> {
        let mut entry = [0u8; ENTRY];
        entry[..16].copy_from_slice(&hash.to_be_bytes());
        entry[16..].copy_from_slice(&fingerprint.to_be_bytes());
        self.len += 1;
        self.buckets.push(bucket_of(hash), &entry)
    }

    /// Adds pairs in order.
    pub fn push_all(&mut self, pairs: &[(u128, u64)]) -> std::io::Result<()> {
        pairs
            .iter()
            .try_for_each(|&(hash, fingerprint)| self.push(hash, fingerprint))
    }

    /// Pairs added.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pairs of one bucket, sorted by key hash (then fingerprint). They are decoded as
    /// their chunks are read, into 24 bytes a pair: at 100 million rows a bucket holds about
    /// 390,000 pairs, 9.4 MB, and nothing else of it is held.
    fn sorted_bucket(&self, bucket: usize) -> std::io::Result<Vec<Pair>> {
        let mut pairs = Vec::with_capacity(self.buckets.bucket_bytes(bucket) / ENTRY);
        self.buckets.read_bucket_chunks(bucket, |bytes| {
            pairs.extend(bytes.chunks_exact(ENTRY).map(Pair::decode));
        })?;
        pairs.sort_unstable();
        Ok(pairs)
    }
}

/// A key hash and fingerprint as three words, ordered by key hash then fingerprint: 24 bytes
/// with the alignment of a `u64`, where `(u128, u64)` takes 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pair {
    /// The key hash's high 64 bits.
    high: u64,
    /// The key hash's low 64 bits.
    low: u64,
    fingerprint: u64,
}

impl Pair {
    fn new(hash: u128, fingerprint: u64) -> Pair {
        Pair {
            high: (hash >> 64) as u64,
            low: hash as u64,
            fingerprint,
        }
    }

    /// One pair from its `ENTRY` big-endian bytes.
    fn decode(entry: &[u8]) -> Pair {
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&entry[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        Pair {
            high: word(0),
            low: word(8),
            fingerprint: word(16),
        }
    }

    fn hash(self) -> u128 {
        (u128::from(self.high) << 64) | u128::from(self.low)
    }
}

/// The keys a diff found new or changed, sorted by key hash, in one vector per bucket (the
/// top byte of the hash) and kind: 16 bytes a key (a hash table of the same keys takes about
/// 70 at its usual load). Each bucket's vectors are trimmed to their length as soon as the
/// comparison is done with the bucket, and move whole from the comparing threads to the
/// result, so no vector of every changed key grows by doubling or is copied: at 5,000,000
/// changed keys they take 80 MB, where one vector per kind reached about three times that
/// while the threads' parts were joined. A key is looked up by binary search in its bucket.
#[derive(Debug, Default, Clone)]
pub struct ChangedKeys {
    /// Per bucket, keys that are not stored; no buckets until the first key.
    added: Vec<Vec<u128>>,
    /// Per bucket, stored keys whose fingerprint differs; no buckets until the first key.
    modified: Vec<Vec<u128>>,
}

impl ChangedKeys {
    /// Adds a key above every key added before in its bucket (the comparison finds them in
    /// order).
    fn push(&mut self, hash: u128, added: bool) {
        let lists = if added {
            &mut self.added
        } else {
            &mut self.modified
        };
        if lists.is_empty() {
            lists.resize_with(BUCKETS, Vec::new);
        }
        let keys = &mut lists[usize::from(bucket_of(hash))];
        debug_assert!(keys.last().is_none_or(|last| *last < hash), "keys out of order");
        keys.push(hash);
    }

    /// Gives back the spare capacity of one bucket's vectors (the comparison is done with it)
    /// by copying them into vectors of their length: `shrink_to_fit` would leave it to the
    /// allocator, and mimalloc keeps a block that shrinks by less than half as it is.
    fn trim(&mut self, bucket: usize) {
        for lists in [&mut self.added, &mut self.modified] {
            if let Some(keys) = lists.get_mut(bucket)
                && keys.capacity() > keys.len()
            {
                *keys = keys.as_slice().to_vec();
            }
        }
    }

    /// Moves `other`'s keys here; within each bucket they are all above this one's.
    fn append(&mut self, other: &mut ChangedKeys) {
        for (mine, theirs) in [
            (&mut self.added, &mut other.added),
            (&mut self.modified, &mut other.modified),
        ] {
            if mine.is_empty() {
                std::mem::swap(mine, theirs);
                continue;
            }
            for (bucket, keys) in theirs.iter_mut().enumerate() {
                if mine[bucket].is_empty() {
                    std::mem::swap(&mut mine[bucket], keys);
                } else {
                    mine[bucket].append(keys);
                }
            }
        }
    }

    /// `Some(true)` when `hash` is new, `Some(false)` when its fingerprint changed, `None`
    /// when it is in neither list.
    pub fn get(&self, hash: u128) -> Option<bool> {
        let bucket = usize::from(bucket_of(hash));
        let holds = |lists: &[Vec<u128>]| {
            lists
                .get(bucket)
                .is_some_and(|keys| keys.binary_search(&hash).is_ok())
        };
        if holds(&self.added) {
            Some(true)
        } else if holds(&self.modified) {
            Some(false)
        } else {
            None
        }
    }

    /// True when some key's top 32 bits are `prefix`.
    pub fn has_prefix(&self, prefix: u32) -> bool {
        let bucket = (prefix >> 24) as usize;
        let top = |hash: &u128| (*hash >> 96) as u32;
        [&self.added, &self.modified].into_iter().any(|lists| {
            lists.get(bucket).is_some_and(|keys| {
                let at = keys.partition_point(|hash| top(hash) < prefix);
                keys.get(at).is_some_and(|hash| top(hash) == prefix)
            })
        })
    }

    /// Drops every key that `drop` says to.
    pub fn remove_where(&mut self, mut drop: impl FnMut(u128) -> bool) {
        for keys in self.added.iter_mut().chain(&mut self.modified) {
            keys.retain(|h| !drop(*h));
        }
    }

    /// Keys in either list.
    pub fn len(&self) -> usize {
        self.added_len() + self.modified.iter().map(Vec::len).sum::<usize>()
    }

    /// True when no key changed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys that are new.
    pub fn added_len(&self) -> usize {
        self.added.iter().map(Vec::len).sum()
    }

    /// Every key, new ones first, each kind in key-hash order.
    pub fn keys(&self) -> impl Iterator<Item = u128> + '_ {
        self.added.iter().chain(&self.modified).flatten().copied()
    }
}

impl PartialEq for ChangedKeys {
    /// The same keys of each kind, however their buckets were allocated.
    fn eq(&self, other: &ChangedKeys) -> bool {
        let kind = |lists: &[Vec<u128>]| lists.iter().flatten().copied().collect::<Vec<u128>>();
        kind(&self.added) == kind(&other.added) && kind(&self.modified) == kind(&other.modified)
    }
}

impl Eq for ChangedKeys {}

#[cfg(test)]
impl FromIterator<(u128, bool)> for ChangedKeys {
    /// Keys in any order (they are sorted here).
    fn from_iter<I: IntoIterator<Item = (u128, bool)>>(iter: I) -> ChangedKeys {
        let mut pairs: Vec<(u128, bool)> = iter.into_iter().collect();
        pairs.sort_unstable();
        pairs.dedup();
        let mut keys = ChangedKeys::default();
        for (hash, added) in pairs {
            keys.push(hash, added);
        }
        keys
    }
}

/// What [`compare`] found between this run's pairs and the stored ones.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Run keys that are not stored (`true`) or whose fingerprint differs (`false`). With
    /// `full_resync`, unchanged keys are left out: the caller counts them as changed.
    pub changed: ChangedKeys,
    /// Run keys that appear more than once, with how many times. They are in no other field.
    pub duplicates: HashMap<u128, u64>,
    /// Stored keys that the run does not have, when they are listed.
    pub removed: RemovedHashes,
    /// Stored keys that the run does not have, listed or not.
    pub removed_count: u64,
}

impl Comparison {
    /// The store's diff: this comparison with the key and identity of the removed rows,
    /// logged with how many rows each side had (`against` names the stored side).
    pub fn into_diff(
        self,
        removed: crate::state::RemovedRows,
        all_added: bool,
        full_resync: bool,
        (staged, stored): (u64, u64),
        against: &str,
    ) -> crate::state::RemoteDiff {
        let diff = crate::state::RemoteDiff {
            all_added,
            full_resync,
            changed: std::sync::Arc::new(self.changed),
            duplicates: self.duplicates,
            removed,
            removed_rows: self.removed_count,
        };
        tracing::info!(
            staged,
            stored,
            changed = diff.changed.len(),
            removed = diff.removed_rows,
            duplicates = diff.duplicates.len(),
            all_added,
            "diff computed against {against}"
        );
        diff
    }
}

/// What a comparison does with the stored keys the run lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Lists them ([`RemovedHashes`]: 16 bytes each, on local disk once they are many) and
    /// counts them: a run that may delete them.
    List,
    /// Counts them only: a run that will not delete (every mode but `mirror`) reports how
    /// many there are.
    Count,
    /// Neither: the run read part of the model (cursor mode), so they were not removed.
    Ignore,
}

/// [`compare`] on a blocking thread, taking both sides (they are dropped, with their
/// temporary files, when it is done), doing with the removed keys what `removed` says: at 1%
/// of the model read, or a model that lost most of its rows, a list would hold most of the
/// stored keys.
pub async fn compare_apart(
    run: HashBuckets,
    stored: Option<HashBuckets>,
    removed: Removed,
) -> std::io::Result<Comparison> {
    tokio::task::spawn_blocking(move || compare_listing(&run, stored.as_ref(), removed))
        .await
        .map_err(|e| std::io::Error::other(format!("comparing fingerprints stopped: {e}")))?
}

/// Compares this run's pairs with the stored ones, bucket by bucket, the buckets shared out
/// between the machine's cores. `stored: None` means nothing is stored: only duplicates are
/// looked for, and `changed` stays empty (every key is new).
pub fn compare(run: &HashBuckets, stored: Option<&HashBuckets>) -> std::io::Result<Comparison> {
    compare_listing(run, stored, Removed::List)
}

/// [`compare`], doing with the removed keys what `removed` says.
fn compare_listing(
    run: &HashBuckets,
    stored: Option<&HashBuckets>,
    removed: Removed,
) -> std::io::Result<Comparison> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 8);
    let per_thread = BUCKETS.div_ceil(threads);
    let parts: Vec<std::io::Result<Comparison>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..BUCKETS)
            .step_by(per_thread)
            .map(|first| {
                s.spawn(move || {
                    compare_buckets(run, stored, first..(first + per_thread).min(BUCKETS), removed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a comparing thread panicked")))
            })
            .collect()
    });
    // The parts cover ascending ranges of buckets: their changed keys' buckets move over
    // whole.
    let mut found = Comparison::default();
    for part in parts {
        let mut part = part?;
        found.changed.append(&mut part.changed);
        found.duplicates.extend(part.duplicates);
        found.removed.append(&mut part.removed)?;
        found.removed_count += part.removed_count;
    }
    Ok(found)
}

/// [`compare`] for a run that read part of the model (no removed keys are listed), against
/// stored pairs that `next_stored` yields in key-hash order (a File store's state file, read
/// as it is): the stored side is never bucketed nor sorted, and memory holds one bucket of
/// each side. `Ok(None)` as soon as a stored key hash is not above the one before it (the
/// stored side is not in order; nothing is returned and the caller compares otherwise).
pub fn compare_partial_in_order<E>(
    run: &HashBuckets,
    mut next_stored: impl FnMut() -> Result<Option<(u128, u64)>, E>,
    io_error: impl Fn(std::io::Error) -> E,
) -> Result<Option<Comparison>, E> {
    let mut found = Comparison::default();
    let mut stored = Vec::new();
    // The first stored pair of a later bucket, read ahead.
    let mut ahead: Option<(u128, u64)> = None;
    let mut previous: Option<u128> = None;
    let mut ended = false;
    for bucket in 0..=u8::MAX {
        stored.clear();
        loop {
            let pair = match ahead.take() {
                Some(pair) => pair,
                None if ended => break,
                None => match next_stored()? {
                    Some(pair) => {
                        if previous.is_some_and(|p| p >= pair.0) {
                            return Ok(None);
                        }
                        previous = Some(pair.0);
                        pair
                    }
                    None => {
                        ended = true;
                        break;
                    }
                },
            };
            if bucket_of(pair.0) == bucket {
                stored.push(Pair::new(pair.0, pair.1));
            } else {
                ahead = Some(pair);
                break;
            }
        }
        let run_pairs = run.sorted_bucket(usize::from(bucket)).map_err(&io_error)?;
        merge_bucket(
            &run_pairs,
            &stored,
            true,
            Removed::Ignore,
            &mut found,
            &mut Vec::new(),
        );
        found.changed.trim(usize::from(bucket));
    }
    Ok(Some(found))
}

/// [`compare`] over a range of buckets.
fn compare_buckets(
    run: &HashBuckets,
    stored: Option<&HashBuckets>,
    buckets: std::ops::Range<usize>,
    removed: Removed,
) -> std::io::Result<Comparison> {
    let mut found = Comparison::default();
    let mut listed = Vec::new();
    for bucket in buckets {
        let run_pairs = run.sorted_bucket(bucket)?;
        let stored_pairs = match stored {
            Some(s) => s.sorted_bucket(bucket)?,
            None => Vec::new(),
        };
        merge_bucket(
            &run_pairs,
            &stored_pairs,
            stored.is_some(),
            removed,
            &mut found,
            &mut listed,
        );
        found.changed.trim(bucket);
        found.removed.extend(&listed)?;
        listed.clear();
    }
    Ok(found)
}

/// Walks one bucket of each side, both sorted by key hash; removed keys are listed, in order,
/// in `listed`.
fn merge_bucket(
    run: &[Pair],
    stored: &[Pair],
    diff: bool,
    removed: Removed,
    out: &mut Comparison,
    listed: &mut Vec<u128>,
) {
    let same_key = |a: &Pair, b: &Pair| (a.high, a.low) == (b.high, b.low);
    let below = |a: &Pair, b: &Pair| (a.high, a.low) < (b.high, b.low);
    let (mut i, mut j) = (0, 0);
    while i < run.len() {
        let pair = run[i];
        let mut k = i + 1;
        while k < run.len() && same_key(&run[k], &pair) {
            k += 1;
        }
        let copies = (k - i) as u64;
        i = k;
        while j < stored.len() && below(&stored[j], &pair) {
            match removed {
                Removed::List => {
                    listed.push(stored[j].hash());
                    out.removed_count += 1;
                }
                Removed::Count => out.removed_count += 1,
                Removed::Ignore => {}
            }
            j += 1;
        }
        let stored_fp = match stored.get(j) {
            Some(s) if same_key(s, &pair) => {
                j += 1;
                Some(s.fingerprint)
            }
            _ => None,
        };
        if copies > 1 {
            out.duplicates.insert(pair.hash(), copies);
        } else if diff {
            match stored_fp {
                None => out.changed.push(pair.hash(), true),
                Some(fp) if fp != pair.fingerprint => out.changed.push(pair.hash(), false),
                Some(_) => {}
            }
        }
    }
    if removed == Removed::List {
        listed.extend(stored[j..].iter().map(|p| p.hash()));
    }
    if removed != Removed::Ignore {
        out.removed_count += (stored.len() - j) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(u128, u64)]) -> HashBuckets {
        let mut b = HashBuckets::new().unwrap();
        for &(h, fp) in pairs {
            b.push(h, fp).unwrap();
        }
        b
    }

    #[test]
    fn compare_finds_added_changed_removed_and_duplicates() {
        let top = |n: u128| n << 120;
        let stored = set(&[(1, 10), (2, 20), (3, 30), (top(7) | 4, 40), (top(255), 1)]);
        let run = set(&[
            (2, 20),          // unchanged
            (3, 31),          // changed
            (5, 50),          // added
            (top(9), 1),      // added, another bucket
            (top(7) | 4, 41), // duplicated (and stored): only a duplicate
            (top(7) | 4, 42),
            (6, 1), // duplicated, new
            (6, 1),
            (6, 1),
        ]);
        let found = compare(&run, Some(&stored)).unwrap();
        assert_eq!(
            found.changed,
            ChangedKeys::from_iter([(3, false), (5, true), (top(9), true)])
        );
        assert_eq!(found.changed.get(3), Some(false));
        assert_eq!(found.changed.get(top(9)), Some(true));
        assert_eq!(found.changed.get(2), None);
        assert_eq!(found.duplicates, HashMap::from([(top(7) | 4, 2), (6, 3)]));
        assert_eq!(found.removed_count, 2);
        let removed: Vec<u128> = found.removed.iter().map(Result::unwrap).collect();
        assert_eq!(removed, vec![1, top(255)], "listed in order");

        // A run that read part of the model finds the same changes and lists no removed key.
        let partial = compare_listing(&run, Some(&stored), Removed::Ignore).unwrap();
        assert_eq!(partial.changed, found.changed);
        assert_eq!(partial.duplicates, found.duplicates);
        assert!(partial.removed.is_empty());
        assert_eq!(partial.removed_count, 0);

        // A run that will not delete counts the removed keys without listing them.
        let counted = compare_listing(&run, Some(&stored), Removed::Count).unwrap();
        assert_eq!(counted.changed, found.changed);
        assert!(counted.removed.is_empty());
        assert_eq!(counted.removed_count, 2);
    }

    #[test]
    fn a_partial_comparison_against_pairs_in_order_finds_what_the_bucketed_one_finds() {
        // Spread over every bucket: hashes multiplied up into the top byte.
        let spread = |n: u128| n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        let stored_pairs: Vec<(u128, u64)> = (0..5_000u128).map(|n| (spread(n), n as u64)).collect();
        let mut run_pairs: Vec<(u128, u64)> = (0..5_000u128)
            .step_by(37)
            .map(|n| (spread(n), if n % 2 == 0 { n as u64 } else { 0 }))
            .collect();
        run_pairs.extend([(spread(9_000), 1), (spread(9_001), 1), (spread(9_001), 2)]);
        let run = set(&run_pairs);
        let mut in_order = stored_pairs.clone();
        in_order.sort_unstable();
        let mut next = in_order.iter().copied();
        let found = compare_partial_in_order(&run, || Ok::<_, std::io::Error>(next.next()), |e| e)
            .unwrap()
            .expect("in order");
        let bucketed = compare_listing(&run, Some(&set(&stored_pairs)), Removed::Ignore).unwrap();
        assert_eq!(
            (&found.changed, &found.duplicates, found.removed_count),
            (&bucketed.changed, &bucketed.duplicates, bucketed.removed_count)
        );
        assert!(bucketed.removed.is_empty());
        assert_eq!(found.duplicates, HashMap::from([(spread(9_001), 2)]));
        assert_eq!(found.changed.get(spread(9_000)), Some(true));
        assert_eq!(found.changed.get(spread(37)), Some(false));
        assert!(found.removed.is_empty());

        // Out of order: nothing is returned, whatever was read before.
        in_order.swap(4_000, 4_001);
        let mut next = in_order.iter().copied();
        let found = compare_partial_in_order(&run, || Ok::<_, std::io::Error>(next.next()), |e| e).unwrap();
        assert!(found.is_none());
    }

    #[test]
    fn changed_keys_are_found_by_binary_search_and_can_be_dropped() {
        let mut keys = ChangedKeys::from_iter([(30, false), (10, true), (20, false), (10, true)]);
        assert_eq!((keys.len(), keys.added_len()), (3, 1));
        assert_eq!(keys.get(10), Some(true));
        assert_eq!(keys.get(20), Some(false));
        assert_eq!(keys.get(15), None);
        keys.remove_where(|hash| hash == 20);
        assert_eq!(keys.get(20), None);
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec![10, 30]);
        assert!(!keys.is_empty());
    }

    #[test]
    fn changed_keys_are_found_by_their_top_32_bits() {
        let key = |top: u32, low: u128| (u128::from(top) << 96) | low;
        let keys = ChangedKeys::from_iter([
            (key(0x0100_0000, 5), true),
            (key(0x0100_0002, 9), false),
            (key(0xff00_0001, 0), false),
        ]);
        assert!(keys.has_prefix(0x0100_0000));
        assert!(keys.has_prefix(0x0100_0002));
        assert!(keys.has_prefix(0xff00_0001));
        assert!(!keys.has_prefix(0x0100_0001));
        assert!(!keys.has_prefix(0x0200_0000));
        assert!(!keys.has_prefix(0xff00_0000));
        assert!(!ChangedKeys::default().has_prefix(0x0100_0000));
        assert_eq!(ChangedKeys::default(), ChangedKeys::from_iter([]));
    }

    #[test]
    fn changed_keys_from_every_comparing_thread_stay_sorted() {
        let spread = |n: u128| n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        let stored: Vec<(u128, u64)> = (0..4_000u128).map(|n| (spread(n), 1)).collect();
        let run: Vec<(u128, u64)> = (0..4_000u128)
            .map(|n| (spread(n), if n % 3 == 0 { 2 } else { 1 }))
            .chain((4_000..5_000u128).map(|n| (spread(n), 1)))
            .collect();
        let found = compare(&set(&run), Some(&set(&stored))).unwrap();
        let expected = ChangedKeys::from_iter(
            (0..4_000u128)
                .step_by(3)
                .map(|n| (spread(n), false))
                .chain((4_000..5_000u128).map(|n| (spread(n), true))),
        );
        assert_eq!(found.changed, expected);
        assert!((0..5_000u128).all(|n| found.changed.get(spread(n)).is_some() == (n % 3 == 0 || n >= 4_000)));
    }

    #[test]
    fn nothing_stored_finds_only_duplicates() {
        let run = set(&[(1, 1), (2, 2), (2, 3)]);
        let found = compare(&run, None).unwrap();
        assert!(found.changed.is_empty());
        assert!(found.removed.is_empty());
        assert_eq!(found.duplicates, HashMap::from([(2, 2)]));
    }

    #[test]
    fn buckets_survive_many_chunks() {
        // 5,000 pairs in one bucket: about ten chunks written to the file plus a tail.
        let pairs: Vec<(u128, u64)> = (0..5_000u128).map(|n| (n * 7919, n as u64)).collect();
        let run = set(&pairs);
        assert_eq!(run.len(), 5_000);
        let mut expected: Vec<Pair> = pairs.iter().map(|&(h, fp)| Pair::new(h, fp)).collect();
        expected.sort_unstable();
        assert_eq!(run.sorted_bucket(0).unwrap(), expected);
        let stored = set(&pairs);
        let same = compare(&run, Some(&stored)).unwrap();
        assert!(same.changed.is_empty() && same.duplicates.is_empty() && same.removed.is_empty());
        assert_eq!(same.removed_count, 0);
    }
}

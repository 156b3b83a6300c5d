//! Some of the stored (key hash, fingerprint) pairs, held in memory while the model is read,
//! so that the planner can leave the rows it knows are unchanged out of the spill.
//!
//! The planner spills mapped rows because the diff is only known once the whole model is
//! read. On a run where few rows changed, almost all of that spill (its framing, its
//! compression, its row index) is for rows that will never be read back. Each store's diff
//! already streams the stored pairs out while the model is read; [`StoredPairsSample`] keeps
//! up to [`BUDGET_BYTES`] of them (none of a state over four times that) and hands them to the
//! planner as [`StoredPairs`] once the read is done (not before: only a finished read knows
//! that every pair it saw is the live one). A row whose key hash and fingerprint are in it is
//! unchanged: the diff will say so too, since it compares the same pairs, so the row is not
//! spilled. Rows read before the pairs arrive, and rows of keys left out of the sample, are
//! spilled as before: the sample only ever saves work, it never decides what is sent.
//!
//! A key is matched on the top 64 bits of its 128-bit hash and its whole fingerprint: a
//! changed row is left out only if another stored key shares those 64 bits and its stored
//! fingerprint equals this row's new one (odds about 2^-128 a row).

use tokio::sync::oneshot;

use super::hash_buckets::HashBuckets;

/// Memory the sample may hold: 16 bytes a pair, so about 1,000,000 stored rows; what the
/// plan's peak memory grows by at most, whatever the row count.
pub const BUDGET_BYTES: usize = 16 * 1024 * 1024;

/// Bytes a pair takes.
const PAIR_BYTES: usize = 16;

/// Pairs the sample holds at most.
const MAX_PAIRS: usize = BUDGET_BYTES / PAIR_BYTES;

/// Stored rows past which no sample is taken: the budget would hold less than a quarter of
/// them, too few rows left out to pay for the memory (and a 100,000,000-row plan's peak
/// memory has no room for it).
const MAX_STORED_ROWS: u64 = 4 * MAX_PAIRS as u64;

/// Bits of the key hash that pick a slice of the sorted pairs (the directory).
const DIRECTORY_BITS: u32 = 16;

/// Stored pairs in memory, sorted by key hash, with a directory on the hash's top bits, and
/// which of them a row of this run matched already.
#[derive(Debug, Default)]
pub struct StoredPairs {
    /// Top 64 bits of the key hash, and the fingerprint, sorted.
    pairs: Vec<(u64, u64)>,
    /// For each value of the hash's top [`DIRECTORY_BITS`] bits, where its pairs start
    /// (one more entry at the end: the number of pairs).
    directory: Vec<u32>,
    /// One bit a pair: a row of this run matched it.
    matched: Vec<u64>,
}

impl StoredPairs {
    fn from_pairs(mut pairs: Vec<(u64, u64)>) -> StoredPairs {
        pairs.sort_unstable();
        let slots = 1usize << DIRECTORY_BITS;
        let mut directory = Vec::with_capacity(slots + 1);
        let mut at = 0usize;
        for slot in 0..slots {
            while pairs
                .get(at)
                .is_some_and(|&(hash, _)| ((hash >> (64 - DIRECTORY_BITS)) as usize) < slot)
            {
                at += 1;
            }
            // At most MAX_PAIRS pairs, far below u32::MAX.
            directory.push(at as u32);
        }
        directory.push(pairs.len() as u32);
        let matched = vec![0; pairs.len().div_ceil(64)];
        StoredPairs {
            pairs,
            directory,
            matched,
        }
    }

    /// Pairs held.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// True when no pair is held.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// True when the store holds this key hash with this fingerprint and no earlier row of
    /// the run matched it: the row is unchanged, and the first of its key. A second row of
    /// the same key (a duplicate) gets false, so at least one row of every duplicated key is
    /// spilled and can be named in the rejection.
    pub fn take_unchanged(&mut self, key_hash: u128, fingerprint: u64) -> bool {
        let Some(at) = self.position(key_hash) else {
            return false;
        };
        let (word, bit) = (at / 64, 1u64 << (at % 64));
        if self.pairs[at].1 != fingerprint || self.matched[word] & bit != 0 {
            return false;
        }
        self.matched[word] |= bit;
        true
    }

    /// Marks this key as having a row that is not taken (a rejected row), so that no later
    /// row of it is taken as unchanged either: the key is a duplicate, to be named from a
    /// spilled row. True when an earlier row of the key was taken already (and so not
    /// spilled).
    pub fn claim(&mut self, key_hash: u128) -> bool {
        let Some(at) = self.position(key_hash) else {
            return false;
        };
        let (word, bit) = (at / 64, 1u64 << (at % 64));
        let taken = self.matched[word] & bit != 0;
        self.matched[word] |= bit;
        taken
    }

    /// Where the pair of this key hash is held, if it is.
    fn position(&self, key_hash: u128) -> Option<usize> {
        let top = (key_hash >> 64) as u64;
        let slot = (top >> (64 - DIRECTORY_BITS)) as usize;
        let (&start, &end) = (self.directory.get(slot)?, self.directory.get(slot + 1)?);
        let (start, end) = (start as usize, end as usize);
        let found = self.pairs[start..end].iter().position(|&(hash, _)| hash == top)?;
        Some(start + found)
    }
}

/// The pairs sent to `from`, if they arrived (once: `from` is emptied then).
pub(crate) fn arrived(from: &mut Option<oneshot::Receiver<StoredPairs>>) -> Option<StoredPairs> {
    let pairs = from.as_mut()?.try_recv().ok()?;
    *from = None;
    Some(pairs)
}

/// Collects stored pairs as a store's diff reads them, in any order, up to the budget, and
/// sends them as [`StoredPairs`] once the read ends ([`StoredPairsSample::finish`]).
#[derive(Debug)]
pub struct StoredPairsSample {
    pairs: Vec<(u64, u64)>,
    /// Pairs pushed, kept or not.
    pushed: u64,
    /// `None` once sent, or once the read passed [`MAX_STORED_ROWS`] (nothing is sent then).
    to: Option<oneshot::Sender<StoredPairs>>,
}

impl StoredPairsSample {
    /// A sample of a read of about `stored_rows` pairs (0 when not known), and where its
    /// pairs arrive. Its memory is taken at once when the count is known, so that growing it
    /// never holds two copies; past [`MAX_STORED_ROWS`] no sample is taken.
    pub fn new(stored_rows: u64) -> (StoredPairsSample, oneshot::Receiver<StoredPairs>) {
        let (to, from) = oneshot::channel();
        let mut sample = StoredPairsSample {
            pairs: Vec::new(),
            pushed: 0,
            to: Some(to),
        };
        if stored_rows > MAX_STORED_ROWS {
            sample.give_up();
        } else {
            sample
                .pairs
                .reserve_exact(usize::try_from(stored_rows).unwrap_or(MAX_PAIRS).min(MAX_PAIRS));
        }
        (sample, from)
    }

    /// Adds a stored pair, unless the budget is full.
    pub fn push(&mut self, key_hash: u128, fingerprint: u64) {
        if self.to.is_none() {
            return;
        }
        self.pushed += 1;
        if self.pushed > MAX_STORED_ROWS {
            self.give_up();
        } else if self.pairs.len() < MAX_PAIRS {
            self.pairs.push(((key_hash >> 64) as u64, fingerprint));
        }
    }

    /// Takes no sample: frees what was collected and will send nothing.
    fn give_up(&mut self) {
        self.to = None;
        self.pairs = Vec::new();
    }

    /// Forgets the pairs collected: the read starts over.
    pub fn clear(&mut self) {
        self.pairs.clear();
        self.pushed = 0;
    }

    /// The read is over: sends what was collected (once).
    pub fn finish(&mut self) {
        if let Some(to) = self.to.take() {
            let pairs = StoredPairs::from_pairs(std::mem::take(&mut self.pairs));
            // The planner may have finished reading the model and dropped its end: the pairs
            // are then of no use.
            let _ = to.send(pairs);
        }
    }
}

/// The stored side of a store's diff: every stored pair into disk buckets, and into the
/// planner's sample when there is one. Every store's read of its state goes through it.
#[derive(Debug)]
pub(crate) struct StoredBuckets {
    buckets: HashBuckets,
    sample: Option<StoredPairsSample>,
}

impl StoredBuckets {
    /// Empty buckets, feeding `sample`.
    pub(crate) fn new(sample: Option<StoredPairsSample>) -> std::io::Result<StoredBuckets> {
        Ok(StoredBuckets {
            buckets: HashBuckets::new()?,
            sample,
        })
    }

    /// Adds a stored pair.
    pub(crate) fn push(&mut self, key_hash: u128, fingerprint: u64) -> std::io::Result<()> {
        if let Some(sample) = self.sample.as_mut() {
            sample.push(key_hash, fingerprint);
        }
        self.buckets.push(key_hash, fingerprint)
    }

    /// The read is over: sends the sample and hands back the buckets.
    pub(crate) fn finish(mut self) -> HashBuckets {
        if let Some(sample) = self.sample.as_mut() {
            sample.finish();
        }
        self.buckets
    }

    /// The read must start over: the sample, emptied, for the next read (the buckets are
    /// dropped).
    pub(crate) fn restart(self) -> Option<StoredPairsSample> {
        self.sample.map(|mut sample| {
            sample.clear();
            sample
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(n: u128) -> u128 {
        n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    }

    #[test]
    fn a_stored_pair_is_taken_once_and_only_with_its_own_fingerprint() {
        let (mut sample, mut from) = StoredPairsSample::new(0);
        for n in 0..50_000u128 {
            sample.push(spread(n), n as u64);
        }
        sample.finish();
        let mut pairs = from.try_recv().unwrap();
        assert_eq!(pairs.len(), 50_000);
        for n in 0..50_000u128 {
            assert!(
                !pairs.take_unchanged(spread(n), n as u64 + 1),
                "another fingerprint: changed"
            );
            assert!(pairs.take_unchanged(spread(n), n as u64), "pair {n} not found");
            assert!(
                !pairs.take_unchanged(spread(n), n as u64),
                "a second row of the key is not taken"
            );
        }
        for n in 50_000..51_000u128 {
            assert!(
                !pairs.take_unchanged(spread(n), n as u64),
                "a key not stored is not unchanged"
            );
            assert!(!pairs.claim(spread(n)), "a key not stored is never taken");
        }
    }

    #[test]
    fn a_claimed_key_is_not_taken_and_a_taken_key_is_told() {
        let (mut sample, mut from) = StoredPairsSample::new(0);
        for n in 0..3u128 {
            sample.push(spread(n), 1);
        }
        sample.finish();
        let mut pairs = from.try_recv().unwrap();
        assert!(!pairs.claim(spread(0)), "no row of it taken before");
        assert!(
            !pairs.take_unchanged(spread(0), 1),
            "claimed: its unchanged row is spilled"
        );
        assert!(pairs.take_unchanged(spread(1), 1));
        assert!(pairs.claim(spread(1)), "its unchanged row was not spilled");
        assert!(!pairs.claim(spread(7)), "not stored");
    }

    #[test]
    fn keys_at_both_ends_of_the_hash_range_are_found() {
        let (mut sample, mut from) = StoredPairsSample::new(0);
        for hash in [0u128, 1 << 64, u128::MAX, u128::MAX << 64] {
            sample.push(hash, 7);
        }
        sample.finish();
        let mut pairs = from.try_recv().unwrap();
        assert!(pairs.take_unchanged(0, 7));
        assert!(pairs.take_unchanged(1 << 64, 7));
        assert!(pairs.take_unchanged(u128::MAX, 7));
        assert!(
            !pairs.take_unchanged(u128::MAX, 7),
            "same top 64 bits: already taken"
        );
        assert!(!pairs.take_unchanged(u128::MAX - (1 << 64), 7));
    }

    #[test]
    fn the_sample_holds_no_more_than_its_budget_and_is_sent_once_when_the_read_ends() {
        let (mut sample, mut from) = StoredPairsSample::new(0);
        for n in 0..=MAX_PAIRS as u128 {
            sample.push(spread(n), 1);
        }
        assert!(from.try_recv().is_err(), "not sent before the read ends");
        sample.finish();
        sample.finish();
        let mut pairs = from.try_recv().unwrap();
        assert!(from.try_recv().is_err(), "sent once");
        assert_eq!(pairs.len(), MAX_PAIRS);
        assert!(
            !pairs.take_unchanged(spread(MAX_PAIRS as u128), 1),
            "a pair past the budget is not held"
        );
        assert!(pairs.take_unchanged(spread(0), 1));
    }

    #[test]
    fn no_sample_is_taken_of_a_state_four_times_the_budget() {
        let (_, mut from) = StoredPairsSample::new(MAX_STORED_ROWS + 1);
        assert!(from.try_recv().is_err(), "a count known too large: nothing sent");
        let (mut sample, mut from) = StoredPairsSample::new(0);
        for n in 0..=MAX_STORED_ROWS as u128 {
            sample.push(spread(n), 1);
        }
        assert!(sample.pairs.capacity() == 0, "the collected pairs are freed");
        sample.finish();
        assert!(
            from.try_recv().is_err(),
            "a read that passed the limit: nothing sent"
        );
    }

    #[test]
    fn a_cleared_sample_forgets_what_it_collected() {
        let (mut sample, mut from) = StoredPairsSample::new(0);
        sample.push(spread(1), 1);
        sample.clear();
        sample.push(spread(2), 2);
        sample.finish();
        let mut pairs = from.try_recv().unwrap();
        assert_eq!(pairs.len(), 1);
        assert!(!pairs.take_unchanged(spread(1), 1));
        assert!(pairs.take_unchanged(spread(2), 2));
    }

    #[test]
    fn an_empty_sample_holds_nothing() {
        let (mut sample, mut from) = StoredPairsSample::new(0);
        sample.finish();
        let mut pairs = from.try_recv().unwrap();
        assert!(pairs.is_empty());
        assert!(!pairs.take_unchanged(spread(3), 3));
    }
}

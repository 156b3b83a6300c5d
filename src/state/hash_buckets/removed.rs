//! The key hashes of the stored rows a comparison found removed, in ascending order, kept in
//! [`DiskBuckets`] by their top byte like every other set of hashes here: 16 bytes a row of
//! local disk, not of memory. The stores read them back a bucket at a time, beside their own
//! entries, to find the removed rows' keys and identities.

use std::io;

use super::{DiskBuckets, bucket_of};

/// Bytes each bucket buffers before writing: 256 hashes (1 MiB for all 256 buckets).
const CHUNK: usize = 4096;

/// Bytes per hash on disk.
const HASH: usize = 16;

/// Removed key hashes, ascending.
#[derive(Debug, Default)]
pub struct RemovedHashes {
    /// One set of buckets per comparing thread, in the order of their ranges of buckets.
    parts: Vec<DiskBuckets>,
    len: u64,
    /// The lowest and the highest hash so far: the next one must be above the highest, and a
    /// part appended after these must start above it.
    first: Option<u128>,
    last: Option<u128>,
}

impl RemovedHashes {
    /// How many hashes there are.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `hashes`, ascending and above every hash added before; out of order is an
    /// `InvalidInput` error (a store would then look the rows up in the wrong places).
    pub fn extend(&mut self, hashes: &[u128]) -> io::Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        if self.parts.is_empty() {
            self.parts.push(DiskBuckets::new(CHUNK)?);
        }
        let last_part = self.parts.len() - 1;
        let part = &mut self.parts[last_part];
        for &hash in hashes {
            if self.last.is_some_and(|last| hash <= last) {
                return Err(out_of_order());
            }
            self.first.get_or_insert(hash);
            self.last = Some(hash);
            self.len += 1;
            part.push(bucket_of(hash), &hash.to_le_bytes())?;
        }
        Ok(())
    }

    /// Moves `other`'s hashes after these; they must all be above them.
    pub fn append(&mut self, other: &mut RemovedHashes) -> io::Result<()> {
        if let (Some(last), Some(first)) = (self.last, other.first)
            && first <= last
        {
            return Err(out_of_order());
        }
        self.parts.append(&mut other.parts);
        self.len += std::mem::take(&mut other.len);
        self.first = self.first.or(other.first.take());
        self.last = other.last.take().or(self.last);
        Ok(())
    }

    /// The hashes a bucket at a time, ascending: each bucket (top byte) that holds some, with
    /// its hashes; memory holds one bucket's.
    pub fn buckets(&self) -> impl Iterator<Item = io::Result<(u8, Vec<u128>)>> + '_ {
        self.parts.iter().flat_map(|part| {
            (0..=u8::MAX)
                .filter(|&bucket| part.bucket_bytes(usize::from(bucket)) > 0)
                .map(|bucket| {
                    let mut bytes = Vec::new();
                    part.read_bucket(usize::from(bucket), &mut bytes)?;
                    let hashes = bytes
                        .chunks_exact(HASH)
                        .map(|b| {
                            let mut hash = [0u8; HASH];
                            hash.copy_from_slice(b);
                            u128::from_le_bytes(hash)
                        })
                        .collect();
                    Ok((bucket, hashes))
                })
        })
    }

    /// The hashes one by one, ascending, read a bucket at a time (a bucket that cannot be
    /// read yields its error in its place).
    pub fn iter(&self) -> impl Iterator<Item = io::Result<u128>> + '_ {
        self.buckets().flat_map(|bucket| {
            let (hashes, failed) = match bucket {
                Ok((_, hashes)) => (hashes, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            hashes.into_iter().map(Ok).chain(failed.map(Err))
        })
    }
}

fn out_of_order() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "removed key hashes came out of order",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(hashes: &RemovedHashes) -> Vec<u128> {
        let mut all = Vec::new();
        for bucket in hashes.buckets() {
            let (n, keys) = bucket.unwrap();
            assert!(keys.iter().all(|&h| bucket_of(h) == n));
            all.extend(keys);
        }
        all
    }

    #[test]
    fn hashes_on_disk_read_back_a_bucket_at_a_time_in_order() {
        let mut low = RemovedHashes::default();
        let mut high = RemovedHashes::default();
        // 65,536 hashes (1 MiB) in each of buckets 0 to 2, then 10 in bucket 255.
        let spread = 1u128 << 104;
        let first: Vec<u128> = (0..(1u128 << 17) + 5).map(|n| n * spread + n).collect();
        let second: Vec<u128> = (0..10u128).map(|n| (255 << 120) + n).collect();
        low.extend(&first[..100]).unwrap();
        low.extend(&first[100..]).unwrap();
        high.extend(&second).unwrap();
        low.append(&mut high).unwrap();
        assert!(high.is_empty());
        assert_eq!(low.len(), (first.len() + second.len()) as u64);
        let expected: Vec<u128> = first.iter().chain(&second).copied().collect();
        assert_eq!(all(&low), expected);
        assert_eq!(all(&low), expected, "a second read starts from the first");
        assert!(all(&RemovedHashes::default()).is_empty());
    }

    #[test]
    fn hashes_out_of_order_are_refused() {
        let mut hashes = RemovedHashes::default();
        hashes.extend(&[5, 9]).unwrap();
        assert!(hashes.extend(&[9]).is_err());
        assert!(hashes.extend(&[4]).is_err());
        let mut lower = RemovedHashes::default();
        lower.extend(&[7]).unwrap();
        assert!(hashes.append(&mut lower).is_err());
        let mut empty = RemovedHashes::default();
        hashes.append(&mut empty).unwrap();
        assert_eq!(all(&hashes), [5, 9]);
        empty.append(&mut hashes).unwrap();
        assert_eq!(all(&empty), [5, 9]);
    }
}

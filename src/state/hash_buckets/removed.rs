//! The key hashes of the stored rows a comparison found removed, in ascending order: up to
//! 1 MiB of them a part in memory, the rest appended to a temporary file, so a model that lost
//! most of its rows costs 16 bytes a row of local disk, not of memory. The stores then walk
//! them in order beside their own entries to read the removed rows' keys and identities.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;

/// Hashes a part holds in memory before it writes them (1 MiB).
const HELD: usize = 1 << 16;

/// Bytes per hash on disk.
const HASH: usize = 16;

/// Removed key hashes, ascending.
#[derive(Debug, Default)]
pub struct RemovedHashes {
    /// Parts in ascending order: one per comparing thread, each on disk then in memory.
    parts: Vec<Part>,
    len: u64,
    /// The highest hash so far, which the next one must be above.
    last: Option<u128>,
}

#[derive(Debug, Default)]
struct Part {
    file: Option<File>,
    /// Hashes written to `file`.
    written: u64,
    held: Vec<u128>,
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
        if self.parts.is_empty() {
            self.parts.push(Part::default());
        }
        let last_part = self.parts.len() - 1;
        let part = &mut self.parts[last_part];
        for &hash in hashes {
            if self.last.is_some_and(|last| hash <= last) {
                return Err(out_of_order());
            }
            self.last = Some(hash);
            self.len += 1;
            part.held.push(hash);
            if part.held.len() == HELD {
                part.write_held()?;
            }
        }
        Ok(())
    }

    /// Moves `other`'s hashes after these; they must all be above them.
    pub fn append(&mut self, other: &mut RemovedHashes) -> io::Result<()> {
        let first = other.parts.first().and_then(|p| p.first());
        if let (Some(last), Ok(Some(first))) = (self.last, first.transpose())
            && first <= last
        {
            return Err(out_of_order());
        }
        self.parts.append(&mut other.parts);
        self.len += std::mem::take(&mut other.len);
        self.last = other.last.take().or(self.last);
        Ok(())
    }

    /// The hashes in ascending order; each call reads from the first.
    pub fn iter(&self) -> impl Iterator<Item = io::Result<u128>> + '_ {
        self.parts.iter().flat_map(Part::iter)
    }
}

impl Part {
    fn write_held(&mut self) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(tempfile::tempfile()?),
        };
        let mut bytes = Vec::with_capacity(self.held.len() * HASH);
        for hash in self.held.drain(..) {
            bytes.extend_from_slice(&hash.to_le_bytes());
        }
        file.write_all(&bytes)?;
        self.written += (bytes.len() / HASH) as u64;
        Ok(())
    }

    /// The part's first hash, reading it from disk if it was written.
    fn first(&self) -> Option<io::Result<u128>> {
        self.iter().next()
    }

    /// The part's hashes: those on disk, read `HELD` at a time, then those held.
    fn iter(&self) -> impl Iterator<Item = io::Result<u128>> + '_ {
        let mut next = 0u64;
        let mut chunk: std::vec::IntoIter<u128> = Vec::new().into_iter();
        let mut failed = false;
        let on_disk = std::iter::from_fn(move || {
            if let Some(hash) = chunk.next() {
                return Some(Ok(hash));
            }
            let file = self.file.as_ref()?;
            if failed || next == self.written {
                return None;
            }
            let count = (self.written - next).min(HELD as u64);
            let mut bytes = vec![0u8; count as usize * HASH];
            if let Err(e) = file.read_exact_at(&mut bytes, next * HASH as u64) {
                failed = true;
                return Some(Err(e));
            }
            next += count;
            chunk = bytes
                .chunks_exact(HASH)
                .map(|b| {
                    let mut hash = [0u8; HASH];
                    hash.copy_from_slice(b);
                    u128::from_le_bytes(hash)
                })
                .collect::<Vec<_>>()
                .into_iter();
            chunk.next().map(Ok)
        });
        on_disk.chain(self.held.iter().copied().map(Ok))
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
        hashes.iter().collect::<io::Result<_>>().unwrap()
    }

    #[test]
    fn parts_past_a_mebibyte_go_to_disk_and_read_back_in_order() {
        let mut low = RemovedHashes::default();
        let mut high = RemovedHashes::default();
        let first: Vec<u128> = (0..(HELD as u128 * 2 + 5)).map(|n| n * 3).collect();
        let second: Vec<u128> = (0..10u128).map(|n| (1 << 100) + n).collect();
        low.extend(&first[..100]).unwrap();
        low.extend(&first[100..]).unwrap();
        high.extend(&second).unwrap();
        assert_eq!(low.parts[0].written, HELD as u64 * 2);
        assert_eq!(low.parts[0].held.len(), 5);
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

//! A key's change as the folds carry it (its hash, key, and the fingerprint and identity
//! put, or a remove), and the record it is written as: in a fold's local spool files and in
//! the packed checkpoints of `backflow_checkpoints`.
//!
//! A record: the key hash (16 bytes), the fingerprint (i64, 0 for a remove), a flag (1: put,
//! 0: remove), the key's length (u32) and the key, then for a put the identity's length and
//! the identity; every number big-endian.

use std::io::{Read, Write};

use super::blocks::FoldError;
use super::copy_tuples::Malformed;

/// The change of a key, its bytes borrowed or owned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Change<B = Vec<u8>> {
    /// The key's hash (`key_hash` as a big-endian number).
    pub hash: u128,
    /// The canonical key.
    pub key: B,
    /// The fingerprint and identity put; `None` for a remove.
    pub put: Option<(i64, B)>,
}

/// A length as the u32 a record stores.
pub(super) fn length(bytes: &[u8]) -> Result<[u8; 4], Malformed> {
    u32::try_from(bytes.len())
        .map(u32::to_be_bytes)
        .map_err(|_| Malformed("a key or identity over 4 GiB"))
}

impl<B: AsRef<[u8]>> Change<B> {
    /// Bytes of the change's record.
    pub fn record_length(&self) -> u64 {
        let identity = self.put.as_ref().map_or(0, |(_, i)| 4 + i.as_ref().len() as u64);
        29 + self.key.as_ref().len() as u64 + identity
    }

    /// Writes the change as a record.
    pub fn write(&self, out: &mut impl Write) -> Result<(), FoldError> {
        out.write_all(&self.hash.to_be_bytes())?;
        let (fingerprint, identity) = match &self.put {
            Some((fingerprint, identity)) => (*fingerprint, Some(identity.as_ref())),
            None => (0, None),
        };
        out.write_all(&fingerprint.to_be_bytes())?;
        out.write_all(&[u8::from(identity.is_some())])?;
        for text in [Some(self.key.as_ref()), identity].into_iter().flatten() {
            out.write_all(&length(text)?)?;
            out.write_all(text)?;
        }
        Ok(())
    }
}

/// True when `hash` lies below `upper` (`None`: no bound).
pub(super) fn below(hash: u128, upper: Option<u128>) -> bool {
    upper.is_none_or(|u| hash < u)
}

/// Records read back in order, one looked ahead, from `length` bytes of `input`: a record that
/// runs past them, or says a text is longer than what is left, is refused before anything is
/// allocated for it. The two changes held (the one looked ahead and the one last taken) keep
/// their buffers for the records read after them: reading allocates nothing once they have
/// grown to the longest key and identity.
pub(super) struct Changes<R: Read> {
    input: R,
    left: u64,
    /// The next change, looked ahead.
    next: Option<Change>,
    /// The change last taken.
    taken: Change,
}

impl<R: Read> Changes<R> {
    /// The records of the first `length` bytes of `input`.
    pub fn new(input: R, length: u64) -> Result<Changes<R>, FoldError> {
        let mut changes = Changes {
            input,
            left: length,
            next: None,
            taken: Change::default(),
        };
        let mut first = Change::default();
        if changes.read(&mut first)? {
            changes.next = Some(first);
        }
        Ok(changes)
    }

    fn take(&mut self, bytes: &mut [u8]) -> Result<(), FoldError> {
        let wanted = bytes.len() as u64;
        if wanted > self.left {
            return Err(Malformed("a packed change runs past the end of its data").into());
        }
        self.input.read_exact(bytes)?;
        self.left -= wanted;
        Ok(())
    }

    /// Reads a text after its length into `bytes`.
    fn text(&mut self, bytes: &mut Vec<u8>) -> Result<(), FoldError> {
        let mut length = [0u8; 4];
        self.take(&mut length)?;
        let length = u64::from(u32::from_be_bytes(length));
        if length > self.left {
            return Err(Malformed("a packed change's text runs past the end of its data").into());
        }
        // At most the bytes left, checked above.
        bytes.clear();
        bytes.resize(length as usize, 0);
        self.take(bytes)
    }

    /// Reads the next record into `into`, reusing its buffers; false at the end.
    fn read(&mut self, into: &mut Change) -> Result<bool, FoldError> {
        if self.left == 0 {
            return Ok(false);
        }
        let mut fixed = [0u8; 25];
        self.take(&mut fixed)?;
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&fixed[..16]);
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&fixed[16..24]);
        into.hash = u128::from_be_bytes(hash);
        self.text(&mut into.key)?;
        let mut identity = into.put.take().map(|(_, identity)| identity).unwrap_or_default();
        match fixed[24] {
            1 => {
                self.text(&mut identity)?;
                into.put = Some((i64::from_be_bytes(fingerprint), identity));
            }
            0 => {}
            _ => return Err(Malformed("a packed change's flag is neither put nor remove").into()),
        }
        Ok(true)
    }

    /// The next change, if its key hash is below `upper` (`None`: no bound).
    pub fn next_below(&mut self, upper: Option<u128>) -> Result<Option<&Change>, FoldError> {
        let Some(next) = self.next.as_mut().filter(|c| below(c.hash, upper)) else {
            return Ok(None);
        };
        // The change taken now moves to `taken`, whose buffers take the record after it.
        std::mem::swap(next, &mut self.taken);
        let mut after = std::mem::take(next);
        let more = self.read(&mut after)?;
        self.next = more.then_some(after);
        Ok(Some(&self.taken))
    }

    /// The change [`Self::next_below`] last took (an empty one before the first).
    pub fn taken(&self) -> &Change {
        &self.taken
    }

    /// The key hash of the next change, if any.
    pub fn peek_hash(&self) -> Option<u128> {
        self.next.as_ref().map(|c| c.hash)
    }
}

/// A source of changes in key-hash order, one per key: what a fold applies.
pub(super) trait SortedChanges {
    /// The next change; `None` at the end.
    fn next_change(&mut self) -> Result<Option<&Change>, FoldError>;
}

impl<R: Read> SortedChanges for Changes<R> {
    fn next_change(&mut self) -> Result<Option<&Change>, FoldError> {
        self.next_below(None)
    }
}

#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// A put of key `k{n}`, its hash `n << 64`.
    pub fn put(n: u128, fingerprint: i64) -> Change {
        Change {
            hash: n << 64,
            key: format!("k{n}").into_bytes(),
            put: Some((fingerprint, format!("{{\"n\":{n}}}").into_bytes())),
        }
    }

    /// A remove of key `k{n}`.
    pub fn remove(n: u128) -> Change {
        Change {
            hash: n << 64,
            key: format!("k{n}").into_bytes(),
            put: None,
        }
    }

    /// `changes` written as records.
    pub fn records(changes: &[Change]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in changes {
            c.write(&mut out).unwrap();
        }
        out
    }

    /// `changes` written, ready to be read back.
    pub fn spooled(changes: &[Change]) -> Changes<std::io::Cursor<Vec<u8>>> {
        let out = records(changes);
        let length = out.len() as u64;
        Changes::new(std::io::Cursor::new(out), length).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn changes_are_written_and_read_back_in_order() {
        let list = vec![put(1, 5), remove(2), put(3, -7)];
        let mut changes = spooled(&list);
        assert_eq!(changes.next_below(Some(2 << 64)).unwrap(), Some(&list[0]));
        assert_eq!(changes.next_below(Some(2 << 64)).unwrap(), None);
        assert_eq!(changes.next_below(None).unwrap(), Some(&list[1]));
        assert_eq!(changes.next_below(None).unwrap(), Some(&list[2]));
        assert_eq!(changes.next_below(None).unwrap(), None);
    }

    #[test]
    fn a_record_cut_short_or_too_long_is_refused_without_allocating_its_length() {
        let whole = records(&[put(1, 5), put(2, 6)]);
        for cut in 1..whole.len() {
            let length = cut as u64;
            let read = Changes::new(std::io::Cursor::new(whole[..cut].to_vec()), length)
                .and_then(|mut c| while_some(&mut c));
            // Cut at the boundary between the records, the first one reads whole.
            let boundary = records(&[put(1, 5)]).len();
            assert_eq!(read.is_ok(), cut == boundary, "cut at {cut}");
        }
        // A key length of u32::MAX with a few bytes behind it.
        let mut huge = records(&[put(1, 5)]);
        huge[25..29].copy_from_slice(&u32::MAX.to_be_bytes());
        let length = huge.len() as u64;
        assert!(matches!(
            Changes::new(std::io::Cursor::new(huge), length),
            Err(FoldError::Malformed(_))
        ));
        // A flag that is neither 0 nor 1.
        let mut flag = records(&[put(1, 5)]);
        flag[24] = 7;
        let length = flag.len() as u64;
        assert!(matches!(
            Changes::new(std::io::Cursor::new(flag), length),
            Err(FoldError::Malformed(_))
        ));
    }

    fn while_some<R: Read>(changes: &mut Changes<R>) -> Result<(), FoldError> {
        while changes.next_change()?.is_some() {}
        Ok(())
    }
}

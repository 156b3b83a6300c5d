//! The key and identity of the stored rows a `mirror` run may delete, sorted by key, held in
//! memory up to a budget and beyond it in sorted runs on local disk.
//!
//! A store's diff pushes the removed rows in whatever order it finds them; [`RemovedRows`]
//! reads them back in key order (then identity), merging the runs as it goes. So a model that
//! lost most of its 100 million rows costs local disk, not memory: the engine reads the list
//! once to decide the delete guard and again, batch by batch, to send the deletes, and memory
//! holds one run being filled (`RUN_BYTES`) or a read buffer per run.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufRead as _, BufReader, Read, Write as _};
use std::os::unix::fs::FileExt as _;

use super::codec::{put_str, read_string};

/// Bytes of rows (text plus `ROW_OVERHEAD` each) held in memory before they are sorted and
/// written as a run.
const RUN_BYTES: usize = 8 << 20;

/// What a held row costs beside its text: two `String`s and their allocations.
const ROW_OVERHEAD: usize = 64;

/// Bytes read from a run at a time while merging.
const READ_CHUNK: usize = 64 << 10;

/// Removed rows, as a store's diff listed them; read them with [`RemovedRows::iter`].
#[derive(Debug, Default)]
pub struct RemovedRows {
    /// The last run, never written: sorted once `finish` is called.
    held: Vec<(String, String)>,
    held_bytes: usize,
    /// The runs written so far, as byte ranges of `file`, each sorted.
    runs: Vec<(u64, u64)>,
    file: Option<File>,
    len: u64,
    /// `finish` was called: the list may be read.
    finished: bool,
}

impl RemovedRows {
    /// An empty list that rows are pushed into; call [`RemovedRows::finish`] before reading.
    pub fn new() -> RemovedRows {
        RemovedRows::default()
    }

    /// Adds a row: its key and identity JSON.
    pub fn push(&mut self, key: String, identity: String) -> io::Result<()> {
        self.held_bytes = self
            .held_bytes
            .saturating_add(key.len() + identity.len() + ROW_OVERHEAD);
        self.held.push((key, identity));
        self.len += 1;
        if self.held_bytes >= RUN_BYTES {
            self.write_run()?;
        }
        Ok(())
    }

    /// Sorts what is held: the list is ready to read.
    pub fn finish(mut self) -> io::Result<RemovedRows> {
        if !self.runs.is_empty() && !self.held.is_empty() {
            self.write_run()?;
        } else {
            self.held.sort_unstable();
        }
        self.finished = true;
        Ok(self)
    }

    /// How many rows the list holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the list holds no row.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rows, `(key, identity)`, in order; each call reads them from the start. A list
    /// that was pushed to but not finished reads as an error, never as part of its rows.
    pub fn iter(&self) -> impl Iterator<Item = io::Result<(String, String)>> + '_ {
        let unfinished = !self.finished && self.len > 0;
        let mut merge = Merge {
            runs: Vec::with_capacity(self.runs.len()),
            heads: BinaryHeap::with_capacity(self.runs.len()),
            held: self.held.iter(),
            failed: unfinished
                .then(|| io::Error::other("the removed rows were read before they were sorted")),
        };
        if let Some(file) = &self.file {
            for &(start, end) in &self.runs {
                merge.runs.push(RunReader {
                    input: BufReader::with_capacity(
                        READ_CHUNK,
                        RunBytes {
                            file,
                            next: start,
                            end,
                        },
                    ),
                });
            }
        }
        for run in 0..merge.runs.len() {
            merge.refill(run);
        }
        merge
    }

    /// Sorts the held rows and appends them to the file as one run.
    fn write_run(&mut self) -> io::Result<()> {
        self.held.sort_unstable();
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(tempfile::tempfile()?),
        };
        let mut bytes = Vec::with_capacity(self.held_bytes);
        for (key, identity) in self.held.drain(..) {
            put_str(&mut bytes, &key);
            put_str(&mut bytes, &identity);
        }
        file.write_all(&bytes)?;
        let start = self.runs.last().map_or(0, |&(_, end)| end);
        self.runs.push((start, start + bytes.len() as u64));
        self.held_bytes = 0;
        Ok(())
    }
}

/// One written run, read by position so that several readers may share the file.
struct RunBytes<'a> {
    file: &'a File,
    /// Where the next read starts in the file.
    next: u64,
    end: u64,
}

impl Read for RunBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end - self.next).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        let n = self.file.read_at(&mut buf[..want], self.next)?;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a run of removed rows ends before its length",
            ));
        }
        self.next += n as u64;
        Ok(n)
    }
}

/// A run's rows, as `write_run` encoded them.
struct RunReader<'a> {
    input: BufReader<RunBytes<'a>>,
}

impl RunReader<'_> {
    /// The run's next row, or `None` at its end.
    fn next_row(&mut self) -> io::Result<Option<(String, String)>> {
        if self.input.fill_buf()?.is_empty() {
            return Ok(None);
        }
        let (mut key, mut identity) = (String::new(), String::new());
        read_string(&mut self.input, &mut key)?;
        read_string(&mut self.input, &mut identity)?;
        Ok(Some((key, identity)))
    }
}

/// The runs merged in order, with the held rows (the only source of a list that never
/// outgrew memory).
struct Merge<'a> {
    runs: Vec<RunReader<'a>>,
    /// Each run's next row, smallest first, with the run it came from.
    heads: BinaryHeap<Reverse<(String, String, usize)>>,
    held: std::slice::Iter<'a, (String, String)>,
    failed: Option<io::Error>,
}

impl Merge<'_> {
    fn refill(&mut self, run: usize) {
        match self.runs[run].next_row() {
            Ok(Some((key, identity))) => self.heads.push(Reverse((key, identity, run))),
            Ok(None) => {}
            Err(e) => self.failed = Some(e),
        }
    }
}

impl Iterator for Merge<'_> {
    type Item = io::Result<(String, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            // One error ends the list: the reader cannot know what the run held.
            self.heads.clear();
            self.runs.clear();
            self.held = [].iter();
            return Some(Err(e));
        }
        if self.runs.is_empty() {
            return self.held.next().cloned().map(Ok);
        }
        let Reverse((key, identity, run)) = self.heads.pop()?;
        self.refill(run);
        Some(Ok((key, identity)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(rows: &RemovedRows) -> Vec<(String, String)> {
        rows.iter().collect::<io::Result<_>>().unwrap()
    }

    #[test]
    fn a_small_list_stays_in_memory_and_reads_sorted_any_number_of_times() {
        let mut rows = RemovedRows::new();
        for key in ["c", "a", "b"] {
            rows.push(key.to_owned(), format!("{{\"id\":\"{key}\"}}"))
                .unwrap();
        }
        let rows = rows.finish().unwrap();
        assert!(rows.file.is_none());
        assert_eq!(rows.len(), 3);
        let keys: Vec<String> = listed(&rows).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(listed(&rows).len(), 3, "a second read starts from the start");
        assert!(RemovedRows::new().finish().unwrap().iter().next().is_none());
        assert!(
            RemovedRows::new().iter().next().is_none(),
            "an empty list needs no finish"
        );
        let mut unfinished = RemovedRows::new();
        unfinished.push("a".to_owned(), "{}".to_owned()).unwrap();
        let read: Vec<io::Result<(String, String)>> = unfinished.iter().collect();
        assert!(read.len() == 1 && read[0].is_err(), "never a partial list");
    }

    #[test]
    fn a_list_past_the_budget_is_merged_from_sorted_runs_on_disk() {
        // A third of the keys are 200 KB long: about 40 of them fill a run, so 1,000 rows make
        // some 8 runs.
        let long = "x".repeat(200_000);
        let mut rows = RemovedRows::new();
        let mut expected = Vec::new();
        for i in 0..1000u64 {
            // A scattered order, with a key that repeats under two identities.
            let n = (i * 7919) % 1000;
            let key = format!("{n:04}{}", if n % 3 == 0 { long.as_str() } else { "" });
            let identity = format!("{}", i % 2);
            expected.push((key.clone(), identity.clone()));
            rows.push(key, identity).unwrap();
        }
        let rows = rows.finish().unwrap();
        assert!(rows.runs.len() > 5, "{} runs", rows.runs.len());
        assert!(rows.held.is_empty());
        expected.sort_unstable();
        assert_eq!(rows.len(), 1000);
        let got = listed(&rows);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the merge returns every row once, in order");
        // Two readers at once do not disturb each other.
        let mut a = rows.iter();
        let mut b = rows.iter();
        assert_eq!(a.next().unwrap().unwrap(), b.next().unwrap().unwrap());
        assert_eq!(a.nth(10).unwrap().unwrap(), expected[11]);
        assert_eq!(b.next().unwrap().unwrap(), expected[1]);
    }

    #[test]
    fn a_damaged_run_is_an_error_not_a_shorter_list() {
        let long = "y".repeat(RUN_BYTES);
        let mut rows = RemovedRows::new();
        rows.push(long.clone(), "{}".to_owned()).unwrap();
        rows.push("a".to_owned(), "{}".to_owned()).unwrap();
        let mut rows = rows.finish().unwrap();
        assert_eq!(rows.runs.len(), 2);
        // The second run claims more bytes than the file holds.
        rows.runs[1].1 += 10;
        let read: Vec<io::Result<(String, String)>> = rows.iter().collect();
        assert!(
            read.iter().any(|r| r.is_err()),
            "{:?}",
            read.iter().map(|r| r.is_ok()).collect::<Vec<_>>()
        );
    }
}

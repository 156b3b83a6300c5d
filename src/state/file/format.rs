//! The File store's two files, read and written as streams: nothing here holds a state whole.
//!
//! - State file: `BFST1`, scope (string), row count (u64), the entries (`codec::put_entry`),
//!   then the xxh3-64 of every byte before it (u64). Written to a temporary file, fsynced,
//!   renamed over the old one, and the directory fsynced: a crash leaves the old or the new.
//! - Journal: `BFJR1`, scope, then checkpoints, each `len u32, xxh3-64 u64, payload` of
//!   change records (`codec::encode_change`), fsynced one by one.

use std::fs::{self, File};
use std::io::{BufRead as _, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::state::StateError;
use crate::state::codec::{put_str, read_string, read_u32, read_u64, skip_string};

const STATE_MAGIC: &[u8; 5] = b"BFST1";
const JOURNAL_MAGIC: &[u8; 5] = b"BFJR1";
/// Read and write buffers.
const BUFFER: usize = 1 << 20;

/// A failure to read or write `path`.
pub(super) fn io_error(path: &Path, e: &std::io::Error) -> StateError {
    StateError::Io {
        location: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// `path` holds something that does not decode.
pub(super) fn corrupt(path: &Path, reason: impl Into<String>) -> StateError {
    StateError::Corrupt {
        location: path.display().to_string(),
        reason: reason.into(),
    }
}

/// A state file opened for reading: its scope and row count, then its entries in order. The
/// checksum is checked once the last entry has been read.
pub(super) struct StateFileReader {
    path: PathBuf,
    /// The file without its checksum, hashed as it is buffered.
    body: BufReader<HashingReader<std::io::Take<File>>>,
    len: u64,
    scope: String,
    count: u64,
    read: u64,
    checked: bool,
}

impl StateFileReader {
    /// Opens the state file and reads its header; `None` when there is none.
    pub(super) fn open(path: &Path) -> Result<Option<StateFileReader>, StateError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(path, &e)),
        };
        let len = file.metadata().map_err(|e| io_error(path, &e))?.len();
        if len < (STATE_MAGIC.len() + 8) as u64 {
            return Err(corrupt(path, "not a Backflow state file"));
        }
        let mut reader = StateFileReader {
            path: path.to_owned(),
            body: BufReader::with_capacity(
                BUFFER,
                HashingReader {
                    inner: file.take(len - 8),
                    hasher: Xxh3::new(),
                },
            ),
            len,
            scope: String::new(),
            count: 0,
            read: 0,
            checked: false,
        };
        let mut magic = [0u8; STATE_MAGIC.len()];
        reader
            .body
            .read_exact(&mut magic)
            .map_err(|e| reader.undecodable(&e))?;
        if &magic != STATE_MAGIC {
            return Err(corrupt(path, "not a Backflow state file"));
        }
        let mut scope = String::new();
        read_string(&mut reader.body, &mut scope).map_err(|e| reader.undecodable(&e))?;
        reader.scope = scope;
        reader.count = read_u64(&mut reader.body).map_err(|e| reader.undecodable(&e))?;
        Ok(Some(reader))
    }

    /// What the state was delivered to.
    pub(super) fn scope(&self) -> &str {
        &self.scope
    }

    /// Rows the file holds.
    pub(super) fn count(&self) -> u64 {
        self.count
    }

    /// Size of the file in bytes.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Reads the next entry's key and identity into the buffers and returns its fingerprint;
    /// `None` after the last entry, once the checksum matched.
    pub(super) fn next(
        &mut self,
        key: &mut String,
        identity: &mut String,
    ) -> Result<Option<u64>, StateError> {
        self.next_entry(key, Some(identity))
    }

    /// Like [`StateFileReader::next`], skipping the identity undecoded (a diff needs only
    /// keys and fingerprints).
    pub(super) fn next_key(&mut self, key: &mut String) -> Result<Option<u64>, StateError> {
        self.next_entry(key, None)
    }

    fn next_entry(
        &mut self,
        key: &mut String,
        identity: Option<&mut String>,
    ) -> Result<Option<u64>, StateError> {
        if self.read == self.count {
            if !self.checked {
                self.check_trailer()?;
                self.checked = true;
            }
            return Ok(None);
        }
        let body = &mut self.body;
        let entry = read_u64(body).and_then(|fingerprint| {
            read_string(body, key)?;
            match identity {
                Some(identity) => read_string(body, identity)?,
                None => skip_string(body)?,
            }
            Ok(fingerprint)
        });
        let fingerprint = entry.map_err(|e| self.undecodable(&e))?;
        self.read += 1;
        Ok(Some(fingerprint))
    }

    fn check_trailer(&mut self) -> Result<(), StateError> {
        let left = self.body.fill_buf().map_err(|e| io_error(&self.path, &e))?;
        if !left.is_empty() {
            return Err(corrupt(&self.path, "data after the last entry"));
        }
        let mut trailer = [0u8; 8];
        self.body
            .get_ref()
            .inner
            .get_ref()
            .read_exact_at(&mut trailer, self.len - 8)
            .map_err(|e| io_error(&self.path, &e))?;
        if self.body.get_ref().hasher.digest() != u64::from_le_bytes(trailer) {
            return Err(corrupt(&self.path, "checksum mismatch"));
        }
        Ok(())
    }

    fn undecodable(&self, e: &std::io::Error) -> StateError {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt(&self.path, "truncated file"),
            std::io::ErrorKind::InvalidData => corrupt(&self.path, e.to_string()),
            _ => io_error(&self.path, e),
        }
    }
}

/// A new state file being written beside the old one; [`StateFileWriter::persist`] puts it
/// in place. Dropped unpersisted, it is deleted and the old file stays.
pub(super) struct StateFileWriter {
    path: PathBuf,
    temp: tempfile::TempPath,
    out: BufWriter<HashingWriter<File>>,
}

impl StateFileWriter {
    /// Starts a state file of `count` rows for `scope`; the entries are written next.
    pub(super) fn create(path: &Path, scope: &str, count: u64) -> Result<StateFileWriter, StateError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
        let (file, temp) = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| io_error(dir, &e))?
            .into_parts();
        let mut writer = StateFileWriter {
            path: path.to_owned(),
            temp,
            out: BufWriter::with_capacity(
                BUFFER,
                HashingWriter {
                    inner: file,
                    hasher: Xxh3::new(),
                },
            ),
        };
        let mut header = STATE_MAGIC.to_vec();
        put_str(&mut header, scope);
        header.extend_from_slice(&count.to_le_bytes());
        writer.out.write_all(&header).map_err(|e| io_error(path, &e))?;
        Ok(writer)
    }

    /// Appends entry bytes (`codec::put_entry` records).
    pub(super) fn write_entries(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.out.write_all(bytes).map_err(|e| io_error(&self.path, &e))
    }

    /// Writes the checksum, makes the file durable and renames it over the old state file.
    pub(super) fn persist(self) -> Result<(), StateError> {
        let path = self.path;
        let HashingWriter { mut inner, hasher } =
            self.out.into_inner().map_err(|e| io_error(&path, e.error()))?;
        inner
            .write_all(&hasher.digest().to_le_bytes())
            .and_then(|()| inner.sync_all())
            .map_err(|e| io_error(&path, &e))?;
        self.temp.persist(&path).map_err(|e| io_error(&path, &e.error))?;
        // The rename is durable only once the directory entry is.
        if let Some(dir) = path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Replaces a small file atomically: a temporary file beside it, fsynced, renamed over it,
/// and the directory fsynced.
pub(super) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_error(dir, &e))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| io_error(path, &e))?;
    temp.persist(path).map_err(|e| io_error(path, &e.error))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The header a new journal starts with.
pub(super) fn journal_header(scope: &str) -> Vec<u8> {
    let mut header = JOURNAL_MAGIC.to_vec();
    put_str(&mut header, scope);
    header
}

/// A journal opened for replay.
pub(super) struct JournalReader {
    input: BufReader<File>,
    scope: String,
    /// The last [`JournalReader::next_payload`] found the end of the file where a checkpoint
    /// would start: nothing torn after the checkpoints read.
    clean_end: bool,
}

impl JournalReader {
    /// Opens the journal and reads its header; `None` when there is none, or when its
    /// header is torn (a crash while creating it, before any checkpoint).
    pub(super) fn open(path: &Path) -> Result<Option<JournalReader>, StateError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(path, &e)),
        };
        let mut input = BufReader::with_capacity(BUFFER, file);
        let mut magic = [0u8; JOURNAL_MAGIC.len()];
        let mut scope = String::new();
        if input.read_exact(&mut magic).is_err()
            || &magic != JOURNAL_MAGIC
            || read_string(&mut input, &mut scope).is_err()
        {
            return Ok(None);
        }
        Ok(Some(JournalReader {
            input,
            scope,
            clean_end: false,
        }))
    }

    /// What the checkpoints were delivered to.
    pub(super) fn scope(&self) -> &str {
        &self.scope
    }

    /// After [`JournalReader::next_payload`] returned false: whether the journal ended right
    /// after a whole checkpoint (true), or holds a torn or damaged one (false).
    pub(super) fn ended_cleanly(&self) -> bool {
        self.clean_end
    }

    /// Reads the next whole checkpoint's change records into `payload`. False at the end,
    /// or at a short or damaged record: a torn write, so it and anything after it are
    /// ignored (those rows are sent again).
    pub(super) fn next_payload(&mut self, payload: &mut Vec<u8>) -> bool {
        self.clean_end = self.input.fill_buf().is_ok_and(<[u8]>::is_empty);
        let (Ok(len), Ok(sum)) = (read_u32(&mut self.input), read_u64(&mut self.input)) else {
            return false;
        };
        payload.clear();
        if (&mut self.input)
            .take(u64::from(len))
            .read_to_end(payload)
            .is_err()
            || payload.len() != len as usize
        {
            return false;
        }
        xxhash_rust::xxh3::xxh3_64(payload) == sum
    }
}

/// Frames one checkpoint's change records for the journal.
pub(super) fn journal_record(payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(payload.len() + 12);
    record.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    record.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// Hashes what it reads (in the large blocks its `BufReader` asks for).
struct HashingReader<R: Read> {
    inner: R,
    hasher: Xxh3,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hashes what it writes (in the large blocks its `BufWriter` hands over).
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Xxh3,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

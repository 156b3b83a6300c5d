//! The `File` state store: a directory on local disk, for `backflow run -f`.
//!
//! Per sync, under `DIR/NAMESPACE/`:
//! - `NAME.state`: the compact state, replaced atomically (write a temporary file, fsync,
//!   rename, fsync the directory), so a crash never leaves a torn file; a checksum trailer
//!   catches any other damage.
//! - `NAME.journal`: checkpoints appended during a run, each record length-prefixed and
//!   checksummed and fsynced before the run goes on. A torn last record (a crash mid-write) is
//!   ignored: that checkpoint is sent again. `finish` folds the journal into the state file.
//! - `NAME.lock`: an exclusive lock held while a run uses the state.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use xxhash_rust::xxh3::Xxh3;

use super::codec::{Replay, encode_change, put_entry, put_str, read_entry, read_string, read_u32, read_u64};
use super::{Fingerprints, StateChange, StateError, StateStore};

const STATE_MAGIC: &[u8; 5] = b"BFST1";
const JOURNAL_MAGIC: &[u8; 5] = b"BFJR1";

/// Fingerprints of one sync in a local directory.
#[derive(Debug)]
pub struct FileStore {
    state_path: PathBuf,
    journal_path: PathBuf,
    lock_path: PathBuf,
    lock: Option<File>,
    journal: Option<File>,
}

impl FileStore {
    /// The store of sync `name` in `namespace` under `dir`. Nothing is touched until `load`.
    pub fn new(dir: &Path, namespace: &str, name: &str) -> FileStore {
        let base = dir.join(namespace);
        FileStore {
            state_path: base.join(format!("{name}.state")),
            journal_path: base.join(format!("{name}.journal")),
            lock_path: base.join(format!("{name}.lock")),
            lock: None,
            journal: None,
        }
    }

    /// Path of the compact state file.
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    fn io(&self, e: std::io::Error) -> StateError {
        StateError::Io {
            location: self.state_path.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, path: &Path, reason: impl Into<String>) -> StateError {
        StateError::Corrupt {
            location: path.display().to_string(),
            reason: reason.into(),
        }
    }

    fn acquire_lock(&mut self) -> Result<(), StateError> {
        if self.lock.is_some() {
            return Ok(());
        }
        if let Some(parent) = self.lock_path.parent() {
            fs::create_dir_all(parent).map_err(|e| self.io(e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| self.io(e))?;
        match file.try_lock() {
            Ok(()) => {
                self.lock = Some(file);
                Ok(())
            }
            Err(fs::TryLockError::WouldBlock) => {
                Err(StateError::Locked(self.state_path.display().to_string()))
            }
            Err(fs::TryLockError::Error(e)) => Err(self.io(e)),
        }
    }

    /// Reads the state file and replays the journal on top.
    fn read_all(&self, scope: &str) -> Result<Fingerprints, StateError> {
        let mut set = self.read_state_file(scope)?.unwrap_or_default();
        let mut replay = Replay::default();
        self.replay_journal(scope, &mut set, &mut replay)?;
        Ok(replay.finish(set))
    }

    /// Streams the state file into a set, never holding the file's bytes whole: at a million
    /// rows the file, a vector of entries and the set together tripled peak memory.
    fn read_state_file(&self, scope: &str) -> Result<Option<Fingerprints>, StateError> {
        let file = match File::open(&self.state_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let path = &self.state_path;
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        if len < (STATE_MAGIC.len() + 8) as u64 {
            return Err(self.corrupt(path, "not a Backflow state file"));
        }
        let mut hasher = Xxh3::new();
        let mut body = HashingReader {
            inner: BufReader::with_capacity(1 << 20, &file).take(len - 8),
            hasher: &mut hasher,
        };
        let truncated = |_| self.corrupt(path, "truncated file");
        let mut magic = [0u8; STATE_MAGIC.len()];
        body.read_exact(&mut magic).map_err(truncated)?;
        if &magic != STATE_MAGIC {
            return Err(self.corrupt(path, "not a Backflow state file"));
        }
        let mut text = String::new();
        read_string(&mut body, &mut text).map_err(truncated)?;
        if text != scope {
            tracing::info!(state = %path.display(), "state belongs to another destination; every row will be sent");
            return Ok(None);
        }
        let count = read_u64(&mut body).map_err(truncated)?;
        // Each entry is 16 bytes of numbers around its key and identity: what is left of the
        // file is, to a few bytes, the arena the set needs.
        let rows = usize::try_from(count).unwrap_or(0).min(1 << 28);
        let arena = usize::try_from(len).unwrap_or(0).saturating_sub(rows * 16);
        let mut set = Fingerprints::with_capacity(rows, arena);
        let (mut key, mut identity) = (String::new(), String::new());
        for _ in 0..count {
            let fingerprint = read_entry(&mut body, &mut key, &mut identity).map_err(truncated)?;
            set.push_unindexed(super::EntryRef {
                key: &key,
                fingerprint,
                identity: &identity,
            });
        }
        set.build_index();
        let mut trailer = [0u8; 8];
        let mut rest = body.inner.into_inner();
        rest.read_exact(&mut trailer).map_err(truncated)?;
        if hasher.digest() != u64::from_le_bytes(trailer) {
            return Err(self.corrupt(path, "checksum mismatch"));
        }
        Ok(Some(set))
    }

    /// Applies the journal's checkpoints to `set`, one record at a time (a first run's journal
    /// holds every row: collecting it whole doubled peak memory).
    fn replay_journal(
        &self,
        scope: &str,
        set: &mut Fingerprints,
        replay: &mut Replay,
    ) -> Result<(), StateError> {
        let file = match File::open(&self.journal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(e)),
        };
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; JOURNAL_MAGIC.len()];
        let mut header_scope = String::new();
        if r.read_exact(&mut magic).is_err()
            || &magic != JOURNAL_MAGIC
            || read_string(&mut r, &mut header_scope).is_err()
        {
            return Ok(());
        }
        if header_scope != scope {
            return Ok(());
        }
        let mut payload = Vec::new();
        // Replay whole records; the first short or damaged one is a torn write: stop there.
        while let (Ok(len), Ok(sum)) = (read_u32(&mut r), read_u64(&mut r)) {
            payload.clear();
            if (&mut r).take(u64::from(len)).read_to_end(&mut payload).is_err()
                || payload.len() != len as usize
            {
                break;
            }
            if xxhash_rust::xxh3::xxh3_64(&payload) != sum {
                break;
            }
            replay
                .apply_payload(set, &payload)
                .map_err(|()| self.corrupt(&self.journal_path, "undecodable checkpoint"))?;
        }
        Ok(())
    }

    fn open_journal(&mut self, scope: &str) -> Result<&mut File, StateError> {
        if self.journal.is_none() {
            let fresh = !self.journal_path.exists();
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.journal_path)
                .map_err(|e| self.io(e))?;
            if fresh {
                let mut header = JOURNAL_MAGIC.to_vec();
                put_str(&mut header, scope);
                file.write_all(&header).map_err(|e| self.io(e))?;
            }
            self.journal = Some(file);
        }
        // Just set above when it was None.
        self.journal.as_mut().ok_or_else(|| StateError::Io {
            location: String::new(),
            reason: "journal not open".into(),
        })
    }

    fn write_state_file(&self, scope: &str, set: &Fingerprints) -> Result<(), StateError> {
        let dir = self.state_path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| self.io(e))?;
        {
            let mut hasher = Xxh3::new();
            let mut w = HashingWriter {
                inner: BufWriter::with_capacity(1 << 20, tmp.as_file_mut()),
                hasher: &mut hasher,
            };
            let mut header = STATE_MAGIC.to_vec();
            put_str(&mut header, scope);
            header.extend_from_slice(&(set.len() as u64).to_le_bytes());
            w.write_all(&header).map_err(|e| self.io(e))?;
            let mut buf = Vec::with_capacity(256);
            for e in set.iter() {
                buf.clear();
                put_entry(&mut buf, e);
                w.write_all(&buf).map_err(|e| self.io(e))?;
            }
            let sum = w.hasher.digest();
            w.inner.write_all(&sum.to_le_bytes()).map_err(|e| self.io(e))?;
            w.inner.flush().map_err(|e| self.io(e))?;
        }
        tmp.as_file().sync_all().map_err(|e| self.io(e))?;
        tmp.persist(&self.state_path).map_err(|e| self.io(e.error))?;
        // The rename is durable only once the directory entry is.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for FileStore {
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        self.acquire_lock()?;
        self.read_all(scope)
    }

    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.acquire_lock()?;
        let mut payload = Vec::with_capacity(changes.len() * 64);
        for c in changes {
            encode_change(c, &mut payload);
        }
        let mut record = Vec::with_capacity(payload.len() + 12);
        record.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
        record.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        let location = self.journal_path.display().to_string();
        let journal = self.open_journal(scope)?;
        journal
            .write_all(&record)
            .and_then(|()| journal.sync_data())
            .map_err(|e| StateError::Io {
                location,
                reason: e.to_string(),
            })
    }

    async fn finish(&mut self, scope: &str) -> Result<(), StateError> {
        self.acquire_lock()?;
        self.journal = None;
        if !self.journal_path.exists() {
            return Ok(());
        }
        let set = self.read_all(scope)?;
        self.write_state_file(scope, &set)?;
        // A crash before this removal only replays the journal again, which is idempotent.
        fs::remove_file(&self.journal_path).map_err(|e| self.io(e))
    }

    async fn discard(&mut self) -> Result<(), StateError> {
        self.journal = None;
        for path in [&self.journal_path, &self.state_path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }
}

struct HashingReader<'a, R: Read> {
    inner: R,
    hasher: &'a mut Xxh3,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct HashingWriter<'a, W: Write> {
    inner: W,
    hasher: &'a mut Xxh3,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, fp: u64) -> StateChange {
        StateChange::Put {
            key: key.into(),
            fingerprint: fp,
            identity: format!("{{\"id\":\"{key}\"}}"),
        }
    }

    #[tokio::test]
    async fn checkpoints_survive_without_finish_and_fold_into_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        assert!(store.load("dest").await.unwrap().is_empty());
        store.commit("dest", &[put("a", 1), put("b", 2)]).await.unwrap();
        store
            .commit("dest", &[StateChange::Remove { key: "a".into() }, put("c", 3)])
            .await
            .unwrap();
        drop(store); // a crash: no finish

        let mut again = FileStore::new(dir.path(), "ns", "s");
        let set = again.load("dest").await.unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.position("a").is_none());
        again.finish("dest").await.unwrap();
        assert!(!dir.path().join("ns/s.journal").exists());
        drop(again);

        let mut third = FileStore::new(dir.path(), "ns", "s");
        let set = third.load("dest").await.unwrap();
        assert_eq!(set.get(set.position("c").unwrap()).unwrap().fingerprint, 3);
        assert_eq!(
            set.get(set.position("b").unwrap()).unwrap().identity,
            "{\"id\":\"b\"}"
        );
    }

    #[tokio::test]
    async fn a_torn_last_checkpoint_is_ignored_and_earlier_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        store.commit("d", &[put("a", 1)]).await.unwrap();
        store.commit("d", &[put("b", 2)]).await.unwrap();
        drop(store);
        let journal = dir.path().join("ns/s.journal");
        let len = fs::metadata(&journal).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&journal)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        let set = FileStore::new(dir.path(), "ns", "s").load("d").await.unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.position("a").is_some());
    }

    #[tokio::test]
    async fn a_damaged_state_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        store.commit("d", &[put("a", 1)]).await.unwrap();
        store.finish("d").await.unwrap();
        drop(store);
        let path = dir.path().join("ns/s.state");
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = FileStore::new(dir.path(), "ns", "s").load("d").await.unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("resync"));
    }

    #[tokio::test]
    async fn state_of_another_destination_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("old").await.unwrap();
        store.commit("old", &[put("a", 1)]).await.unwrap();
        store.finish("old").await.unwrap();
        assert!(store.load("new").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_second_run_of_the_same_sync_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = FileStore::new(dir.path(), "ns", "s");
        first.load("d").await.unwrap();
        let err = FileStore::new(dir.path(), "ns", "s").load("d").await.unwrap_err();
        assert!(matches!(err, StateError::Locked(_)));
    }
}

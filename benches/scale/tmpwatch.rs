//! The peak of local disk a phase holds in the temporary directory: a thread samples the
//! sizes of the process's open files under it every 20 ms (the spill, its index and the
//! diff's buckets are anonymous, unlinked files, which only `/proc/self/fd` still shows).
//! Files under `except` (the File store's state directory, kept apart in a deployment) are
//! not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A running sampler; [`TmpWatch::stop`] returns the peak in bytes.
pub struct TmpWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TmpWatch {
    pub fn start(except: Option<std::path::PathBuf>) -> TmpWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let dir = std::env::temp_dir();
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(held_under(&dir, except.as_deref()), Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
        };
        TmpWatch {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Bytes of the regular files this process holds open under `dir`, but not under `except`.
fn held_under(dir: &std::path::Path, except: Option<&std::path::Path>) -> u64 {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.starts_with(dir) && except.is_none_or(|e| !target.starts_with(e)))
        })
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

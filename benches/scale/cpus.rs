//! The sink and its clients on CPUs of their own, for delivery against the sink's ceiling.
//!
//! On a shared machine the local sink and the process posting to it compete for the same
//! cores, so "what the sink can take" would depend on how much CPU its client leaves it: a
//! bare client leaves more than the engine, which also reads its spill. A real destination
//! runs on machines of its own. So the sink (this process, every thread) gets the last CPU,
//! and the engine or the bare client the others, through `taskset` (util-linux); the
//! ceiling is then the sink's on one core, and the engine's share says whether it keeps that
//! core busy.

use std::process::Command;

/// The CPUs of the sink and of its client.
pub struct Split {
    /// The sink's CPU (a `taskset` list).
    sink: String,
    /// The client's CPUs.
    pub client: String,
    /// Every CPU, to give back to this process afterwards.
    all: String,
}

/// The sink's threads confined to its CPU until dropped.
pub struct SinkPinned<'s>(&'s Split);

impl Split {
    /// The last CPU for the sink, the others for its client; `None` with fewer than two CPUs
    /// or without `taskset`.
    pub fn new() -> Option<Split> {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let found = Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        (cpus >= 2 && found).then(|| Split {
            sink: (cpus - 1).to_string(),
            client: if cpus == 2 {
                "0".to_owned()
            } else {
                format!("0-{}", cpus - 2)
            },
            all: format!("0-{}", cpus - 1),
        })
    }

    /// Confines every thread of this process (the sink's) to the sink's CPU; threads started
    /// later inherit it.
    pub fn pin_sink(&self) -> SinkPinned<'_> {
        set_all_threads(&self.sink);
        SinkPinned(self)
    }

    /// What the figures were measured with, for the printout.
    pub fn describe(&self) -> String {
        format!(
            "sink on CPU {}, engine and bare client on CPU {}",
            self.sink, self.client
        )
    }
}

impl Drop for SinkPinned<'_> {
    fn drop(&mut self) {
        set_all_threads(&self.0.all);
    }
}

fn set_all_threads(list: &str) {
    let pid = std::process::id().to_string();
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", list, &pid])
        .output()
        .expect("run taskset");
    assert!(
        out.status.success(),
        "taskset -a -p -c {list}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

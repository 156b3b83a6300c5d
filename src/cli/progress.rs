//! How a command shows a run in flight: a progress bar on a terminal, plain lines otherwise
//! (CI logs, pipes), both on standard error so standard output keeps only the summary.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::text::progress_line;
use crate::api::reverse_sync::RunProgress;

/// Where a followed run's progress goes.
pub enum ProgressView {
    /// A bar of records sent against records to send, with the progress line beside it.
    Bar(ProgressBar),
    /// One line per change, for logs.
    Lines {
        /// The last line printed, not printed again.
        last: String,
    },
}

impl ProgressView {
    /// A bar when standard error is a terminal, lines otherwise.
    pub fn for_stderr() -> ProgressView {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            ProgressView::Bar(bar)
        } else {
            ProgressView::Lines { last: String::new() }
        }
    }

    /// Shows a state without counts ("waiting for the operator to start the run").
    pub fn state(&mut self, what: &str) {
        match self {
            ProgressView::Bar(bar) => bar.set_message(what.to_owned()),
            ProgressView::Lines { last } => print_changed(last, what.to_owned()),
        }
    }

    /// Shows the progress the operator last wrote.
    pub fn progress(&mut self, p: &RunProgress) {
        let line = progress_line(p);
        match self {
            ProgressView::Bar(bar) => {
                bar.set_length(p.records_to_send);
                bar.set_position(p.records_sent.min(p.records_to_send));
                bar.set_message(line);
            }
            ProgressView::Lines { last } => print_changed(last, line),
        }
    }

    /// Clears the bar (lines stay).
    pub fn finish(&self) {
        if let ProgressView::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn print_changed(last: &mut String, line: String) {
    if *last != line {
        eprintln!("{line}");
        *last = line;
    }
}

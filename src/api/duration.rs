//! Durations written as text in manifests (`30s`, `15m`, `1h30m`), parsed with `humantime`.

use std::time::Duration;

/// Parses a manifest duration such as `500ms`, `30s`, `15m` or `1h 30m`.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write it like 30s, 15m or 1h"))
}

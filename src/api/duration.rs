//! Durations written as text in manifests (`30s`, `15m`, `1h30m`), parsed with `humantime`,
//! and cron expressions. Both are bounded: a manifest number must never overflow a clock.

use std::time::Duration;

/// Longest text of a duration field (also the CRD's `maxLength`).
pub const MAX_TEXT: usize = 32;

/// Longest duration any field takes (the Redis TTL's bound): ten years. Each field has its own,
/// lower bound besides ([`MAX_INTERVAL`], [`MAX_TIMEOUT`], [`MAX_BACKOFF`]).
pub const LONGEST: Duration = Duration::from_secs(10 * 366 * 86_400);
/// Longest `schedule.interval`: a year.
pub const MAX_INTERVAL: Duration = Duration::from_secs(366 * 86_400);
/// Longest statement or request timeout: a day.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Longest retry backoff: an hour.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3_600);

/// Parses a manifest duration such as `500ms`, `30s`, `15m` or `1h 30m`, at most [`LONGEST`].
pub fn parse(text: &str) -> Result<Duration, String> {
    parse_at_most(text, LONGEST)
}

/// Parses a manifest duration of at most `max`.
pub fn parse_at_most(text: &str, max: Duration) -> Result<Duration, String> {
    if text.len() > MAX_TEXT {
        return Err(format!(
            "a duration is at most {MAX_TEXT} characters; write it like 30s, 15m or 1h"
        ));
    }
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write it like 30s, 15m or 1h"))?;
    if d > max {
        return Err(format!(
            "{text:?} is longer than the longest allowed, {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// Parses a cron expression of exactly five fields (minute hour day-of-month month
/// day-of-week, UTC) or a nickname such as `@daily`; a seconds or a year field is refused.
pub fn cron(text: &str) -> Result<croner::Cron, String> {
    use croner::parser::{CronParser, Seconds, Year};
    if text.len() > 100 {
        return Err("a cron expression is at most 100 characters".to_owned());
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| format!("{text:?} is not a cron expression of five fields ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_their_bound_or_too_long_to_read_are_refused() {
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert!(parse("300000y").unwrap_err().contains("longer than"));
        assert!(parse_at_most("2d", MAX_TIMEOUT).is_err());
        assert!(parse(&"1".repeat(40)).is_err());
        assert!(parse("99999999999999999999999y").is_err());
    }

    #[test]
    fn cron_takes_five_fields_and_refuses_seconds() {
        assert!(cron("*/15 * * * *").is_ok());
        assert!(cron("@daily").is_ok());
        assert!(cron("*/5 * * * * *").is_err(), "a seconds field");
        assert!(cron("0 0 1 1 * 2030").is_err());
        assert!(cron("every day").is_err());
    }
}

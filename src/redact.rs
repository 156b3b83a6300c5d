//! One scrubber for secrets in messages: every error text that may reach a log line, an event,
//! a status or a summary passes through it first.
//!
//! It masks connection URLs whole, their passwords as written and percent-decoded, and every
//! value of a Secret as written and percent-encoded (as it appears inside a URL).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::destination::{SecretData, SendError};

/// What replaces a secret in a message.
pub const MASK: &str = "***";

/// Shorter values are not masked: replacing every `ab` in a message would make it unreadable,
/// and such a value protects nothing.
const MIN_LEN: usize = 3;

/// RFC 3986's unreserved characters stay as they are; everything else is encoded.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Masks known secrets in text.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so a URL is masked whole before the password inside it.
    needles: Vec<String>,
}

impl Scrubber {
    /// A scrubber that masks nothing yet.
    pub fn new() -> Self {
        Scrubber::default()
    }

    /// Also masks this connection URL and its password (a user name alone is not secret).
    pub fn with_url(mut self, url: &str) -> Self {
        self.needles.push(url.to_owned());
        if let Some((_, rest)) = url.split_once("://") {
            // The last `@` ends the user info even when the password holds an unescaped `@`.
            if let Some((userinfo, _)) = rest.rsplit_once('@')
                && let Some((_, password)) = userinfo.split_once(':')
            {
                self.needles.push(userinfo.to_owned());
                self.needles.push(password.to_owned());
                self.needles
                    .push(percent_decode_str(password).decode_utf8_lossy().into_owned());
            }
        }
        self.sorted()
    }

    /// Also masks every value of a Secret, as written and percent-encoded.
    pub fn with_secret(mut self, secret: Option<&SecretData>) -> Self {
        for value in secret.into_iter().flat_map(SecretData::values) {
            self.needles.push(value.to_owned());
            self.needles
                .push(utf8_percent_encode(value, NOT_UNRESERVED).to_string());
        }
        self.sorted()
    }

    fn sorted(mut self) -> Self {
        self.needles.retain(|s| s.chars().count() >= MIN_LEN);
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        self.needles.dedup();
        self
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), MASK);
            }
        }
        out
    }

    /// `error` with every secret masked in its message.
    pub fn error(&self, error: SendError) -> SendError {
        match error {
            SendError::Retryable {
                reason,
                retry_after,
                throttled,
            } => SendError::Retryable {
                reason: self.scrub(&reason),
                retry_after,
                throttled,
            },
            SendError::BatchRejected(reason) => SendError::BatchRejected(self.scrub(&reason)),
            SendError::Fatal(reason) => SendError::Fatal(self.scrub(&reason)),
            SendError::TooLarge { limit, reason } => SendError::TooLarge {
                limit,
                reason: self.scrub(&reason),
            },
        }
    }
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("values", &self.needles.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn passwords_are_masked_as_written_and_decoded() {
        let s = Scrubber::new().with_url("postgres://app:s%40cret@db:5432/x");
        assert_eq!(
            s.scrub("login for app with s@cret failed; s%40cret"),
            "login for app with *** failed; ***"
        );
        assert_eq!(
            s.scrub("postgres://app:s%40cret@db:5432/x refused"),
            "*** refused"
        );
    }

    #[test]
    fn a_user_name_without_a_password_is_left_alone() {
        let s = Scrubber::new().with_url("postgres://postgres@db:5432/x");
        assert_eq!(
            s.scrub("role postgres does not exist"),
            "role postgres does not exist"
        );
    }

    #[test]
    fn secret_values_are_masked_as_written_and_percent_encoded() {
        let data = SecretData::new(BTreeMap::from([("token".to_owned(), "a b/c".to_owned())]));
        let s = Scrubber::new().with_secret(Some(&data));
        assert_eq!(
            s.scrub("sent a b/c to https://x/?t=a%20b%2Fc"),
            "sent *** to https://x/?t=***"
        );
        assert_eq!(Scrubber::new().with_secret(None).scrub("plain"), "plain");
    }
}

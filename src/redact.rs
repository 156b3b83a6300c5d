//! One scrubber for secrets in messages: every error text that may reach a log line, an event,
//! a status or a summary passes through it first.
//!
//! It masks connection URLs whole, their passwords as written and percent-decoded, and every
//! value of a Secret as written and in each form it takes inside a URL or a header: percent-
//! encoded strictly (either hex case) or minimally (a query keeps `/+=&`), form-encoded (`+`
//! for a space), and the base64 of Basic credentials (`user:password` of a URL, any two
//! values of a Secret).

use base64::Engine as _;
use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::model::secret::SecretData;

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

/// What a URL encodes at least (the WHATWG query set): a value in a `Location` or a query
/// may keep `/`, `+`, `=` and `&` as they are.
const MINIMAL: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'`');

/// Secrets with more values than this get no pairwise Basic forms (the count grows with the
/// square of the values).
const MAX_PAIRED_VALUES: usize = 16;

/// `value` as written and in the encodings a URL or a form gives it.
fn encodings(value: &str) -> Vec<String> {
    let strict = utf8_percent_encode(value, NOT_UNRESERVED).to_string();
    let lower = lower_hex(&strict);
    vec![
        value.to_owned(),
        strict.replace("%20", "+"),
        lower.replace("%20", "+"),
        utf8_percent_encode(value, MINIMAL).to_string(),
        lower,
        strict,
    ]
}

/// Percent-escapes with lower-case hex digits.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut escape = 0;
    for c in encoded.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The base64 of `user:password`, as an `Authorization: Basic` header carries it.
fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

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
                let decoded = percent_decode_str(password).decode_utf8_lossy().into_owned();
                self.needles.extend(encodings(password));
                self.needles.extend(encodings(&decoded));
                if let Some((user, _)) = userinfo.split_once(':') {
                    let user = percent_decode_str(user).decode_utf8_lossy();
                    self.needles.push(basic(&user, &decoded));
                }
            }
        }
        self.sorted()
    }

    /// Also masks every value of a Secret, as written and percent-encoded.
    pub fn with_secret(mut self, secret: Option<&SecretData>) -> Self {
        let values: Vec<&str> = secret.into_iter().flat_map(SecretData::values).collect();
        for value in &values {
            self.needles.extend(encodings(value));
        }
        if values.len() <= MAX_PAIRED_VALUES {
            for user in &values {
                for password in &values {
                    self.needles.push(basic(user, password));
                }
            }
        }
        self.sorted()
    }

    /// Also masks each of `values` (keys of a source's Secret, tokens minted during a run),
    /// as written and percent-encoded.
    pub fn with_values<'a>(mut self, values: impl IntoIterator<Item = &'a str>) -> Self {
        for value in values {
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
    pub fn error<E: Scrub>(&self, error: E) -> E {
        error.scrubbed(self)
    }
}

/// An error whose messages a [`Scrubber`] can mask (implemented beside the error type, so
/// this module needs to know none of them).
pub trait Scrub {
    /// The same error with every secret in its messages masked.
    fn scrubbed(self, scrubber: &Scrubber) -> Self;
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("values", &self.needles.len())
            .finish()
    }
}

/// Host, port and database of a connection URL, without user or password, for messages.
pub fn describe_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let after_credentials = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
            let without_query = after_credentials.split('?').next().unwrap_or("");
            format!("{scheme}://{without_query}")
        }
        None => "<invalid URL>".to_owned(),
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

    #[test]
    fn url_encoded_forms_and_basic_credentials_are_masked_too() {
        let token = "t0k en/+=&x";
        let data = SecretData::new(BTreeMap::from([
            ("token".to_owned(), token.to_owned()),
            ("user".to_owned(), "site-42".to_owned()),
        ]));
        let s = Scrubber::new().with_secret(Some(&data));
        for leaked in [
            "t0k%20en/+=&x",
            "t0k+en%2F%2B%3D%26x",
            "t0k%20en%2f%2b%3d%26x",
            &basic("site-42", token),
        ] {
            let text = format!("redirected to https://x/cb?t={leaked} (Location)");
            assert_eq!(
                s.scrub(&text),
                "redirected to https://x/cb?t=*** (Location)",
                "{leaked}"
            );
        }
        let u = Scrubber::new().with_url("https://app:p%40ss@api.example.com/");
        assert_eq!(u.scrub(&format!("echoed {}", basic("app", "p@ss"))), "echoed ***");
    }
}

//! Rejection reasons without the record's values. Vendors echo what they refused
//! (Salesforce: `INVALID_EMAIL_ADDRESS: Email: invalid email address: a.example.com`, HubSpot:
//! `Email address a.example.com is invalid`); a reason goes to status samples, Events and logs
//! that people other than the data's owners read, so the values are masked while the vendor's
//! error code and field names stay.
//!
//! Every text form of the record's values (identity and fields, nested ones too) of at least
//! [`MIN_VALUE_CHARS`] characters is replaced, case-insensitively, by [`VALUE_MASK`], also with
//! its whitespace folded and, at the end of a reason cut short (`…`), its beginning. Not
//! caught: a value the vendor rewrote beyond case (reformatted numbers or dates, a truncated
//! text) and values of fewer characters, which mask too much of a message when short (`1`,
//! `yes`).

use crate::model::record::Record;
use crate::model::value::Value;

/// What stands in for a masked value.
pub const VALUE_MASK: &str = "<value>";
/// The shortest value masked.
pub const MIN_VALUE_CHARS: usize = 4;

/// `reason` with every value of `record` masked.
pub fn without_values(reason: &str, record: &Record) -> String {
    let mut texts = Vec::new();
    for value in record.identity.values().chain(record.fields.values()) {
        collect(value, &mut texts);
    }
    // Longest first, so a value containing another is masked whole.
    texts.sort_by(|a, b| b.chars().count().cmp(&a.chars().count()).then_with(|| a.cmp(b)));
    texts.dedup();
    let mut out = reason.to_owned();
    for text in &texts {
        out = mask(&out, text);
    }
    if let Some(body) = out.strip_suffix('…') {
        // An excerpt cut inside a value: mask the start of it that remains.
        let lower = body.to_lowercase();
        for text in &texts {
            let chars: Vec<char> = text.to_lowercase().chars().collect();
            let cut = (MIN_VALUE_CHARS..chars.len()).rev().find(|&n| {
                let start: String = chars[..n].iter().collect();
                lower.ends_with(&start)
            });
            if let Some(n) = cut {
                let start: String = chars[..n].iter().collect();
                // Lower-casing can change byte lengths; cut by characters from the end.
                let keep = body.chars().count().saturating_sub(start.chars().count());
                let head: String = body.chars().take(keep).collect();
                out = format!("{head}{VALUE_MASK}…");
                break;
            }
        }
    }
    out
}

fn collect(value: &Value, texts: &mut Vec<String>) {
    match value {
        Value::Null | Value::Bool(_) => {}
        Value::Object(doc) => doc.values().for_each(|v| collect(v, texts)),
        Value::Array(items) => items.iter().for_each(|v| collect(v, texts)),
        Value::Json(json) => collect_json(json, texts),
        other => push(other.to_text(), texts),
    }
}

fn collect_json(json: &serde_json::Value, texts: &mut Vec<String>) {
    match json {
        serde_json::Value::String(s) => push(s.clone(), texts),
        serde_json::Value::Number(n) => push(n.to_string(), texts),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_json(v, texts)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect_json(v, texts)),
        serde_json::Value::Null | serde_json::Value::Bool(_) => {}
    }
}

fn push(text: String, texts: &mut Vec<String>) {
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for text in [text.trim().to_owned(), folded] {
        if text.chars().count() >= MIN_VALUE_CHARS {
            texts.push(text);
        }
    }
}

/// `haystack` with every case-insensitive occurrence of `needle` replaced by the mask.
fn mask(haystack: &str, needle: &str) -> String {
    let lower_needle = needle.to_lowercase();
    let mut out = String::with_capacity(haystack.len());
    let mut rest = haystack;
    'outer: while !rest.is_empty() {
        for (at, _) in rest.char_indices() {
            let tail = &rest[at..];
            if let Some(len) = prefix_len_ignoring_case(tail, &lower_needle) {
                out.push_str(&rest[..at]);
                out.push_str(VALUE_MASK);
                rest = &tail[len..];
                continue 'outer;
            }
        }
        out.push_str(rest);
        break;
    }
    out
}

/// The byte length of the prefix of `text` that equals `lower_needle` ignoring case.
fn prefix_len_ignoring_case(text: &str, lower_needle: &str) -> Option<usize> {
    let mut needle = lower_needle.chars();
    let mut len = 0;
    let mut pending: Vec<char> = Vec::new();
    for c in text.chars() {
        pending.extend(c.to_lowercase());
        len += c.len_utf8();
        while let Some(first) = pending.first().copied() {
            match needle.next() {
                Some(n) if n == first => {
                    pending.remove(0);
                }
                Some(_) => return None,
                None => return None,
            }
        }
        if needle.clone().next().is_none() {
            return Some(len);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::value::Document;

    fn record() -> Record {
        Record {
            key: "13".into(),
            identity: Document::from([("Email".to_owned(), Value::Text("User13.example.com".into()))]).into(),
            fields: Document::from([
                ("Email".to_owned(), Value::Text("User13.example.com".into())),
                ("Tier".to_owned(), Value::Text("vip".into())),
                ("Score".to_owned(), Value::Int(12345)),
                ("Paid".to_owned(), Value::Bool(true)),
                (
                    "Meta".to_owned(),
                    Value::Json(serde_json::json!({"city": "Zürich"})),
                ),
            ])
            .into(),
        }
    }

    #[test]
    fn echoed_values_are_masked_and_codes_and_fields_stay() {
        assert_eq!(
            without_values(
                "INVALID_EMAIL_ADDRESS: Email: invalid email address: user13.example.com (Email)",
                &record()
            ),
            "INVALID_EMAIL_ADDRESS: Email: invalid email address: <value> (Email)"
        );
        assert_eq!(
            without_values(
                "Score 12345 too high; city ZÜRICH unknown; must be true",
                &record()
            ),
            "Score <value> too high; city <value> unknown; must be true"
        );
        assert_eq!(
            without_values("bad address: user13.exam…", &record()),
            "bad address: <value>…",
            "an excerpt cut inside a value"
        );
        assert_eq!(
            without_values("vip tier is not a valid choice", &record()),
            "vip tier is not a valid choice",
            "values shorter than four characters are kept"
        );
    }
}

//! The canonical value model every source decodes into, and the canonical JSON form used both
//! to fingerprint a row and to send it.
//!
//! Canonical means: object keys sorted, numbers written in their shortest exact form (an
//! integer-valued decimal or float is written as an integer, trailing zeros are dropped, no
//! exponent), timestamps in UTC as RFC 3339 with a `Z`. Two sources holding the same data
//! therefore produce the same bytes and the same fingerprint.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat, Utc};
use uuid::Uuid;

/// A mapped record: destination field name to value, sorted by name.
pub type Document = BTreeMap<String, Value>;

/// One cell of a source row, or one field of a mapped record.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer that fits 64 bits.
    Int(i64),
    /// An exact decimal (NUMERIC, DECIMAL, unsigned 64-bit integers); never rounded.
    Decimal(BigDecimal),
    /// A binary floating point number.
    Float(f64),
    /// Text.
    Text(String),
    /// A calendar date.
    Date(NaiveDate),
    /// A time of day without a date.
    Time(NaiveTime),
    /// An instant, normalised to UTC.
    Timestamp(DateTime<Utc>),
    /// A JSON document from a JSON column.
    Json(serde_json::Value),
    /// A UUID.
    Uuid(Uuid),
    /// An array column.
    Array(Vec<Value>),
    /// A nested object built by mappings with dotted targets (`properties.email`).
    Object(Document),
}

impl Value {
    /// About how many bytes the value takes as text (its canonical JSON, give or take quotes
    /// and escapes): what bounds a value's and a row's size.
    pub fn approx_bytes(&self) -> usize {
        fn json_bytes(v: &serde_json::Value) -> usize {
            match v {
                serde_json::Value::String(s) => s.len() + 2,
                serde_json::Value::Array(a) => a.iter().map(|x| json_bytes(x) + 1).sum::<usize>() + 2,
                serde_json::Value::Object(o) => {
                    o.iter().map(|(k, x)| k.len() + 4 + json_bytes(x)).sum::<usize>() + 2
                }
                _ => 8,
            }
        }
        match self {
            Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 8,
            Value::Decimal(d) => d.digits().try_into().unwrap_or(usize::MAX).saturating_add(8),
            Value::Text(s) => s.len() + 2,
            Value::Date(_) | Value::Time(_) | Value::Timestamp(_) | Value::Uuid(_) => 40,
            Value::Json(j) => json_bytes(j),
            Value::Array(a) => a.iter().map(|x| x.approx_bytes() + 1).sum::<usize>() + 2,
            Value::Object(o) => {
                o.iter()
                    .map(|(k, x)| k.len() + 4 + x.approx_bytes())
                    .sum::<usize>()
                    + 2
            }
        }
    }

    /// True for SQL NULL (and a JSON null).
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null | Value::Json(serde_json::Value::Null))
    }

    /// A value from plain JSON: strings, integers, exact decimals, booleans and null get their
    /// own variants; arrays and objects stay JSON.
    pub fn from_json(json: serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::String(s) => Value::Text(s),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => match n.to_string().parse::<BigDecimal>() {
                    Ok(d) if decimal_in_range(&d) => Value::Decimal(d),
                    _ => Value::Json(serde_json::Value::Number(n)),
                },
            },
            other => Value::Json(other),
        }
    }

    /// Parses canonical JSON text back into values without losing digits: numbers become
    /// integers or exact decimals (never a float), objects become [`Value::Object`]. The
    /// canonical form of the result equals the input's.
    pub fn from_json_text(text: &str) -> Result<Value, serde_json::Error> {
        use serde_json::value::RawValue;
        let t = text.trim();
        if matches!(t.as_bytes().first(), Some(b'{' | b'['))
            && let Some(value) = Scanner::parse(t)
        {
            return Ok(value);
        }
        Ok(match t.as_bytes().first() {
            Some(b'{') => {
                // Borrowed entries: no key or value is copied before it is converted.
                let entries: Entries<'_> = serde_json::from_str(t)?;
                let mut doc = Document::new();
                for (k, v) in entries.0 {
                    doc.insert(k.into_owned(), Value::from_json_text(v.get())?);
                }
                Value::Object(doc)
            }
            Some(b'"') if plain_string(t) => Value::Text(t[1..t.len() - 1].to_owned()),
            Some(b't') if t == "true" => Value::Bool(true),
            Some(b'f') if t == "false" => Value::Bool(false),
            Some(b'n') if t == "null" => Value::Null,
            Some(b'[') => {
                let items: Vec<&RawValue> = serde_json::from_str(t)?;
                Value::Array(
                    items
                        .iter()
                        .map(|v| Value::from_json_text(v.get()))
                        .collect::<Result<_, _>>()?,
                )
            }
            // Canonical decimals never carry an exponent: a number with one is a large float.
            Some(b'-' | b'0'..=b'9') if t.contains(['e', 'E']) => match t.parse::<f64>() {
                Ok(f) if f.is_finite() => Value::Float(f),
                _ => Value::from_json(serde_json::from_str(t)?),
            },
            Some(b'-' | b'0'..=b'9') => match t.parse::<i64>() {
                Ok(i) => Value::Int(i),
                Err(_) => match t.parse::<BigDecimal>() {
                    Ok(d) if decimal_in_range(&d) => Value::Decimal(d),
                    _ => Value::from_json(serde_json::from_str(t)?),
                },
            },
            _ => Value::from_json(serde_json::from_str(t)?),
        })
    }

    /// The value as plain text: strings unquoted, everything else in canonical JSON form.
    pub fn to_text(&self) -> String {
        self.as_text().into_owned()
    }

    /// Like [`Value::to_text`], borrowing text values instead of copying them.
    pub fn as_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Value::Text(s) => std::borrow::Cow::Borrowed(s),
            Value::Json(serde_json::Value::String(s)) => std::borrow::Cow::Borrowed(s),
            Value::Int(i) => std::borrow::Cow::Owned(i.to_string()),
            other => {
                let mut out = Vec::new();
                other.write_canonical(&mut out);
                // Canonical output is built only from valid UTF-8 pieces.
                std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
            }
        }
    }

    /// Appends a field name in canonical form, with its colon: `"name":`.
    pub fn write_json_key(name: &str, out: &mut Vec<u8>) {
        write_json_string(name, out);
        out.push(b':');
    }

    /// Appends the canonical JSON form of this value to `out`.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
            Value::Decimal(d) => write_canonical_decimal(d, out),
            Value::Float(f) => write_float(*f, out),
            Value::Text(s) => write_json_string(s, out),
            Value::Date(d) => write_json_string(&d.format("%Y-%m-%d").to_string(), out),
            Value::Time(t) => write_json_string(&t.format("%H:%M:%S%.f").to_string(), out),
            Value::Timestamp(ts) => write_timestamp(ts, out),
            Value::Json(j) => write_json(j, out),
            Value::Uuid(u) => write_json_string(&u.hyphenated().to_string(), out),
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_canonical(out);
                }
                out.push(b']');
            }
            Value::Object(map) => write_document(map, out),
        }
    }

    /// Converts to a `serde_json::Value` (decimals beyond f64 precision become strings).
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = Vec::new();
        self.write_canonical(&mut out);
        match serde_json::from_slice::<serde_json::Value>(&out) {
            // A decimal that f64 cannot hold exactly is kept as its exact text.
            Ok(serde_json::Value::Number(n)) if matches!(self, Value::Decimal(_)) => {
                let text = String::from_utf8_lossy(&out).into_owned();
                if n.to_string() == text {
                    serde_json::Value::Number(n)
                } else {
                    serde_json::Value::String(text)
                }
            }
            Ok(v) => v,
            Err(_) => serde_json::Value::String(String::from_utf8_lossy(&out).into_owned()),
        }
    }
}

/// A single pass over JSON text in the form this module writes (the spill reads every sent
/// row back through it): objects, arrays, strings, literals, and numbers handed to
/// [`Value::from_json_text`]. Anything it does not expect makes it give up (`None`), and the
/// caller parses with serde_json instead, which also words the error.
struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn parse(text: &'a str) -> Option<Value> {
        let mut s = Scanner { text, at: 0 };
        let value = s.value()?;
        s.skip_space();
        (s.at == text.len()).then_some(value)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.skip_space();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn value(&mut self) -> Option<Value> {
        self.skip_space();
        match self.peek()? {
            b'{' => {
                self.at += 1;
                let mut doc = Document::new();
                self.skip_space();
                if self.peek()? == b'}' {
                    self.at += 1;
                    return Some(Value::Object(doc));
                }
                loop {
                    self.skip_space();
                    let key = self.string()?;
                    self.eat(b':')?;
                    let value = self.value()?;
                    doc.insert(key, value);
                    self.skip_space();
                    match self.peek()? {
                        b',' => self.at += 1,
                        b'}' => {
                            self.at += 1;
                            return Some(Value::Object(doc));
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.at += 1;
                let mut items = Vec::new();
                self.skip_space();
                if self.peek()? == b']' {
                    self.at += 1;
                    return Some(Value::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.skip_space();
                    match self.peek()? {
                        b',' => self.at += 1,
                        b']' => {
                            self.at += 1;
                            return Some(Value::Array(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => self.string().map(Value::Text),
            b'-' | b'0'..=b'9' => {
                let start = self.at;
                while matches!(self.peek(), Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')) {
                    self.at += 1;
                }
                Value::from_json_text(&self.text[start..self.at]).ok()
            }
            _ => {
                for (word, value) in [
                    ("true", Value::Bool(true)),
                    ("false", Value::Bool(false)),
                    ("null", Value::Null),
                ] {
                    if self.text[self.at..].starts_with(word) {
                        self.at += word.len();
                        return Some(value);
                    }
                }
                None
            }
        }
    }

    /// A string literal at the cursor: its bytes when it holds no escape, else serde_json's
    /// reading of it.
    fn string(&mut self) -> Option<String> {
        let bytes = self.text.as_bytes();
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.at;
        let mut i = start + 1;
        let mut escaped = false;
        loop {
            match *bytes.get(i)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                b if b < 0x20 => return None,
                _ => i += 1,
            }
        }
        self.at = i + 1;
        if escaped {
            serde_json::from_str(&self.text[start..self.at]).ok()
        } else {
            Some(self.text[start + 1..i].to_owned())
        }
    }
}

/// The entries of a JSON object, borrowed from its text, in order.
struct Entries<'a>(Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)>);

/// True for a JSON string literal without escapes: its text is the bytes between the quotes.
fn plain_string(t: &str) -> bool {
    t.len() >= 2
        && t.ends_with('"')
        && !t.as_bytes()[1..t.len() - 1]
            .iter()
            .any(|b| *b == b'"' || *b == b'\\' || *b < 0x20)
}

/// An object key, borrowed from the text unless it holds escapes.
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

impl<'de> serde::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de serde_json::value::RawValue>()? {
                    entries.push((entry.0.0, entry.1));
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Appends the canonical JSON form of a document (keys sorted) to `out`.
pub fn write_document(doc: &Document, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (k, v)) in doc.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(k, out);
        out.push(b':');
        v.write_canonical(out);
    }
    out.push(b'}');
}

/// The canonical JSON bytes of a document.
pub fn canonical_bytes(doc: &Document) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_document(doc, &mut out);
    out
}

/// Largest decimal exponent, either sign, a value may carry (PostgreSQL's `numeric` keeps at
/// most 16383 digits after the point). Beyond it a few bytes of text such as `1e300000000`
/// would expand to hundreds of megabytes of digits when written out: such a value rejects its
/// row instead.
pub const MAX_DECIMAL_EXPONENT: u64 = 16_383;

/// True when `d` can be written in plain notation at a bounded cost: its scale (digits after
/// the point, negative for a positive exponent) is within [`MAX_DECIMAL_EXPONENT`].
pub fn decimal_in_range(d: &BigDecimal) -> bool {
    d.fractional_digit_count().unsigned_abs() <= MAX_DECIMAL_EXPONENT
}

/// An exact decimal parsed from text (`12.50`, `1e3`), or `None` when the text is not a
/// number or its exponent is out of range ([`decimal_in_range`]).
pub fn parse_decimal(text: &str) -> Option<BigDecimal> {
    let d: BigDecimal = text.trim().parse().ok()?;
    decimal_in_range(&d).then_some(d)
}

/// An exact decimal in plain notation, without trailing zeros (`10.50` → `10.5`, `1E+3` → `1000`).
pub fn canonical_decimal(d: &BigDecimal) -> String {
    let mut out = Vec::new();
    write_canonical_decimal(d, &mut out);
    // Only ASCII digits, a sign and a point are written.
    out.into_iter().map(char::from).collect()
}

/// [`canonical_decimal`] of any decimal, through its plain string.
fn canonical_decimal_of_plain_text(d: &BigDecimal) -> String {
    // Trimming the plain text is exact and far cheaper than `normalized()`, which divides.
    let mut text = d.to_plain_string();
    if text.contains('.') {
        let trimmed = text.trim_end_matches('0').trim_end_matches('.').len();
        text.truncate(trimmed);
    }
    if text == "-0" {
        text = "0".to_owned();
    }
    text
}

/// Appends the canonical text of `d` to `out`. A decimal whose digits fit in 128
/// bits and whose scale is 0 to 38 (every `numeric` column a model usually has) is written
/// from its integer and scale, without a `String` nor big-integer division.
pub fn write_canonical_decimal(d: &BigDecimal, out: &mut Vec<u8>) {
    use bigdecimal::ToPrimitive as _;
    let (digits, scale) = d.as_bigint_and_scale();
    let (Some(digits), Ok(scale @ 0..=38)) = (digits.to_i128(), usize::try_from(scale)) else {
        out.extend_from_slice(canonical_decimal_of_plain_text(d).as_bytes());
        return;
    };
    if digits == 0 {
        out.push(b'0');
        return;
    }
    if digits < 0 {
        out.push(b'-');
    }
    let mut buffer = itoa::Buffer::new();
    let text = buffer.format(digits.unsigned_abs()).as_bytes();
    if scale == 0 {
        out.extend_from_slice(text);
        return;
    }
    // The fraction's digits, left-padded with zeros to `scale`, then trailing zeros trimmed.
    let (whole, fraction) = text.split_at(text.len().saturating_sub(scale));
    let padding = scale - fraction.len();
    let kept = fraction.iter().rposition(|b| *b != b'0').map_or(0, |at| at + 1);
    if whole.is_empty() {
        out.push(b'0');
    } else {
        out.extend_from_slice(whole);
    }
    if kept > 0 {
        out.push(b'.');
        out.resize(out.len() + padding, b'0');
        out.extend_from_slice(&fraction[..kept]);
    }
}

/// Floats from this magnitude on are written with an exponent (`1e308`), as JavaScript
/// writes them: in plain notation 1e308 is a 309-digit integer that destinations read as an
/// overflowing integer, not as the float it is.
const FLOAT_EXPONENT_FROM: f64 = 1e21;

fn write_float(f: f64, out: &mut Vec<u8>) {
    if !f.is_finite() {
        // Sources reject rows holding NaN or an infinity (JSON has neither), so no canonical
        // value holds one; should one appear, it is written as null, never as invalid JSON.
        out.extend_from_slice(b"null");
    } else if f.abs() >= FLOAT_EXPONENT_FROM {
        out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
    } else if f.fract() == 0.0 && f.abs() < 1e15 {
        let _ = write!(StringSink(out), "{}", f as i64);
    } else {
        let mut buf = ryu::Buffer::new();
        let s = buf.format_finite(f);
        if s.contains('e') || s.contains('E') {
            // Exponent form is not canonical across sources; go through an exact decimal.
            match s.parse::<BigDecimal>() {
                Ok(d) => write_canonical_decimal(&d, out),
                Err(_) => out.extend_from_slice(s.as_bytes()),
            }
        } else {
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// Appends an instant as a JSON string, RFC 3339 in UTC with a `Z` and the fewest of 0, 3, 6
/// or 9 fraction digits that hold it exactly: what chrono's `to_rfc3339_opts(AutoSi, true)`
/// writes, without its allocation and format machinery (every timestamp of every row comes
/// through here). Years outside 0–9999 and leap seconds go through chrono.
fn write_timestamp(ts: &DateTime<Utc>, out: &mut Vec<u8>) {
    use chrono::{Datelike as _, Timelike as _};
    // Each accessor of a `DateTime` applies its offset again: read the UTC date and time once.
    let naive = ts.naive_utc();
    let (date, time) = (naive.date(), naive.time());
    let (year, nanos) = (date.year(), time.nanosecond());
    let Ok(year) = u32::try_from(year) else {
        write_json_string(&ts.to_rfc3339_opts(SecondsFormat::AutoSi, true), out);
        return;
    };
    if year > 9999 || nanos >= 1_000_000_000 {
        write_json_string(&ts.to_rfc3339_opts(SecondsFormat::AutoSi, true), out);
        return;
    }
    fn digits(out: &mut Vec<u8>, value: u32, width: u32) {
        for p in (0..width).rev() {
            // A digit, 0–9: the cast cannot truncate.
            out.push(b'0' + (value / 10u32.pow(p) % 10) as u8);
        }
    }
    out.reserve(32);
    out.push(b'"');
    digits(out, year, 4);
    out.push(b'-');
    digits(out, date.month(), 2);
    out.push(b'-');
    digits(out, date.day(), 2);
    out.push(b'T');
    digits(out, time.hour(), 2);
    out.push(b':');
    digits(out, time.minute(), 2);
    out.push(b':');
    digits(out, time.second(), 2);
    if nanos != 0 {
        out.push(b'.');
        if nanos % 1_000_000 == 0 {
            digits(out, nanos / 1_000_000, 3);
        } else if nanos % 1_000 == 0 {
            digits(out, nanos / 1_000, 6);
        } else {
            digits(out, nanos, 9);
        }
    }
    out.extend_from_slice(b"Z\"");
}

fn write_json(j: &serde_json::Value, out: &mut Vec<u8>) {
    match j {
        serde_json::Value::Object(map) => {
            // serde_json's Map is a BTreeMap here (no preserve_order), so iteration is sorted.
            out.push(b'{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(k, out);
                out.push(b':');
                write_json(v, out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(v, out);
            }
            out.push(b']');
        }
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => write_float(f, out),
            _ => out.extend_from_slice(n.to_string().as_bytes()),
        },
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// Appends a string as a canonical JSON string literal.
pub fn write_json_string(s: &str, out: &mut Vec<u8>) {
    // Most text needs no escaping: copy it as is, which is much cheaper per row.
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // serde_json's string escaping is the canonical one; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// True when `bytes` hold a control character, a quote or a backslash (what JSON escapes),
/// looked for eight bytes at a time (the tail padded with spaces): for each word, the classic
/// tests for a byte below a bound and for a zero byte (after XOR with the character), which
/// never miss one.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |word: u64, bound: u64| word.wrapping_sub(ONES * bound) & !word & HIGHS != 0;
    let escapes = |chunk: &[u8]| {
        let mut word = [b' '; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word);
        below(word, 0x20)
            || below(word ^ (ONES * u64::from(b'"')), 1)
            || below(word ^ (ONES * u64::from(b'\\')), 1)
    };
    let mut words = bytes.chunks_exact(8);
    words.any(escapes) || (!words.remainder().is_empty() && escapes(words.remainder()))
}

struct StringSink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StringSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn text_needs_escaping_exactly_when_one_byte_does() {
        let plain = |b: u8| b >= 0x20 && b != b'"' && b != b'\\';
        // Every byte value at every position of words and tails, amid plain text and amid
        // bytes just above and below each bound.
        for len in [1, 7, 8, 9, 16, 23] {
            for at in 0..len {
                for b in 0..=255u8 {
                    for filler in [b'a', 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xff] {
                        let mut bytes = vec![filler; len];
                        bytes[at] = b;
                        let expected = !bytes.iter().all(|&b| plain(b));
                        assert_eq!(needs_escape(&bytes), expected, "{bytes:?}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
        assert!(!needs_escape("ünïcödé text, long enough for words".as_bytes()));
    }

    #[test]
    fn decimals_written_from_their_integer_read_as_the_plain_text_does() {
        let texts = [
            "0",
            "-0",
            "0.00",
            "1",
            "-1",
            "10",
            "100.00",
            "1.50",
            "-1.50",
            "0.05",
            "-0.05",
            "123456.789000",
            "0.000000000000000000000000000000000000001",
            "1e5",
            "1.2e-3",
            "-170141183460469231731687303715884105727",
            "170141183460469231731687303715884105728.5",
            "99999999999999999999999999999999999999.9",
            "12345678901234567890.1234567890",
        ];
        let check = |d: BigDecimal| {
            let mut written = Vec::new();
            write_canonical_decimal(&d, &mut written);
            assert_eq!(
                String::from_utf8(written).unwrap(),
                canonical_decimal_of_plain_text(&d),
                "{d:?}"
            );
        };
        for text in texts {
            check(BigDecimal::from_str(text).unwrap());
        }
        for n in -2_000i64..2_000 {
            for scale in [0, 1, 2, 3, 5, 38, 39] {
                check(BigDecimal::new(n.into(), scale));
            }
        }
    }

    fn canon(v: &Value) -> String {
        let mut out = Vec::new();
        v.write_canonical(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let cases = [
            "2024-03-01T12:00:00Z",
            "2024-03-01T12:00:00.5Z",
            "1999-12-31T23:59:59.999999Z",
            "0001-01-01T00:00:00.000000001Z",
            "2021-01-01T00:01:00.120Z",
            "9999-12-31T23:59:59.123456789Z",
            "0000-01-01T00:00:00Z",
            "-0001-06-01T00:00:00Z",
            "+10000-01-01T00:00:00.25Z",
        ];
        for text in cases {
            let ts = match DateTime::parse_from_rfc3339(text) {
                Ok(ts) => ts.with_timezone(&Utc),
                // Years beyond four digits: built from their parts.
                Err(_) => {
                    let (year, nanos) = if text.starts_with('-') {
                        (-1, 0)
                    } else {
                        (10_000, 250_000_000)
                    };
                    NaiveDate::from_ymd_opt(year, 1, 1)
                        .unwrap()
                        .and_hms_nano_opt(0, 0, 0, nanos)
                        .unwrap()
                        .and_utc()
                }
            };
            let expected = format!("\"{}\"", ts.to_rfc3339_opts(SecondsFormat::AutoSi, true));
            assert_eq!(canon(&Value::Timestamp(ts)), expected, "{text}");
        }
        // A leap second (a nanosecond count past one second) goes through chrono too.
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(
            canon(&Value::Timestamp(leap)),
            format!("\"{}\"", leap.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        );
    }

    #[test]
    fn decimals_drop_trailing_zeros_and_never_use_exponents() {
        assert_eq!(
            canon(&Value::Decimal(BigDecimal::from_str("10.50").unwrap())),
            "10.5"
        );
        assert_eq!(
            canon(&Value::Decimal(BigDecimal::from_str("1E+3").unwrap())),
            "1000"
        );
        assert_eq!(
            canon(&Value::Decimal(BigDecimal::from_str("100.000").unwrap())),
            "100"
        );
        assert_eq!(
            canon(&Value::Decimal(
                BigDecimal::from_str("12345678901234567890.123456789").unwrap()
            )),
            "12345678901234567890.123456789"
        );
        assert_eq!(
            canon(&Value::Decimal(BigDecimal::from_str("-0.0001").unwrap())),
            "-0.0001"
        );
    }

    #[test]
    fn integral_numbers_hash_the_same_whatever_their_type() {
        let a = canon(&Value::Int(10));
        let b = canon(&Value::Decimal(BigDecimal::from_str("10.00").unwrap()));
        let c = canon(&Value::Float(10.0));
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(canon(&Value::Float(0.1)), "0.1");
        assert_eq!(canon(&Value::Float(1e-7)), "0.0000001");
    }

    #[test]
    fn documents_are_written_with_sorted_keys() {
        let mut inner = Document::new();
        inner.insert("z".into(), Value::Int(1));
        inner.insert("a".into(), Value::Text("x\"y".into()));
        let mut doc = Document::new();
        doc.insert("b".into(), Value::Object(inner));
        doc.insert(
            "a".into(),
            Value::Json(serde_json::json!({"y": 1.50, "x": [true, null]})),
        );
        assert_eq!(
            String::from_utf8(canonical_bytes(&doc)).unwrap(),
            r#"{"a":{"x":[true,null],"y":1.5},"b":{"a":"x\"y","z":1}}"#
        );
    }

    #[test]
    fn timestamps_are_utc_with_z() {
        let ts = DateTime::parse_from_rfc3339("2024-03-01T12:00:00+02:00").unwrap();
        assert_eq!(
            canon(&Value::Timestamp(ts.with_timezone(&Utc))),
            "\"2024-03-01T10:00:00Z\""
        );
    }

    #[test]
    fn canonical_json_parses_back_without_losing_digits() {
        let text = r#"{"a":[1,"x",null],"b":{"c":12345678901234567890.123456789,"d":true},"e":-0.5}"#;
        let v = Value::from_json_text(text).unwrap();
        assert_eq!(canon(&v), text);
    }

    #[test]
    fn the_single_pass_reader_agrees_with_serde_json_and_leaves_bad_text_to_it() {
        let texts = [
            r#"{"k\"ey":"é\n\"x\u0001","n":[{"a":[]},{},-1.25e30,0],"s":"plain","t":false}"#,
            r#" { "spaced" : [ 1 , 2 ] } "#,
            r#"[1.5,"a",[null,true]]"#,
        ];
        for text in texts {
            let fast = Scanner::parse(text.trim()).expect("the scanner reads it");
            assert_eq!(Value::from_json_text(text).unwrap(), fast);
            let mut out = Vec::new();
            fast.write_canonical(&mut out);
            let again = Value::from_json_text(std::str::from_utf8(&out).unwrap()).unwrap();
            assert_eq!(again, fast);
        }
        assert_eq!(
            Scanner::parse(r#"{"a":"x\"y"}"#),
            Some(Value::Object(Document::from([(
                "a".to_owned(),
                Value::Text("x\"y".to_owned())
            )])))
        );
        // Text the scanner does not take goes to serde_json, which refuses it with its error.
        for bad in [
            r#"{"a":1"#,
            r#"{"a" 1}"#,
            r#"{"a":"raw
newline"}"#,
            r#"[1,]"#,
            "{} x",
        ] {
            assert_eq!(Scanner::parse(bad), None, "{bad}");
            assert!(Value::from_json_text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn huge_floats_keep_their_exponent_and_read_back_as_floats() {
        assert_eq!(canon(&Value::Float(1e308)), "1e308");
        assert_eq!(canon(&Value::Float(-2.5e21)), "-2.5e21");
        assert_eq!(canon(&Value::Float(1e20)), "100000000000000000000");
        assert_eq!(Value::from_json_text("1e308").unwrap(), Value::Float(1e308));
        assert_eq!(Value::Float(1e308).to_json(), serde_json::json!(1e308));
        assert_eq!(canon(&Value::Float(f64::NAN)), "null");
    }

    #[test]
    fn decimals_from_text_refuse_exponents_no_canonical_form_could_hold() {
        assert_eq!(
            parse_decimal(" 10.50 "),
            Some(BigDecimal::from_str("10.5").unwrap())
        );
        assert_eq!(parse_decimal("1e3"), Some(BigDecimal::from(1000)));
        assert_eq!(parse_decimal("1e999999999"), None);
        assert_eq!(parse_decimal("1e-999999999"), None);
        assert_eq!(parse_decimal("soon"), None);
    }

    #[test]
    fn large_decimals_stay_exact_in_json() {
        let v = Value::Decimal(BigDecimal::from_str("12345678901234567890.1").unwrap());
        assert_eq!(v.to_json(), serde_json::json!("12345678901234567890.1"));
        assert_eq!(
            Value::Decimal(BigDecimal::from_str("2.50").unwrap()).to_json(),
            serde_json::json!(2.5)
        );
    }
}

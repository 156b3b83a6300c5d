//! The RowBinary format, read incrementally as the HTTP body arrives.
//!
//! Why RowBinary: every value travels in its exact stored form (decimals as scaled integers,
//! `DateTime` as epoch seconds whatever its time zone, so no daylight-saving hour is
//! ambiguous; floats bit for bit), nothing is escaped, and reading a row is a few bounds
//! checks and copies, the cheapest of ClickHouse's output formats to parse. Text formats
//! print `DateTime` in the column's time zone (ambiguous once a year), and JSON formats
//! quote 64-bit integers or not depending on settings.
//!
//! Reference: <https://clickhouse.com/docs/interfaces/formats/RowBinary>. Rows are decoded
//! from a buffer; when a row is cut by the end of a chunk the decoder reports
//! [`Framing::Incomplete`] and the row is decoded again once more bytes arrived. A value
//! that is well framed but cannot be a canonical value (text that is not UTF-8, an enum
//! number without a name) is a per-value error: its bytes are consumed, the row is reported
//! with the reason, and the next row is read normally.

use std::net::{Ipv4Addr, Ipv6Addr};

use bigdecimal::BigDecimal;
use bigdecimal::num_bigint::{BigInt, Sign};
use chrono::{DateTime, NaiveDate, TimeDelta};
use uuid::Uuid;

use super::types::ChType;
use crate::model::value::{Document, Value};
use crate::source::{SourceRow, UndecodableRow, ValueError};

/// Largest single value (a string) accepted, and the most bytes buffered for one row.
pub(super) const MAX_ROW_BYTES: usize = 64 << 20;

/// Bytes kept in view after a row boundary that starts like a server exception, before
/// deciding it is one (an exception is the last thing in the body, and short).
const EXCEPTION_PROBE_BYTES: usize = 64 << 10;

/// Why a row or header could not be decoded from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Framing {
    /// The buffer ends inside it: read more.
    Incomplete,
    /// The bytes cannot be RowBinary of the announced types; the stream is unusable.
    Invalid(String),
}

/// A value, or why this well-framed value has no canonical form.
pub(super) type ValueResult = Result<Value, String>;

/// A read position in the buffered bytes.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Framing> {
        if n > MAX_ROW_BYTES {
            return Err(Framing::Invalid(format!(
                "a value of {n} bytes is larger than the {MAX_ROW_BYTES}-byte limit"
            )));
        }
        if n > self.remaining() {
            return Err(Framing::Incomplete);
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Framing> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, Framing> {
        Ok(self.take(1)?[0])
    }

    /// An unsigned LEB128 number, at most 10 bytes.
    fn varint(&mut self) -> Result<u64, Framing> {
        let mut value = 0_u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            value |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Framing::Invalid("a length does not fit 64 bits".to_owned()))
    }

    /// A varint length, refused when the rest of the result could not hold that many items
    /// of at least `item_size` bytes before anything is allocated for them.
    fn length(&mut self, item_size: usize) -> Result<usize, Framing> {
        let n = usize::try_from(self.varint()?)
            .map_err(|_| Framing::Invalid("a length does not fit memory".to_owned()))?;
        match n.checked_mul(item_size) {
            _ if n == 0 => Ok(0),
            Some(0) => Err(Framing::Invalid(
                "a non-empty array of a type that has no values".to_owned(),
            )),
            Some(bytes) if bytes <= MAX_ROW_BYTES => {
                if bytes > self.remaining() {
                    Err(Framing::Incomplete)
                } else {
                    Ok(n)
                }
            }
            _ => Err(Framing::Invalid(format!(
                "an array of {n} items is larger than the {MAX_ROW_BYTES}-byte limit"
            ))),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], Framing> {
        let n = self.length(1)?;
        self.take(n)
    }
}

/// Reads the `RowBinaryWithNamesAndTypes` header: column names and type names.
pub(super) fn read_header(cur: &mut Cursor<'_>) -> Result<Vec<(String, String)>, Framing> {
    // Each column takes at least two bytes (two empty strings).
    let n = cur.length(2)?;
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        names.push(header_string(cur)?);
    }
    let mut columns = Vec::with_capacity(n);
    for name in names {
        columns.push((name, header_string(cur)?));
    }
    Ok(columns)
}

fn header_string(cur: &mut Cursor<'_>) -> Result<String, Framing> {
    String::from_utf8(cur.bytes()?.to_vec())
        .map_err(|_| Framing::Invalid("a column name or type is not UTF-8".to_owned()))
}

/// Reads one row. A value with no canonical form becomes NULL and makes the row
/// [`SourceRow::Undecodable`], naming the first such column and why; the row's bytes are
/// consumed either way.
pub(super) fn read_row(cur: &mut Cursor<'_>, types: &[ChType]) -> Result<SourceRow, Framing> {
    let mut values = Vec::with_capacity(types.len());
    let mut first_error = None;
    for (i, ty) in types.iter().enumerate() {
        match read_value(cur, ty)? {
            Ok(v) => values.push(v),
            Err(reason) => {
                first_error.get_or_insert((i, reason));
                values.push(Value::Null);
            }
        }
    }
    Ok(match first_error {
        Some((column, reason)) => SourceRow::Undecodable(Box::new(UndecodableRow {
            values,
            column,
            reason: reason.into(),
        })),
        None => SourceRow::Decoded(values),
    })
}

/// Reads one value of type `ty`.
pub(super) fn read_value(cur: &mut Cursor<'_>, ty: &ChType) -> Result<ValueResult, Framing> {
    Ok(Ok(match ty {
        ChType::Bool => Value::Bool(cur.byte()? != 0),
        ChType::Int(1) => Value::Int(i8::from_le_bytes(cur.array()?).into()),
        ChType::Int(2) => Value::Int(i16::from_le_bytes(cur.array()?).into()),
        ChType::Int(4) => Value::Int(i32::from_le_bytes(cur.array()?).into()),
        ChType::Int(8) => Value::Int(i64::from_le_bytes(cur.array()?)),
        ChType::Int(16) => integer(BigInt::from(i128::from_le_bytes(cur.array()?))),
        ChType::Int(w) => integer(BigInt::from_signed_bytes_le(cur.take(*w)?)),
        ChType::UInt(1) => Value::Int(cur.byte()?.into()),
        ChType::UInt(2) => Value::Int(u16::from_le_bytes(cur.array()?).into()),
        ChType::UInt(4) => Value::Int(u32::from_le_bytes(cur.array()?).into()),
        ChType::UInt(8) => {
            let n = u64::from_le_bytes(cur.array()?);
            i64::try_from(n).map_or_else(|_| integer(BigInt::from(n)), Value::Int)
        }
        ChType::UInt(16) => integer(BigInt::from(u128::from_le_bytes(cur.array()?))),
        ChType::UInt(w) => integer(BigInt::from_bytes_le(Sign::Plus, cur.take(*w)?)),
        ChType::Float32 => {
            let f = crate::source::widen_f32(f32::from_le_bytes(cur.array()?));
            return Ok(canonical(crate::source::float(f)));
        }
        ChType::Float64 => return Ok(canonical(crate::source::float(f64::from_le_bytes(cur.array()?)))),
        ChType::Decimal { width, scale } => {
            let digits = match width {
                4 => BigInt::from(i32::from_le_bytes(cur.array()?)),
                8 => BigInt::from(i64::from_le_bytes(cur.array()?)),
                _ => BigInt::from_signed_bytes_le(cur.take(*width)?),
            };
            Value::Decimal(BigDecimal::new(digits, i64::from(*scale)))
        }
        ChType::String => return Ok(text(cur.bytes()?)),
        // FixedString pads short values with zero bytes; the padding is not part of the text.
        ChType::FixedString(n) => {
            let bytes = cur.take(*n)?;
            let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            return Ok(text(&bytes[..end]));
        }
        ChType::Uuid => {
            // Two little-endian 64-bit halves, the high half first.
            let high = u64::from_le_bytes(cur.array()?);
            let low = u64::from_le_bytes(cur.array()?);
            Value::Uuid(Uuid::from_u64_pair(high, low))
        }
        ChType::Date => return Ok(days(u16::from_le_bytes(cur.array()?).into())),
        ChType::Date32 => return Ok(days(i32::from_le_bytes(cur.array()?).into())),
        ChType::DateTime => {
            let seconds = u32::from_le_bytes(cur.array()?);
            return Ok(instant(seconds.into(), 0));
        }
        ChType::DateTime64 { precision } => {
            let ticks = i64::from_le_bytes(cur.array()?);
            // precision <= 9 was checked when the type was parsed.
            let per_second = 10_i64.pow(*precision);
            let nanos = ticks.rem_euclid(per_second) * 10_i64.pow(9 - precision);
            return Ok(instant(ticks.div_euclid(per_second), nanos));
        }
        ChType::Enum { width, names } => {
            let n = if *width == 1 {
                i16::from(i8::from_le_bytes(cur.array()?))
            } else {
                i16::from_le_bytes(cur.array()?)
            };
            match names.get(&n) {
                Some(name) => Value::Text(name.clone()),
                None => {
                    return Ok(Err("an enum number without a name in the column type".to_owned()));
                }
            }
        }
        ChType::Ipv4 => Value::Text(Ipv4Addr::from(u32::from_le_bytes(cur.array()?)).to_string()),
        ChType::Ipv6 => Value::Text(Ipv6Addr::from(cur.array::<16>()?).to_string()),
        ChType::Json => {
            return Ok(canonical(crate::source::json_value(cur.bytes()?)));
        }
        ChType::Nothing => {
            return Err(Framing::Invalid("a value of type Nothing".to_owned()));
        }
        ChType::Nullable(inner) => match cur.byte()? {
            1 => Value::Null,
            0 => return read_value(cur, inner),
            other => {
                return Err(Framing::Invalid(format!("a NULL marker of {other}")));
            }
        },
        ChType::Array(inner) => {
            let n = cur.length(inner.min_size())?;
            let mut items = Vec::with_capacity(n);
            let mut first_error = None;
            for _ in 0..n {
                match read_value(cur, inner)? {
                    Ok(v) => items.push(v),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            match first_error {
                Some(e) => return Ok(Err(e)),
                None => Value::Array(items),
            }
        }
        ChType::Map(key, value) => {
            let n = cur.length(key.min_size() + value.min_size())?;
            let mut map = Document::new();
            let mut first_error = None;
            for _ in 0..n {
                match (read_value(cur, key)?, read_value(cur, value)?) {
                    // A map may repeat a key; the last value wins, as in a JSON object.
                    (Ok(k), Ok(v)) => {
                        map.insert(k.as_text().into_owned(), v);
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            match first_error {
                Some(e) => return Ok(Err(e)),
                None => Value::Object(map),
            }
        }
    }))
}

/// A value from the source's shared helpers, its reason as this module carries it.
fn canonical(value: Result<Value, ValueError>) -> ValueResult {
    value.map_err(|e| match e {
        ValueError::Undecodable(reason) => reason.into_owned(),
        ValueError::Fatal(e) => e.to_string(),
    })
}

/// An integer as `Int` when it fits 64 bits, else as an exact decimal.
fn integer(n: BigInt) -> Value {
    match i64::try_from(&n) {
        Ok(i) => Value::Int(i),
        Err(_) => Value::Decimal(BigDecimal::new(n, 0)),
    }
}

fn text(bytes: &[u8]) -> ValueResult {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(Value::Text(s.to_owned())),
        Err(_) => Err(
            "the text is not valid UTF-8 (cast binary data in the query, for example with base64Encode or hex)"
                .to_owned(),
        ),
    }
}

fn days(n: i64) -> ValueResult {
    NaiveDate::from_ymd_opt(1970, 1, 1)
        .zip(TimeDelta::try_days(n))
        .and_then(|(epoch, delta)| epoch.checked_add_signed(delta))
        .map(Value::Date)
        .ok_or_else(|| "a date outside the years -262143 to 262142".to_owned())
}

fn instant(seconds: i64, nanos: i64) -> ValueResult {
    // nanos is in 0..1e9 by construction.
    u32::try_from(nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(seconds, n))
        .map(Value::Timestamp)
        .ok_or_else(|| "a timestamp outside the years -262143 to 262142".to_owned())
}

/// Whether the bytes at a row boundary are where ClickHouse wrote an exception into an
/// already started body: `Code: 159, e.displayText() = …` (before 21.x), `Code: 159.
/// DB::Exception: …` (later), or the `__exception__` block of 24.x and later.
pub(super) fn looks_like_exception(rest: &[u8]) -> bool {
    if rest.starts_with(b"__exception__") {
        return true;
    }
    let Some(after) = rest.strip_prefix(b"Code: ") else {
        return false;
    };
    let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && matches!(after.get(digits), Some(b',' | b'.'))
}

/// Where a row boundary stands.
#[derive(Debug, PartialEq)]
pub(super) enum Step {
    /// A row, or the index of the column whose value has no canonical form and why.
    Row(SourceRow),
    /// More bytes are needed.
    NeedMore,
    /// The body ended after a whole row.
    End,
}

/// Why the stream cannot go on.
#[derive(Debug, PartialEq)]
pub(super) enum StreamError {
    /// The server wrote an exception into the body (its text).
    Server(String),
    /// The body is not RowBinary of the announced types, or ended inside a row.
    Invalid(String),
}

/// Buffers the body and cuts it into rows.
pub(super) struct RowReader {
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
    /// After a cut row, decode again only once this many bytes are unread, so a row far
    /// larger than a chunk is decoded a logarithmic number of times, not once per chunk.
    retry_at: usize,
}

impl RowReader {
    /// An empty reader.
    pub(super) fn new() -> Self {
        RowReader {
            buf: Vec::new(),
            pos: 0,
            ended: false,
            retry_at: 0,
        }
    }

    /// Appends a chunk of the body.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Result<(), StreamError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.len() + chunk.len() > MAX_ROW_BYTES + EXCEPTION_PROBE_BYTES {
            return Err(StreamError::Invalid(format!(
                "a row is larger than the {MAX_ROW_BYTES}-byte limit"
            )));
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// Marks the end of the body.
    pub(super) fn finish(&mut self) {
        self.ended = true;
    }

    /// Whether the body ended and every byte of it was read.
    pub(super) fn at_end(&self) -> bool {
        self.ended && self.pos == self.buf.len()
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Decodes the next item with `read`, or says more bytes are needed.
    pub(super) fn next_with<T>(
        &mut self,
        read: impl FnOnce(&mut Cursor<'_>) -> Result<T, Framing>,
    ) -> Result<Option<T>, StreamError> {
        let unread = self.buf.len() - self.pos;
        if !self.ended && unread < self.retry_at {
            return Ok(None);
        }
        let (result, consumed) = {
            let mut cur = Cursor::new(&self.buf[self.pos..]);
            let result = read(&mut cur);
            (result, cur.pos)
        };
        match result {
            Ok(item) => {
                self.pos += consumed;
                self.retry_at = 0;
                Ok(Some(item))
            }
            Err(Framing::Incomplete) if !self.ended => {
                self.retry_at = unread.saturating_mul(2).max(1);
                Ok(None)
            }
            Err(Framing::Incomplete) => Err(StreamError::Invalid("the result ended inside a row".to_owned())),
            Err(Framing::Invalid(reason)) => Err(StreamError::Invalid(reason)),
        }
    }

    /// The next row of `types`.
    pub(super) fn next_row(&mut self, types: &[ChType]) -> Result<Step, StreamError> {
        let unread = self.unread();
        if unread.is_empty() {
            return Ok(if self.ended { Step::End } else { Step::NeedMore });
        }
        if looks_like_exception(unread) {
            if self.ended {
                let text = String::from_utf8_lossy(unread).trim().to_owned();
                return Err(StreamError::Server(text));
            }
            if unread.len() < EXCEPTION_PROBE_BYTES {
                // Either the exception (the body ends soon) or a row that starts with the
                // same bytes (the body goes on): wait to see which.
                return Ok(Step::NeedMore);
            }
        }
        Ok(match self.next_with(|cur| read_row(cur, types))? {
            Some(row) => Step::Row(row),
            None => Step::NeedMore,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn one(bytes: &[u8], ty: &ChType) -> ValueResult {
        let mut cur = Cursor::new(bytes);
        let v = read_value(&mut cur, ty).unwrap();
        assert_eq!(cur.pos, bytes.len(), "every byte consumed");
        v
    }

    #[test]
    fn integers_beyond_64_bits_become_exact_decimals() {
        assert_eq!(
            one(&u64::MAX.to_le_bytes(), &ChType::UInt(8)).unwrap(),
            Value::Decimal(BigDecimal::from_str("18446744073709551615").unwrap())
        );
        assert_eq!(
            one(&(-5_i128).to_le_bytes(), &ChType::Int(16)).unwrap(),
            Value::Int(-5)
        );
        assert_eq!(
            one(&i128::MIN.to_le_bytes(), &ChType::Int(16)).unwrap(),
            Value::Decimal(BigDecimal::from_str(&i128::MIN.to_string()).unwrap())
        );
        let mut minus_one = [0xff_u8; 32];
        assert_eq!(one(&minus_one, &ChType::Int(32)).unwrap(), Value::Int(-1));
        minus_one[31] = 0x7f;
        let Value::Decimal(max) = one(&minus_one, &ChType::UInt(32)).unwrap() else {
            panic!()
        };
        assert_eq!(max.to_string().len(), 77);
    }

    #[test]
    fn decimals_keep_their_scale() {
        let v = one(
            &(-12345_i64).to_le_bytes(),
            &ChType::Decimal { width: 8, scale: 3 },
        );
        assert_eq!(
            v.unwrap(),
            Value::Decimal(BigDecimal::from_str("-12.345").unwrap())
        );
    }

    #[test]
    fn a_bad_value_rejects_its_row_but_the_next_row_reads() {
        let types = [ChType::UInt(1), ChType::String];
        let mut body = vec![1, 2, 0xff, 0xfe];
        body.extend_from_slice(&[2, 2, b'o', b'k']);
        let mut reader = RowReader::new();
        reader.push(&body).unwrap();
        reader.finish();
        let Step::Row(SourceRow::Undecodable(bad)) = reader.next_row(&types).unwrap() else {
            panic!("expected a rejected row")
        };
        assert_eq!(bad.column, 1);
        assert!(bad.reason.contains("UTF-8"), "{}", bad.reason);
        assert_eq!(bad.values, vec![Value::Int(1), Value::Null]);
        assert_eq!(
            reader.next_row(&types).unwrap(),
            Step::Row(SourceRow::Decoded(vec![Value::Int(2), Value::Text("ok".into())]))
        );
        assert_eq!(reader.next_row(&types).unwrap(), Step::End);
    }

    #[test]
    fn rows_cut_across_chunks_at_every_byte_decode_the_same() {
        let types = [
            ChType::Nullable(Box::new(ChType::String)),
            ChType::Array(Box::new(ChType::Int(4))),
        ];
        let mut body = Vec::new();
        for i in 0..50_u8 {
            body.extend_from_slice(&[0, 3, b'a', b'b', i]);
            body.extend_from_slice(&[2]);
            body.extend_from_slice(&i32::from(i).to_le_bytes());
            body.extend_from_slice(&(-1_i32).to_le_bytes());
        }
        for chunk_size in [1, 2, 3, 7, 64, body.len()] {
            let mut reader = RowReader::new();
            let mut rows = 0;
            let mut chunks = body.chunks(chunk_size);
            loop {
                match reader.next_row(&types).unwrap() {
                    Step::Row(row) => {
                        let row = row.decoded().unwrap();
                        assert_eq!(row[1], Value::Array(vec![Value::Int(rows), Value::Int(-1)]));
                        rows += 1;
                    }
                    Step::NeedMore => match chunks.next() {
                        Some(c) => reader.push(c).unwrap(),
                        None => reader.finish(),
                    },
                    Step::End => break,
                }
            }
            assert_eq!(rows, 50, "chunk size {chunk_size}");
        }
    }

    #[test]
    fn an_exception_after_rows_is_a_server_error_not_a_row() {
        let types = [ChType::UInt(8)];
        let mut body = 7_u64.to_le_bytes().to_vec();
        body.extend_from_slice(
            b"Code: 159, e.displayText() = DB::Exception: Timeout exceeded, e.what() = DB::Exception\n",
        );
        let mut reader = RowReader::new();
        reader.push(&body).unwrap();
        assert!(matches!(
            reader.next_row(&types).unwrap(),
            Step::Row(SourceRow::Decoded(_))
        ));
        assert_eq!(reader.next_row(&types).unwrap(), Step::NeedMore);
        reader.finish();
        let Err(StreamError::Server(text)) = reader.next_row(&types) else {
            panic!("expected the exception")
        };
        assert!(text.starts_with("Code: 159"), "{text}");
    }

    #[test]
    fn truncated_and_hostile_bodies_are_errors_not_panics_or_huge_allocations() {
        let types = [ChType::Array(Box::new(ChType::UInt(8)))];
        let mut reader = RowReader::new();
        // An array claiming 2^62 items.
        reader
            .push(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40])
            .unwrap();
        assert!(matches!(reader.next_row(&types), Err(StreamError::Invalid(_))));

        let mut reader = RowReader::new();
        reader.push(&[3, 1, 0, 0, 0]).unwrap();
        reader.finish();
        assert!(matches!(reader.next_row(&types), Err(StreamError::Invalid(m)) if m.contains("ended")));

        let nullable = [ChType::Nullable(Box::new(ChType::Bool))];
        let mut reader = RowReader::new();
        reader.push(&[7]).unwrap();
        assert!(matches!(reader.next_row(&nullable), Err(StreamError::Invalid(_))));

        let mut cur = Cursor::new(&[0xff; 11]);
        assert!(matches!(cur.varint(), Err(Framing::Invalid(_))));
    }

    #[test]
    fn datetime64_before_the_epoch_rounds_toward_the_past() {
        let v = one(&(-1_i64).to_le_bytes(), &ChType::DateTime64 { precision: 3 }).unwrap();
        assert_eq!(
            v,
            Value::Timestamp(
                DateTime::parse_from_rfc3339("1969-12-31T23:59:59.999Z")
                    .unwrap()
                    .to_utc()
            )
        );
    }
}

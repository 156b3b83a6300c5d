//! Values in PostgreSQL's binary format (the type's `send` function), decoded from their
//! bytes: the same for a value of a binary `COPY` and of a row of the extended protocol.
//!
//! The layouts are those of the server's `*_send` functions (`boolsend`, `int4send`,
//! `numeric_send`, `array_send`, … in `src/backend/utils/adt/`). A value whose bytes do not
//! fit its type's layout is undecodable: its row is rejected, never the run, and the reason
//! names only the kind of value.

use std::borrow::Cow;

use bigdecimal::BigDecimal;
use bigdecimal::num_bigint::BigInt;
use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, Utc};
use uuid::Uuid;

use super::{DecodeResult, Decoder, Kind};
use crate::model::value::Value;
use crate::source::ValueError;

/// Why a text value is refused.
const NOT_UTF8: &str = "text that is not valid UTF-8";

/// A non-NULL value of a column decoded as `decoder`.
pub(super) fn decode(bytes: &[u8], decoder: Decoder) -> DecodeResult {
    match decoder {
        Decoder::Scalar(kind) => scalar(bytes, kind),
        Decoder::Array(kind) => array(bytes, kind),
    }
}

/// The `N` bytes of a fixed-size value, or why they are not.
fn fixed<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], ValueError> {
    bytes.try_into().map_err(|_| ValueError::undecodable(what))
}

/// A scalar value.
fn scalar(bytes: &[u8], kind: Kind) -> DecodeResult {
    Ok(match kind {
        Kind::Bool => Value::Bool(fixed::<1>(bytes, "a malformed bool")?[0] != 0),
        Kind::Int2 => Value::Int(i16::from_be_bytes(fixed(bytes, "a malformed int2")?).into()),
        Kind::Int4 => Value::Int(i32::from_be_bytes(fixed(bytes, "a malformed int4")?).into()),
        Kind::Int8 => Value::Int(i64::from_be_bytes(fixed(bytes, "a malformed int8")?)),
        Kind::Oid => Value::Int(u32::from_be_bytes(fixed(bytes, "a malformed oid")?).into()),
        Kind::Float4 => {
            let f = f32::from_be_bytes(fixed(bytes, "a malformed float4")?);
            crate::source::float(crate::source::widen_f32(f))?
        }
        Kind::Float8 => crate::source::float(f64::from_be_bytes(fixed(bytes, "a malformed float8")?))?,
        Kind::Numeric => Value::Decimal(numeric(bytes)?),
        Kind::Text => Value::Text(
            std::str::from_utf8(bytes)
                .map_err(|_| ValueError::undecodable(NOT_UTF8))?
                .to_owned(),
        ),
        Kind::Date => date(i32::from_be_bytes(fixed(bytes, "a malformed date")?))?,
        // Microseconds since midnight; 24:00:00, which PostgreSQL allows, wraps to midnight.
        Kind::Time => Value::Time(
            NaiveTime::MIN + TimeDelta::microseconds(i64::from_be_bytes(fixed(bytes, "a malformed time")?)),
        ),
        Kind::Timestamp | Kind::TimestampTz => {
            timestamp(i64::from_be_bytes(fixed(bytes, "a malformed timestamp")?))?
        }
        Kind::Json => crate::source::json_value(bytes)?,
        // jsonb's binary form is a version byte, then the text.
        Kind::Jsonb => match bytes.split_first() {
            Some((1, text)) => crate::source::json_value(text)?,
            _ => {
                return Err(ValueError::undecodable(
                    "jsonb in an unknown binary format version",
                ));
            }
        },
        Kind::Uuid => Value::Uuid(Uuid::from_bytes(fixed(bytes, "a malformed uuid")?)),
        Kind::Void => Value::Null,
    })
}

/// A numeric (`numeric_send`): digit count, weight (the power of 10000 of the first digit),
/// sign (0, 0x4000 negative, 0xC000 NaN, 0xD000 and 0xF000 the infinities), display scale,
/// then the digits, each a big-endian `int16` from 0 to 9999. The decimal's integer and scale
/// come from the digits and the weight; the display scale is not kept (trailing zeros do not
/// change the canonical form).
fn numeric(bytes: &[u8]) -> Result<BigDecimal, ValueError> {
    const MALFORMED: &str = "a malformed numeric";
    let word = |at: usize| -> Result<u16, ValueError> {
        match bytes.get(at..at + 2) {
            Some(&[high, low]) => Ok(u16::from_be_bytes([high, low])),
            _ => Err(ValueError::undecodable(MALFORMED)),
        }
    };
    let count = usize::from(word(0)?);
    let weight = i64::from(word(2)? as i16);
    let negative = match word(4)? {
        0 => false,
        0x4000 => true,
        0xC000 => return Err(ValueError::undecodable("numeric NaN has no exact decimal form")),
        0xD000 => {
            return Err(ValueError::undecodable(
                "numeric Infinity has no exact decimal form",
            ));
        }
        0xF000 => {
            return Err(ValueError::undecodable(
                "numeric -Infinity has no exact decimal form",
            ));
        }
        _ => return Err(ValueError::undecodable(MALFORMED)),
    };
    if bytes.len() != 8 + 2 * count {
        return Err(ValueError::undecodable(MALFORMED));
    }
    if count == 0 {
        return Ok(BigDecimal::from(0u64));
    }
    // `count` ≤ 65535 and `weight` an i16: no overflow.
    let scale = (count as i64 - weight - 1) * 4;
    let digit = |n: usize| -> Result<u16, ValueError> {
        let d = word(8 + 2 * n)?;
        if d > 9999 {
            return Err(ValueError::undecodable(MALFORMED));
        }
        Ok(d)
    };
    let mut small: i128 = 0;
    // Up to 9 digits of 10000 (under 10^36, far from i128's 1.7·10^38) in an i128; more in a
    // big integer.
    for n in 0..count.min(9) {
        small = small * 10_000 + i128::from(digit(n)?);
    }
    let mut int = BigInt::from(small);
    if count > 9 {
        let mut part: u64 = 0;
        let mut part_digits = 0;
        for n in 9..count {
            part = part * 10_000 + u64::from(digit(n)?);
            part_digits += 1;
            // Four digits of 10000 fit a u64 many times over; flush every four.
            if part_digits == 4 || n + 1 == count {
                int = int * BigInt::from(10_000u64.pow(part_digits)) + BigInt::from(part);
                part = 0;
                part_digits = 0;
            }
        }
    }
    if negative {
        int = -int;
    }
    Ok(BigDecimal::new(int, scale))
}

/// An array (`array_send`): dimension count, a flags word, the element type, then for each
/// dimension its length and lower bound, then the elements in row-major order, each a
/// length (-1 for NULL) and its bytes. One dimension is a list; more are lists of lists.
/// An element that cannot be decoded makes the whole array undecodable.
fn array(bytes: &[u8], kind: Kind) -> DecodeResult {
    let mut reader = ArrayReader { bytes, at: 0 };
    let dimensions = reader.int()?;
    let _flags = reader.int()?;
    let _element_type = reader.int()?;
    if dimensions == 0 {
        return Ok(Value::Array(Vec::new()));
    }
    // PostgreSQL's MAXDIM.
    if !(1..=6).contains(&dimensions) {
        return Err(malformed_array());
    }
    let mut lengths = Vec::with_capacity(6);
    let mut total: usize = 1;
    for _ in 0..dimensions {
        let length = usize::try_from(reader.int()?).map_err(|_| malformed_array())?;
        let _lower_bound = reader.int()?;
        total = total.checked_mul(length).ok_or_else(malformed_array)?;
        lengths.push(length);
    }
    // Every element takes at least its 4-byte length: a count past that is a lie.
    if total > reader.left() / 4 {
        return Err(malformed_array());
    }
    let mut elements = Vec::with_capacity(total);
    for _ in 0..total {
        let length = reader.int()?;
        if length == -1 {
            elements.push(Value::Null);
            continue;
        }
        let element = reader.take(usize::try_from(length).map_err(|_| malformed_array())?)?;
        elements.push(scalar(element, kind).map_err(|e| element_error(e, kind))?);
    }
    if reader.left() != 0 {
        return Err(malformed_array());
    }
    // Row-major: the last dimension varies fastest, so group from the innermost out.
    for &length in lengths[1..].iter().rev() {
        let mut grouped = Vec::with_capacity(elements.len() / length.max(1));
        let mut rest = elements.into_iter();
        loop {
            let group: Vec<Value> = rest.by_ref().take(length).collect();
            if group.is_empty() {
                break;
            }
            grouped.push(Value::Array(group));
        }
        elements = grouped;
    }
    Ok(Value::Array(elements))
}

/// Why an array is refused when its layout is broken.
fn malformed_array() -> ValueError {
    ValueError::undecodable("a malformed array")
}

/// Reads an array's words and elements in order, refusing to read past its end.
struct ArrayReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> ArrayReader<'a> {
    /// The next big-endian `int4`.
    fn int(&mut self) -> Result<i32, ValueError> {
        let word = self.take(4)?;
        Ok(i32::from_be_bytes(fixed(word, "a malformed array")?))
    }

    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Result<&'a [u8], ValueError> {
        let end = self.at.checked_add(n).ok_or_else(malformed_array)?;
        let taken = self.bytes.get(self.at..end).ok_or_else(malformed_array)?;
        self.at = end;
        Ok(taken)
    }

    /// Bytes not read yet.
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// What an array's undecodable element makes of the array: the element's reason where it
/// names a kind of value the array holds, or the array's own.
fn element_error(e: ValueError, kind: Kind) -> ValueError {
    let ValueError::Undecodable(reason) = e else {
        return e;
    };
    let reason: Cow<'static, str> = match kind {
        Kind::Numeric if reason.contains("NaN") || reason.contains("Infinity") => {
            "a numeric array holding NaN or Infinity, which have no exact decimal form".into()
        }
        Kind::Text => "a text array with text that is not valid UTF-8".into(),
        // Floats, dates, timestamps and JSON say what the element is.
        Kind::Float4
        | Kind::Float8
        | Kind::Date
        | Kind::Timestamp
        | Kind::TimestampTz
        | Kind::Json
        | Kind::Jsonb => reason,
        _ => "a malformed array".into(),
    };
    ValueError::Undecodable(reason)
}

/// A DATE from its wire form, days since 2000-01-01.
///
/// Decoded here because sqlx panics on `infinity` (the extremes of `i32`).
fn date(days: i32) -> DecodeResult {
    NaiveDate::from_ymd_opt(2000, 1, 1)
        .zip(TimeDelta::try_days(days.into()))
        .and_then(|(epoch, delta)| epoch.checked_add_signed(delta))
        .map(Value::Date)
        .ok_or_else(|| ValueError::undecodable(out_of_range("date", days.into(), 0x7fff_ffff, -0x8000_0000)))
}

/// A TIMESTAMP or TIMESTAMPTZ from its wire form, microseconds since 2000-01-01 00:00 UTC.
///
/// Both types travel as UTC on the wire (a TIMESTAMP without time zone is read as UTC).
/// Decoded here because sqlx panics on `infinity` (the extremes of `i64`).
fn timestamp(micros: i64) -> DecodeResult {
    DateTime::<Utc>::from_timestamp(946_684_800, 0)
        .and_then(|epoch| epoch.checked_add_signed(TimeDelta::microseconds(micros)))
        .map(Value::Timestamp)
        .ok_or_else(|| ValueError::undecodable(out_of_range("timestamp", micros, i64::MAX, i64::MIN)))
}

/// Why a date or timestamp has no canonical form: an infinity, or a year past what a
/// destination can hold (the canonical range is years -262143 to 262142).
fn out_of_range(what: &str, raw: i64, infinity: i64, minus_infinity: i64) -> String {
    if raw == infinity {
        format!("{what} infinity is not a point in time")
    } else if raw == minus_infinity {
        format!("{what} -infinity is not a point in time")
    } else {
        format!("a {what} outside the years -262143 to 262142")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(r: DecodeResult) -> String {
        match r {
            Err(ValueError::Undecodable(reason)) => reason.into_owned(),
            other => panic!("expected an undecodable value, got {other:?}"),
        }
    }

    /// A numeric's binary form from its weight, sign and base-10000 digits.
    fn numeric_bytes(weight: i16, sign: u16, digits: &[u16]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [digits.len() as u16, weight as u16, sign, 0] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        for digit in digits {
            bytes.extend_from_slice(&digit.to_be_bytes());
        }
        bytes
    }

    #[test]
    fn numerics_keep_their_digits_and_scale() {
        let cases: [(Vec<u8>, &str, i64); 9] = [
            (numeric_bytes(0, 0, &[12, 3456]), "123456", 4), // 12.3456
            (numeric_bytes(0, 0x4000, &[12, 3400]), "-123400", 4), // -12.34, as stored
            (numeric_bytes(-1, 0, &[500]), "500", 4),        // 0.05
            (numeric_bytes(2, 0, &[7]), "7", -8),            // 700000000
            (numeric_bytes(0, 0, &[]), "0", 0),              // 0
            (numeric_bytes(8, 0, &[9999; 9]), &"9".repeat(36), 0), // 36 nines
            (numeric_bytes(1, 0, &[1, 2, 3]), "100020003", 4), // 10002.0003
            // Past 9 digits: the big integer, in parts of four digits.
            (numeric_bytes(9, 0, &[1; 10]), &"0001".repeat(10)[3..], 0),
            (
                numeric_bytes(5, 0x4000, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]),
                "-10002000300040005000600070008000900100011001200130014",
                32,
            ),
        ];
        for (bytes, digits, scale) in cases {
            let decimal = numeric(&bytes).unwrap();
            let (int, found_scale) = decimal.as_bigint_and_scale();
            assert_eq!((int.to_string(), found_scale), (digits.to_owned(), scale));
        }
    }

    #[test]
    fn numeric_specials_and_malformed_numerics_are_undecodable() {
        let special = |sign| reason(scalar(&numeric_bytes(0, sign, &[]), Kind::Numeric));
        assert!(special(0xC000).contains("numeric NaN"));
        assert!(special(0xD000).contains("numeric Infinity"));
        assert!(special(0xF000).contains("numeric -Infinity"));
        assert!(special(0x1234).contains("malformed"));
        let digit_out_of_range = numeric_bytes(0, 0, &[10_000]);
        assert!(reason(scalar(&digit_out_of_range, Kind::Numeric)).contains("malformed"));
        let short = &numeric_bytes(0, 0, &[1, 2])[..10];
        assert!(reason(scalar(short, Kind::Numeric)).contains("malformed"));
        assert!(reason(scalar(&[0, 1], Kind::Numeric)).contains("malformed"));
    }

    #[test]
    fn fixed_size_values_of_the_wrong_size_are_undecodable() {
        for kind in [
            Kind::Bool,
            Kind::Int2,
            Kind::Int4,
            Kind::Int8,
            Kind::Oid,
            Kind::Float4,
            Kind::Float8,
            Kind::Date,
            Kind::Time,
            Kind::Timestamp,
            Kind::Uuid,
        ] {
            assert!(reason(scalar(&[1, 2, 3], kind)).contains("malformed"), "{kind:?}");
        }
        assert!(reason(scalar(&[0xff, 0xfe], Kind::Text)).contains("UTF-8"));
        assert!(reason(scalar(b"\x02{}", Kind::Jsonb)).contains("version"));
        assert_eq!(
            scalar(b"\x01{}", Kind::Jsonb).unwrap(),
            Value::Json(serde_json::json!({}))
        );
        assert_eq!(scalar(&[], Kind::Void).unwrap(), Value::Null);
    }

    #[test]
    fn times_are_microseconds_since_midnight_and_midnight_wraps() {
        let micros = |us: i64| scalar(&us.to_be_bytes(), Kind::Time).unwrap();
        assert_eq!(
            micros(13 * 3_600_000_000 + 500_000),
            Value::Time(NaiveTime::from_hms_milli_opt(13, 0, 0, 500).unwrap())
        );
        assert_eq!(micros(86_400_000_000), Value::Time(NaiveTime::MIN));
    }

    /// An int4 array's binary form: `dims` lengths, lower bounds 1, `items` in order.
    fn int4_array(dims: &[i32], items: &[Option<i32>]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [dims.len() as i32, 1, 23] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
            bytes.extend_from_slice(&1i32.to_be_bytes());
        }
        for item in items {
            match item {
                None => bytes.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    bytes.extend_from_slice(&4i32.to_be_bytes());
                    bytes.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
        bytes
    }

    #[test]
    fn arrays_of_one_or_more_dimensions_become_nested_lists() {
        let int = |v| Value::Int(v);
        let list = |v: Vec<Value>| Value::Array(v);
        assert_eq!(array(&int4_array(&[], &[]), Kind::Int4).unwrap(), list(vec![]));
        assert_eq!(
            array(&int4_array(&[3], &[Some(1), None, Some(3)]), Kind::Int4).unwrap(),
            list(vec![int(1), Value::Null, int(3)])
        );
        let six: Vec<Option<i32>> = (1..=6).map(Some).collect();
        assert_eq!(
            array(&int4_array(&[2, 3], &six), Kind::Int4).unwrap(),
            list(vec![
                list(vec![int(1), int(2), int(3)]),
                list(vec![int(4), int(5), int(6)])
            ])
        );
    }

    #[test]
    fn malformed_arrays_are_undecodable_without_allocating_their_claimed_size() {
        // A claimed length far past the bytes.
        let mut huge = int4_array(&[1], &[Some(1)]);
        huge[12..16].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(reason(array(&huge, Kind::Int4)).contains("malformed"));
        // Dimensions whose product overflows.
        let overflow = int4_array(&[i32::MAX, i32::MAX, i32::MAX], &[]);
        assert!(reason(array(&overflow, Kind::Int4)).contains("malformed"));
        // An element longer than what is left, a negative length, trailing bytes, a short header.
        let mut long = int4_array(&[1], &[Some(1)]);
        long[20..24].copy_from_slice(&40i32.to_be_bytes());
        assert!(reason(array(&long, Kind::Int4)).contains("malformed"));
        let mut negative = int4_array(&[1], &[Some(1)]);
        negative[20..24].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(reason(array(&negative, Kind::Int4)).contains("malformed"));
        let mut trailing = int4_array(&[1], &[Some(1)]);
        trailing.push(0);
        assert!(reason(array(&trailing, Kind::Int4)).contains("malformed"));
        assert!(reason(array(&[0, 0, 0], Kind::Int4)).contains("malformed"));
        // An element of the wrong size.
        let mut wrong = int4_array(&[1], &[Some(1)]);
        wrong[20..24].copy_from_slice(&2i32.to_be_bytes());
        wrong.truncate(26);
        assert!(reason(array(&wrong, Kind::Int4)).contains("malformed array"));
    }

    #[test]
    fn an_undecodable_element_names_what_the_array_holds() {
        let mut nan = Vec::new();
        for word in [1i32, 0, 1700, 1, 1] {
            nan.extend_from_slice(&word.to_be_bytes());
        }
        let element = numeric_bytes(0, 0xC000, &[]);
        nan.extend_from_slice(&(element.len() as i32).to_be_bytes());
        nan.extend_from_slice(&element);
        assert!(reason(array(&nan, Kind::Numeric)).contains("NaN or Infinity"));
        let mut infinite = Vec::new();
        for word in [1i32, 0, 701, 1, 1, 8] {
            infinite.extend_from_slice(&word.to_be_bytes());
        }
        infinite.extend_from_slice(&f64::INFINITY.to_be_bytes());
        assert!(reason(array(&infinite, Kind::Float8)).contains("float Infinity"));
    }

    #[test]
    fn infinite_dates_and_timestamps_are_undecodable_values_not_panics() {
        assert!(reason(date(i32::MAX)).contains("date infinity"));
        assert!(reason(timestamp(i64::MIN)).contains("timestamp -infinity"));
        assert!(reason(date(i32::MAX - 1)).contains("outside the years"));
        assert_eq!(
            date(0).unwrap(),
            Value::Date(NaiveDate::from_ymd_opt(2000, 1, 1).unwrap())
        );
        assert_eq!(
            timestamp(-1).unwrap(),
            Value::Timestamp(
                DateTime::parse_from_rfc3339("1999-12-31T23:59:59.999999Z")
                    .unwrap()
                    .with_timezone(&Utc)
            )
        );
    }
}

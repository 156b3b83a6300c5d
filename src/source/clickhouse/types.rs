//! ClickHouse type names, as `DESCRIBE` and the `RowBinaryWithNamesAndTypes` header spell
//! them (`Nullable(Decimal(18, 4))`, `DateTime('Europe/Paris')`, `Enum8('a' = 1)`), parsed
//! into the shapes the RowBinary decoder reads.
//!
//! Reference: <https://clickhouse.com/docs/sql-reference/data-types>.

use std::collections::BTreeMap;

/// Deepest nesting of type constructors accepted (`Array(Array(…))`): the header is vendor
/// input, and the parser and decoder recurse once per level.
const MAX_DEPTH: usize = 32;

/// A column type the decoder can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ChType {
    /// `Bool`: one byte.
    Bool,
    /// `Int8` … `Int256`, by width in bytes.
    Int(usize),
    /// `UInt8` … `UInt256`, by width in bytes.
    UInt(usize),
    /// `Float32`.
    Float32,
    /// `Float64`.
    Float64,
    /// `Decimal(P, S)` and its aliases, stored as a little-endian integer of `width` bytes.
    Decimal {
        /// 4, 8, 16 or 32 bytes, from the precision.
        width: usize,
        /// Digits after the point.
        scale: u32,
    },
    /// `String`: arbitrary bytes, read as UTF-8 text.
    String,
    /// `FixedString(N)`: N bytes, zero-padded.
    FixedString(usize),
    /// `UUID`.
    Uuid,
    /// `Date`: days since 1970-01-01 as `UInt16`.
    Date,
    /// `Date32`: days since 1970-01-01 as `Int32`.
    Date32,
    /// `DateTime` (any time zone): seconds since the epoch as `UInt32`.
    DateTime,
    /// `DateTime64(P)` (any time zone): ticks of 10^-P seconds since the epoch as `Int64`.
    DateTime64 {
        /// Digits of sub-second precision, 0 to 9.
        precision: u32,
    },
    /// `Enum8`/`Enum16`: the stored number and the names it stands for.
    Enum {
        /// 1 or 2 bytes.
        width: usize,
        /// Name of each value.
        names: BTreeMap<i16, String>,
    },
    /// `IPv4`: `UInt32`.
    Ipv4,
    /// `IPv6`: 16 bytes in network order.
    Ipv6,
    /// `JSON`, written as a JSON string (`output_format_binary_write_json_as_string`).
    Json,
    /// `Nothing`: the element type of `[]` and of `NULL`; it has no values.
    Nothing,
    /// `Nullable(T)`.
    Nullable(Box<ChType>),
    /// `Array(T)`.
    Array(Box<ChType>),
    /// `Map(K, V)`.
    Map(Box<ChType>, Box<ChType>),
}

impl ChType {
    /// Whether a `JSON` value is anywhere inside this type.
    pub(super) fn has_json(&self) -> bool {
        match self {
            ChType::Json => true,
            ChType::Nullable(inner) | ChType::Array(inner) => inner.has_json(),
            ChType::Map(key, value) => key.has_json() || value.has_json(),
            _ => false,
        }
    }

    /// The fewest bytes a value of this type takes, used to refuse an array length that the
    /// rest of the result cannot hold before anything is allocated for it.
    pub(super) fn min_size(&self) -> usize {
        match self {
            ChType::Bool | ChType::Nullable(_) => 1,
            ChType::Int(w) | ChType::UInt(w) | ChType::Decimal { width: w, .. } => *w,
            ChType::Enum { width, .. } => *width,
            ChType::Float32 | ChType::DateTime | ChType::Ipv4 | ChType::Date32 => 4,
            ChType::Float64 | ChType::DateTime64 { .. } => 8,
            ChType::Date => 2,
            ChType::Uuid | ChType::Ipv6 => 16,
            ChType::FixedString(n) => *n,
            ChType::String | ChType::Json | ChType::Array(_) | ChType::Map(..) => 1,
            ChType::Nothing => 0,
        }
    }
}

/// Parses a ClickHouse type name. The error is the part that is not supported.
pub(super) fn parse(name: &str) -> Result<ChType, String> {
    parse_at(name.trim(), 0)
}

fn parse_at(name: &str, depth: usize) -> Result<ChType, String> {
    if depth > MAX_DEPTH {
        return Err(format!("types nested deeper than {MAX_DEPTH} levels"));
    }
    let (head, args) = match name.find('(') {
        Some(open) if name.ends_with(')') => {
            let inner = &name[open + 1..name.len() - 1];
            (name[..open].trim(), split_args(inner)?)
        }
        Some(_) => return Err(name.to_owned()),
        None => (name, Vec::new()),
    };
    let unsupported = || Err(name.to_owned());
    let one_type = |args: &[&str]| match args {
        [inner] => parse_at(inner, depth + 1),
        _ => Err(name.to_owned()),
    };
    Ok(match (head, args.len()) {
        ("Bool" | "Boolean", 0) => ChType::Bool,
        ("Int8", 0) => ChType::Int(1),
        ("Int16", 0) => ChType::Int(2),
        ("Int32", 0) => ChType::Int(4),
        ("Int64", 0) => ChType::Int(8),
        ("Int128", 0) => ChType::Int(16),
        ("Int256", 0) => ChType::Int(32),
        ("UInt8", 0) => ChType::UInt(1),
        ("UInt16", 0) => ChType::UInt(2),
        ("UInt32", 0) => ChType::UInt(4),
        ("UInt64", 0) => ChType::UInt(8),
        ("UInt128", 0) => ChType::UInt(16),
        ("UInt256", 0) => ChType::UInt(32),
        ("Float32", 0) => ChType::Float32,
        ("Float64", 0) => ChType::Float64,
        ("Decimal", 2) => {
            let precision = number(args[0], name)?;
            decimal(precision, number(args[1], name)?, name)?
        }
        ("Decimal32", 1) => decimal(9, number(args[0], name)?, name)?,
        ("Decimal64", 1) => decimal(18, number(args[0], name)?, name)?,
        ("Decimal128", 1) => decimal(38, number(args[0], name)?, name)?,
        ("Decimal256", 1) => decimal(76, number(args[0], name)?, name)?,
        ("String", 0) => ChType::String,
        ("FixedString", 1) => ChType::FixedString(number(args[0], name)? as usize),
        ("UUID", 0) => ChType::Uuid,
        ("Date", 0) => ChType::Date,
        ("Date32", 0) => ChType::Date32,
        // The time zone only changes how ClickHouse prints the instant, not what is sent.
        ("DateTime", 0 | 1) => ChType::DateTime,
        ("DateTime64", 1 | 2) => {
            let precision = number(args[0], name)?;
            if precision > 9 {
                return unsupported();
            }
            ChType::DateTime64 { precision }
        }
        ("Enum8", _) => ChType::Enum {
            width: 1,
            names: enum_names(&args, name)?,
        },
        ("Enum16", _) => ChType::Enum {
            width: 2,
            names: enum_names(&args, name)?,
        },
        ("IPv4", 0) => ChType::Ipv4,
        ("IPv6", 0) => ChType::Ipv6,
        // `JSON(max_dynamic_paths = …, a.b UInt32, SKIP c)`: the parameters shape storage only.
        ("JSON", _) => ChType::Json,
        ("Nothing", 0) => ChType::Nothing,
        ("Nullable", 1) => ChType::Nullable(Box::new(one_type(&args)?)),
        // Dictionary encoding is a storage detail: RowBinary sends the plain values.
        ("LowCardinality", 1) => one_type(&args)?,
        // The stored value has the type of the last argument.
        ("SimpleAggregateFunction", n) if n >= 2 => parse_at(args[n - 1], depth + 1)?,
        ("Array", 1) => ChType::Array(Box::new(one_type(&args)?)),
        ("Map", 2) => ChType::Map(
            Box::new(parse_at(args[0], depth + 1)?),
            Box::new(parse_at(args[1], depth + 1)?),
        ),
        _ => return unsupported(),
    })
}

fn decimal(precision: u32, scale: u32, name: &str) -> Result<ChType, String> {
    let width = match precision {
        1..=9 => 4,
        10..=18 => 8,
        19..=38 => 16,
        39..=76 => 32,
        _ => return Err(name.to_owned()),
    };
    if scale > precision {
        return Err(name.to_owned());
    }
    Ok(ChType::Decimal { width, scale })
}

fn number(arg: &str, name: &str) -> Result<u32, String> {
    arg.trim().parse().map_err(|_| name.to_owned())
}

/// `'a' = 1, 'b' = -2` into value → name.
fn enum_names(args: &[&str], name: &str) -> Result<BTreeMap<i16, String>, String> {
    let mut names = BTreeMap::new();
    for arg in args {
        let arg = arg.trim();
        let (label, rest) = unquote(arg).ok_or_else(|| name.to_owned())?;
        let value = rest
            .trim()
            .strip_prefix('=')
            .and_then(|v| v.trim().parse::<i16>().ok())
            .ok_or_else(|| name.to_owned())?;
        names.insert(value, label);
    }
    Ok(names)
}

/// A single-quoted string at the start of `s` with its backslash escapes resolved, and the
/// text after its closing quote.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('\'')?.char_indices();
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' => return Some((out, &s[i + 2..])),
            '\\' => {
                let (_, escaped) = chars.next()?;
                out.push(match escaped {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    '0' => '\0',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    other => other,
                });
            }
            other => out.push(other),
        }
    }
    None
}

/// Splits constructor arguments at the commas outside parentheses and quotes.
fn split_args(inner: &str) -> Result<Vec<&str>, String> {
    let mut args = Vec::new();
    let (mut depth, mut start, mut quoted, mut escaped) = (0_usize, 0, false, false);
    for (i, c) in inner.char_indices() {
        if quoted {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '\'') => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '\'' => quoted = true,
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or_else(|| inner.to_owned())?,
            ',' if depth == 0 => {
                args.push(inner[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return Err(inner.to_owned());
    }
    let last = inner[start..].trim();
    if !last.is_empty() || !args.is_empty() {
        args.push(last);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrappers_and_parameters_parse_to_the_wire_shape() {
        assert_eq!(
            parse("LowCardinality(Nullable(String))").unwrap(),
            ChType::Nullable(Box::new(ChType::String))
        );
        assert_eq!(
            parse("Decimal(18, 4)").unwrap(),
            ChType::Decimal { width: 8, scale: 4 }
        );
        assert_eq!(
            parse("Decimal256(20)").unwrap(),
            ChType::Decimal { width: 32, scale: 20 }
        );
        assert_eq!(parse("DateTime('Europe/Paris')").unwrap(), ChType::DateTime);
        assert_eq!(
            parse("DateTime64(3, 'Asia/Tokyo')").unwrap(),
            ChType::DateTime64 { precision: 3 }
        );
        assert_eq!(
            parse("Map(String, Array(Nullable(UInt64)))").unwrap(),
            ChType::Map(
                Box::new(ChType::String),
                Box::new(ChType::Array(Box::new(ChType::Nullable(Box::new(ChType::UInt(
                    8
                ))))))
            )
        );
        assert_eq!(
            parse("SimpleAggregateFunction(sum, UInt64)").unwrap(),
            ChType::UInt(8)
        );
        assert_eq!(parse("JSON(max_dynamic_paths = 8)").unwrap(), ChType::Json);
    }

    #[test]
    fn enum_labels_keep_commas_quotes_and_escapes() {
        let ChType::Enum { width, names } = parse(r"Enum8('a, b' = 1, 'it\'s' = -2, '(x)' = 3)").unwrap()
        else {
            panic!("not an enum")
        };
        assert_eq!(width, 1);
        assert_eq!(names[&1], "a, b");
        assert_eq!(names[&-2], "it's");
        assert_eq!(names[&3], "(x)");
    }

    #[test]
    fn unsupported_and_malformed_types_are_errors_not_panics() {
        for name in [
            "Tuple(UInt8, String)",
            "AggregateFunction(uniq, UInt64)",
            "Interval Second",
            "Decimal(77, 2)",
            "DateTime64(10)",
            "Array(",
            "Array(UInt8",
            "Enum8('a = 1)",
            "FixedString(x)",
            "",
        ] {
            assert!(parse(name).is_err(), "{name}");
        }
        let deep = format!("{}UInt8{}", "Array(".repeat(100), ")".repeat(100));
        assert!(parse(&deep).unwrap_err().contains("nested"));
    }
}

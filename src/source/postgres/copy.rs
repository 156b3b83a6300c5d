//! Reading the model through `COPY (query) TO STDOUT (FORMAT binary)`.
//!
//! The rows are the same as the extended protocol's, each value in its type's binary form,
//! but they arrive as one stream of bytes instead of a message the driver unpacks into a row
//! object per row: the tuples are split here and decoded straight into values
//! ([`super::binary`]), which takes about 30% of the source's instructions out of a
//! full-model read.
//!
//! The layout (<https://www.postgresql.org/docs/current/sql-copy.html#SQL-COPY-BINARY-FORMAT>):
//! an 11-byte signature, a flags word and a header extension of a given length; then each
//! tuple as a 16-bit field count and, per field, a 32-bit length (-1 for NULL) and the
//! value's bytes; then a field count of -1. The server cuts the data into messages as it
//! likes (PostgreSQL sends a tuple per message, the header with the first), so a tuple may
//! span messages: what is left of one waits for the next.

use futures::{Stream, StreamExt};

use super::{DecodeResult, PlannedColumn};
use crate::model::value::Value;
use crate::source::{RowSink, SourceError, SourceRow, StreamEnd};

/// The signature that opens binary COPY data.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// The statement that reads `query` as binary COPY data. The query stands on lines of its
/// own, so that a trailing `--` comment cannot swallow the closing parenthesis; a trailing
/// semicolon is dropped.
pub(super) fn statement(query: &str) -> String {
    let query = query.trim_end().trim_end_matches(';');
    format!("COPY (\n{query}\n) TO STDOUT (FORMAT binary)")
}

/// Where the reader is in the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Header,
    Tuples,
    Ended,
}

/// Splits binary COPY data into tuples, whatever the message boundaries.
struct Tuples {
    /// The start of a tuple (or of the header) whose end has not arrived yet.
    pending: Vec<u8>,
    part: Part,
    /// Fields in every tuple: the query's columns.
    width: usize,
}

/// Why the COPY data could not be read: never the server's fault in practice, so the run
/// stops rather than guess.
fn broken(what: &str) -> SourceError {
    SourceError::Query(format!("the server's COPY data is malformed: {what}"))
}

impl Tuples {
    fn new(width: usize) -> Tuples {
        Tuples {
            pending: Vec::new(),
            part: Part::Header,
            width,
        }
    }

    /// Takes the next message of data and calls `tuple` with each tuple completed by it (the
    /// bytes after its field count).
    fn push(
        &mut self,
        data: &[u8],
        tuple: &mut impl FnMut(&[u8]) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        if self.pending.is_empty() {
            let used = self.split(data, tuple)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            self.pending.extend_from_slice(data);
            let pending = std::mem::take(&mut self.pending);
            let used = self.split(&pending, tuple);
            self.pending = pending;
            self.pending.drain(..used?);
        }
        Ok(())
    }

    /// Reads what `data` holds whole: the header, tuples, the trailer. Returns the bytes used.
    fn split(
        &mut self,
        data: &[u8],
        tuple: &mut impl FnMut(&[u8]) -> Result<(), SourceError>,
    ) -> Result<usize, SourceError> {
        let mut at = 0;
        if self.part == Part::Header {
            // Signature, flags, extension length, extension.
            let Some(extension) = data.get(15..19) else {
                return Ok(0);
            };
            if &data[..11] != SIGNATURE {
                return Err(broken("it does not start with the binary COPY signature"));
            }
            let extension = u32::from_be_bytes([extension[0], extension[1], extension[2], extension[3]]);
            let end = 19usize.saturating_add(extension as usize);
            if data.len() < end {
                return Ok(0);
            }
            at = end;
            self.part = Part::Tuples;
        }
        while self.part == Part::Tuples {
            let Some(count) = data.get(at..at + 2) else {
                break;
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.part = Part::Ended;
                at += 2;
                break;
            }
            if usize::try_from(count).ok() != Some(self.width) {
                return Err(broken(&format!(
                    "a tuple of {count} fields where the query has {}",
                    self.width
                )));
            }
            let Some(end) = tuple_end(data, at + 2, self.width)? else {
                break;
            };
            tuple(&data[at + 2..end])?;
            at = end;
        }
        Ok(at)
    }

    /// True once the trailer has been read.
    fn ended(&self) -> bool {
        self.part == Part::Ended && self.pending.is_empty()
    }
}

/// Where the tuple of `width` fields starting at `at` ends, or `None` when its end has not
/// arrived.
fn tuple_end(data: &[u8], mut at: usize, width: usize) -> Result<Option<usize>, SourceError> {
    for _ in 0..width {
        let Some(length) = data.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        let length = i32::from_be_bytes([length[0], length[1], length[2], length[3]]);
        if length == -1 {
            continue;
        }
        let length = usize::try_from(length).map_err(|_| broken("a negative field length"))?;
        at = at.saturating_add(length);
        if at > data.len() {
            return Ok(None);
        }
    }
    Ok(Some(at))
}

/// Decodes one tuple's fields (already checked whole by [`tuple_end`]) against the plan.
fn decode_tuple(mut fields: &[u8], plan: &[PlannedColumn]) -> Result<SourceRow, SourceError> {
    crate::source::decode_row(plan.len(), |i| -> DecodeResult {
        let (length, rest) = fields.split_at(4);
        let length = i32::from_be_bytes([length[0], length[1], length[2], length[3]]);
        let Ok(length) = usize::try_from(length) else {
            fields = rest;
            return Ok(Value::Null);
        };
        let (value, rest) = rest.split_at(length);
        fields = rest;
        super::binary::decode(value, plan[i].decoder)
    })
}

/// Streams the COPY data of `chunks` as rows into `sink` until the trailer, an error (sent as
/// the last item) or the receiver going away. Waiting for data also watches the receiver.
pub(super) async fn pump<S, B>(
    chunks: S,
    mut sink: RowSink,
    plan: &[PlannedColumn],
    query_error: impl Fn(sqlx::Error) -> SourceError,
) -> StreamEnd
where
    S: Stream<Item = Result<B, sqlx::Error>>,
    B: AsRef<[u8]>,
{
    let mut chunks = std::pin::pin!(chunks);
    let mut tuples = Tuples::new(plan.len());
    let mut rows = Vec::new();
    loop {
        let next = tokio::select! {
            next = chunks.next() => next,
            () = sink.closed() => return StreamEnd::ReceiverGone,
        };
        let data = match next {
            None if tuples.ended() => return sink.finish().await,
            None => return sink.fail(broken("it ended before its trailer")).await,
            Some(Err(e)) => return sink.fail(query_error(e)).await,
            Some(Ok(data)) => data,
        };
        let split = tuples.push(data.as_ref(), &mut |fields| {
            rows.push(decode_tuple(fields, plan)?);
            Ok(())
        });
        for row in rows.drain(..) {
            if !sink.push(row).await {
                return StreamEnd::ReceiverGone;
            }
        }
        if let Err(e) = split {
            return sink.fail(e).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary COPY data: header, then `tuples` of optional fields, then the trailer.
    fn copy_data(tuples: &[Vec<Option<&[u8]>>]) -> Vec<u8> {
        let mut data = SIGNATURE.to_vec();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&4u32.to_be_bytes());
        data.extend_from_slice(b"ext!");
        for tuple in tuples {
            data.extend_from_slice(&(tuple.len() as i16).to_be_bytes());
            for field in tuple {
                match field {
                    None => data.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(bytes) => {
                        data.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                        data.extend_from_slice(bytes);
                    }
                }
            }
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
        data
    }

    /// The tuples read from `data` cut into messages of `size` bytes.
    fn split_in(data: &[u8], size: usize, width: usize) -> Result<(Vec<Vec<u8>>, bool), SourceError> {
        let mut tuples = Tuples::new(width);
        let mut seen = Vec::new();
        for message in data.chunks(size) {
            tuples.push(message, &mut |t| {
                seen.push(t.to_vec());
                Ok(())
            })?;
        }
        Ok((seen, tuples.ended()))
    }

    #[test]
    fn tuples_are_found_whatever_the_message_boundaries() {
        let long = vec![7u8; 300];
        let data = copy_data(&[
            vec![Some(b"ab".as_slice()), None],
            vec![None, Some(long.as_slice())],
            vec![Some(b"".as_slice()), Some(b"x".as_slice())],
        ]);
        let (whole, ended) = split_in(&data, data.len(), 2).unwrap();
        assert!(ended);
        assert_eq!(whole.len(), 3);
        for size in 1..=data.len() {
            assert_eq!(split_in(&data, size, 2).unwrap(), (whole.clone(), true), "{size}");
        }
        // Without the trailer the data has not ended.
        assert!(!split_in(&data[..data.len() - 2], 4, 2).unwrap().1);
    }

    #[test]
    fn broken_data_is_an_error_not_a_panic() {
        let data = copy_data(&[vec![Some(b"ab".as_slice())]]);
        let mut bad_signature = data.clone();
        bad_signature[0] = b'X';
        assert!(split_in(&bad_signature, 64, 1).is_err());
        assert!(split_in(&data, 64, 3).unwrap_err().to_string().contains("3"));
        let mut negative = data.clone();
        let field = 19 + 4 + 2;
        negative[field..field + 4].copy_from_slice(&(-7i32).to_be_bytes());
        assert!(split_in(&negative, 64, 1).is_err());
        // A length past the end waits for more data instead of reading beyond it.
        let mut long = data.clone();
        long[field..field + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(split_in(&long, 64, 1).unwrap(), (vec![], false));
    }

    #[test]
    fn statements_survive_trailing_comments_and_semicolons() {
        assert_eq!(
            statement("SELECT 1 -- one\n ;  \n"),
            "COPY (\nSELECT 1 -- one\n \n) TO STDOUT (FORMAT binary)"
        );
    }
}

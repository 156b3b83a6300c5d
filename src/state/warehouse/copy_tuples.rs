//! Reading PostgreSQL's binary `COPY` data: tuples of a known number of fields, split out
//! whatever the message boundaries, and the state's 16-byte key hashes in them.

use futures::TryStreamExt;
use sqlx::postgres::PgConnection;

use super::write::COPY_HEADER;

/// Data without the shape it should have: a state block, or the server's `COPY` data.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Malformed(pub &'static str);

/// Splits PostgreSQL's binary `COPY` data into tuples of `N` fields, whatever the message
/// boundaries (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>).
#[derive(Debug)]
pub(super) struct CopyTuples<const N: usize> {
    pending: Vec<u8>,
    header_read: bool,
    ended: bool,
}

impl<const N: usize> Default for CopyTuples<N> {
    fn default() -> Self {
        CopyTuples {
            pending: Vec::new(),
            header_read: false,
            ended: false,
        }
    }
}

impl<const N: usize> CopyTuples<N> {
    /// Takes the next piece of data and calls `tuple` with the fields (`None`: NULL) of each
    /// tuple completed by it.
    pub fn feed<E: From<Malformed>>(
        &mut self,
        bytes: &[u8],
        mut tuple: impl FnMut([Option<&[u8]>; N]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.pending.extend_from_slice(bytes);
        let data = &self.pending[..];
        let mut at = 0;
        if !self.header_read {
            // Signature, flags, header extension length and extension.
            let Some(extension) = data.get(15..19) else {
                return Ok(());
            };
            if data[..11] != COPY_HEADER[..11] {
                return Err(Malformed("COPY data without the binary signature").into());
            }
            let end =
                19 + u32::from_be_bytes([extension[0], extension[1], extension[2], extension[3]]) as usize;
            if data.len() < end {
                return Ok(());
            }
            at = end;
            self.header_read = true;
        }
        while !self.ended {
            let Some(count) = data.get(at..at + 2) else {
                break;
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                break;
            }
            if usize::try_from(count).ok() != Some(N) {
                return Err(Malformed("COPY data with another number of columns").into());
            }
            let mut fields = [None; N];
            let mut end = at + 2;
            let mut whole = true;
            for slot in &mut fields {
                let Some(length) = data.get(end..end + 4) else {
                    whole = false;
                    break;
                };
                end += 4;
                let length = i32::from_be_bytes([length[0], length[1], length[2], length[3]]);
                if length < 0 {
                    continue;
                }
                let Some(value) = data.get(end..end + length as usize) else {
                    whole = false;
                    break;
                };
                *slot = Some(value);
                end += length as usize;
            }
            if !whole {
                break;
            }
            tuple(fields)?;
            at = end;
        }
        self.pending.drain(..at);
        Ok(())
    }

    /// True once the trailer was read.
    pub fn ended(&self) -> bool {
        self.ended && self.pending.is_empty()
    }
}

/// Text as an SQL string literal, for `COPY`, which takes no parameters.
pub(super) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Runs `COPY (query) TO STDOUT (FORMAT binary)` on `c`, calls `tuple` with the fields of each
/// tuple as they arrive, and checks that the data ended with its trailer.
pub(super) async fn copy_out<const N: usize, E>(
    c: &mut PgConnection,
    query: &str,
    mut tuple: impl FnMut([Option<&[u8]>; N]) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<Malformed> + From<sqlx::Error>,
{
    let mut data = c
        .copy_out_raw(&format!("COPY ({query}) TO STDOUT (FORMAT binary)"))
        .await?;
    let mut tuples = CopyTuples::<N>::default();
    while let Some(bytes) = data.try_next().await? {
        tuples.feed(&bytes, &mut tuple)?;
    }
    if tuples.ended() {
        Ok(())
    } else {
        Err(Malformed("the COPY data ended without its trailer").into())
    }
}

/// A 16-byte key hash as a number.
pub(super) fn hash_of(bytes: Option<&[u8]>) -> Result<u128, Malformed> {
    let bytes: [u8; 16] = bytes
        .and_then(|b| b.try_into().ok())
        .ok_or(Malformed("a key hash is not 16 bytes"))?;
    Ok(u128::from_be_bytes(bytes))
}

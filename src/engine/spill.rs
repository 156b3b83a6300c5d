//! The spill file: rows planned for sending, written while the model streams and read back
//! for delivery once the plan is complete (a duplicate key found late must still stop its
//! first row from being sent). It keeps memory flat whatever the number of changed rows.

use std::io::{BufRead, BufReader, Seek, Write};

use serde::Deserialize;

use crate::model::record::Operation;
use crate::model::value::{Document, Value, write_json_string};

/// One planned row, as read back.
#[derive(Debug)]
pub struct SpilledRow {
    /// The operation to send.
    pub operation: Operation,
    /// Canonical primary key.
    pub key: String,
    /// Fingerprint of the mapped record.
    pub fingerprint: u64,
    /// True for a row never delivered before.
    pub added: bool,
    /// Match fields.
    pub identity: Document,
    /// Canonical JSON of the match fields (what the state stores).
    pub identity_json: String,
    /// Mapped fields.
    pub fields: Document,
    /// Bytes of the row's spilled line: about what it weighs in a request.
    pub bytes: usize,
}

#[derive(Deserialize)]
struct Line<'a> {
    o: &'a str,
    #[serde(borrow)]
    k: std::borrow::Cow<'a, str>,
    f: u64,
    a: bool,
    #[serde(borrow)]
    i: &'a serde_json::value::RawValue,
    /// Fields holding a JSON null (absent when none): `null` in `d` is SQL NULL otherwise.
    #[serde(borrow, default)]
    n: Vec<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    d: &'a serde_json::value::RawValue,
}

/// A planned row's canonical JSON, as the spill keeps it.
#[derive(Debug, Clone, Copy)]
pub struct RowJson<'a> {
    /// The match fields.
    pub identity: &'a [u8],
    /// The mapped fields.
    pub fields: &'a [u8],
    /// The fields holding a JSON null, which `fields` writes as `null` like SQL NULL.
    pub json_nulls: &'a [&'a str],
}

/// Bytes of rows collected before they are handed to the writing thread.
const BLOCK: usize = 1 << 20;
/// Full blocks waiting for the writing thread.
const BLOCKS_IN_FLIGHT: usize = 4;

/// Writes planned rows to an anonymous temporary file. Rows are formatted into 1 MiB blocks
/// and a thread of its own writes the blocks, so the copying into the page cache happens off
/// the thread that reads the model (on a large model, every row is spilled).
pub struct SpillWriter {
    /// The block being filled.
    block: Vec<u8>,
    /// Full blocks, to the writing thread (`None` once closed).
    full: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Written blocks coming back, to be filled again.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    /// The writing thread; it returns the file.
    writer: Option<std::thread::JoinHandle<std::io::Result<std::fs::File>>>,
    /// Bytes handed to the writing thread.
    handed_over: u64,
}

impl SpillWriter {
    /// A new spill in the system's temporary directory (removed when dropped).
    pub fn new() -> std::io::Result<SpillWriter> {
        let mut file = tempfile::tempfile()?;
        let (full, blocks) = std::sync::mpsc::sync_channel::<Vec<u8>>(BLOCKS_IN_FLIGHT);
        let (give_back, spare) = std::sync::mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("spill-writer".to_owned())
            .spawn(move || {
                for mut block in blocks {
                    file.write_all(&block)?;
                    block.clear();
                    // The writer may be gone already; the block is then just dropped.
                    let _ = give_back.send(block);
                }
                Ok(file)
            })?;
        Ok(SpillWriter {
            block: Vec::with_capacity(BLOCK + 4096),
            full: Some(full),
            spare,
            writer: Some(writer),
            handed_over: 0,
        })
    }

    /// Appends one row; `identity_json` and `fields_json` are the canonical JSON of its
    /// match fields and of its mapped fields. Returns where the row starts in the spill (for
    /// [`SpillReader::only_rows_at`]).
    pub fn push(
        &mut self,
        operation: Operation,
        key: &str,
        fingerprint: u64,
        added: bool,
        json: RowJson<'_>,
    ) -> std::io::Result<u64> {
        let RowJson {
            identity: identity_json,
            fields: fields_json,
            json_nulls,
        } = json;
        let offset = self.handed_over + self.block.len() as u64;
        let b = &mut self.block;
        b.extend_from_slice(b"{\"o\":\"");
        b.extend_from_slice(operation.as_str().as_bytes());
        b.extend_from_slice(b"\",\"k\":");
        write_json_string(key, b);
        write!(b, ",\"f\":{fingerprint},\"a\":{added},\"i\":")?;
        b.extend_from_slice(identity_json);
        if !json_nulls.is_empty() {
            b.extend_from_slice(b",\"n\":[");
            for (i, target) in json_nulls.iter().enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                write_json_string(target, b);
            }
            b.push(b']');
        }
        b.extend_from_slice(b",\"d\":");
        b.extend_from_slice(fields_json);
        b.extend_from_slice(b"}\n");
        if self.block.len() >= BLOCK {
            self.hand_over()?;
        }
        Ok(offset)
    }

    /// Sends the filled block to the writing thread and takes an empty one.
    fn hand_over(&mut self) -> std::io::Result<()> {
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BLOCK + 4096));
        let block = std::mem::replace(&mut self.block, next);
        self.handed_over += block.len() as u64;
        let sent = match &self.full {
            Some(full) => full.send(block).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The thread stopped: its error says why.
            self.join().map(drop)
        }
    }

    /// Closes the channel and waits for the writing thread.
    fn join(&mut self) -> std::io::Result<std::fs::File> {
        self.full = None;
        match self.writer.take() {
            Some(writer) => writer
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the spill writing thread panicked"))),
            None => Err(std::io::Error::other("the spill is already closed")),
        }
    }

    /// Finishes writing and returns a reader from the first row.
    pub fn into_reader(mut self) -> std::io::Result<SpillReader> {
        if !self.block.is_empty() {
            self.hand_over()?;
        }
        let mut file = self.join()?;
        file.rewind()?;
        Ok(SpillReader {
            lines: BufReader::with_capacity(1 << 20, file),
            line: String::new(),
            only: None,
        })
    }
}

/// Reads planned rows back in order.
pub struct SpillReader {
    lines: BufReader<std::fs::File>,
    line: String,
    /// When set, only the rows starting at these offsets (ascending) are read, each with one
    /// positioned read instead of reading every row in between.
    only: Option<std::vec::IntoIter<u64>>,
}

impl SpillReader {
    /// From now on reads only the rows starting at `offsets` (as [`SpillWriter::push`]
    /// returned them, ascending): when few rows of a large spill are sent.
    pub fn only_rows_at(&mut self, offsets: Vec<u64>) {
        self.only = Some(offsets.into_iter());
    }

    /// Reads the line starting at `offset` into `self.line`.
    fn read_line_at(&mut self, offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let file = self.lines.get_ref();
        let mut bytes = vec![0u8; 1024];
        let mut filled = 0;
        loop {
            let n = file.read_at(&mut bytes[filled..], offset + filled as u64)?;
            if let Some(end) = bytes[filled..filled + n].iter().position(|b| *b == b'\n') {
                bytes.truncate(filled + end);
                break;
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "a spilled row ends without its newline",
                ));
            }
            filled += n;
            if filled == bytes.len() {
                bytes.resize(bytes.len() * 2, 0);
            }
        }
        self.line =
            String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(())
    }

    /// Starts again from the first row.
    pub fn rewind(&mut self) -> std::io::Result<()> {
        self.only = None;
        self.lines.rewind()
    }

    /// The next row, or `None` at the end.
    pub fn next_row(&mut self) -> std::io::Result<Option<SpilledRow>> {
        self.next_row_where(|_, operation, added| Some((operation, added)))
    }

    /// The next row that `choose` keeps, given its key, operation and added flag; `choose`
    /// may change both. Rows it skips are never decoded beyond their key, which matters when
    /// the spill holds every row of the model and few are sent.
    pub fn next_row_where(
        &mut self,
        mut choose: impl FnMut(&str, Operation, bool) -> Option<(Operation, bool)>,
    ) -> std::io::Result<Option<SpilledRow>> {
        let invalid = |e: serde_json::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        loop {
            self.line.clear();
            if let Some(only) = self.only.as_mut() {
                match only.next() {
                    Some(offset) => self.read_line_at(offset)?,
                    None => return Ok(None),
                }
            } else if self.lines.read_line(&mut self.line)? == 0 {
                return Ok(None);
            }
            let bytes = self.line.len();
            let l: Line<'_> = serde_json::from_str(self.line.trim_end()).map_err(invalid)?;
            let operation = match l.o {
                "insert" => Operation::Insert,
                "update" => Operation::Update,
                "delete" => Operation::Delete,
                _ => Operation::Upsert,
            };
            let Some((operation, added)) = choose(&l.k, operation, l.a) else {
                continue;
            };
            return Ok(Some(SpilledRow {
                operation,
                fingerprint: l.f,
                added,
                identity: parse_document(l.i.get()).map_err(invalid)?,
                identity_json: l.i.get().to_owned(),
                fields: {
                    let mut fields = parse_document(l.d.get()).map_err(invalid)?;
                    for target in &l.n {
                        set_json_null(&mut fields, target);
                    }
                    fields
                },
                key: l.k.into_owned(),
                bytes,
            }));
        }
    }
}

/// Puts a JSON null at the dotted `target` of a document read back from canonical JSON, where
/// it reads as SQL NULL.
fn set_json_null(doc: &mut Document, target: &str) {
    let (head, rest) = match target.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (target, None),
    };
    match (doc.get_mut(head), rest) {
        (Some(slot), None) => *slot = Value::Json(serde_json::Value::Null),
        (Some(Value::Object(inner)), Some(rest)) => set_json_null(inner, rest),
        _ => {}
    }
}

/// A document from the canonical JSON of an object, numbers kept exact.
pub fn parse_document(json: &str) -> Result<Document, serde_json::Error> {
    match Value::from_json_text(json)? {
        Value::Object(doc) => Ok(doc),
        _ => Ok(Document::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json<'a>(identity: &'a [u8], json_nulls: &'a [&'a str], fields: &'a [u8]) -> RowJson<'a> {
        RowJson {
            identity,
            fields,
            json_nulls,
        }
    }
    use std::str::FromStr;

    #[test]
    fn only_the_rows_at_the_given_offsets_are_read_back() {
        let mut w = SpillWriter::new().unwrap();
        let mut offsets = Vec::new();
        // Enough rows to cross several 1 MiB blocks, a few longer than one positioned read.
        for i in 0..30_000u64 {
            let mut fields = Document::new();
            let text = if i % 1000 == 7 {
                "x".repeat(5000)
            } else {
                format!("row {i}")
            };
            fields.insert("t".into(), Value::Text(text));
            let body = crate::model::value::canonical_bytes(&fields);
            offsets.push(
                w.push(
                    Operation::Upsert,
                    &format!("k{i}"),
                    i,
                    false,
                    json(b"{}", &[], &body),
                )
                .unwrap(),
            );
        }
        let mut r = w.into_reader().unwrap();
        let wanted: Vec<u64> = (0..30_000u64).filter(|i| i % 100 == 7).collect();
        r.only_rows_at(wanted.iter().map(|i| offsets[*i as usize]).collect());
        let mut got = Vec::new();
        while let Some(row) = r.next_row().unwrap() {
            got.push(row.fingerprint);
            let expected = if row.fingerprint % 1000 == 7 {
                5000
            } else {
                format!("row {}", row.fingerprint).len()
            };
            match row.fields.get("t") {
                Some(Value::Text(t)) => assert_eq!(t.len(), expected),
                other => panic!("field t: {other:?}"),
            }
        }
        assert_eq!(got, wanted);
        // Rewinding reads every row again.
        r.rewind().unwrap();
        let mut all = 0;
        while r.next_row().unwrap().is_some() {
            all += 1;
        }
        assert_eq!(all, 30_000);
    }

    #[test]
    fn rows_come_back_with_the_same_canonical_bytes() {
        let mut fields = Document::new();
        fields.insert(
            "n".into(),
            Value::Decimal(bigdecimal::BigDecimal::from_str("12345678901234567890.5").unwrap()),
        );
        fields.insert("s".into(), Value::Text("é\n\"".into()));
        let mut nested = Document::new();
        nested.insert("x".into(), Value::Int(1));
        fields.insert("o".into(), Value::Object(nested));
        let mut identity = Document::new();
        identity.insert("s".into(), Value::Text("é\n\"".into()));
        let mut w = SpillWriter::new().unwrap();
        w.push(
            Operation::Upsert,
            "k\"1",
            42,
            true,
            json(
                &crate::model::value::canonical_bytes(&identity),
                &[],
                &crate::model::value::canonical_bytes(&fields),
            ),
        )
        .unwrap();
        let mut r = w.into_reader().unwrap();
        let row = r.next_row().unwrap().unwrap();
        assert_eq!((row.key.as_str(), row.fingerprint, row.added), ("k\"1", 42, true));
        assert_eq!(
            crate::model::value::canonical_bytes(&row.fields),
            crate::model::value::canonical_bytes(&fields)
        );
        assert_eq!(row.identity_json, "{\"s\":\"é\\n\\\"\"}");
        assert!(r.next_row().unwrap().is_none());
    }

    #[test]
    fn json_nulls_come_back_as_json_nulls_and_sql_nulls_as_sql_nulls() {
        let mut nested = Document::new();
        nested.insert("j".into(), Value::Json(serde_json::Value::Null));
        let mut fields = Document::new();
        fields.insert("a".into(), Value::Json(serde_json::Value::Null));
        fields.insert("b".into(), Value::Null);
        fields.insert("p".into(), Value::Object(nested));
        let mut w = SpillWriter::new().unwrap();
        let body = crate::model::value::canonical_bytes(&fields);
        w.push(
            Operation::Upsert,
            "k",
            1,
            false,
            json(b"{}", &["a", "p.j"], &body),
        )
        .unwrap();
        w.push(Operation::Upsert, "k2", 2, false, json(b"{}", &[], &body))
            .unwrap();
        let mut r = w.into_reader().unwrap();
        assert_eq!(r.next_row().unwrap().unwrap().fields, fields);
        let plain = r.next_row().unwrap().unwrap().fields;
        assert_eq!(plain["a"], Value::Null);
    }
}

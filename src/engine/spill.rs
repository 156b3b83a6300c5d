//! The spill file: rows planned for sending, written while the model streams and read back
//! for delivery once the plan is complete (a duplicate key found late must still stop its
//! first row from being sent). It keeps memory flat whatever the number of changed rows.
//!
//! Rows are packed in a small binary framing (operation, key, the canonical JSON of the match
//! fields and of the record) into blocks of [`BLOCK`] bytes, and each block is compressed with
//! zstd as a frame of its own by the writing thread, off the thread that reads the model. A
//! row's position is its block's number and its offset in the block, so the rows a diff names
//! are read back by decompressing only the blocks that hold them. The fingerprint is not
//! stored: it is the hash of the record's bytes, computed again from the record read back
//! once the destination accepted it ([`record_fingerprint`]).

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;

use crate::model::record::{Fields, Operation};

/// One planned row, as read back.
#[derive(Debug)]
pub struct SpilledRow {
    /// The operation to send.
    pub operation: Operation,
    /// Canonical primary key.
    pub key: String,
    /// True for a row never delivered before.
    pub added: bool,
    /// Match fields: their canonical JSON as spilled (what the state stores), parsed only
    /// when asked for.
    pub identity: Fields,
    /// Mapped fields: their canonical JSON as spilled, parsed only when asked for; their
    /// fingerprint is [`record_fingerprint`].
    pub fields: Fields,
    /// Bytes of the row's key, match fields and record: about what it weighs in a request.
    pub bytes: usize,
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

/// Uncompressed bytes of rows per block. Measured on the 8-field rows of the scale
/// benchmark (zstd level 1): 64 KiB blocks keep a row's positioned read to one 64 KiB
/// decompression while packing nearly as tight as larger ones.
const BLOCK: usize = 64 * 1024;
/// Full blocks waiting for the writing thread.
const BLOCKS_IN_FLIGHT: usize = 8;
/// zstd level of the blocks: level 1 packs these rows about as tight as level 3 at about
/// twice the speed, and the writing thread must keep up with the model.
const LEVEL: i32 = 1;
/// Bytes before each block in the file: its compressed and uncompressed lengths.
const BLOCK_HEADER: usize = 8;

/// Where a compressed block lies in the file.
#[derive(Debug, Clone, Copy)]
struct BlockAt {
    offset: u64,
    compressed: u32,
    raw: u32,
}

/// What the writing thread returns: the file and where each block is.
type Written = std::io::Result<(std::fs::File, Vec<BlockAt>)>;

/// Writes planned rows to an anonymous temporary file. Rows are packed into blocks and a
/// thread of its own compresses and writes the blocks, so the compression and the copying
/// into the page cache happen off the thread that reads the model (on a large model, every
/// row is spilled).
pub struct SpillWriter {
    /// The block being filled.
    block: Vec<u8>,
    /// Full blocks, to the writing thread (`None` once closed).
    full: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Written blocks coming back, to be filled again.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    /// The writing thread.
    writer: Option<std::thread::JoinHandle<Written>>,
    /// Blocks handed to the writing thread.
    blocks: u64,
    /// Compressed bytes written, shared with the writing thread.
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SpillWriter {
    /// A new spill in the system's temporary directory (removed when dropped).
    pub fn new() -> std::io::Result<SpillWriter> {
        let file = tempfile::tempfile()?;
        let (full, blocks) = std::sync::mpsc::sync_channel::<Vec<u8>>(BLOCKS_IN_FLIGHT);
        let (give_back, spare) = std::sync::mpsc::channel();
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = written.clone();
        let writer = std::thread::Builder::new()
            .name("spill-writer".to_owned())
            .spawn(move || write_blocks(file, &blocks, &give_back, &counter))?;
        Ok(SpillWriter {
            block: Vec::with_capacity(BLOCK + 4096),
            full: Some(full),
            spare,
            writer: Some(writer),
            blocks: 0,
            written,
        })
    }

    /// Appends one row; `json` holds the canonical JSON of its match fields and of its
    /// mapped fields. `fingerprint` must be what [`row_fingerprint`] gives for them (it is
    /// computed again from the record read back, not stored). Returns the row's position in
    /// the spill (for [`SpillReader::only_rows_at`]).
    pub fn push(
        &mut self,
        operation: Operation,
        key: &str,
        fingerprint: u64,
        added: bool,
        json: RowJson<'_>,
    ) -> std::io::Result<u64> {
        debug_assert_eq!(fingerprint, row_fingerprint(json.fields, json.json_nulls));
        let in_block = u32::try_from(self.block.len())
            .map_err(|_| std::io::Error::other("a spill block grew over 4 GiB"))?;
        let position = (self.blocks << 32) | u64::from(in_block);
        let b = &mut self.block;
        b.push(operation_code(operation) | if added { ADDED } else { 0 });
        put_bytes(b, key.as_bytes());
        put_bytes(b, json.identity);
        put_varint(b, json.json_nulls.len() as u64);
        for target in json.json_nulls {
            put_bytes(b, target.as_bytes());
        }
        put_bytes(b, json.fields);
        if self.block.len() >= BLOCK {
            self.hand_over()?;
        }
        Ok(position)
    }

    /// Compressed bytes written to the file so far (blocks still being compressed are not
    /// counted).
    pub fn bytes_written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends the filled block to the writing thread and takes an empty one.
    fn hand_over(&mut self) -> std::io::Result<()> {
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BLOCK + 4096));
        let block = std::mem::replace(&mut self.block, next);
        self.blocks += 1;
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
    fn join(&mut self) -> Written {
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
        let (file, blocks) = self.join()?;
        let bytes = self.bytes_written();
        Ok(SpillReader {
            file,
            blocks,
            bytes,
            decompressor: zstd::bulk::Decompressor::new()?,
            compressed: Vec::new(),
            raw: Vec::new(),
            current: None,
            at: 0,
            only: None,
        })
    }
}

/// The writing thread: compresses each block as a zstd frame and appends it, after its
/// lengths, to the file.
fn write_blocks(
    file: std::fs::File,
    blocks: &std::sync::mpsc::Receiver<Vec<u8>>,
    give_back: &std::sync::mpsc::Sender<Vec<u8>>,
    written: &std::sync::atomic::AtomicU64,
) -> Written {
    let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut compressed = Vec::with_capacity(zstd::zstd_safe::compress_bound(BLOCK + 4096));
    let mut at = Vec::new();
    let mut offset = 0u64;
    for mut block in blocks {
        compressed.clear();
        compressed.reserve(zstd::zstd_safe::compress_bound(block.len()));
        compressor.compress_to_buffer(&block, &mut compressed)?;
        let too_large = || std::io::Error::other("a spill block grew over 4 GiB");
        let entry = BlockAt {
            offset,
            compressed: u32::try_from(compressed.len()).map_err(|_| too_large())?,
            raw: u32::try_from(block.len()).map_err(|_| too_large())?,
        };
        out.write_all(&entry.compressed.to_le_bytes())?;
        out.write_all(&entry.raw.to_le_bytes())?;
        out.write_all(&compressed)?;
        let length = (BLOCK_HEADER + compressed.len()) as u64;
        offset += length;
        written.fetch_add(length, std::sync::atomic::Ordering::Relaxed);
        at.push(entry);
        block.clear();
        // The writer may be gone already; the block is then just dropped.
        let _ = give_back.send(block);
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    Ok((file, at))
}

/// The fingerprint of a spilled record: the planner's, from its canonical JSON and the
/// targets holding a JSON null.
pub fn row_fingerprint(fields: &[u8], json_nulls: &[&str]) -> u64 {
    use super::plan::{fingerprint, fingerprint_with_json_nulls};
    fingerprint_with_json_nulls(fingerprint(fields), json_nulls)
}

/// The fingerprint of a record's fields read back from the spill ([`SpilledRow::fields`]),
/// from the canonical JSON they still hold; `None` once they were built as a document or
/// changed, when the JSON nulls among them can no longer be told from SQL NULLs.
pub fn record_fingerprint(fields: &Fields) -> Option<u64> {
    use super::plan::{fingerprint, fingerprint_with_json_nulls};
    let json = fields.canonical_json()?;
    Some(fingerprint_with_json_nulls(
        fingerprint(json.as_bytes()),
        fields.json_nulls(),
    ))
}

const ADDED: u8 = 0x10;

fn operation_code(operation: Operation) -> u8 {
    match operation {
        Operation::Upsert => 0,
        Operation::Insert => 1,
        Operation::Update => 2,
        Operation::Delete => 3,
    }
}

fn operation_of(code: u8) -> Operation {
    match code & 0x0F {
        1 => Operation::Insert,
        2 => Operation::Update,
        3 => Operation::Delete,
        _ => Operation::Upsert,
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the spill is damaged: {what}"),
    )
}

/// Reads one row's fields from a block, from `at`.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> std::io::Result<u8> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| invalid("a row is cut short"))?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> std::io::Result<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7F) << shift;
            if b < 0x80 {
                return Ok(n);
            }
        }
        Err(invalid("a length is too long"))
    }

    fn bytes(&mut self) -> std::io::Result<&'a [u8]> {
        let len = usize::try_from(self.varint()?).map_err(|_| invalid("a length is too long"))?;
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| invalid("a row is cut short"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn text(&mut self) -> std::io::Result<&'a str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| invalid("text is not UTF-8"))
    }
}

/// Reads planned rows back in order.
pub struct SpillReader {
    file: std::fs::File,
    blocks: Vec<BlockAt>,
    /// Compressed bytes of the file.
    bytes: u64,
    decompressor: zstd::bulk::Decompressor<'static>,
    compressed: Vec<u8>,
    /// The block in `current`, uncompressed.
    raw: Vec<u8>,
    current: Option<usize>,
    /// The next row's offset in `raw` when reading every row.
    at: usize,
    /// When set, only the rows at these positions (ascending) are read, decompressing only
    /// the blocks that hold them.
    only: Option<Positions>,
}

/// Positions of spilled rows, ascending, as [`SpillWriter::push`] returned them; read as the
/// rows are, so they need not all be in memory.
pub type Positions = Box<dyn Iterator<Item = std::io::Result<u64>> + Send>;

impl SpillReader {
    /// From now on reads only the rows at `positions`: when few rows of a large spill are
    /// sent.
    pub fn only_rows_at(&mut self, positions: Positions) {
        self.only = Some(positions);
    }

    /// Bytes the spill takes on disk, compressed.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Starts again from the first row.
    pub fn rewind(&mut self) -> std::io::Result<()> {
        self.only = None;
        self.current = None;
        self.at = 0;
        Ok(())
    }

    /// Decompresses block `n` into `raw`, unless it is there already.
    fn load(&mut self, n: usize) -> std::io::Result<()> {
        if self.current == Some(n) {
            return Ok(());
        }
        let block = *self
            .blocks
            .get(n)
            .ok_or_else(|| invalid("a row's block is missing"))?;
        self.compressed.resize(block.compressed as usize, 0);
        self.file
            .read_exact_at(&mut self.compressed, block.offset + BLOCK_HEADER as u64)?;
        self.raw.clear();
        self.raw.reserve(block.raw as usize);
        let n_raw = self
            .decompressor
            .decompress_to_buffer(&self.compressed, &mut self.raw)?;
        if n_raw != block.raw as usize {
            return Err(invalid("a block decompressed to another length"));
        }
        self.current = Some(n);
        Ok(())
    }

    /// The offset in `raw` of the next row to read, its block loaded; `None` at the end.
    fn next_offset(&mut self) -> std::io::Result<Option<usize>> {
        if let Some(only) = self.only.as_mut() {
            let Some(position) = only.next().transpose()? else {
                return Ok(None);
            };
            self.load((position >> 32) as usize)?;
            return Ok(Some((position & 0xFFFF_FFFF) as usize));
        }
        loop {
            let block = match self.current {
                Some(_) if self.at < self.raw.len() => return Ok(Some(self.at)),
                Some(n) => n + 1,
                None => 0,
            };
            if block >= self.blocks.len() {
                return Ok(None);
            }
            self.load(block)?;
            self.at = 0;
        }
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
        loop {
            let Some(start) = self.next_offset()? else {
                return Ok(None);
            };
            let mut row = Cursor {
                bytes: &self.raw,
                at: start,
            };
            let tag = row.byte()?;
            let key = row.text()?;
            let identity = row.bytes()?;
            let nulls = row.varint()?;
            let mut json_nulls = Vec::new();
            for _ in 0..nulls {
                json_nulls.push(row.text()?);
            }
            let fields = row.bytes()?;
            self.at = row.at;
            let Some((operation, added)) = choose(key, operation_of(tag), tag & ADDED != 0) else {
                continue;
            };
            let identity_text = std::str::from_utf8(identity).map_err(|_| invalid("text is not UTF-8"))?;
            let fields_text = std::str::from_utf8(fields).map_err(|_| invalid("text is not UTF-8"))?;
            return Ok(Some(SpilledRow {
                operation,
                key: key.to_owned(),
                added,
                identity: Fields::from_canonical_json(identity_text.into(), Vec::new()),
                fields: Fields::from_canonical_json(
                    fields_text.into(),
                    json_nulls.iter().map(|t| (*t).into()).collect(),
                ),
                bytes: key.len() + identity.len() + fields.len(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::value::{Document, Value};

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
                    row_fingerprint(&body, &[]),
                    false,
                    json(b"{}", &[], &body),
                )
                .unwrap(),
            );
        }
        let mut r = w.into_reader().unwrap();
        let wanted: Vec<u64> = (0..30_000u64).filter(|i| i % 100 == 7).collect();
        let positions: Vec<u64> = wanted.iter().map(|i| offsets[*i as usize]).collect();
        r.only_rows_at(Box::new(positions.into_iter().map(Ok)));
        let mut got = Vec::new();
        while let Some(row) = r.next_row().unwrap() {
            let i: u64 = row.key[1..].parse().unwrap();
            got.push(i);
            let expected = if i % 1000 == 7 {
                5000
            } else {
                format!("row {i}").len()
            };
            assert_eq!(
                record_fingerprint(&row.fields),
                Some(row_fingerprint(
                    &crate::model::value::canonical_bytes(&row.fields),
                    &[]
                ))
            );
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
        let body = crate::model::value::canonical_bytes(&fields);
        let fingerprint = row_fingerprint(&body, &[]);
        w.push(
            Operation::Insert,
            "k\"1",
            fingerprint,
            true,
            json(&crate::model::value::canonical_bytes(&identity), &[], &body),
        )
        .unwrap();
        let mut r = w.into_reader().unwrap();
        assert!(r.bytes() > 0);
        let row = r.next_row().unwrap().unwrap();
        assert_eq!(
            (
                row.key.as_str(),
                record_fingerprint(&row.fields),
                row.added,
                row.operation
            ),
            ("k\"1", Some(fingerprint), true, Operation::Insert)
        );
        assert_eq!(
            crate::model::value::canonical_bytes(&row.fields),
            crate::model::value::canonical_bytes(&fields)
        );
        assert_eq!(row.identity.into_canonical_json(), "{\"s\":\"é\\n\\\"\"}");
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
        let nulls = ["a", "p.j"];
        w.push(
            Operation::Upsert,
            "k",
            row_fingerprint(&body, &nulls),
            false,
            json(b"{}", &nulls, &body),
        )
        .unwrap();
        w.push(
            Operation::Upsert,
            "k2",
            row_fingerprint(&body, &[]),
            false,
            json(b"{}", &[], &body),
        )
        .unwrap();
        let mut r = w.into_reader().unwrap();
        assert_eq!(r.next_row().unwrap().unwrap().fields, fields);
        let plain = r.next_row().unwrap().unwrap().fields;
        assert_eq!(plain["a"], Value::Null);
    }
}

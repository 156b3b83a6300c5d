//! What travels from the engine to a destination: one record, and the operation a batch
//! asks for.

use std::sync::OnceLock;

use super::value::{Document, Value, canonical_bytes, write_document};

/// What a batch asks the destination to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Create the record, or update it if it exists.
    Upsert,
    /// Update an existing record.
    Update,
    /// Create a new record.
    Insert,
    /// Delete the record (mirror mode).
    Delete,
}

impl Operation {
    /// The name used in templates, logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Upsert => "upsert",
            Operation::Update => "update",
            Operation::Insert => "insert",
            Operation::Delete => "delete",
        }
    }
}

/// One record to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The row's primary key in canonical text form (for outcomes and logs; never a payload).
    pub key: String,
    /// The match fields and their values: how the destination identifies the record (read
    /// back from the spill, built only when a connector looks at them).
    pub identity: Fields,
    /// The mapped fields to write (empty for deletes).
    pub fields: Fields,
}

/// A record's mapped fields or match fields: a [`Document`] (through `Deref`), and, for a
/// record read back from the canonical JSON the engine spilled, those bytes. A connector that sends the fields
/// as they are writes the bytes through ([`Fields::write_json`]) and the document is never
/// built; one that looks inside builds it on first use (or the engine builds it ahead,
/// [`Fields::parse_now`]). Changing the fields (`DerefMut`) drops the bytes.
#[derive(Clone, Default)]
pub struct Fields {
    /// The canonical JSON of the fields, while it is known and unchanged.
    json: Option<Box<str>>,
    /// The dotted targets holding a JSON null, which `json` writes as `null` like SQL NULL.
    json_nulls: Vec<Box<str>>,
    /// The document, built from `json` on first use when there is one.
    document: OnceLock<Document>,
}

impl Fields {
    /// Fields known by their canonical JSON (an object, as [`write_document`] writes it) and
    /// the dotted targets in it holding a JSON null. Nothing is parsed until the document is
    /// asked for.
    pub fn from_canonical_json(json: Box<str>, json_nulls: Vec<Box<str>>) -> Fields {
        Fields {
            json: Some(json),
            json_nulls,
            document: OnceLock::new(),
        }
    }

    /// The canonical JSON the fields were read from, unless they were built as a document or
    /// changed since.
    pub fn canonical_json(&self) -> Option<&str> {
        self.json.as_deref()
    }

    /// The dotted targets holding a JSON null that [`canonical_json`](Fields::canonical_json)
    /// writes as `null` (empty once the fields were built as a document or changed).
    pub fn json_nulls(&self) -> &[Box<str>] {
        &self.json_nulls
    }

    /// The fields' canonical JSON, taken out: the bytes they were read from when known, the
    /// document written out otherwise (the same text either way).
    pub fn into_canonical_json(self) -> String {
        match self.json {
            Some(json) => json.into_string(),
            None => String::from_utf8_lossy(&canonical_bytes(&self)).into_owned(),
        }
    }

    /// Appends the fields' canonical JSON to `out`: their bytes as read when known, the
    /// document written out otherwise (the same bytes either way).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match &self.json {
            Some(json) => out.extend_from_slice(json.as_bytes()),
            None => write_document(self, out),
        }
    }

    /// Builds the document now, failing if the canonical JSON does not parse (a damaged
    /// spill), rather than later when a connector reads a field.
    pub fn parse_now(&self) -> Result<(), serde_json::Error> {
        if self.document.get().is_none() {
            let document = self.try_parse()?;
            // Another thread reading the fields may have built it meanwhile: the same document.
            let _ = self.document.set(document);
        }
        Ok(())
    }

    fn try_parse(&self) -> Result<Document, serde_json::Error> {
        let Some(json) = &self.json else {
            return Ok(Document::new());
        };
        let mut document = parse_document(json)?;
        for target in &self.json_nulls {
            set_json_null(&mut document, target);
        }
        Ok(document)
    }

    fn parse(&self) -> Document {
        self.try_parse().unwrap_or_else(|e| {
            // `from_canonical_json` takes only what the engine itself wrote; a parse failure
            // means the bytes were damaged on disk. The record goes out as they are.
            tracing::error!(error = %e, "a record's canonical JSON does not parse; its fields read as empty");
            Document::new()
        })
    }
}

impl std::ops::Deref for Fields {
    type Target = Document;

    fn deref(&self) -> &Document {
        self.document.get_or_init(|| self.parse())
    }
}

impl std::ops::DerefMut for Fields {
    fn deref_mut(&mut self) -> &mut Document {
        if self.document.get().is_none() {
            self.document = OnceLock::from(self.parse());
        }
        // The document changes from here on: the bytes no longer describe it.
        self.json = None;
        self.json_nulls.clear();
        match self.document.get_mut() {
            Some(document) => document,
            // Set just above when it was not.
            None => unreachable!("the document was just built"),
        }
    }
}

impl From<Document> for Fields {
    fn from(document: Document) -> Fields {
        Fields {
            json: None,
            json_nulls: Vec::new(),
            document: OnceLock::from(document),
        }
    }
}

impl FromIterator<(String, Value)> for Fields {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(items: I) -> Fields {
        Fields::from(items.into_iter().collect::<Document>())
    }
}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a String, &'a Value);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Value>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for Fields {
    fn eq(&self, other: &Fields) -> bool {
        **self == **other
    }
}

impl PartialEq<Document> for Fields {
    fn eq(&self, other: &Document) -> bool {
        **self == *other
    }
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// A document from the canonical JSON of an object, numbers kept exact.
pub fn parse_document(json: &str) -> Result<Document, serde_json::Error> {
    match Value::from_json_text(json)? {
        Value::Object(doc) => Ok(doc),
        _ => Ok(Document::new()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Document {
        let mut nested = Document::new();
        nested.insert("j".into(), Value::Json(serde_json::Value::Null));
        nested.insert("n".into(), Value::Int(-3));
        Document::from([
            ("a".to_owned(), Value::Text("é\n\"".into())),
            ("b".to_owned(), Value::Null),
            ("p".to_owned(), Value::Object(nested)),
        ])
    }

    fn read_back() -> Fields {
        let mut json = Vec::new();
        write_document(&document(), &mut json);
        let json = String::from_utf8(json).unwrap().into_boxed_str();
        Fields::from_canonical_json(json, vec!["p.j".into()])
    }

    #[test]
    fn fields_read_back_write_their_bytes_and_read_as_the_document() {
        let fields = read_back();
        let mut through = Vec::new();
        fields.write_json(&mut through);
        let mut built = Vec::new();
        Fields::from(document()).write_json(&mut built);
        assert_eq!(through, built);
        assert_eq!(
            fields.canonical_json(),
            Some(std::str::from_utf8(&built).unwrap())
        );
        assert_eq!(fields, document());
        assert_eq!(fields["p"], document()["p"]);
        assert_eq!((&fields).into_iter().count(), 3);
    }

    #[test]
    fn changed_fields_drop_their_bytes() {
        let mut fields = read_back();
        fields.insert("c".into(), Value::Bool(true));
        assert_eq!(fields.canonical_json(), None);
        let mut out = Vec::new();
        fields.write_json(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":"é\n\"","b":null,"c":true,"p":{"j":null,"n":-3}}"#
        );
        assert_eq!(fields["p"], document()["p"]);
    }

    #[test]
    fn bytes_that_do_not_parse_fail_parse_now() {
        let fields = Fields::from_canonical_json("{\"a\":".into(), Vec::new());
        assert!(fields.parse_now().is_err());
        assert!(read_back().parse_now().is_ok());
        assert!(Fields::default().parse_now().is_ok());
    }
}

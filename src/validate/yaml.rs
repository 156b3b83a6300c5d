//! The documents of a YAML file, each with the line and column of its fields.
//!
//! Values come from `serde_yaml_ng`, the parser `backflow run` and the operator's tests use, so
//! that `validate` reads a manifest exactly as they do. Positions come from a second pass with
//! `saphyr-parser`, whose events carry a span each: the path of every key (`spec.mappings[1].to`)
//! is mapped to where it was written. The two parsers agree on where documents start and end;
//! when the second pass fails the findings simply carry no line.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span};
use serde::Deserialize;

/// A line and a column, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl Position {
    fn of(span: &Span) -> Position {
        Position {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// One document of a file.
#[derive(Debug)]
pub struct Document {
    /// The document's value (`Null` for an empty document).
    pub value: serde_yaml_ng::Value,
    /// Where each field path was written: the key of a mapping entry, the item of a sequence.
    pub positions: Positions,
}

/// Field paths (`spec.mappings[1].to`, `""` for the document itself) and their positions.
#[derive(Debug, Default)]
pub struct Positions(HashMap<String, Position>);

impl Positions {
    /// The position of `path`, or of its nearest ancestor written in the file (a missing
    /// required field points at the object that lacks it).
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(p) = self.0.get(path) {
                return Some(*p);
            }
            if path.is_empty() {
                return None;
            }
            path = parent(path);
        }
    }
}

/// `spec.mappings` of `spec.mappings[1]`, `spec` of `spec.mappings`, `""` of `spec`.
fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(at) => &path[..at],
        None => "",
    }
}

/// A file that is not valid YAML: what the parser said, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// The 0-based index of the document that failed.
    pub document: usize,
    /// The parser's message.
    pub message: String,
    /// Where, when the parser knows.
    pub position: Option<Position>,
}

/// Reads every document of `text`. Documents before a syntax error are kept.
pub fn documents(text: &str) -> (Vec<Document>, Option<SyntaxError>) {
    let mut positions = positions(text).into_iter();
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        // Merge keys (`<<: *defaults`) are applied, as kubectl applies them before sending.
        let parsed = serde_yaml_ng::Value::deserialize(doc).and_then(|mut value| {
            value.apply_merge()?;
            Ok(value)
        });
        match parsed {
            Ok(value) => docs.push(Document {
                value,
                positions: positions.next().unwrap_or_default(),
            }),
            Err(e) => {
                let position = e.location().map(|l| Position {
                    line: l.line(),
                    column: l.column(),
                });
                let error = SyntaxError {
                    document: i,
                    message: e.to_string(),
                    position,
                };
                return (docs, Some(error));
            }
        }
    }
    (docs, None)
}

/// One open collection while reading events.
enum Frame {
    /// A mapping: its path, and the key read whose value comes next.
    Mapping { path: String, key: Option<String> },
    /// A sequence: its path and the index of the next item.
    Sequence { path: String, next: usize },
}

/// The positions of every document of `text`; empty where the events could not be read.
fn positions(text: &str) -> Vec<Positions> {
    let mut out = Vec::new();
    let mut current = Positions::default();
    let mut stack: Vec<Frame> = Vec::new();
    for event in Parser::new_from_str(text) {
        let Ok((event, span)) = event else {
            out.push(std::mem::take(&mut current));
            return out;
        };
        match event {
            Event::DocumentStart(_) => {
                current = Positions::default();
                stack.clear();
            }
            Event::DocumentEnd => out.push(std::mem::take(&mut current)),
            Event::Scalar(value, ..) => {
                if let Some(Frame::Mapping { key: key @ None, .. }) = stack.last_mut() {
                    // A key: its position is the field's.
                    *key = Some(value.into_owned());
                    let path = value_path(&stack);
                    current.0.entry(path).or_insert(Position::of(&span));
                } else {
                    let path = value_path(&stack);
                    current.0.entry(path).or_insert(Position::of(&span));
                    advance(&mut stack);
                }
            }
            Event::Alias(_) => {
                if let Some(Frame::Mapping { key: key @ None, .. }) = stack.last_mut() {
                    *key = Some(String::new());
                } else {
                    let path = value_path(&stack);
                    current.0.entry(path).or_insert(Position::of(&span));
                    advance(&mut stack);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A collection used as a key gets no path of its own.
                let path = value_path(&stack);
                current.0.entry(path.clone()).or_insert(Position::of(&span));
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Mapping { path, key: None }
                } else {
                    Frame::Sequence { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                advance(&mut stack);
            }
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
    out
}

/// The path of the value the next event starts.
fn value_path(stack: &[Frame]) -> String {
    match stack.last() {
        None => String::new(),
        Some(Frame::Mapping { path, key }) => {
            let key = key.as_deref().unwrap_or("?");
            if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            }
        }
        Some(Frame::Sequence { path, next }) => format!("{path}[{next}]"),
    }
}

/// A value ended: the mapping waits for its next key, the sequence for its next item.
fn advance(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Mapping { key, .. }) => *key = None,
        Some(Frame::Sequence { next, .. }) => *next += 1,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_path_of_every_document_has_its_line_and_column() {
        let text = "---\n# first\napiVersion: v1\nkind: Secret\n---\nspec:\n  mappings:\n    - from: id\n      to: id\n    - {from: email, to: mail}\n";
        let (docs, err) = documents(text);
        assert_eq!(err, None);
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[0].positions.find("kind"),
            Some(Position { line: 4, column: 1 })
        );
        let p = &docs[1].positions;
        assert_eq!(
            p.find("spec.mappings[0].to"),
            Some(Position { line: 9, column: 7 })
        );
        assert_eq!(
            p.find("spec.mappings[1].to"),
            Some(Position { line: 10, column: 21 })
        );
        assert_eq!(
            p.find("spec.mappings[1].transforms[0]"),
            Some(Position { line: 10, column: 7 }),
            "a missing field points at its nearest written ancestor, the item's mapping"
        );
    }

    #[test]
    fn merge_keys_are_applied_as_kubectl_applies_them() {
        let (docs, err) = documents("base: &b {type: http}\nspec:\n  <<: *b\n  batchSize: 5\n");
        assert_eq!(err, None);
        let spec = &docs[0].value["spec"];
        assert_eq!(
            (spec["type"].as_str(), spec["batchSize"].as_u64()),
            (Some("http"), Some(5))
        );
    }

    #[test]
    fn a_syntax_error_names_its_document_and_line_and_keeps_the_documents_before() {
        let (docs, err) = documents("a: 1\n---\nb: [\n");
        assert_eq!(docs.len(), 1);
        let err = err.unwrap();
        assert_eq!(err.document, 1);
        assert!(err.position.is_some_and(|p| p.line >= 3), "{err:?}");
    }
}

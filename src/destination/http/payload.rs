//! The request side of the `http` destination: URL and header templates, rendered once per
//! operation when the connector is built, and the body of each batch.
//!
//! A body is the `body` template (the batch envelope) around the batch's records. Each record
//! is its canonical fields (its match fields for deletes), or, with a `record` template, the
//! JSON that template renders from them. Templates are Jinja (see `docs/templates.md`):
//! - URL and headers: `{{ operation }}` and `{{ secret.KEY }}`;
//! - `body`: `{{ operation }}`, `{{ records }}` (the JSON array of the records) and
//!   `{{ count }}`, or `{{ record }}` (one record: a body naming it is sent once per record);
//!   text, so its literal JSON is written as it is;
//! - `record`: the record's fields by name (nested objects by attribute, `properties.email`),
//!   `{{ record }}` (all of them) and `{{ operation }}`; JSON, so each `{{ … }}` writes a
//!   JSON value. A record whose JSON does not parse is rejected, naming the template.
//!
//! Secrets are bound only when URLs and headers are rendered: a body or record template that
//! names `secret` is refused when the connector is built (and when the manifest is
//! validated).

use std::collections::BTreeMap;

use minijinja::value::Value as JinjaValue;

use crate::destination::{DestinationError, SendError};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::{Document, Value, write_document};
use crate::template::values::to_jinja;
use crate::template::{Jinja, Limits, Mode};

/// The template variable holding the credentials Secret.
pub const SECRET: &str = "secret";
const OPERATION: &str = "operation";
const RECORDS: &str = "records";
const COUNT: &str = "count";
const RECORD: &str = "record";

/// Which variables a URL, header or body template may use.
#[derive(Clone, Copy)]
pub struct Allowed {
    /// `{{ secret.KEY }}`.
    pub secrets: bool,
    /// `{{ operation }}`.
    pub operation: bool,
    /// `{{ records }}`, `{{ count }}` and `{{ record }}`.
    pub records: bool,
}

impl Allowed {
    fn describe(self) -> String {
        let mut names = Vec::new();
        if self.operation {
            names.push("{{ operation }}");
        }
        if self.records {
            names.push("{{ records }}");
            names.push("{{ count }}");
            names.push("{{ record }}");
        }
        if self.secrets {
            names.push("{{ secret.KEY }}");
        }
        names.join(", ")
    }

    fn allows(self, name: &str) -> bool {
        match name {
            OPERATION => self.operation,
            RECORDS | COUNT | RECORD => self.records,
            SECRET => self.secrets,
            _ => false,
        }
    }
}

/// Variables of URL and header templates.
pub const URL_VARIABLES: Allowed = Allowed {
    secrets: true,
    operation: true,
    records: false,
};
/// Variables of `checkUrl`.
pub const CHECK_URL_VARIABLES: Allowed = Allowed {
    secrets: true,
    operation: false,
    records: false,
};
/// Variables of the body (envelope) template.
pub const BODY_VARIABLES: Allowed = Allowed {
    secrets: false,
    operation: true,
    records: true,
};

fn secret_refused(field: &str) -> DestinationError {
    DestinationError::Invalid(format!(
        "{field}: {{{{ secret.KEY }}}} is available only in the URL and headers, so that no Secret \
         value is ever sent in a body"
    ))
}

/// Compiles a URL, header or body template and checks its variables: known names only, and
/// every Secret key it reads present.
pub fn compile(
    field: &str,
    text: &str,
    allowed: Allowed,
    limits: Limits,
    secret: Option<&SecretData>,
) -> Result<Jinja, DestinationError> {
    let template = Jinja::compile(text, Mode::Text, limits)
        .map_err(|e| DestinationError::Invalid(format!("{field}: {e}")))?;
    for name in template.variables() {
        if name == SECRET && !allowed.secrets {
            return Err(secret_refused(field));
        }
        if !allowed.allows(name) {
            return Err(DestinationError::Invalid(format!(
                "{field}: {{{{ {name} }}}} is not available here; use {}",
                allowed.describe()
            )));
        }
    }
    if template.variables().iter().any(|v| v == SECRET) {
        let data = secret.ok_or(DestinationError::MissingCredentials("http"))?;
        for path in template.paths() {
            let Some(rest) = path.strip_prefix(SECRET) else {
                continue;
            };
            let key = rest.strip_prefix('.').unwrap_or_default();
            if key.is_empty() {
                return Err(DestinationError::Invalid(format!(
                    "{field}: read a Secret value as {{{{ secret.KEY }}}}"
                )));
            }
            if data.get(key).is_none() {
                return Err(DestinationError::MissingSecretKey {
                    secret: data.name().to_owned(),
                    key: key.to_owned(),
                });
            }
        }
    }
    Ok(template)
}

/// Renders a URL or header template for one operation. With `mask`, each Secret value is
/// its `{{secret.KEY}}` placeholder instead (for messages and labels).
pub fn render_fixed(
    field: &str,
    template: &Jinja,
    operation: Operation,
    secret: Option<&SecretData>,
    mask: bool,
) -> Result<String, DestinationError> {
    let bound = template
        .variables()
        .iter()
        .map(|name| match name.as_str() {
            OPERATION => JinjaValue::from(operation.as_str()),
            SECRET => JinjaValue::from_pairs(secret.into_iter().flat_map(|s| s.entries()).map(|(k, v)| {
                let shown = if mask {
                    format!("{{{{secret.{k}}}}}")
                } else {
                    v.clone()
                };
                (k.as_str(), JinjaValue::from(shown))
            })),
            // `compile` admits no other name here.
            _ => JinjaValue::UNDEFINED,
        })
        .collect();
    template
        .render_jinja(bound)
        .map_err(|e| DestinationError::Invalid(format!("{field}: {e}")))
}

/// How one operation's body is built.
pub struct Payload {
    body_field: String,
    body: Jinja,
    record: Option<RecordTemplate>,
}

struct RecordTemplate {
    field: String,
    template: Jinja,
}

/// A batch's body, and which records it holds.
pub struct Rendered {
    /// The request body.
    pub body: Vec<u8>,
    /// The batch positions of the records in the body, in order.
    pub sent: Vec<usize>,
    /// Records refused before sending (their template did not render), with the reason.
    pub refused: Vec<(usize, String)>,
}

impl Payload {
    /// Compiles the body and (optional) record templates of one operation.
    pub fn new(
        body_field: String,
        body: &str,
        record: Option<(String, &str)>,
        secret: Option<&SecretData>,
    ) -> Result<Payload, DestinationError> {
        let body_template = compile(&body_field, body, BODY_VARIABLES, Limits::BATCH, secret)?;
        let record = match record {
            None => None,
            Some((field, text)) => {
                let template = Jinja::compile(text, Mode::Json, Limits::RECORD)
                    .map_err(|e| DestinationError::Invalid(format!("{field}: {e}")))?;
                if template.variables().iter().any(|v| v == SECRET) {
                    return Err(secret_refused(&field));
                }
                Some(RecordTemplate { field, template })
            }
        };
        Ok(Payload {
            body_field,
            body: body_template,
            record,
        })
    }

    /// True when a record template shapes each record: it reads the records' fields one by
    /// one, where without one they are written as their canonical JSON.
    pub fn has_record_template(&self) -> bool {
        self.record.is_some()
    }

    /// True when the body names `{{ record }}`: one record per request.
    pub fn per_record(&self) -> bool {
        self.body.variables().iter().any(|v| v == RECORD)
    }

    /// Renders the body of `batch`. A record whose template fails is left out and reported
    /// in `refused`; a template naming a field the records lack, or a body that is not
    /// JSON, fails the batch.
    pub fn render(&self, operation: Operation, batch: &[Record]) -> Result<Rendered, SendError> {
        let mut records = Vec::with_capacity(2 + 128 * batch.len());
        let mut sent = Vec::with_capacity(batch.len());
        let mut refused = Vec::new();
        // Where the first record sent lies in `records`, for `{{ record }}`.
        let mut first = 0..0;
        records.push(b'[');
        for (i, record) in batch.iter().enumerate() {
            let written = match &self.record {
                None => {
                    if !sent.is_empty() {
                        records.push(b',');
                    }
                    match operation {
                        Operation::Delete => write_document(&record.identity, &mut records),
                        // Read back from the spill, the fields are written as their bytes.
                        Operation::Upsert | Operation::Update | Operation::Insert => {
                            record.fields.write_json(&mut records)
                        }
                    }
                    Ok(())
                }
                Some(shape) => shape.render(operation, record).map(|json| {
                    if !sent.is_empty() {
                        records.push(b',');
                    }
                    records.extend_from_slice(json.as_bytes());
                }),
            };
            match written {
                Ok(()) => {
                    if sent.is_empty() {
                        first = 1..records.len();
                    }
                    sent.push(i);
                }
                Err(Refusal::Record(reason)) => refused.push((i, reason)),
                Err(Refusal::Batch(error)) => return Err(error),
            }
        }
        records.push(b']');
        if self.per_record() && sent.len() > 1 {
            // The connector asks for batches of one when the body names `record`.
            return Err(SendError::Fatal(format!(
                "{}: {{{{ record }}}} sends one record per request, but a batch of {} came (a bug)",
                self.body_field,
                sent.len()
            )));
        }
        let body = self.envelope(operation, records, first, sent.len())?;
        Ok(Rendered { body, sent, refused })
    }

    fn envelope(
        &self,
        operation: Operation,
        records: Vec<u8>,
        first: std::ops::Range<usize>,
        count: usize,
    ) -> Result<Vec<u8>, SendError> {
        if let Some(holes) = self.body.as_plain() {
            let mut body = Vec::with_capacity(64 + records.len());
            holes
                .write_into(&mut body, |name, out| match name {
                    OPERATION => {
                        out.extend_from_slice(operation.as_str().as_bytes());
                        true
                    }
                    RECORDS => {
                        out.extend_from_slice(&records);
                        true
                    }
                    COUNT => {
                        out.extend_from_slice(count.to_string().as_bytes());
                        true
                    }
                    RECORD => {
                        out.extend_from_slice(&records[first.clone()]);
                        true
                    }
                    _ => false,
                })
                // Body variables were checked at construction; this only guards that invariant.
                .map_err(|e| SendError::Fatal(format!("{}: {e}", self.body_field)))?;
            return Ok(body);
        }
        // Records are canonical or checked JSON, built from valid UTF-8 pieces.
        let record = String::from_utf8_lossy(&records[first]).into_owned();
        let records = String::from_utf8_lossy(&records).into_owned();
        let bound = self
            .body
            .variables()
            .iter()
            .map(|name| match name.as_str() {
                OPERATION => JinjaValue::from(operation.as_str()),
                RECORDS => JinjaValue::from_safe_string(records.clone()),
                COUNT => JinjaValue::from(count),
                RECORD => JinjaValue::from_safe_string(record.clone()),
                _ => JinjaValue::UNDEFINED,
            })
            .collect();
        let body = self
            .body
            .render_jinja(bound)
            .map_err(|e| SendError::Fatal(format!("{}: {e}", self.body_field)))?;
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&body) {
            return Err(SendError::Fatal(format!(
                "{}: the body template did not render valid JSON (line {}, column {})",
                self.body_field,
                e.line(),
                e.column()
            )));
        }
        Ok(body.into_bytes())
    }
}

/// Why a record is not in the body.
enum Refusal {
    /// This record only.
    Record(String),
    /// The whole batch: the template does not fit the records.
    Batch(SendError),
}

impl RecordTemplate {
    fn render(&self, operation: Operation, record: &Record) -> Result<String, Refusal> {
        let nested;
        let document = match operation {
            // Match fields are dotted (`properties.email`); templates read them nested.
            Operation::Delete => {
                nested = nest(&record.identity);
                &nested
            }
            Operation::Upsert | Operation::Update | Operation::Insert => &*record.fields,
        };
        let mut bound = Vec::with_capacity(self.template.variables().len());
        for name in self.template.variables() {
            let value = match (document.get(name), name.as_str()) {
                (Some(value), _) => to_jinja(value),
                (None, OPERATION) => JinjaValue::from(operation.as_str()),
                (None, RECORD) => to_jinja(&Value::Object(document.clone())),
                (None, _) => {
                    let fields = document.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
                    return Err(Refusal::Batch(SendError::Fatal(format!(
                        "{}: {{{{ {name} }}}} is not a field of the {} records (fields: {fields}; \
                         also {{{{ record }}}} and {{{{ operation }}}})",
                        self.field,
                        operation.as_str()
                    ))));
                }
            };
            bound.push(value);
        }
        let json = self
            .template
            .render_jinja(bound)
            .map_err(|e| Refusal::Record(format!("{}: {e}", self.field)))?;
        // serde_json's message names the place (line, column), never the text.
        serde_json::from_str::<serde::de::IgnoredAny>(&json).map_err(|e| {
            Refusal::Record(format!(
                "{}: the record template did not render valid JSON (line {}, column {})",
                self.field,
                e.line(),
                e.column()
            ))
        })?;
        Ok(json)
    }
}

/// Dotted keys (`properties.email`) as nested objects.
fn nest(flat: &Document) -> Document {
    let mut out = Document::new();
    for (key, value) in flat {
        insert_path(&mut out, &key.split('.').collect::<Vec<_>>(), value.clone());
    }
    out
}

fn insert_path(doc: &mut BTreeMap<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            doc.insert((*last).to_owned(), value);
        }
        [head, rest @ ..] => {
            let entry = doc
                .entry((*head).to_owned())
                .or_insert_with(|| Value::Object(Document::new()));
            if let Value::Object(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let identity = Document::from([("properties.email".to_owned(), Value::Text("a@b.c".into()))]);
        let fields = Document::from([
            ("id".to_owned(), Value::Int(1)),
            ("name".to_owned(), Value::Text("Ada \"A\"".into())),
            ("plan".to_owned(), Value::Null),
        ]);
        Record {
            key: "1".into(),
            identity: identity.into(),
            fields: fields.into(),
        }
    }

    fn payload(body: &str, record: Option<&str>) -> Payload {
        Payload::new(
            "spec.http.body".into(),
            body,
            record.map(|r| ("spec.http.record".into(), r)),
            None,
        )
        .unwrap()
    }

    fn body_of(rendered: &Rendered) -> String {
        String::from_utf8(rendered.body.clone()).unwrap()
    }

    #[test]
    fn a_record_template_shapes_each_record_and_the_envelope_wraps_them() {
        let p = payload(
            r#"{"data": {{ records }}, "n": {{ count }}, "op": "{{ operation }}"}"#,
            Some(
                r#"{"type": "contacts", "id": {{ id | string }}, "attributes": {"name": {{ name }}, "plan": {{ plan | default("free") }}}}"#,
            ),
        );
        let rendered = p.render(Operation::Upsert, &[record()]).unwrap();
        assert_eq!(
            body_of(&rendered),
            r#"{"data": [{"type": "contacts", "id": "1", "attributes": {"name": "Ada \"A\"", "plan": "free"}}], "n": 1, "op": "upsert"}"#
        );
    }

    #[test]
    fn deletes_read_match_fields_nested_and_record_is_the_whole_document() {
        let p = payload(
            "{{records}}",
            Some(r#"{"email": {{ properties.email }}, "all": {{ record }}}"#),
        );
        let rendered = p.render(Operation::Delete, &[record()]).unwrap();
        assert_eq!(
            body_of(&rendered),
            r#"[{"email": "a@b.c", "all": {"properties":{"email":"a@b.c"}}}]"#
        );
    }

    #[test]
    fn a_record_that_renders_invalid_json_is_refused_alone_naming_the_template() {
        let p = payload(
            "{{records}}",
            Some(r#"{% if id == 2 %}{"id": {% endif %}{"id": {{ id }}}"#),
        );
        let mut second = record();
        second.fields.insert("id".into(), Value::Int(2));
        let rendered = p.render(Operation::Upsert, &[record(), second]).unwrap();
        assert_eq!(rendered.sent, [0]);
        assert_eq!(rendered.refused.len(), 1);
        let (at, reason) = &rendered.refused[0];
        assert_eq!(*at, 1);
        assert!(
            reason.starts_with("spec.http.record: the record template did not render valid JSON"),
            "{reason}"
        );
        assert_eq!(body_of(&rendered), r#"[{"id": 1}]"#);
    }

    #[test]
    fn a_field_the_records_lack_fails_the_batch_naming_it() {
        let p = payload("{{records}}", Some(r#"{"e": {{ emial }}}"#));
        let Err(SendError::Fatal(message)) = p.render(Operation::Upsert, &[record()]) else {
            panic!("a missing field fails the batch");
        };
        assert!(message.contains("{{ emial }} is not a field"), "{message}");
    }

    #[test]
    fn secrets_are_refused_in_bodies_and_record_templates() {
        let data = SecretData::new(BTreeMap::from([("token".to_owned(), "t".to_owned())]));
        for (body, record) in [
            (r#"{"t": "{{ secret.token }}"}"#, None),
            ("{{records}}", Some(r#"{"t": {{ secret.token }}}"#)),
        ] {
            let err = Payload::new(
                "spec.http.body".into(),
                body,
                record.map(|r| ("spec.http.record".to_owned(), r)),
                Some(&data),
            )
            .err()
            .expect("refused");
            assert!(
                err.to_string().contains("available only in the URL and headers"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_body_naming_record_is_that_one_record() {
        let p = payload("{{ record }}", Some(r#"{"id": {{ id }}}"#));
        assert!(p.per_record());
        let rendered = p.render(Operation::Upsert, &[record()]).unwrap();
        assert_eq!(body_of(&rendered), r#"{"id": 1}"#);
        assert!(!payload("{{ records }}", None).per_record());
        assert!(matches!(
            p.render(Operation::Upsert, &[record(), record()]),
            Err(SendError::Fatal(_))
        ));
    }

    #[test]
    fn a_jinja_body_that_is_not_json_fails_the_batch() {
        let p = payload(r#"{"n": {{ count }}{% if false %}}{% endif %}"#, None);
        let Err(SendError::Fatal(message)) = p.render(Operation::Upsert, &[record()]) else {
            panic!("an invalid body fails the batch");
        };
        assert!(
            message.contains("spec.http.body: the body template did not render valid JSON"),
            "{message}"
        );
    }
}

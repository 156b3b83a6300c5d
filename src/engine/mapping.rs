//! Mappings: from a source row to the destination record, through transforms.
//!
//! A [`Mapper`] is compiled once per run against the model's columns (unknown columns are
//! caught before any row is read) and then maps each row. A transform that cannot apply to a
//! row's value rejects that row; reasons name the mapping, never the value.

use std::collections::BTreeMap;

use crate::api::reverse_sync::{Mapping, TemplateType};
use crate::api::validation::effective_match_fields;
use crate::model::transform::Transform;
use crate::model::value::Value;
use crate::source::Column;
use crate::template::{Jinja, Limits, Mode};

/// Where a mapped value comes from.
#[derive(Debug)]
enum FieldSource {
    Column(usize),
    Template {
        template: Jinja,
        /// The column of each of the template's variables, in its order.
        columns: Vec<usize>,
    },
}

#[derive(Debug)]
struct CompiledMapping {
    source: FieldSource,
    /// The column's value may be moved out of the row: no later mapping or template reads it.
    take: bool,
    target: Vec<String>,
    target_text: String,
    transforms: Vec<Transform>,
}

/// A failure compiling the mappings against the model's columns.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// A mapping or the primary key names a column the query does not return.
    #[error("failed to map {field}: the model has no column {column:?} (columns: {available})")]
    UnknownColumn {
        /// The field of the spec that names it.
        field: String,
        /// The missing column.
        column: String,
        /// The columns the query returns.
        available: String,
    },
    /// A transform or template does not parse.
    #[error("failed to map {field}: {reason}")]
    Invalid {
        /// The field of the spec.
        field: String,
        /// Why.
        reason: String,
    },
}

/// The destination record's shape: field names, sorted, down to the mapping of each leaf.
#[derive(Debug)]
enum Shape {
    /// The value of the mapping with this index.
    Leaf(usize),
    /// A nested object.
    Object(BTreeMap<String, Shape>),
}

/// Why a single row could not be mapped; the run goes on.
#[derive(Debug, Clone, PartialEq)]
pub struct RowRejection {
    /// The key, when it could be read.
    pub key: Option<String>,
    /// Why (never a payload value).
    pub reason: String,
}

/// Largest value a row may hold in one column, about (text, JSON, arrays): a larger one rejects
/// its row, so that a few wide rows cannot exhaust the operator's memory.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest mapped record, as canonical JSON: a larger one rejects its row.
pub const MAX_ROW_BYTES: usize = 4 * 1024 * 1024;

/// A value a row may not carry (too large, or a decimal out of range): why, and whether it is
/// in a primary key column (then the row's key cannot be named either).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueFault {
    /// The reason, naming the column, never the value.
    pub reason: String,
    /// The value at fault is in a primary key column.
    pub in_key: bool,
}

/// Mappings compiled against the model's columns.
#[derive(Debug)]
pub struct Mapper {
    /// The model's column names, in order (for messages).
    columns: Vec<String>,
    mappings: Vec<CompiledMapping>,
    key_columns: Vec<(String, usize)>,
    /// The record's canonical JSON around its values, its keys escaped once.
    layout: RecordLayout,
    /// Match fields (dotted) and the mapping that fills each.
    match_fields: Vec<(String, usize)>,
}

impl Mapper {
    /// Compiles mappings, primary key and match fields against the model's columns.
    pub fn new(
        mappings: &[Mapping],
        primary_key: &[String],
        match_fields: &[String],
        columns: &[Column],
    ) -> Result<Mapper, MappingError> {
        let index: BTreeMap<&str, usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let available = columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let lookup = |field: String, column: &str| {
            index
                .get(column)
                .copied()
                .ok_or_else(|| MappingError::UnknownColumn {
                    field,
                    column: column.to_owned(),
                    available: available.clone(),
                })
        };
        let key_columns = primary_key
            .iter()
            .enumerate()
            .map(|(i, c)| lookup(format!("spec.source.primaryKey[{i}]"), c).map(|idx| (c.clone(), idx)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut compiled = Vec::with_capacity(mappings.len());
        for (i, m) in mappings.iter().enumerate() {
            let field = format!("spec.mappings[{i}]");
            let source = match (&m.from, &m.template) {
                (Some(col), None) => FieldSource::Column(lookup(format!("{field}.from"), col)?),
                (None, Some(text)) => {
                    let mode = match m.template_type {
                        TemplateType::Text => Mode::Text,
                        TemplateType::Json => Mode::Json,
                    };
                    let template = Jinja::compile_with_names(text, mode, Limits::RECORD, |name| {
                        index.contains_key(name)
                    })
                    .map_err(|e| MappingError::Invalid {
                        field: format!("{field}.template"),
                        reason: e.to_string(),
                    })?;
                    let columns = template
                        .variables()
                        .iter()
                        .map(|var| lookup(format!("{field}.template"), var))
                        .collect::<Result<Vec<_>, _>>()?;
                    FieldSource::Template { template, columns }
                }
                _ => {
                    return Err(MappingError::Invalid {
                        field,
                        reason: "a mapping needs exactly one of from or template".to_owned(),
                    });
                }
            };
            let transforms = m
                .transforms
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    Transform::parse(t).map_err(|reason| MappingError::Invalid {
                        field: format!("{field}.transforms[{j}]"),
                        reason,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            compiled.push(CompiledMapping {
                source,
                take: false,
                target: m.to.split('.').map(str::to_owned).collect(),
                target_text: m.to.clone(),
                transforms,
            });
        }
        mark_movable(&mut compiled);
        let mut shape = BTreeMap::new();
        for (i, m) in compiled.iter().enumerate() {
            add_to_shape(&mut shape, &m.target, i).map_err(|reason| MappingError::Invalid {
                field: format!("spec.mappings[{i}].to"),
                reason,
            })?;
        }
        let match_fields = effective_match_fields(mappings, primary_key, match_fields)
            .map_err(|reason| MappingError::Invalid {
                field: "spec.match".to_owned(),
                reason,
            })?
            .into_iter()
            .filter_map(|f| compiled.iter().position(|m| m.target_text == f).map(|i| (f, i)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        Ok(Mapper {
            columns: columns.iter().map(|c| c.name.clone()).collect(),
            mappings: compiled,
            key_columns,
            layout: RecordLayout::of(&shape),
            match_fields,
        })
    }

    /// Refuses a row with a value over [`MAX_VALUE_BYTES`], or a decimal whose exponent is
    /// out of range ([`crate::model::value::decimal_in_range`]), naming the column, never the
    /// value. Cheap: no value is written out.
    pub fn check_values(&self, row: &[Value]) -> Result<(), ValueFault> {
        for (i, value) in row.iter().enumerate() {
            let column = || self.columns.get(i).map_or("?", String::as_str);
            let reason = if let Value::Decimal(d) = value
                && !crate::model::value::decimal_in_range(d)
            {
                format!(
                    "column {:?} holds a decimal whose exponent is outside ±{}",
                    column(),
                    crate::model::value::MAX_DECIMAL_EXPONENT
                )
            } else {
                let bytes = value.approx_bytes();
                if bytes <= MAX_VALUE_BYTES {
                    continue;
                }
                format!(
                    "column {:?} holds a value of about {bytes} bytes, over the limit of {MAX_VALUE_BYTES}",
                    column()
                )
            };
            let in_key = self.key_columns.iter().any(|(_, idx)| *idx == i);
            return Err(ValueFault { reason, in_key });
        }
        Ok(())
    }

    /// The primary key of a row in canonical text form, or why it has none.
    pub fn key(&self, row: &[Value]) -> Result<String, String> {
        let mut out = Vec::new();
        self.write_key(row, &mut out)?;
        // The key is written from valid UTF-8 pieces only (text values and canonical JSON).
        String::from_utf8(out).map_err(|_| "the primary key is not valid UTF-8".to_owned())
    }

    /// Appends the primary key of a row in canonical text form to `out` (what [`Self::key`]
    /// returns), or says why it has none: a text key as is, any other value, and a key of
    /// several columns as a whole, in canonical JSON.
    pub fn write_key(&self, row: &[Value], out: &mut Vec<u8>) -> Result<(), String> {
        for (name, idx) in &self.key_columns {
            if row.get(*idx).is_none_or(Value::is_null) {
                return Err(format!("primary key column {name:?} is NULL"));
            }
        }
        match self.key_columns.as_slice() {
            [(_, idx)] => match &row[*idx] {
                Value::Text(s) | Value::Json(serde_json::Value::String(s)) => {
                    out.extend_from_slice(s.as_bytes());
                }
                other => other.write_canonical(out),
            },
            cols => {
                out.push(b'[');
                for (n, (_, idx)) in cols.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    row[*idx].write_canonical(out);
                }
                out.push(b']');
            }
        }
        Ok(())
    }

    /// Maps a row whose key is already known into `values` (cleared first: one value per
    /// mapping, in spec order), moving values out of the row where it can.
    pub fn map_into(
        &self,
        key: &str,
        mut row: Vec<Value>,
        values: &mut Vec<Value>,
    ) -> Result<(), RowRejection> {
        values.clear();
        for m in &self.mappings {
            let mut value = match &m.source {
                FieldSource::Column(idx) => match row.get_mut(*idx) {
                    Some(v) if m.take => std::mem::replace(v, Value::Null),
                    Some(v) => v.clone(),
                    None => Value::Null,
                },
                FieldSource::Template { template, columns } => {
                    let reject = |reason: String| RowRejection {
                        key: Some(key.to_owned()),
                        reason: format!("mapping to {:?}: {reason}", m.target_text),
                    };
                    let rendered = template
                        .render(|i| row.get(columns[i]).unwrap_or(&Value::Null))
                        .map_err(|e| reject(e.to_string()))?;
                    match template.mode() {
                        Mode::Text => Value::Text(rendered),
                        // serde_json's message names the place (line, column), not the text.
                        Mode::Json => Value::from_json_text(&rendered).map_err(|e| {
                            reject(format!(
                                "the template did not render valid JSON (line {}, column {})",
                                e.line(),
                                e.column()
                            ))
                        })?,
                    }
                }
            };
            for t in &m.transforms {
                value = t.apply(value).map_err(|reason| RowRejection {
                    key: Some(key.to_owned()),
                    reason: format!("mapping to {:?}: {reason}", m.target_text),
                })?;
            }
            values.push(value);
        }
        for (field, i) in &self.match_fields {
            if values[*i].is_null() {
                return Err(RowRejection {
                    key: Some(key.to_owned()),
                    reason: format!("match field {field:?} is NULL, so the record cannot be identified"),
                });
            }
        }
        Ok(())
    }

    /// Appends the canonical JSON of the record (what is fingerprinted and sent) to `out`:
    /// the bytes [`crate::model::value::write_document`] writes for the same record.
    pub fn write_fields(&self, values: &[Value], out: &mut Vec<u8>) {
        for (before, mapping) in &self.layout.steps {
            out.extend_from_slice(before);
            values[*mapping].write_canonical(out);
        }
        out.extend_from_slice(&self.layout.tail);
    }

    /// The mappings whose value is a JSON null (a `jsonb` `'null'`), which canonical JSON
    /// writes as `null` like SQL NULL: the fingerprint and the spill carry their targets
    /// ([`Self::json_null_targets`]) beside it. Empty (and allocation-free) for almost every
    /// row.
    pub fn json_null_mappings(&self, values: &[Value]) -> Vec<usize> {
        values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, Value::Json(serde_json::Value::Null)))
            .map(|(i, _)| i)
            .collect()
    }

    /// The targets of `mappings` (indexes from [`Self::json_null_mappings`]), in order.
    pub fn json_null_targets(&self, mappings: &[usize]) -> Vec<&str> {
        mappings
            .iter()
            .filter_map(|&i| self.mappings.get(i))
            .map(|m| m.target_text.as_str())
            .collect()
    }

    /// Appends the canonical JSON of the match fields and their values: how the destination
    /// identifies the record (what the state keeps to delete it later).
    pub fn write_identity(&self, values: &[Value], out: &mut Vec<u8>) {
        out.push(b'{');
        for (n, (field, i)) in self.match_fields.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            Value::write_json_key(field, out);
            values[*i].write_canonical(out);
        }
        out.push(b'}');
    }
}

fn add_to_shape(shape: &mut BTreeMap<String, Shape>, path: &[String], mapping: usize) -> Result<(), String> {
    match path {
        [] => Err("the target is empty".to_owned()),
        [last] => match shape.insert(last.clone(), Shape::Leaf(mapping)) {
            None => Ok(()),
            Some(_) => Err(format!(
                "field {last:?} is written by two mappings or is also an object"
            )),
        },
        [head, rest @ ..] => {
            let entry = shape
                .entry(head.clone())
                .or_insert_with(|| Shape::Object(BTreeMap::new()));
            match entry {
                Shape::Object(inner) => add_to_shape(inner, rest, mapping),
                Shape::Leaf(_) => Err(format!("field {head:?} is both a value and an object")),
            }
        }
    }
}

/// A record's canonical JSON as the bytes between its values: braces, commas and escaped keys
/// written once when the mappings are compiled, so a row only appends them and its values.
#[derive(Debug, Default)]
struct RecordLayout {
    /// The bytes before each value, and the mapping whose value follows, in output order.
    steps: Vec<(Vec<u8>, usize)>,
    /// The bytes after the last value.
    tail: Vec<u8>,
}

impl RecordLayout {
    /// The layout of `shape`: its fields in key order, nested objects inline.
    fn of(shape: &BTreeMap<String, Shape>) -> RecordLayout {
        let mut layout = RecordLayout::default();
        layout.add_object(shape);
        layout
    }

    fn add_object(&mut self, shape: &BTreeMap<String, Shape>) {
        self.tail.push(b'{');
        for (n, (name, node)) in shape.iter().enumerate() {
            if n > 0 {
                self.tail.push(b',');
            }
            Value::write_json_key(name, &mut self.tail);
            match node {
                Shape::Leaf(i) => self.steps.push((std::mem::take(&mut self.tail), *i)),
                Shape::Object(inner) => self.add_object(inner),
            }
        }
        self.tail.push(b'}');
    }
}

/// Marks the mappings that may move their column's value out of the row: the last plain
/// mapping of a column that no template reads.
fn mark_movable(mappings: &mut [CompiledMapping]) {
    let mut read_later = std::collections::HashSet::new();
    for m in mappings.iter() {
        if let FieldSource::Template { columns, .. } = &m.source {
            read_later.extend(columns.iter().copied());
        }
    }
    for m in mappings.iter_mut().rev() {
        if let FieldSource::Column(idx) = m.source {
            m.take = read_later.insert(idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bigdecimal::BigDecimal;
    use std::str::FromStr;

    /// The values `mapper` maps `row` to.
    fn map(mapper: &Mapper, key: &str, row: Vec<Value>) -> Result<Vec<Value>, RowRejection> {
        let mut values = Vec::new();
        mapper.map_into(key, row, &mut values).map(|()| values)
    }

    fn col(name: &str) -> Column {
        Column {
            name: name.into(),
            type_name: "TEXT".into(),
        }
    }

    fn mapping(from: &str, to: &str, transforms: &[&str]) -> Mapping {
        Mapping {
            from: Some(from.into()),
            template: None,
            template_type: TemplateType::Text,
            to: to.into(),
            transforms: transforms.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn records_are_written_with_keys_sorted_escaped_and_nested_at_any_depth() {
        let columns = [col("id"), col("c1"), col("c2"), col("c3"), col("c4")];
        let maps = vec![
            mapping("id", "id", &[]),
            mapping("c4", "z", &[]),
            mapping("c1", "a.b.c", &[]),
            mapping("c3", "q\"uote", &[]),
            mapping("c2", "a.d", &[]),
        ];
        let mapper = Mapper::new(&maps, &["id".into()], &[], &columns).unwrap();
        let row: Vec<Value> = (0..5).map(Value::Int).collect();
        let mapped = map(&mapper, "0", row).unwrap();
        let mut written = Vec::new();
        mapper.write_fields(&mapped, &mut written);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            r#"{"a":{"b":{"c":1},"d":2},"id":0,"q\"uote":3,"z":4}"#
        );
    }

    #[test]
    fn rows_map_to_nested_targets_and_unmapped_columns_are_dropped() {
        let columns = [
            col("id"),
            col("email"),
            col("first"),
            col("last"),
            col("secret_score"),
        ];
        let mut maps = vec![
            mapping("id", "id", &[]),
            mapping("email", "properties.email", &["trim", "lowercase"]),
        ];
        maps.push(Mapping {
            from: None,
            template: Some("{{first}} {{last}}".into()),
            template_type: TemplateType::Text,
            to: "properties.name".into(),
            transforms: vec![],
        });
        let mapper = Mapper::new(&maps, &["id".into()], &["properties.email".into()], &columns).unwrap();
        let row = vec![
            Value::Int(1),
            Value::Text(" Ada@Example.COM ".into()),
            Value::Text("Ada".into()),
            Value::Text("Lovelace".into()),
            Value::Int(99),
        ];
        let key = mapper.key(&row).unwrap();
        assert_eq!(key, "1");
        let mapped = map(&mapper, &key, row).unwrap();
        let expected = r#"{"id":1,"properties":{"email":"ada@example.com","name":"Ada Lovelace"}}"#;
        let mut written = Vec::new();
        mapper.write_fields(&mapped, &mut written);
        assert_eq!(String::from_utf8(written).unwrap(), expected);
        let mut identity = Vec::new();
        mapper.write_identity(&mapped, &mut identity);
        assert_eq!(
            String::from_utf8(identity).unwrap(),
            r#"{"properties.email":"ada@example.com"}"#
        );
    }

    #[test]
    fn a_column_mapped_twice_and_read_by_a_template_reaches_every_target() {
        let maps = vec![
            mapping("email", "a", &[]),
            Mapping {
                from: None,
                template: Some("<{{email}}>".into()),
                template_type: TemplateType::Text,
                to: "b".into(),
                transforms: vec![],
            },
            mapping("email", "c", &["uppercase"]),
            mapping("id", "id", &[]),
        ];
        let mapper = Mapper::new(&maps, &["id".into()], &[], &[col("id"), col("email")]).unwrap();
        let mapped = map(&mapper, "1", vec![Value::Int(1), Value::Text("x@y".into())]).unwrap();
        assert_eq!(
            {
                let mut out = Vec::new();
                mapper.write_fields(&mapped, &mut out);
                String::from_utf8(out).unwrap()
            },
            r#"{"a":"x@y","b":"<x@y>","c":"X@Y","id":1}"#
        );
    }

    #[test]
    fn unknown_columns_are_named_before_any_row_is_read() {
        let err = Mapper::new(
            &[mapping("emial", "email", &[])],
            &["id".into()],
            &["email".into()],
            &[col("id"), col("email")],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("spec.mappings[0].from") && text.contains("emial"),
            "{text}"
        );
    }

    #[test]
    fn null_keys_are_refused_with_the_column_name() {
        let mapper = Mapper::new(&[mapping("id", "id", &[])], &["id".into()], &[], &[col("id")]).unwrap();
        assert!(mapper.key(&[Value::Null]).unwrap_err().contains("\"id\" is NULL"));
    }

    #[test]
    fn composite_keys_are_canonical_arrays() {
        let mapper = Mapper::new(
            &[mapping("a", "a", &[]), mapping("b", "b", &[])],
            &["a".into(), "b".into()],
            &[],
            &[col("a"), col("b")],
        )
        .unwrap();
        assert_eq!(
            mapper.key(&[Value::Int(1), Value::Text("x".into())]).unwrap(),
            r#"[1,"x"]"#
        );
    }

    fn template(text: &str, kind: TemplateType, to: &str) -> Mapping {
        Mapping {
            from: None,
            template: Some(text.into()),
            template_type: kind,
            to: to.into(),
            transforms: vec![],
        }
    }

    fn written(mapper: &Mapper, values: &[Value]) -> String {
        let mut out = Vec::new();
        mapper.write_fields(values, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn jinja_templates_map_text_and_json_with_exact_numbers() {
        let maps = vec![
            mapping("id", "id", &[]),
            template(
                r#"{% if plan == "enterprise" %}customer{% else %}lead{% endif %}"#,
                TemplateType::Text,
                "stage",
            ),
            template(
                r#"{"ltv": {{ ltv | round(2) }}, "since": {{ since | date("%Y-%m-%d") }}}"#,
                TemplateType::Json,
                "facts",
            ),
        ];
        let columns = [col("id"), col("plan"), col("ltv"), col("since")];
        let mapper = Mapper::new(&maps, &["id".into()], &[], &columns).unwrap();
        let row = vec![
            Value::Int(1),
            Value::Text("enterprise".into()),
            Value::Decimal(BigDecimal::from_str("98765432109876543.215").unwrap()),
            Value::Timestamp("2024-05-06T07:08:09Z".parse().unwrap()),
        ];
        let mapped = map(&mapper, "1", row).unwrap();
        assert_eq!(
            written(&mapper, &mapped),
            r#"{"facts":{"ltv":98765432109876543.22,"since":"2024-05-06"},"id":1,"stage":"customer"}"#
        );
    }

    #[test]
    fn a_jinja_template_naming_a_missing_column_names_the_mapping() {
        let maps = vec![
            mapping("id", "id", &[]),
            template("{{ first_name | title }}", TemplateType::Text, "name"),
        ];
        let err = Mapper::new(&maps, &["id".into()], &[], &[col("id"), col("first")]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("spec.mappings[1].template") && text.contains("\"first_name\""),
            "{text}"
        );
    }

    #[test]
    fn json_that_does_not_parse_rejects_the_row_naming_the_mapping_not_the_value() {
        let maps = vec![
            mapping("id", "id", &[]),
            template("{{ note | safe }}", TemplateType::Json, "note"),
        ];
        let mapper = Mapper::new(&maps, &["id".into()], &[], &[col("id"), col("note")]).unwrap();
        let rejection = map(
            &mapper,
            "1",
            vec![Value::Int(1), Value::Text("private words".into())],
        )
        .unwrap_err();
        assert!(
            rejection
                .reason
                .starts_with("mapping to \"note\": the template did not render valid JSON"),
            "{}",
            rejection.reason
        );
        assert!(!rejection.reason.contains("private"), "{}", rejection.reason);
    }

    #[test]
    fn legacy_names_with_dashes_still_mean_their_column() {
        let maps = vec![
            mapping("id", "id", &[]),
            template("{{first-name}}!", TemplateType::Text, "name"),
        ];
        let mapper = Mapper::new(&maps, &["id".into()], &[], &[col("id"), col("first-name")]).unwrap();
        let mapped = map(&mapper, "1", vec![Value::Int(1), Value::Text("Ada".into())]).unwrap();
        assert_eq!(mapped[1], Value::Text("Ada!".into()));
    }

    #[test]
    fn a_template_that_runs_out_of_fuel_rejects_only_its_row() {
        let maps = vec![
            mapping("id", "id", &[]),
            template(
                "{% for i in range(n) %}{% for j in range(n) %}.{% endfor %}{% endfor %}",
                TemplateType::Text,
                "dots",
            ),
        ];
        let mapper = Mapper::new(&maps, &["id".into()], &[], &[col("id"), col("n")]).unwrap();
        assert!(map(&mapper, "1", vec![Value::Int(1), Value::Int(3)]).is_ok());
        let rejection = map(&mapper, "2", vec![Value::Int(2), Value::Int(100_000)]).unwrap_err();
        assert!(
            rejection.reason.contains("ran out of fuel"),
            "{}",
            rejection.reason
        );
    }
}

//! CSV as Bulk API 2.0 reads and writes it: comma-delimited, LF line endings, a field quoted
//! when it holds a comma, a double quote or a line break, a quote inside doubled (RFC 4180);
//! a record's fields flattened to columns, `#N/A` to clear a field.
//!
//! Docs: <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/datafiles_prepare_csv.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/datafiles_csv_valid_record_rows.htm>
//! (the guide's CSV rules, shared by both Bulk APIs: "Empty field values are ignored when you
//! update records. To set a field value to null, use a field value of #N/A."),
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/relationship_fields_in_a_header_row__2_0.htm>
//! (a relationship written through a related record's External ID is the column
//! `Relationship.ExternalIdField`).

use std::collections::BTreeMap;

use serde_json::Value as Json;

use crate::model::value::{Document, Value};

/// The cell that sets a field to null; an empty cell leaves the field as it is.
pub const NULL_CELL: &str = "#N/A";

/// Appends one field, quoted when it must be.
pub fn push_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// Appends one row of fields and its LF.
pub fn push_row<'a>(out: &mut String, fields: impl IntoIterator<Item = &'a str>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_field(out, field);
    }
    out.push('\n');
}

/// The cells of a record: one per field, a nested object (a mapping target like
/// `Account.Customer_Id__c`, or a JSON object) flattened to dotted column names the way Bulk
/// API writes relationships; NULL and empty text become [`NULL_CELL`] so they clear the
/// field, as `null` does in sObject Collections; timestamps and times in Salesforce's
/// formats, as on the collections path.
pub fn cells(fields: &Document) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in fields {
        if name != "attributes" {
            flatten(name, value, &mut out);
        }
    }
    out
}

fn flatten(column: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(doc) => {
            for (name, inner) in doc {
                flatten(&format!("{column}.{name}"), inner, out);
            }
        }
        Value::Json(Json::Object(map)) => {
            for (name, inner) in map {
                flatten(&format!("{column}.{name}"), &Value::from_json(inner.clone()), out);
            }
        }
        Value::Json(Json::Array(_)) | Value::Array(_) => {
            out.insert(column.to_owned(), value.to_json().to_string());
        }
        v if v.is_null() => {
            out.insert(column.to_owned(), NULL_CELL.to_owned());
        }
        Value::Timestamp(ts) => {
            out.insert(column.to_owned(), super::date_time_text(ts));
        }
        Value::Time(t) => {
            out.insert(column.to_owned(), super::time_text(t));
        }
        other => {
            let text = other.as_text();
            let cell = if text.is_empty() { NULL_CELL } else { &text };
            out.insert(column.to_owned(), cell.to_owned());
        }
    }
}

/// A parsed CSV document: its header and its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Column names.
    pub header: Vec<String>,
    /// Rows, each as long as it was written.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// The position of a column.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }
}

/// Reads a CSV document (LF or CRLF line endings); an empty document is an empty table.
pub fn parse(text: &str) -> Result<Table, String> {
    let mut records: Vec<Vec<String>> = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    // Whether the current row has anything yet (a blank line is no row).
    let mut started = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                other => field.push(other),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => {
                quoted = true;
                started = true;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                started = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if started || !field.is_empty() {
                    row.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut row));
                }
                started = false;
            }
            other => {
                field.push(other);
                started = true;
            }
        }
    }
    if quoted {
        return Err("a quoted field is not closed".to_owned());
    }
    if started || !field.is_empty() {
        row.push(field);
        records.push(row);
    }
    let mut records = records.into_iter();
    Ok(Table {
        header: records.next().unwrap_or_default(),
        rows: records.collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_with_commas_quotes_or_line_breaks_are_quoted_and_read_back() {
        let mut out = String::new();
        push_row(&mut out, ["Email__c", "Description"]);
        push_row(&mut out, ["a@x.com", "Director, \"West\"\nRegion"]);
        push_row(&mut out, ["b@x.com", ""]);
        assert_eq!(
            out,
            "Email__c,Description\na@x.com,\"Director, \"\"West\"\"\nRegion\"\nb@x.com,\n"
        );
        let table = parse(&out).unwrap();
        assert_eq!(table.header, ["Email__c", "Description"]);
        assert_eq!(
            table.rows,
            [
                vec!["a@x.com".to_owned(), "Director, \"West\"\nRegion".to_owned()],
                vec!["b@x.com".to_owned(), String::new()],
            ]
        );
        assert_eq!(table.column("Description"), Some(1));
    }

    #[test]
    fn crlf_quoted_empty_fields_and_an_unclosed_quote() {
        let table = parse("\"sf__Id\",\"sf__Error\"\r\n\"\",\"X:y:--\"\r\n").unwrap();
        assert_eq!(table.rows, [vec![String::new(), "X:y:--".to_owned()]]);
        assert_eq!(parse("").unwrap(), Table::default());
        assert!(parse("a\n\"open").is_err());
    }

    #[test]
    fn nulls_clear_fields_and_nested_objects_become_dotted_columns() {
        let account = Document::from([("Customer_Id__c".to_owned(), Value::Int(42))]);
        let fields = Document::from([
            ("LastName".to_owned(), Value::Null),
            ("Phone".to_owned(), Value::Text(String::new())),
            ("LTV__c".to_owned(), Value::Float(12.5)),
            ("Account".to_owned(), Value::Object(account)),
            (
                "Meta".to_owned(),
                Value::Json(serde_json::json!({"Tier__c": "gold", "Tags": ["a", "b"]})),
            ),
            ("attributes".to_owned(), Value::Text("ignored".to_owned())),
        ]);
        let cells = cells(&fields);
        assert_eq!(
            cells.into_iter().collect::<Vec<_>>(),
            [
                ("Account.Customer_Id__c".to_owned(), "42".to_owned()),
                ("LTV__c".to_owned(), "12.5".to_owned()),
                ("LastName".to_owned(), "#N/A".to_owned()),
                ("Meta.Tags".to_owned(), "[\"a\",\"b\"]".to_owned()),
                ("Meta.Tier__c".to_owned(), "gold".to_owned()),
                ("Phone".to_owned(), "#N/A".to_owned()),
            ]
        );
    }
}

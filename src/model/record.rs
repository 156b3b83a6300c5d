//! What travels from the engine to a destination: one record, and the operation a batch
//! asks for.

use super::value::Document;

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
    /// The match fields and their values: how the destination identifies the record.
    pub identity: Document,
    /// The mapped fields to write (empty for deletes).
    pub fields: Document,
}

//! The rows a `mirror` run deletes, from either planner, read as many times as the run needs
//! them (the delete guard's digest, a dry run's samples, the batches sent) without copying the
//! list: the in-memory planner's are positions in the state it loaded, a store diff's are the
//! list it made, on local disk once it outgrows its memory budget.

use super::{Batch, RunError, identity_document};
use crate::model::record::{Fields, Operation, Record};
use crate::state::{Fingerprints, RemovedRows};

/// The rows a run deletes, in the order they go out.
pub(super) enum Deletes {
    /// Nothing to delete.
    None,
    /// Positions in the state the in-memory planner loaded.
    Loaded {
        /// The loaded state.
        state: Fingerprints,
        /// The removed rows' positions in it.
        positions: Vec<usize>,
    },
    /// What a store's diff listed, in key order.
    Listed(RemovedRows),
}

impl Deletes {
    /// How many rows are deleted.
    pub(super) fn len(&self) -> u64 {
        match self {
            Deletes::None => 0,
            Deletes::Loaded { positions, .. } => positions.len() as u64,
            Deletes::Listed(rows) => rows.len(),
        }
    }

    /// True when nothing is deleted.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows, `(key, identity JSON)`, from the first; a local temporary file that fails to
    /// read is an error, after which nothing more comes.
    pub(super) fn rows(&self) -> Box<dyn Iterator<Item = Result<(String, String), RunError>> + Send + '_> {
        match self {
            Deletes::None => Box::new(std::iter::empty()),
            Deletes::Loaded { state, positions } => Box::new(
                positions
                    .iter()
                    .filter_map(|&pos| state.get(pos))
                    .map(|e| Ok((e.key.to_owned(), e.identity.to_owned()))),
            ),
            Deletes::Listed(rows) => Box::new(rows.iter().map(|row| row.map_err(RunError::spill))),
        }
    }

    /// The batches of deletes, each made as delivery asks for it: a delete's record (its key
    /// and parsed identity) is held only while its batch is under way.
    pub(super) fn batches(
        &self,
        batch_size: usize,
    ) -> impl Iterator<Item = Result<Batch, RunError>> + Send + '_ {
        let size = batch_size.max(1);
        let mut rows = self.rows();
        std::iter::from_fn(move || {
            let mut records = Vec::new();
            for row in rows.by_ref().take(size) {
                match row {
                    Ok((key, identity)) => records.push(Record {
                        key,
                        identity: identity_document(&identity).into(),
                        fields: Fields::default(),
                    }),
                    Err(e) => return Some(Err(e)),
                }
            }
            (!records.is_empty()).then_some(Ok(Batch {
                operation: Operation::Delete,
                records,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::EntryRef;

    fn keys(batch: &Batch) -> Vec<&str> {
        batch.records.iter().map(|r| r.key.as_str()).collect()
    }

    #[test]
    fn both_planners_deletes_go_out_in_batches_of_the_delivery_size() {
        let mut state = Fingerprints::default();
        for key in ["a", "b", "c", "d", "e"] {
            state.push_unindexed(EntryRef {
                key,
                fingerprint: 1,
                identity: r#"{"id":1}"#,
            });
        }
        state.build_index();
        let loaded = Deletes::Loaded {
            state,
            positions: vec![4, 0, 2],
        };
        let mut listed = RemovedRows::new();
        for key in ["e", "a", "c"] {
            listed.push(key.to_owned(), r#"{"id":1}"#.to_owned()).unwrap();
        }
        let listed = Deletes::Listed(listed.finish().unwrap());
        for (deletes, order) in [(&loaded, ["e", "a", "c"]), (&listed, ["a", "c", "e"])] {
            assert_eq!(deletes.len(), 3);
            let batches: Vec<Batch> = deletes.batches(2).map(Result::unwrap).collect();
            assert_eq!(batches.len(), 2);
            assert_eq!(keys(&batches[0]), order[..2]);
            assert_eq!(keys(&batches[1]), order[2..]);
            assert!(batches.iter().all(|b| b.operation == Operation::Delete));
            assert_eq!(*batches[0].records[0].identity, identity_document(r#"{"id":1}"#));
            // Read again from the first row, and a batch size of 0 sends one at a time.
            assert_eq!(deletes.batches(0).count(), 3);
        }
        assert!(Deletes::None.is_empty());
        assert_eq!(Deletes::None.batches(10).count(), 0);
    }
}

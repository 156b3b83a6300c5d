//! The mass-delete guard: how much one run of a mirror sync may delete.
//!
//! A model that suddenly returns nothing, or a fraction of its rows (a broken upstream model,
//! a revoked grant, a wrong schema), would otherwise make mirror mode delete the destination's
//! records, and no vendor offers an undo. When a plan passes the limit, the run sends its adds
//! and updates but no delete; the deleted rows stay in the state, so the next run plans them
//! again. A person approves one plan by its id ([`DeleteCheck::plan_id`]: the delete count and
//! a hash of the deleted keys), so an approval cannot let a later, different plan through.

use xxhash_rust::xxh3::xxh3_64;

use crate::api::reverse_sync::{DeleteLimit, DeletesHeldBack};

/// Share of the stored records one run may delete by default, in percent.
pub const DEFAULT_MAX_PERCENT: u32 = 50;

/// Stored records from which the share is checked by default: below, ordinary churn in a
/// tiny sync (3 of 5 records) would be held back.
pub const DEFAULT_MIN_STORED_RECORDS: u64 = 10;

/// The limits of one sync, with the defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest share of the stored records, in percent (100: no share check).
    pub max_percent: u32,
    /// Largest number of deletes.
    pub max_count: Option<u64>,
    /// Stored records from which the share is checked.
    pub min_stored_records: u64,
    /// Whether a run may delete every stored record.
    pub allow_delete_all: bool,
}

impl Limits {
    /// The limits of `spec.deleteLimit` (the defaults when absent).
    pub fn of(spec: Option<&DeleteLimit>) -> Limits {
        let default = DeleteLimit::default();
        let DeleteLimit {
            max_percent,
            max_count,
            min_stored_records,
            allow_delete_all,
        } = spec.unwrap_or(&default);
        Limits {
            max_percent: max_percent.unwrap_or(DEFAULT_MAX_PERCENT).min(100),
            max_count: *max_count,
            min_stored_records: min_stored_records.unwrap_or(DEFAULT_MIN_STORED_RECORDS),
            allow_delete_all: *allow_delete_all,
        }
    }
}

/// What the guard found for one plan's deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteCheck {
    /// Records the plan deletes.
    pub deletes: u64,
    /// Records stored before the run.
    pub stored_records: u64,
    /// `<deletes>-<hash of the deleted keys>`: what an approval names.
    pub plan_id: String,
    /// The limit the plan passes, in words; `None` within the limits.
    pub exceeded: Option<String>,
    /// True when the plan passes a limit but was approved by its id.
    pub approved: bool,
}

impl DeleteCheck {
    /// True when the deletes are held back: a limit passed and no approval of this plan.
    pub fn held_back(&self) -> bool {
        self.exceeded.is_some() && !self.approved
    }

    /// How the status shows held-back deletes; `None` when nothing is held back.
    pub fn status(&self) -> Option<DeletesHeldBack> {
        let reason = self.exceeded.as_ref().filter(|_| !self.approved)?;
        Some(DeletesHeldBack {
            deletes: self.deletes,
            stored_records: self.stored_records,
            reason: reason.clone(),
            plan_id: self.plan_id.clone(),
        })
    }
}

/// An order-independent hash of a set of keys, fed one key at a time.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeySetHash(u64);

impl KeySetHash {
    /// Adds one key.
    pub fn add(&mut self, key: &str) {
        self.0 = self.0.wrapping_add(xxh3_64(key.as_bytes()));
    }
}

/// Checks a plan that deletes `deletes` of `stored_records` records, whose deleted keys hash
/// to `keys`, against `limits`; `approval` is the plan id a person approved, if any.
pub fn check(
    limits: &Limits,
    stored_records: u64,
    deletes: u64,
    keys: KeySetHash,
    approval: Option<&str>,
) -> DeleteCheck {
    let plan_id = format!("{deletes}-{:016x}", keys.0);
    let exceeded = exceeded(limits, stored_records, deletes);
    let approved = exceeded.is_some() && approval.is_some_and(|a| a.trim() == plan_id);
    DeleteCheck {
        deletes,
        stored_records,
        plan_id,
        exceeded,
        approved,
    }
}

fn exceeded(limits: &Limits, stored: u64, deletes: u64) -> Option<String> {
    if deletes == 0 {
        return None;
    }
    if deletes >= stored && !limits.allow_delete_all {
        return Some(format!(
            "the run would delete every one of the {stored} stored records (the model returned none of their keys); spec.deleteLimit.allowDeleteAll permits it"
        ));
    }
    if let Some(max) = limits.max_count
        && deletes > max
    {
        return Some(format!(
            "the run would delete {deletes} records, above spec.deleteLimit.maxCount of {max}"
        ));
    }
    // deletes / stored > max_percent / 100, in integers (no rounding, no overflow).
    let share_checked = limits.max_percent < 100 && stored >= limits.min_stored_records;
    if share_checked && u128::from(deletes) * 100 > u128::from(limits.max_percent) * u128::from(stored) {
        let percent = u128::from(deletes) * 100 / u128::from(stored.max(1));
        return Some(format!(
            "the run would delete {deletes} of {stored} stored records ({percent}%), above the limit of {}% (spec.deleteLimit.maxPercent)",
            limits.max_percent
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> KeySetHash {
        let mut h = KeySetHash::default();
        for n in names {
            h.add(n);
        }
        h
    }

    #[test]
    fn the_default_holds_back_more_than_half_and_an_emptied_model() {
        let limits = Limits::of(None);
        assert!(check(&limits, 100, 50, keys(&["a"]), None).exceeded.is_none());
        let over = check(&limits, 100, 51, keys(&["a"]), None);
        assert!(over.held_back());
        assert!(over.exceeded.unwrap().contains("51 of 100 stored records (51%)"));
        // Tiny syncs: the share is not checked below the floor, but deleting all still is.
        assert!(check(&limits, 5, 3, keys(&["a"]), None).exceeded.is_none());
        let all = check(&limits, 2, 2, keys(&["a", "b"]), None);
        assert!(
            all.exceeded
                .unwrap()
                .contains("every one of the 2 stored records")
        );
        assert!(check(&limits, 0, 0, keys(&[]), None).exceeded.is_none());
    }

    #[test]
    fn a_sync_sets_its_own_share_count_and_floor() {
        let spec = DeleteLimit {
            max_percent: Some(10),
            max_count: Some(5),
            min_stored_records: Some(0),
            allow_delete_all: true,
        };
        let limits = Limits::of(Some(&spec));
        assert!(
            check(&limits, 1000, 6, keys(&[]), None)
                .exceeded
                .unwrap()
                .contains("maxCount of 5")
        );
        assert!(
            check(&limits, 20, 3, keys(&[]), None)
                .exceeded
                .unwrap()
                .contains("(15%)")
        );
        assert!(
            check(&limits, 1, 1, keys(&[]), None).exceeded.is_some(),
            "100% > 10%"
        );
        let off = Limits::of(Some(&DeleteLimit {
            max_percent: Some(100),
            allow_delete_all: true,
            ..DeleteLimit::default()
        }));
        assert!(check(&off, 10, 10, keys(&[]), None).exceeded.is_none());
    }

    #[test]
    fn an_approval_lets_only_the_plan_it_names_through() {
        let limits = Limits::of(None);
        let plan = check(&limits, 100, 60, keys(&["a", "b"]), None);
        assert!(plan.plan_id.starts_with("60-"));
        let approved = check(&limits, 100, 60, keys(&["b", "a"]), Some(&plan.plan_id));
        assert!(approved.approved && !approved.held_back());
        // Same count, other keys: a different plan.
        let other = check(&limits, 100, 60, keys(&["a", "c"]), Some(&plan.plan_id));
        assert!(other.held_back());
        assert_eq!(approved.status(), None);
        assert_eq!(other.status().unwrap().deletes, 60);
    }
}

//! Local runs.

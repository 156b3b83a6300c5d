//! The vocabulary every layer shares: the value model ([`value`]), the transforms a mapping
//! applies to values ([`transform`]), the record a destination receives and the operation it
//! is asked for ([`record`]), a Secret's decoded data ([`secret`]), and the labels put on
//! the objects Backflow creates ([`labels`]).
//!
//! It sits at the bottom of the crate and imports nothing of it, so `source`, `state`,
//! `destination`, `engine` and `controller` can all speak it without importing each other.

pub mod labels;
pub mod record;
pub mod secret;
pub mod transform;
pub mod value;

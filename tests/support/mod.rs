//! Helpers shared by the integration tests: one module per concern.

pub mod db;
pub mod http_server;

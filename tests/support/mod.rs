//! Helpers shared by the integration tests: one module per concern.

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

pub mod apiserver;
pub mod bigquery_double;
pub mod braze_double;
pub mod clickhouse;
pub mod cluster;
pub mod cluster_manifests;
pub mod customerio_double;
pub mod databricks_double;
pub mod db;
pub mod eager_pairs_store;
pub mod engine;
pub mod fake_connector;
pub mod http_server;
pub mod hubspot_double;
pub mod in_memory_store;
pub mod intercom_double;
pub mod mailchimp_double;
pub mod rows;
pub mod salesforce_double;
pub mod slack_double;
pub mod snowflake_double;
pub mod sqlite;
pub mod statement_double;
pub mod table_suite;
pub mod warehouse;
pub mod zendesk_double;

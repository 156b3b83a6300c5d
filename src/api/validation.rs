//! Checks of a spec that the schema cannot express, with messages that name the field.
//! Pure: no I/O. The controller and the local runner call these before anything runs.

use std::collections::{BTreeSet, HashMap};

use super::destination::{DestinationSpec, DestinationType};
use super::reverse_sync::{CursorSpec, Mapping, ReverseSyncSpec, StateSpec, StateStoreKind, TemplateType};
use super::{duration, limits};
use crate::model::transform::Transform;
use crate::template::{Jinja, Limits, Mode, Template};

/// One problem in a spec: the field path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, like `spec.mappings[2].to`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
pub struct InvalidSpec(pub Vec<FieldError>);

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
    fn finish(self) -> Result<(), InvalidSpec> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec(self.0))
        }
    }
}

/// Validates a ReverseSync spec.
pub fn validate_reverse_sync(spec: &ReverseSyncSpec) -> Result<(), InvalidSpec> {
    let mut errors = Errors(Vec::new());
    let source = &spec.source;
    if source.query.trim().is_empty() {
        errors.add("spec.source.query", "the model query is empty");
    }
    if source.primary_key.is_empty() {
        errors.add(
            "spec.source.primaryKey",
            "name at least one column that identifies a row",
        );
    }
    for (field, len, max) in [
        (
            "spec.source.primaryKey",
            source.primary_key.len(),
            limits::MAX_KEY_COLUMNS,
        ),
        ("spec.match", spec.match_fields.len(), limits::MAX_KEY_COLUMNS),
        (
            "spec.schedule.after",
            spec.schedule.as_ref().map_or(0, |s| s.after.len()),
            limits::MAX_AFTER,
        ),
    ] {
        if len > max {
            errors.add(field, format!("at most {max} items"));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, col) in source.primary_key.iter().enumerate() {
        if col.trim().is_empty() {
            errors.add(format!("spec.source.primaryKey[{i}]"), "column name is empty");
        } else if !seen.insert(col) {
            errors.add(
                format!("spec.source.primaryKey[{i}]"),
                format!("column {col:?} is listed twice"),
            );
        }
    }
    if let Some(t) = &source.statement_timeout {
        check_duration(
            &mut errors,
            "spec.source.statementTimeout",
            t,
            duration::MAX_TIMEOUT,
        );
    }
    if source.connection_secret_ref.name.trim().is_empty() {
        errors.add(
            "spec.source.connectionSecretRef.name",
            "name the Secret holding the connection URL",
        );
    }
    if spec.destination_ref.name.trim().is_empty() {
        errors.add("spec.destinationRef.name", "name the Destination to send rows to");
    }
    validate_mappings(spec, &mut errors);
    if let Some(limit) = &spec.delete_limit
        && limit.max_percent.is_some_and(|p| p > 100)
    {
        errors.add(
            "spec.deleteLimit.maxPercent",
            "a share of the stored records, from 0 to 100 (100 turns the share check off)",
        );
    }
    if let Some(state) = &spec.state {
        validate_state(state, &mut errors);
    }
    if let Some(cursor) = &spec.cursor {
        validate_cursor(cursor, &mut errors);
    }
    if let Some(schedule) = &spec.schedule {
        match (&schedule.interval, &schedule.cron) {
            (Some(_), Some(_)) => errors.add("spec.schedule", "set interval or cron, not both"),
            (None, None) if schedule.after.is_empty() => errors.add(
                "spec.schedule",
                "set interval (like 15m), cron (like \"*/15 * * * *\") or after (syncs to follow)",
            ),
            (None, None) => {}
            (Some(interval), None) => match duration::parse_at_most(interval, duration::MAX_INTERVAL) {
                Ok(d) if d.as_secs() < 1 => {
                    errors.add("spec.schedule.interval", "the interval must be at least 1s")
                }
                Ok(_) => {}
                Err(e) => errors.add("spec.schedule.interval", e),
            },
            (None, Some(cron)) => {
                if let Err(e) = duration::cron(cron) {
                    errors.add("spec.schedule.cron", e);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, name) in schedule.after.iter().enumerate() {
            if name.is_empty() {
                errors.add(
                    format!("spec.schedule.after[{i}]"),
                    "name a ReverseSync of this namespace",
                );
            } else if !seen.insert(name) {
                errors.add(
                    format!("spec.schedule.after[{i}]"),
                    format!("{name:?} is listed twice"),
                );
            }
        }
    }
    errors.finish()
}

fn validate_cursor(cursor: &CursorSpec, errors: &mut Errors) {
    if !is_plain_identifier(&cursor.column) {
        errors.add(
            "spec.cursor.column",
            format!(
                "{:?} is not a plain identifier: use letters, digits and underscores, starting \
                 with a letter or underscore, at most 63 characters (alias the column in the query)",
                cursor.column
            ),
        );
    }
    let Some(full) = &cursor.full_diff else {
        return;
    };
    match (&full.interval, &full.cron) {
        (Some(interval), None) => match duration::parse_at_most(interval, duration::MAX_INTERVAL) {
            Ok(d) if d.as_secs() < 1 => errors.add(
                "spec.cursor.fullDiff.interval",
                "the interval must be at least 1s",
            ),
            Ok(_) => {}
            Err(e) => errors.add("spec.cursor.fullDiff.interval", e),
        },
        (None, Some(cron)) => {
            if let Err(e) = duration::cron(cron) {
                errors.add("spec.cursor.fullDiff.cron", e);
            }
        }
        _ => errors.add("spec.cursor.fullDiff", "set interval or cron, exactly one"),
    }
}

fn validate_state(state: &StateSpec, errors: &mut Errors) {
    let warehouse = state.store == StateStoreKind::Warehouse;
    if let Some(schema) = &state.schema {
        if !warehouse {
            errors.add("spec.state.schema", "applies only to store Warehouse");
        } else if !is_plain_identifier(schema) {
            errors.add(
                "spec.state.schema",
                format!(
                    "{schema:?} is not a plain identifier: use letters, digits and underscores, \
                     starting with a letter or underscore, at most 63 characters"
                ),
            );
        }
    }
    if let Some(secret) = &state.connection_secret_ref {
        if !warehouse {
            errors.add(
                "spec.state.connectionSecretRef",
                "applies only to store Warehouse",
            );
        } else if secret.name.trim().is_empty() {
            errors.add(
                "spec.state.connectionSecretRef.name",
                "name the Secret holding the state connection URL",
            );
        }
    }
    if state.sync_logs && !warehouse {
        errors.add("spec.state.syncLogs", "applies only to store Warehouse");
    }
}

/// A name safe to splice into SQL unquoted on every supported server (and then quoted anyway).
pub fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

fn validate_mappings(spec: &ReverseSyncSpec, errors: &mut Errors) {
    if spec.mappings.is_empty() {
        errors.add(
            "spec.mappings",
            "map at least one column; unmapped columns are not sent",
        );
    }
    if spec.mappings.len() > limits::MAX_MAPPINGS {
        errors.add(
            "spec.mappings",
            format!("at most {} mappings", limits::MAX_MAPPINGS),
        );
        return;
    }
    // Targets by name, and every proper dotted prefix of a target (`a` and `a.b` of `a.b.c`)
    // with the first mapping that has it: checking a mapping costs its own depth, so the whole
    // check is linear in the number of mappings.
    let mut targets: HashMap<&str, usize> = HashMap::new();
    let mut prefixes: HashMap<&str, usize> = HashMap::new();
    for (i, m) in spec.mappings.iter().enumerate() {
        let field = format!("spec.mappings[{i}]");
        match (&m.from, &m.template) {
            (Some(_), Some(_)) | (None, None) => errors.add(&field, "set exactly one of from or template"),
            (Some(from), None) if from.trim().is_empty() => {
                errors.add(format!("{field}.from"), "column name is empty")
            }
            (None, Some(t)) => {
                let mode = match m.template_type {
                    TemplateType::Text => Mode::Text,
                    TemplateType::Json => Mode::Json,
                };
                if let Err(e) = Jinja::compile(t, mode, Limits::RECORD) {
                    errors.add(format!("{field}.template"), e.to_string());
                }
            }
            _ => {}
        }
        if m.template.is_none() && m.template_type != TemplateType::Text {
            errors.add(
                format!("{field}.templateType"),
                "applies only to a template mapping",
            );
        }
        if m.to.is_empty() || m.to.split('.').any(str::is_empty) {
            errors.add(
                format!("{field}.to"),
                "the target field is empty or has an empty part between dots",
            );
        } else if let Some(j) = targets.get(m.to.as_str()) {
            errors.add(
                format!("{field}.to"),
                format!("{:?} is already the target of spec.mappings[{j}]", m.to),
            );
        } else if let Some(j) = dotted_prefixes(&m.to)
            .find_map(|p| targets.get(p))
            .or_else(|| prefixes.get(m.to.as_str()))
        {
            errors.add(
                format!("{field}.to"),
                format!(
                    "{:?} overlaps spec.mappings[{j}] ({:?}): a field cannot be both a value and an object",
                    m.to, spec.mappings[*j].to
                ),
            );
        }
        targets.entry(&m.to).or_insert(i);
        for p in dotted_prefixes(&m.to) {
            prefixes.entry(p).or_insert(i);
        }
        if m.transforms.len() > limits::MAX_TRANSFORMS {
            errors.add(
                format!("{field}.transforms"),
                format!("at most {} transforms", limits::MAX_TRANSFORMS),
            );
        }
        for (j, t) in m.transforms.iter().enumerate() {
            if let Err(e) = Transform::parse(t) {
                errors.add(format!("{field}.transforms[{j}]"), e);
            }
        }
    }
    if !spec.mappings.is_empty()
        && let Err(e) = effective_match_fields(&spec.mappings, &spec.source.primary_key, &spec.match_fields)
    {
        errors.add("spec.match", e);
    }
}

/// The proper dotted prefixes of a field path: `a` and `a.b` of `a.b.c`.
fn dotted_prefixes(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('.').map(move |(at, _)| &path[..at])
}

/// Validates a Destination spec.
pub fn validate_destination(spec: &DestinationSpec) -> Result<(), InvalidSpec> {
    let mut errors = Errors(Vec::new());
    let t = spec.destination_type;
    // Every type's block is the spec field named after the type.
    let json = serde_json::to_value(spec).unwrap_or_default();
    let blocks = DestinationType::ALL.iter().map(|ty| {
        (
            ty.as_str(),
            json.get(ty.as_str()).is_some_and(|b| !b.is_null()),
            *ty,
        )
    });
    for (name, present, ty) in blocks {
        if ty == t && !present {
            errors.add(
                format!("spec.{name}"),
                format!("type {} needs the {name} block", t.as_str()),
            );
        } else if ty != t && present {
            errors.add(
                format!("spec.{name}"),
                format!("the {name} block does not match type {}", t.as_str()),
            );
        }
    }
    if let Some(r) = &spec.rate_limit {
        if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
            errors.add("spec.rateLimit.requestsPerSecond", "must be a number above 0");
        }
        if r.burst == Some(0) {
            errors.add("spec.rateLimit.burst", "must be at least 1");
        }
    }
    if spec.batch_size == Some(0) {
        errors.add("spec.batchSize", "must be at least 1");
    }
    match spec.max_concurrency {
        Some(0) => errors.add("spec.maxConcurrency", "must be at least 1"),
        Some(n) if n > limits::MAX_CONCURRENCY => errors.add(
            "spec.maxConcurrency",
            format!("must be at most {}", limits::MAX_CONCURRENCY),
        ),
        _ => {}
    }
    if let Some(retry) = &spec.retry {
        if retry.max_attempts == Some(0) {
            errors.add("spec.retry.maxAttempts", "must be at least 1");
        }
        if let Some(d) = &retry.initial_backoff {
            check_duration(&mut errors, "spec.retry.initialBackoff", d, duration::MAX_BACKOFF);
        }
        if let Some(d) = &retry.max_backoff {
            check_duration(&mut errors, "spec.retry.maxBackoff", d, duration::MAX_BACKOFF);
        }
    }
    if let Some(slack) = &spec.slack {
        for (field, text) in [
            ("spec.slack.channel", &slack.channel),
            ("spec.slack.text", &slack.text),
        ] {
            if let Err(e) = Template::parse(text) {
                errors.add(field, e.to_string());
            }
        }
    }
    if let Some(http) = &spec.http {
        validate_http_templates(http, &mut errors);
        if let Some(t) = &http.timeout {
            check_duration(&mut errors, "spec.http.timeout", t, duration::MAX_TIMEOUT);
        }
        if let Some(m) = &http.method
            && !matches!(
                m.to_ascii_uppercase().as_str(),
                "POST" | "PUT" | "PATCH" | "DELETE"
            )
        {
            errors.add(
                "spec.http.method",
                format!("{m:?} is not one of POST, PUT, PATCH, DELETE"),
            );
        }
    }
    if let Some(redis) = &spec.redis {
        if let Err(e) = Template::parse(&redis.key) {
            errors.add("spec.redis.key", e.to_string());
        }
        if let Some(t) = &redis.ttl {
            check_duration(&mut errors, "spec.redis.ttl", t, duration::LONGEST);
        }
    }
    if let Some(braze) = &spec.braze {
        let url = braze.base_url.trim();
        if url.is_empty() {
            errors.add(
                "spec.braze.baseUrl",
                "set your instance's REST endpoint, like https://rest.iad-01.braze.com",
            );
        } else if !(url.starts_with("https://") || url.starts_with("http://")) {
            errors.add(
                "spec.braze.baseUrl",
                format!("{url:?} is not an http(s) URL; use your instance's REST endpoint, like https://rest.iad-01.braze.com"),
            );
        }
    }
    for (name, block) in [
        ("postgres", &spec.postgres),
        ("mysql", &spec.mysql),
        ("sqlite", &spec.sqlite),
    ] {
        if let Some(b) = block
            && b.table.trim().is_empty()
        {
            errors.add(format!("spec.{name}.table"), "name the table to write to");
        }
    }
    errors.finish()
}

/// Compiles every template of an `http` block: syntax, filters, limits, and no Secret
/// outside the URL and headers. Secret keys and record fields are checked when the
/// connector is built, where the Secret and the records are known.
fn validate_http_templates(http: &super::destination::HttpSpec, errors: &mut Errors) {
    let delete = http.delete.as_ref();
    let mut templates = vec![
        ("spec.http.url".to_owned(), Some(&http.url), Mode::Text, true),
        ("spec.http.body".to_owned(), http.body.as_ref(), Mode::Text, false),
        (
            "spec.http.record".to_owned(),
            http.record.as_ref(),
            Mode::Json,
            false,
        ),
        (
            "spec.http.checkUrl".to_owned(),
            http.check_url.as_ref(),
            Mode::Text,
            true,
        ),
        (
            "spec.http.delete.url".to_owned(),
            delete.map(|d| &d.url),
            Mode::Text,
            true,
        ),
        (
            "spec.http.delete.body".to_owned(),
            delete.and_then(|d| d.body.as_ref()),
            Mode::Text,
            false,
        ),
        (
            "spec.http.delete.record".to_owned(),
            delete.and_then(|d| d.record.as_ref()),
            Mode::Json,
            false,
        ),
    ];
    for (name, text) in &http.headers {
        templates.push((format!("spec.http.headers.{name}"), Some(text), Mode::Text, true));
    }
    for (field, text, mode, secrets) in templates {
        let Some(text) = text else { continue };
        match Jinja::compile(text, mode, Limits::RECORD) {
            Err(e) => errors.add(field, e.to_string()),
            Ok(t) if !secrets && t.variables().iter().any(|v| v == "secret") => errors.add(
                field,
                "{{ secret.KEY }} is available only in the URL and headers, so that no Secret value is \
                 ever sent in a body",
            ),
            Ok(_) => {}
        }
    }
}

fn check_duration(errors: &mut Errors, field: &str, text: &str, max: std::time::Duration) {
    if let Err(e) = duration::parse_at_most(text, max) {
        errors.add(field, e);
    }
}

/// The match fields of a sync: `spec.match`, or the targets of the primary key columns.
pub fn effective_match_fields(
    mappings: &[Mapping],
    primary_key: &[String],
    match_fields: &[String],
) -> Result<Vec<String>, String> {
    if !match_fields.is_empty() {
        for f in match_fields {
            if !mappings.iter().any(|m| &m.to == f) {
                return Err(format!("match field {f:?} is not the target (to) of any mapping"));
            }
        }
        return Ok(match_fields.to_vec());
    }
    let targets: Vec<String> = primary_key
        .iter()
        .filter_map(|pk| {
            mappings
                .iter()
                .find(|m| m.from.as_deref() == Some(pk.as_str()))
                .map(|m| m.to.clone())
        })
        .collect();
    if targets.len() != primary_key.len() {
        return Err("set spec.match to the destination field(s) that identify a record, or map every primary key column".to_owned());
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::reverse_sync::Mapping;

    fn sync(yaml: &str) -> ReverseSyncSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const BASE: &str = r#"
source: {connectionSecretRef: {name: wh}, query: "select 1", primaryKey: [id]}
destinationRef: {name: crm}
mappings: [{from: id, to: id}, {from: email, to: email}]
"#;

    #[test]
    fn warehouse_state_settings_are_checked_and_refused_for_other_stores() {
        let mut s = sync(BASE);
        s.state = Some(serde_yaml_ng::from_str(
            "{store: Warehouse, schema: ops_state, connectionSecretRef: {name: wh-writer}, syncLogs: true}",
        ).unwrap());
        assert_eq!(validate_reverse_sync(&s), Ok(()));
        s.state = Some(serde_yaml_ng::from_str("{store: Warehouse, schema: \"a;drop\"}").unwrap());
        let err = validate_reverse_sync(&s).unwrap_err().to_string();
        assert!(err.contains("spec.state.schema"), "{err}");
        s.state = Some(serde_yaml_ng::from_str("{store: ConfigMap, syncLogs: true, schema: x}").unwrap());
        let err = validate_reverse_sync(&s).unwrap_err().to_string();
        assert!(
            err.contains("spec.state.syncLogs") && err.contains("spec.state.schema"),
            "{err}"
        );
    }

    #[test]
    fn a_delete_limit_past_one_hundred_percent_names_the_field() {
        let ok = format!(
            "{BASE}mode: mirror\ndeleteLimit: {{maxPercent: 20, maxCount: 500, minStoredRecords: 100}}\n"
        );
        validate_reverse_sync(&sync(&ok)).unwrap();
        let err =
            validate_reverse_sync(&sync(&format!("{BASE}deleteLimit: {{maxPercent: 150}}\n"))).unwrap_err();
        assert!(err.to_string().contains("spec.deleteLimit.maxPercent"), "{err}");
        let typo =
            serde_yaml_ng::from_str::<ReverseSyncSpec>(&format!("{BASE}deleteLimit: {{maxPercnt: 5}}\n"));
        assert!(typo.is_err(), "unknown fields are refused");
    }

    #[test]
    fn a_cursor_needs_a_plain_column_and_at_most_one_full_diff_schedule() {
        let with = |cursor: &str| validate_reverse_sync(&sync(&format!("{BASE}cursor: {cursor}\n")));
        with("{column: updated_at}").unwrap();
        with("{column: updated_at, fullDiff: {interval: 6h}}").unwrap();
        with("{column: updated_at, fullDiff: {cron: \"0 3 * * *\"}}").unwrap();
        for (cursor, field) in [
            ("{column: \"updated at\"}", "spec.cursor.column"),
            ("{column: x, fullDiff: {}}", "spec.cursor.fullDiff"),
            (
                "{column: x, fullDiff: {interval: 1h, cron: \"0 3 * * *\"}}",
                "spec.cursor.fullDiff",
            ),
            (
                "{column: x, fullDiff: {interval: soon}}",
                "spec.cursor.fullDiff.interval",
            ),
            (
                "{column: x, fullDiff: {cron: \"every day\"}}",
                "spec.cursor.fullDiff.cron",
            ),
        ] {
            let err = with(cursor).unwrap_err().to_string();
            assert!(err.contains(field), "{cursor}: {err}");
        }
    }

    #[test]
    fn a_complete_spec_is_valid() {
        validate_reverse_sync(&sync(BASE)).unwrap();
    }

    #[test]
    fn an_unknown_mode_is_refused_when_parsing() {
        let err = serde_yaml_ng::from_str::<ReverseSyncSpec>(&format!("{BASE}mode: upsrt\n")).unwrap_err();
        assert!(err.to_string().contains("unknown variant `upsrt`"), "{err}");
    }

    #[test]
    fn an_empty_primary_key_names_the_field() {
        let err =
            validate_reverse_sync(&sync(&BASE.replace("primaryKey: [id]", "primaryKey: []"))).unwrap_err();
        assert!(err.to_string().contains("spec.source.primaryKey"), "{err}");
    }

    #[test]
    fn durations_counts_and_cron_seconds_past_their_bounds_are_refused() {
        for (extra, field) in [
            ("schedule: {interval: 300000y}\n", "spec.schedule.interval"),
            ("schedule: {interval: 400d}\n", "spec.schedule.interval"),
            ("schedule: {cron: \"*/5 * * * * *\"}\n", "spec.schedule.cron"),
        ] {
            let err = validate_reverse_sync(&sync(&format!("{BASE}{extra}"))).unwrap_err();
            assert!(err.to_string().contains(field), "{extra}: {err}");
        }
        let mut s = sync(BASE);
        s.source.statement_timeout = Some("2d".into());
        assert!(
            validate_reverse_sync(&s)
                .unwrap_err()
                .to_string()
                .contains("statementTimeout")
        );
        let mut d: DestinationSpec = serde_yaml_ng::from_str(
            "type: http\nhttp: {url: \"https://x\", timeout: 1000000000000y}\nmaxConcurrency: 65\nretry: {maxBackoff: 2h}\n",
        )
        .unwrap();
        let err = validate_destination(&d).unwrap_err().to_string();
        for field in [
            "spec.http.timeout",
            "spec.maxConcurrency",
            "spec.retry.maxBackoff",
        ] {
            assert!(err.contains(field), "{field}: {err}");
        }
        d.max_concurrency = Some(64);
        d.retry = None;
        d.http.as_mut().unwrap().timeout = Some("1h".into());
        validate_destination(&d).unwrap();
    }

    #[test]
    fn twenty_thousand_mappings_are_refused_and_a_thousand_checked_with_overlaps_found() {
        let mut s = sync(BASE);
        s.mappings = (0..20_000)
            .map(|i| Mapping {
                from: Some(format!("c{i}")),
                template: None,
                template_type: TemplateType::Text,
                to: format!("f{i}"),
                transforms: Vec::new(),
            })
            .collect();
        let err = validate_reverse_sync(&s).unwrap_err().to_string();
        assert!(err.contains("at most 1000 mappings"), "{err}");
        s.mappings.truncate(999);
        s.mappings.push(Mapping {
            from: Some("c0".into()),
            template: None,
            template_type: TemplateType::Text,
            to: "f998.deep.field".into(),
            transforms: Vec::new(),
        });
        let err = validate_reverse_sync(&s).unwrap_err().to_string();
        assert!(
            err.contains("spec.mappings[999].to") && err.contains("overlaps spec.mappings[998]"),
            "{err}"
        );
    }

    #[test]
    fn bad_intervals_and_crons_name_the_field() {
        let err = validate_reverse_sync(&sync(&format!("{BASE}schedule: {{interval: soon}}\n"))).unwrap_err();
        assert!(err.to_string().contains("spec.schedule.interval"), "{err}");
        let err =
            validate_reverse_sync(&sync(&format!("{BASE}schedule: {{cron: \"61 * * * *\"}}\n"))).unwrap_err();
        assert!(err.to_string().contains("spec.schedule.cron"), "{err}");
        validate_reverse_sync(&sync(&format!("{BASE}schedule: {{cron: \"*/15 * * * *\"}}\n"))).unwrap();
        validate_reverse_sync(&sync(&format!("{BASE}schedule: {{interval: 15m}}\n"))).unwrap();
        validate_reverse_sync(&sync(&format!("{BASE}schedule: {{after: [model, other]}}\n"))).unwrap();
        let err = validate_reverse_sync(&sync(&format!("{BASE}schedule: {{after: [a, a]}}\n"))).unwrap_err();
        assert!(err.to_string().contains("spec.schedule.after[1]"), "{err}");
    }

    #[test]
    fn mapping_to_the_same_target_twice_is_refused() {
        let spec = sync(&BASE.replace("{from: email, to: email}", "{from: email, to: id}"));
        let err = validate_reverse_sync(&spec).unwrap_err();
        assert!(err.to_string().contains("spec.mappings[1].to"), "{err}");
        let spec = sync(&BASE.replace("{from: email, to: email}", "{from: email, to: id.email}"));
        assert!(
            validate_reverse_sync(&spec)
                .unwrap_err()
                .to_string()
                .contains("overlaps")
        );
    }

    #[test]
    fn bad_transforms_and_unmatched_match_fields_are_named() {
        let spec = sync(&BASE.replace(
            "{from: email, to: email}",
            "{from: email, to: email, transforms: [shout]}",
        ));
        assert!(
            validate_reverse_sync(&spec)
                .unwrap_err()
                .to_string()
                .contains("spec.mappings[1].transforms[0]")
        );
        let spec = sync(&format!("{BASE}match: [phone]\n"));
        assert!(
            validate_reverse_sync(&spec)
                .unwrap_err()
                .to_string()
                .contains("spec.match")
        );
    }

    #[test]
    fn a_destination_block_that_does_not_match_its_type_is_refused() {
        let spec: DestinationSpec = serde_yaml_ng::from_str("type: http\npostgres: {table: t}\n").unwrap();
        let err = validate_destination(&spec).unwrap_err().to_string();
        assert!(err.contains("spec.http: type http needs the http block"), "{err}");
        assert!(
            err.contains("spec.postgres: the postgres block does not match type http"),
            "{err}"
        );
    }

    #[test]
    fn a_redis_key_template_and_ttl_are_checked() {
        let spec: DestinationSpec = serde_yaml_ng::from_str(
            "type: redis
redis: {key: \"c:{{id\", ttl: soon}\n",
        )
        .unwrap();
        let err = validate_destination(&spec).unwrap_err().to_string();
        assert!(err.contains("spec.redis.key"), "{err}");
        assert!(err.contains("spec.redis.ttl"), "{err}");
        let ok: DestinationSpec = serde_yaml_ng::from_str(
            "type: redis
redis: {key: \"c:{{id}}\", ttl: 30d}\n",
        )
        .unwrap();
        validate_destination(&ok).unwrap();
    }

    #[test]
    fn mapping_templates_compile_at_validation_and_errors_name_the_field() {
        let spec = sync(&BASE.replace(
            "{from: email, to: email}",
            "{template: \"{% if plan %}x\", to: email}",
        ));
        let err = validate_reverse_sync(&spec).unwrap_err().to_string();
        assert!(
            err.contains("spec.mappings[1].template: failed to compile template"),
            "{err}"
        );
        let spec = sync(&BASE.replace(
            "{from: email, to: email}",
            "{template: \"{{ email | shout }}\", to: email}",
        ));
        let err = validate_reverse_sync(&spec).unwrap_err().to_string();
        assert!(err.contains("unknown filter \"shout\""), "{err}");
        let spec = sync(&BASE.replace(
            "{from: email, to: email}",
            "{template: '{\"a\": \"{{ email }}\"}', templateType: json, to: email}",
        ));
        let err = validate_reverse_sync(&spec).unwrap_err().to_string();
        assert!(
            err.contains("spec.mappings[1].template") && err.contains("inside a JSON string"),
            "{err}"
        );
        let spec = sync(&BASE.replace(
            "{from: email, to: email}",
            "{from: email, templateType: json, to: email}",
        ));
        let err = validate_reverse_sync(&spec).unwrap_err().to_string();
        assert!(err.contains("spec.mappings[1].templateType"), "{err}");
        let spec = sync(&BASE.replace(
            "{from: email, to: email}",
            "{template: \"{{ first | title }} {% if plan == 'enterprise' %}VIP{% endif %}\", to: email}",
        ));
        validate_reverse_sync(&spec).unwrap();
    }

    #[test]
    fn a_secret_in_a_body_or_record_template_is_refused_at_validation() {
        for block in [
            r#"{url: "https://x.example.com", body: '{"t": "{{ secret.token }}", "r": {{records}}}'}"#,
            r#"{url: "https://x.example.com", record: '{"t": {{ secret.token }}}'}"#,
            r#"{url: "https://x.example.com", delete: {url: "https://x.example.com/d", record: '{"t": {{ secret.token }}}'}}"#,
        ] {
            let spec: DestinationSpec =
                serde_yaml_ng::from_str(&format!("type: http\nhttp: {block}\n")).unwrap();
            let err = validate_destination(&spec).unwrap_err().to_string();
            assert!(err.contains("is available only in the URL and headers"), "{err}");
        }
        let ok: DestinationSpec = serde_yaml_ng::from_str(
            "type: http\nhttp: {url: \"https://x.example.com/{{ operation }}\", headers: {Authorization: \"Bearer {{ secret.token }}\"}, record: '{\"e\": {{ email }}}', body: '{\"data\": {{ records }}}'}\n",
        )
        .unwrap();
        validate_destination(&ok).unwrap();
        let bad: DestinationSpec = serde_yaml_ng::from_str(
            "type: http\nhttp: {url: \"https://x.example.com\", headers: {X: \"{{ a | nope }}\"}}\n",
        )
        .unwrap();
        let err = validate_destination(&bad).unwrap_err().to_string();
        assert!(
            err.contains("spec.http.headers.X: failed to compile template"),
            "{err}"
        );
    }

    #[test]
    fn a_braze_destination_needs_its_rest_endpoint() {
        let spec: DestinationSpec =
            serde_yaml_ng::from_str("type: braze\nbraze: {baseUrl: \" \"}\n").unwrap();
        let err = validate_destination(&spec).unwrap_err().to_string();
        assert!(
            err.contains("spec.braze.baseUrl: set your instance's REST endpoint"),
            "{err}"
        );
        let spec: DestinationSpec =
            serde_yaml_ng::from_str("type: braze\nbraze: {baseUrl: rest.iad-01.braze.com}\n").unwrap();
        let err = validate_destination(&spec).unwrap_err().to_string();
        assert!(err.contains("is not an http(s) URL"), "{err}");
        assert!(serde_yaml_ng::from_str::<DestinationSpec>("type: braze\nbraze: {}\n").is_err());
        let ok: DestinationSpec =
            serde_yaml_ng::from_str("type: braze\nbraze: {baseUrl: \"https://rest.iad-01.braze.com\"}\n")
                .unwrap();
        validate_destination(&ok).unwrap();
    }
}

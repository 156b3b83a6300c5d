//! A structural walk of a document against a CRD's `openAPIV3Schema`, as the API server does
//! it on create: nulls of non-nullable fields are dropped, defaults filled in, then types,
//! formats of values (enum, bounds, lengths, patterns, item and property counts), required and
//! unknown fields are checked, and the `x-kubernetes-validations` rules of each field evaluated
//! on its defaulted value.
//!
//! A walk rather than a JSON-schema validator: a CRD schema is OpenAPI v3 with Kubernetes
//! extensions (`nullable`, `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`,
//! defaults, CEL rules at any depth) that JSON-schema crates do not know, and the walk gives
//! each finding the field path the API server would name.
//!
//! Unknown fields are errors: `kubectl apply` refuses them by default (strict field
//! validation), and `backflow run` refuses them too. The `metadata` of an object is the API
//! server's own type and is checked by the manifest loader, not here.

use std::collections::HashMap;

use serde_json::{Map, Value as Json};

use super::rules::Rules;

/// One thing the schema refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Field path, like `spec.mappings[1].to` (`""` for the whole object).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// The CEL rule that failed, when the issue is a rule's.
    pub rule: Option<String>,
}

impl Issue {
    fn schema(path: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            path: path.into(),
            message: message.into(),
            rule: None,
        }
    }

    /// An issue raised by the rule `source`.
    pub(super) fn rule(path: String, source: &str, message: String) -> Issue {
        Issue {
            path,
            message,
            rule: Some(source.to_owned()),
        }
    }
}

/// The `openAPIV3Schema` of a CRD version with the API server's own fields of every object
/// (`apiVersion`, `kind`, `metadata`), which CRD schemas leave out. Done once per schema.
pub fn with_object_fields(mut schema: Json) -> Json {
    if let Some(props) = schema.get_mut("properties").and_then(Json::as_object_mut) {
        for (name, field) in [
            ("apiVersion", serde_json::json!({"type": "string"})),
            ("kind", serde_json::json!({"type": "string"})),
            (
                "metadata",
                serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            ),
        ] {
            props.entry(name).or_insert(field);
        }
    }
    schema
}

/// Checks `value` (a whole object) against `schema`, the `openAPIV3Schema` of its CRD version
/// as [`with_object_fields`] returns it. Returns the object as the API server would store it
/// (nulls pruned, defaults filled, unknown fields dropped) and every issue found.
pub fn check(schema: &Json, mut value: Json, rules: &mut Rules) -> (Json, Vec<Issue>) {
    let mut walk = Walk {
        rules,
        patterns: HashMap::new(),
        issues: Vec::new(),
    };
    walk.node(schema, &mut value, "");
    (value, walk.issues)
}

struct Walk<'r> {
    rules: &'r mut Rules,
    patterns: HashMap<String, Option<regex::Regex>>,
    issues: Vec<Issue>,
}

fn flag(schema: &Json, name: &str) -> bool {
    schema.get(name).and_then(Json::as_bool).unwrap_or(false)
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn short(value: &Json) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

impl Walk<'_> {
    /// Checks one value against its schema; true when nothing in it is wrong.
    fn node(&mut self, schema: &Json, value: &mut Json, path: &str) -> bool {
        let before = self.issues.len();
        if value.is_null() {
            if !flag(schema, "nullable") {
                self.issues.push(Issue::schema(path, "must not be null"));
            }
            return self.issues.len() == before;
        }
        if !self.check_type(schema, value, path) {
            return false;
        }
        self.check_value(schema, value, path);
        match value {
            Json::Object(map) => self.object(schema, map, path),
            Json::Array(items) => self.array(schema, items, path),
            _ => {}
        }
        self.combinators(schema, value, path);
        if self.issues.len() == before
            && let Some(rules) = schema.get("x-kubernetes-validations").and_then(Json::as_array)
        {
            self.rules.check(rules, value, path, &mut self.issues);
        }
        self.issues.len() == before
    }

    fn check_type(&mut self, schema: &Json, value: &Json, path: &str) -> bool {
        let actual = type_name(value);
        let ok = if flag(schema, "x-kubernetes-int-or-string") {
            matches!(actual, "integer" | "string")
        } else {
            match schema.get("type").and_then(Json::as_str) {
                None => true,
                Some("number") => matches!(actual, "integer" | "number"),
                Some(expected) => expected == actual,
            }
        };
        if !ok {
            let expected = if flag(schema, "x-kubernetes-int-or-string") {
                "an integer or a string"
            } else {
                schema.get("type").and_then(Json::as_str).unwrap_or("?")
            };
            self.issues.push(Issue::schema(
                path,
                format!("must be {expected}, not {actual} {}", short(value)),
            ));
        }
        ok
    }

    /// Enum, bounds, lengths and pattern of a scalar or a collection's size.
    fn check_value(&mut self, schema: &Json, value: &Json, path: &str) {
        if let Some(allowed) = schema.get("enum").and_then(Json::as_array)
            && !allowed.contains(value)
        {
            let list = allowed.iter().map(short).collect::<Vec<_>>().join(", ");
            self.issues.push(Issue::schema(
                path,
                format!("{} is not one of {list}", short(value)),
            ));
        }
        let bound = |name: &str| schema.get(name).and_then(Json::as_f64);
        let count = |name: &str| schema.get(name).and_then(Json::as_u64);
        if let Json::Number(n) = value
            && let Some(x) = n.as_f64()
        {
            if let Some(min) = bound("minimum") {
                let exclusive = flag(schema, "exclusiveMinimum");
                if x < min || (exclusive && x <= min) {
                    let word = if exclusive { "above" } else { "at least" };
                    self.issues
                        .push(Issue::schema(path, format!("must be {word} {min}, not {n}")));
                }
            }
            if let Some(max) = bound("maximum") {
                let exclusive = flag(schema, "exclusiveMaximum");
                if x > max || (exclusive && x >= max) {
                    let word = if exclusive { "below" } else { "at most" };
                    self.issues
                        .push(Issue::schema(path, format!("must be {word} {max}, not {n}")));
                }
            }
        }
        if let Json::String(s) = value {
            let len = s.chars().count() as u64;
            if let Some(min) = count("minLength")
                && len < min
            {
                self.issues.push(Issue::schema(
                    path,
                    format!("must be at least {min} characters long"),
                ));
            }
            if let Some(max) = count("maxLength")
                && len > max
            {
                self.issues.push(Issue::schema(
                    path,
                    format!("must be at most {max} characters long"),
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Json::as_str)
                && let Some(re) = self.pattern(pattern)
                && !re.is_match(s)
            {
                self.issues.push(Issue::schema(
                    path,
                    format!("{} does not match the pattern {pattern}", short(value)),
                ));
            }
        }
        let size = match value {
            Json::Array(a) => Some((a.len() as u64, "items", "Items")),
            Json::Object(o) => Some((o.len() as u64, "fields", "Properties")),
            _ => None,
        };
        if let Some((len, what, suffix)) = size {
            if let Some(min) = count(&format!("min{suffix}"))
                && len < min
            {
                self.issues
                    .push(Issue::schema(path, format!("needs at least {min} {what}")));
            }
            if let Some(max) = count(&format!("max{suffix}"))
                && len > max
            {
                self.issues
                    .push(Issue::schema(path, format!("may have at most {max} {what}")));
            }
        }
    }

    /// A compiled `pattern`; a pattern the `regex` crate does not accept is not checked.
    fn pattern(&mut self, pattern: &str) -> Option<&regex::Regex> {
        self.patterns
            .entry(pattern.to_owned())
            .or_insert_with(|| match regex::Regex::new(pattern) {
                Ok(re) => Some(re),
                Err(e) => {
                    tracing::debug!(pattern, error = %e, "schema pattern not checked");
                    None
                }
            })
            .as_ref()
    }

    fn object(&mut self, schema: &Json, map: &mut Map<String, Json>, path: &str) {
        let empty = Map::new();
        let props = schema
            .get("properties")
            .and_then(Json::as_object)
            .unwrap_or(&empty);
        // Nulls of fields that are not nullable are pruned before defaulting, as the API server does.
        map.retain(|k, v| !v.is_null() || props.get(k).is_none_or(|s| flag(s, "nullable")));
        for (name, prop) in props {
            if !map.contains_key(name)
                && let Some(default) = prop.get("default")
            {
                map.insert(name.clone(), default.clone());
            }
        }
        if let Some(required) = schema.get("required").and_then(Json::as_array) {
            for name in required.iter().filter_map(Json::as_str) {
                if !map.contains_key(name) {
                    self.issues.push(Issue::schema(child(path, name), "is required"));
                }
            }
        }
        let additional = schema.get("additionalProperties");
        let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
        let mut unknown = Vec::new();
        for (key, v) in map.iter_mut() {
            let at = child(path, key);
            match (props.get(key), additional) {
                (Some(prop), _) => {
                    self.node(prop, v, &at);
                }
                (None, Some(extra)) if extra.is_object() => {
                    self.node(extra, v, &at);
                }
                (None, Some(Json::Bool(true))) => {}
                (None, _) if preserve => {}
                (None, _) => {
                    let known = props.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
                    self.issues.push(Issue::schema(
                        at,
                        format!("unknown field {key:?} (known fields: {known})"),
                    ));
                    unknown.push(key.clone());
                }
            }
        }
        for key in unknown {
            map.remove(&key);
        }
    }

    fn array(&mut self, schema: &Json, items: &mut [Json], path: &str) {
        if let Some(item) = schema.get("items") {
            for (i, v) in items.iter_mut().enumerate() {
                self.node(item, v, &format!("{path}[{i}]"));
            }
        }
        if schema.get("uniqueItems").and_then(Json::as_bool) == Some(true)
            || schema.get("x-kubernetes-list-type").and_then(Json::as_str) == Some("set")
        {
            for (i, v) in items.iter().enumerate() {
                if items[..i].contains(v) {
                    self.issues.push(Issue::schema(
                        format!("{path}[{i}]"),
                        format!("{} is listed twice", short(v)),
                    ));
                }
            }
        }
    }

    /// `allOf`, `anyOf`, `oneOf` and `not`: in a structural schema they only add value checks.
    fn combinators(&mut self, schema: &Json, value: &Json, path: &str) {
        let passes = |walk: &mut Walk, sub: &Json| {
            let mut trial = Walk {
                rules: walk.rules,
                patterns: std::mem::take(&mut walk.patterns),
                issues: Vec::new(),
            };
            let mut copy = value.clone();
            trial.node(sub, &mut copy, path);
            walk.patterns = trial.patterns;
            trial.issues
        };
        if let Some(all) = schema.get("allOf").and_then(Json::as_array) {
            for sub in all {
                let issues = passes(self, sub);
                self.issues.extend(issues);
            }
        }
        for (name, wanted) in [("anyOf", None), ("oneOf", Some(1))] {
            if let Some(any) = schema.get(name).and_then(Json::as_array) {
                let matching = any.iter().filter(|sub| passes(self, sub).is_empty()).count();
                let ok = match wanted {
                    None => matching > 0,
                    Some(n) => matching == n,
                };
                if !ok {
                    self.issues.push(Issue::schema(
                        path,
                        format!(
                            "matches {matching} of the {} forms allowed here ({name})",
                            any.len()
                        ),
                    ));
                }
            }
        }
        if let Some(not) = schema.get("not")
            && passes(self, not).is_empty()
        {
            self.issues.push(Issue::schema(
                path,
                "matches a form that is not allowed here (not)",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn issues(schema: Json, value: Json) -> (Json, Vec<(String, String)>) {
        let (v, issues) = check(&with_object_fields(schema), value, &mut Rules::new());
        (v, issues.into_iter().map(|i| (i.path, i.message)).collect())
    }

    #[test]
    fn types_requirements_bounds_and_unknown_fields_name_their_path() {
        let schema = json!({"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["to"],
        "properties": {
            "to": {"type": "string", "minLength": 1},
            "n": {"type": "integer", "minimum": 1.0, "maximum": 64.0},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "q": {"x-kubernetes-int-or-string": true},
            "interval": {"type": "string", "pattern": "^[0-9]+[a-z]+$", "nullable": true},
            "list": {"type": "array", "maxItems": 1, "items": {"type": "string"}}
        }}}});
        let (_, found) = issues(
            schema.clone(),
            json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"}, "spec": {
                "n": 65, "mode": "c", "q": true, "interval": "soon", "list": ["a", 2], "tpyo": 1}}),
        );
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.to",
                "spec.interval",
                "spec.list",
                "spec.list[1]",
                "spec.mode",
                "spec.n",
                "spec.q",
                "spec.tpyo"
            ],
            "{found:?}"
        );
        assert!(found[5].1.contains("at most 64"), "{found:?}");
        assert!(found[7].1.contains("unknown field \"tpyo\""), "{found:?}");
        let (_, found) = issues(schema, json!({"spec": {"to": "x", "q": "50%", "interval": null}}));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn defaults_fill_absent_fields_and_nulls_of_non_nullable_fields_are_pruned_first() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"t": {"type": "string", "default": "text"}, "u": {"type": "string"}},
            "x-kubernetes-validations": [{"rule": "self.t == 'text'", "message": "t"}]}}});
        let (value, found) = issues(schema, json!({"spec": {"u": null}}));
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(value, json!({"spec": {"t": "text"}}));
    }
}

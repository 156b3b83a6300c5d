//! The CEL rules of a schema (`x-kubernetes-validations`), evaluated as the API server does:
//! `self` is the value of the field that carries the rule, after defaulting.
//!
//! Every rule found in a schema is compiled once and evaluated generically; nothing here knows
//! which rules the CRDs carry. Transition rules (those reading `oldSelf`) only apply to updates
//! and are skipped offline: there is no stored object to compare with.

use std::collections::HashMap;
use std::sync::Arc;

use cel::{Context, Env, Program, Value};
use serde_json::Value as Json;

use super::schema::Issue;

/// Compiled rules, by their source text.
pub struct Rules {
    env: Arc<Env>,
    compiled: HashMap<String, Result<Arc<Program>, String>>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new()
    }
}

impl Rules {
    /// The standard CEL environment with the string, list and math libraries Kubernetes also
    /// offers.
    pub fn new() -> Rules {
        let mut env = Env::stdlib();
        for extension in [
            cel::extensions::strings as fn(&mut Env) -> Result<(), _>,
            cel::extensions::lists,
            cel::extensions::math,
        ] {
            // A library that fails to load leaves its functions out: a rule using them is then
            // reported as failing to evaluate, never silently passed.
            if let Err(e) = env.add_extension(extension) {
                tracing::debug!(error = %e, "CEL library not loaded");
            }
        }
        Rules {
            env: Arc::new(env),
            compiled: HashMap::new(),
        }
    }

    fn program(&mut self, source: &str) -> Result<Arc<Program>, String> {
        if let Some(p) = self.compiled.get(source) {
            return p.clone();
        }
        let p = self.env.compile(source).map(Arc::new).map_err(|e| e.to_string());
        self.compiled.insert(source.to_owned(), p.clone());
        p
    }

    /// Evaluates the rules `rules` (the `x-kubernetes-validations` list of a schema) on `value`,
    /// the field at `path`, and adds an issue for each rule that does not hold.
    pub fn check(&mut self, rules: &[Json], value: &Json, path: &str, out: &mut Vec<Issue>) {
        let this = to_cel(value);
        for rule in rules {
            let Some(source) = rule.get("rule").and_then(Json::as_str) else {
                continue;
            };
            let at = match rule.get("fieldPath").and_then(Json::as_str) {
                Some(field) => join_field_path(path, field),
                None => path.to_owned(),
            };
            let program = match self.program(source) {
                Ok(p) => p,
                Err(e) => {
                    out.push(Issue::rule(
                        at,
                        source,
                        format!("failed to compile rule {source:?}: {e}"),
                    ));
                    continue;
                }
            };
            if program.references().has_variable("oldSelf") {
                continue;
            }
            let mut context = Context::with_env(self.env.clone());
            context.add_variable_from_value("self", this.clone());
            match program.execute(&context) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false)) => {
                    let message = self.message(rule, &context, source);
                    out.push(Issue::rule(at, source, message));
                }
                Ok(other) => out.push(Issue::rule(
                    at,
                    source,
                    format!("rule {source:?} gave {other:?}, not true or false"),
                )),
                Err(e) => out.push(Issue::rule(
                    at,
                    source,
                    format!("failed to evaluate rule {source:?}: {e}"),
                )),
            }
        }
    }

    /// The message of a rule that failed: its `messageExpression` when that gives a non-empty
    /// string, else its `message`, else the rule itself (as the API server words it).
    fn message(&mut self, rule: &Json, context: &Context, source: &str) -> String {
        if let Some(expr) = rule.get("messageExpression").and_then(Json::as_str)
            && let Ok(p) = self.program(expr)
            && let Ok(Value::String(s)) = p.execute(context)
            && !s.trim().is_empty()
        {
            return s.to_string();
        }
        match rule.get("message").and_then(Json::as_str) {
            Some(m) if !m.is_empty() => m.to_owned(),
            _ => format!("failed rule: {source}"),
        }
    }
}

/// `spec.http` from `spec` and a rule's `fieldPath` `.http` (also `['x-y']` subscripts).
fn join_field_path(path: &str, field: &str) -> String {
    let field = field.trim();
    let mut out = path.to_owned();
    let mut rest = field;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("['")
            && let Some(end) = r.find("']")
        {
            push_segment(&mut out, &r[..end]);
            rest = &r[end + 2..];
        } else if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            push_segment(&mut out, &r[..end]);
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').map_or(r.len(), |e| e + 1);
            out.push('[');
            out.push_str(&r[..end]);
            rest = r.get(end..).unwrap_or("");
        } else {
            push_segment(&mut out, rest);
            break;
        }
    }
    out
}

fn push_segment(out: &mut String, segment: &str) {
    if !out.is_empty() {
        out.push('.');
    }
    out.push_str(segment);
}

/// A JSON value as CEL sees it in Kubernetes: integers are `int` (`uint` only past `int`'s
/// range), other numbers `double`, objects maps with string keys.
pub fn to_cel(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(map) => {
            let map: HashMap<String, Value> = map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            Value::Map(map.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn failures(rule: Json, value: Json) -> Vec<Issue> {
        let mut out = Vec::new();
        Rules::new().check(&[rule], &value, "spec", &mut out);
        out
    }

    #[test]
    fn has_self_ternaries_and_string_functions_evaluate() {
        for (rule, value, holds) in [
            (
                "has(self.http) == (self.type == 'http')",
                json!({"type": "http", "http": {}}),
                true,
            ),
            (
                "has(self.http) == (self.type == 'http')",
                json!({"type": "redis", "http": {}}),
                false,
            ),
            ("!(has(self.a) && has(self.b))", json!({"a": 1}), true),
            ("(has(self.a) ? self.a : 0) < 5", json!({"a": 7}), false),
            (
                "self.name.startsWith('x') && size(self.name) <= 3",
                json!({"name": "xyz"}),
                true,
            ),
            ("self.items.all(i, i > 0)", json!({"items": [1, 2, 0]}), false),
            ("self.n == 3 && self.f > 1.5", json!({"n": 3, "f": 2.5}), true),
            ("self.name.lowerAscii() == 'ab'", json!({"name": "AB"}), true),
        ] {
            let out = failures(json!({"rule": rule, "message": "m"}), value);
            assert_eq!(out.is_empty(), holds, "{rule}: {out:?}");
        }
    }

    #[test]
    fn messages_field_paths_and_transition_rules_follow_the_api_server() {
        let out = failures(
            json!({"rule": "self.a > 1", "messageExpression": "'a is ' + string(self.a)", "fieldPath": ".a"}),
            json!({"a": 1}),
        );
        assert_eq!(
            (out[0].path.as_str(), out[0].message.as_str()),
            ("spec.a", "a is 1")
        );
        let out = failures(json!({"rule": "self.a > 1"}), json!({"a": 1}));
        assert_eq!(out[0].message, "failed rule: self.a > 1");
        assert!(failures(json!({"rule": "self == oldSelf"}), json!({"a": 1})).is_empty());
        let out = failures(json!({"rule": "self.missing == 1"}), json!({"a": 1}));
        assert!(out[0].message.starts_with("failed to evaluate rule"), "{out:?}");
        let out = failures(json!({"rule": "self.a >"}), json!({"a": 1}));
        assert!(out[0].message.starts_with("failed to compile rule"), "{out:?}");
    }
}

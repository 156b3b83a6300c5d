//! Templates: Jinja through [`minijinja`], sandboxed, compiled once and rendered per row.
//!
//! [`Jinja`] is what mappings (`template:`) and the `http` destination (URL, headers, body,
//! per-record payload) compile. The sandbox:
//! - no file or network access: minijinja is built without `include`, `import`, `extends` and
//!   macros, and no loader is ever set;
//! - each render has a fuel budget ([`Limits::fuel`], minijinja's count of instructions and
//!   of bytes created) and an output limit ([`Limits::max_output`]); recursion is capped at
//!   [`RECURSION_LIMIT`]; a template's source is at most [`MAX_SOURCE_BYTES`];
//! - a template sees only the variables its caller binds: Secrets are bound only for URL and
//!   header templates.
//!
//! Two output modes ([`Mode`]): a text template writes each `{{ … }}` as text (NULL empty);
//! a JSON template writes each `{{ … }}` as a canonical JSON value, so a row value cannot
//! break the document around it (see [`values`]).
//!
//! A template that is only `{{name}}` holes is rendered by the [`plain`] substituter instead
//! of the Jinja machine: the same bytes (both print through [`values`]), several times
//! faster. Legacy names such as `{{first-name}}` keep meaning the column of that name.

mod filters;
pub mod plain;
pub mod values;

use std::sync::{Arc, LazyLock};

use minijinja::value::{Enumerator, Object, Value as JinjaValue};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};

use crate::model::value::Value;
pub use plain::{Position, Template, TemplateError};

/// Longest template source accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;
/// Deepest recursion at render time (recursive loops; the parser bounds source nesting).
pub const RECURSION_LIMIT: usize = 32;

/// The name JSON templates are compiled under; its extension selects JSON output.
const JSON_NAME: &str = "template.json";
const TEXT_NAME: &str = "template.txt";
const JSON_ESCAPE: &str = "json";

/// How a template writes the values it prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Text: NULL empty, text as is, numbers canonical, lists and maps as JSON.
    Text,
    /// JSON: every `{{ … }}` writes a canonical JSON value; the result must parse as JSON.
    Json,
}

/// What one render may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// minijinja fuel: about one per instruction and one per 64 bytes created.
    pub fuel: u64,
    /// Longest output, in bytes.
    pub max_output: usize,
}

impl Limits {
    /// One field or one record: 50,000 fuel (a few milliseconds at most), 1 MiB out.
    pub const RECORD: Limits = Limits {
        fuel: 50_000,
        max_output: 1024 * 1024,
    };
    /// A request body around a batch of records (which it mostly copies): 2,000,000 fuel,
    /// 64 MiB out.
    pub const BATCH: Limits = Limits {
        fuel: 2_000_000,
        max_output: 64 * 1024 * 1024,
    };
}

/// Why a template does not compile. Messages name the line, never a row value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The source is longer than [`MAX_SOURCE_BYTES`].
    #[error("failed to compile template: it is {bytes} bytes long, more than the {MAX_SOURCE_BYTES} allowed")]
    TooLong {
        /// Its length.
        bytes: usize,
    },
    /// Jinja syntax error.
    #[error("failed to compile template: {message}")]
    Syntax {
        /// minijinja's description, with the line.
        message: String,
    },
    /// A filter name that does not exist.
    #[error("failed to compile template: unknown filter {name:?} (see docs/templates.md for the filters)")]
    UnknownFilter {
        /// The name as written.
        name: String,
    },
    /// `"{{ x }}"` in a JSON template, which would write `""…""`.
    #[error(
        "failed to compile template: `{{{{` at line {line} is inside a JSON string; in a JSON template \
         `{{{{ x }}}}` already writes a JSON value (\"Ada\", 42, null): drop the quotes, and build text \
         with `{{{{ a ~ \" \" ~ b }}}}`"
    )]
    QuotedValue {
        /// Line of the `{{`.
        line: usize,
    },
}

/// Why one render failed. Messages never hold a row value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The fuel budget ran out: a loop or filter chain too long for one record.
    #[error("failed to render template: it ran out of fuel ({fuel} units; a loop that runs too long?)")]
    OutOfFuel {
        /// The budget.
        fuel: u64,
    },
    /// The output passed [`Limits::max_output`].
    #[error("failed to render template: the output is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// Any other failure (a filter on the wrong type, a division by zero…).
    #[error("failed to render template: {reason}")]
    Failed {
        /// The kind of failure and where (line).
        reason: String,
    },
}

/// A compiled template.
pub struct Jinja {
    mode: Mode,
    limits: Limits,
    /// The names the template reads from its caller, in a fixed order.
    variables: Arc<[String]>,
    inner: Inner,
}

enum Inner {
    Plain(plain::Template),
    Engine(Box<Environment<'static>>),
}

impl std::fmt::Debug for Jinja {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jinja")
            .field("mode", &self.mode)
            .field("variables", &self.variables)
            .field("plain", &self.is_plain())
            .finish()
    }
}

/// The configured environment every template clones (filters, limits, formatter).
static PROTOTYPE: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    filters::register(&mut env);
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".json") {
            AutoEscape::Custom(JSON_ESCAPE.into())
        } else {
            AutoEscape::None
        }
    });
    env.set_formatter(|out, state, value| {
        let mut text = String::new();
        let written = if matches!(state.auto_escape(), AutoEscape::Custom(name) if name == JSON_ESCAPE) {
            values::write_jinja_json(value, &mut text)
        } else {
            values::write_jinja_text(value, &mut text)
        };
        written.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
        out.write_str(&text).map_err(minijinja::Error::from)
    });
    env
});

/// A variable name the plain substituter may take over from Jinja: `{{ name }}` means the
/// same in both.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Jinja {
    /// Compiles `text`. Plain `{{name}}` holes take the fast path.
    pub fn compile(text: &str, mode: Mode, limits: Limits) -> Result<Jinja, CompileError> {
        Jinja::compile_with_names(text, mode, limits, |_| false)
    }

    /// Like [`Jinja::compile`]; a template of plain holes whose every name is an identifier
    /// or satisfies `known` (a column named `first-name`) takes the fast path, where each
    /// name is looked up whole, as it always was.
    pub fn compile_with_names(
        text: &str,
        mode: Mode,
        limits: Limits,
        known: impl Fn(&str) -> bool,
    ) -> Result<Jinja, CompileError> {
        if text.len() > MAX_SOURCE_BYTES {
            return Err(CompileError::TooLong { bytes: text.len() });
        }
        let scan = scan(text, mode)?;
        if !text.contains("{%")
            && !text.contains("{#")
            && !text.contains("{{-")
            && !text.contains("-}}")
            && let Ok(holes) = plain::Template::parse(text)
            && holes.variables().all(|name| is_identifier(name) || known(name))
        {
            let mut variables: Vec<String> = Vec::new();
            for name in holes.variables() {
                if !variables.iter().any(|v| v == name) {
                    variables.push(name.to_owned());
                }
            }
            return Ok(Jinja {
                mode,
                limits,
                variables: variables.into(),
                inner: Inner::Plain(holes),
            });
        }
        let mut env = PROTOTYPE.clone();
        env.set_fuel(Some(limits.fuel));
        let name = match mode {
            Mode::Text => TEXT_NAME,
            Mode::Json => JSON_NAME,
        };
        env.add_template_owned(name, text.to_owned())
            .map_err(|e| CompileError::Syntax {
                message: describe(&e),
            })?;
        if let Some(unknown) = scan.filters.iter().find(|f| env_lacks_filter(&env, f)) {
            return Err(CompileError::UnknownFilter {
                name: unknown.clone(),
            });
        }
        let globals: Vec<String> = env.globals().map(|(n, _)| n.to_owned()).collect();
        let template = env.get_template(name).map_err(|e| CompileError::Syntax {
            message: describe(&e),
        })?;
        let mut variables: Vec<String> = template
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !globals.contains(v))
            .collect();
        variables.sort();
        Ok(Jinja {
            mode,
            limits,
            variables: variables.into(),
            inner: Inner::Engine(Box::new(env)),
        })
    }

    /// The names the template reads, each once; a render binds a value to each, in this order.
    pub fn variables(&self) -> &[String] {
        &self.variables
    }

    /// The variables with the attributes read from them (`secret.token`), each once, sorted.
    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = match &self.inner {
            Inner::Plain(_) => self.variables.to_vec(),
            Inner::Engine(env) => env
                .get_template(self.name())
                .map(|t| t.undeclared_variables(true).into_iter().collect())
                .unwrap_or_default(),
        };
        paths.sort();
        paths
    }

    fn name(&self) -> &'static str {
        match self.mode {
            Mode::Text => TEXT_NAME,
            Mode::Json => JSON_NAME,
        }
    }

    /// True when the plain substituter renders it.
    pub fn is_plain(&self) -> bool {
        matches!(self.inner, Inner::Plain(_))
    }

    /// The plain holes, for callers that stream a large variable (a batch of records)
    /// straight into their buffer.
    pub fn as_plain(&self) -> Option<&plain::Template> {
        match &self.inner {
            Inner::Plain(holes) => Some(holes),
            Inner::Engine(_) => None,
        }
    }

    /// The output mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Renders with `value(i)` bound to `variables()[i]`.
    pub fn render<'v>(&self, value: impl Fn(usize) -> &'v Value) -> Result<String, RenderError> {
        match &self.inner {
            Inner::Plain(holes) => {
                let mut out = String::with_capacity(64);
                for part in holes.parts() {
                    match part {
                        plain::Piece::Literal(text) => out.push_str(text),
                        plain::Piece::Variable(name) => {
                            let i = self.variables.iter().position(|v| v == name).unwrap_or(0);
                            match self.mode {
                                Mode::Text => values::write_text(value(i), &mut out),
                                Mode::Json => values::write_json(value(i), &mut out),
                            }
                        }
                    }
                    if out.len() > self.limits.max_output {
                        return Err(RenderError::TooLarge {
                            max: self.limits.max_output,
                        });
                    }
                }
                Ok(out)
            }
            Inner::Engine(_) => {
                let bound = (0..self.variables.len())
                    .map(|i| values::to_jinja(value(i)))
                    .collect();
                self.render_jinja(bound)
            }
        }
    }

    /// Renders through the Jinja machine with template values bound to `variables()`.
    pub fn render_jinja(&self, bound: Vec<JinjaValue>) -> Result<String, RenderError> {
        let env = match &self.inner {
            Inner::Engine(env) => env,
            Inner::Plain(_) => {
                // The plain path has no machine; print its holes from the bound values.
                return self.render_plain_bound(&bound);
            }
        };
        let name = self.name();
        let context = JinjaValue::from_object(Vars {
            names: Arc::clone(&self.variables),
            values: bound,
        });
        let rendered = env
            .get_template(name)
            .and_then(|t| t.render(context))
            .map_err(|e| self.render_error(&e))?;
        if rendered.len() > self.limits.max_output {
            return Err(RenderError::TooLarge {
                max: self.limits.max_output,
            });
        }
        Ok(rendered)
    }

    fn render_plain_bound(&self, bound: &[JinjaValue]) -> Result<String, RenderError> {
        let Inner::Plain(holes) = &self.inner else {
            return Ok(String::new());
        };
        let mut out = String::new();
        for part in holes.parts() {
            match part {
                plain::Piece::Literal(text) => out.push_str(text),
                plain::Piece::Variable(name) => {
                    let value = self
                        .variables
                        .iter()
                        .position(|v| v == name)
                        .and_then(|i| bound.get(i))
                        .cloned()
                        .unwrap_or_default();
                    let written = match self.mode {
                        Mode::Text => values::write_jinja_text(&value, &mut out),
                        Mode::Json => values::write_jinja_json(&value, &mut out),
                    };
                    written.map_err(|e| RenderError::Failed {
                        reason: e.to_string(),
                    })?;
                }
            }
            if out.len() > self.limits.max_output {
                return Err(RenderError::TooLarge {
                    max: self.limits.max_output,
                });
            }
        }
        Ok(out)
    }

    fn render_error(&self, error: &minijinja::Error) -> RenderError {
        match error.kind() {
            ErrorKind::OutOfFuel => RenderError::OutOfFuel {
                fuel: self.limits.fuel,
            },
            kind => {
                // The detail of a render error may quote a value; keep only ours, which never do.
                let reason = match (kind, error.detail()) {
                    (ErrorKind::InvalidOperation, Some(detail)) if is_our_message(detail) => {
                        detail.to_owned()
                    }
                    _ => kind.to_string(),
                };
                RenderError::Failed {
                    reason: match error.line() {
                        Some(line) => format!("{reason} (line {line})"),
                        None => reason,
                    },
                }
            }
        }
    }
}

/// Messages of Backflow's filters and writers, which name no value.
fn is_our_message(detail: &str) -> bool {
    [
        "date:",
        "round:",
        "tojson:",
        "cannot write",
        "recursion limit exceeded",
    ]
    .iter()
    .any(|prefix| detail.starts_with(prefix))
}

fn describe(error: &minijinja::Error) -> String {
    let mut text = error.kind().to_string();
    if let Some(detail) = error.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    if let Some(line) = error.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

fn env_lacks_filter(env: &Environment<'_>, name: &str) -> bool {
    // Probing by compiling `x|name` would not tell either: filters are looked up when used.
    let probe = format!("{{{{ none | {name} }}}}");
    match env.render_str(&probe, ()) {
        Err(e) => e.kind() == ErrorKind::UnknownFilter,
        Ok(_) => false,
    }
}

/// The variables of one render, looked up by name.
#[derive(Debug)]
struct Vars {
    names: Arc<[String]>,
    values: Vec<JinjaValue>,
}

impl Object for Vars {
    fn get_value(self: &Arc<Self>, key: &JinjaValue) -> Option<JinjaValue> {
        let key = key.as_str()?;
        let i = self.names.iter().position(|n| n == key)?;
        self.values.get(i).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.names.iter().map(|n| JinjaValue::from(n.as_str())).collect())
    }
}

/// What a quick pass over the source finds before minijinja compiles it.
struct Scan {
    /// Filter names used (`| name`).
    filters: Vec<String>,
}

/// Reads the filter names, and in JSON mode refuses a `{{` inside a JSON string literal.
fn scan(text: &str, mode: Mode) -> Result<Scan, CompileError> {
    let bytes = text.as_bytes();
    let mut filters = Vec::new();
    let mut in_json_string = false;
    let mut i = 0;
    let line_of = |at: usize| text[..at].matches('\n').count() + 1;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("{#") {
            i += rest.find("#}").map_or(rest.len(), |end| end + 2);
            continue;
        }
        if rest.starts_with("{{") || rest.starts_with("{%") {
            if mode == Mode::Json && in_json_string && rest.starts_with("{{") {
                return Err(CompileError::QuotedValue { line: line_of(i) });
            }
            let close = if rest.starts_with("{{") { "}}" } else { "%}" };
            let mut j = 2;
            let inner = rest.as_bytes();
            while j < inner.len() && !rest[j..].starts_with(close) {
                match inner[j] {
                    quote @ (b'"' | b'\'') => {
                        j += 1;
                        while j < inner.len() && inner[j] != quote {
                            j += if inner[j] == b'\\' { 2 } else { 1 };
                        }
                        j += 1;
                    }
                    b'|' => {
                        j += 1;
                        while j < inner.len() && inner[j].is_ascii_whitespace() {
                            j += 1;
                        }
                        let start = j;
                        while j < inner.len() && (inner[j].is_ascii_alphanumeric() || inner[j] == b'_') {
                            j += 1;
                        }
                        if j > start {
                            filters.push(rest[start..j].to_owned());
                        }
                    }
                    _ => j += 1,
                }
            }
            i += (j + close.len()).min(rest.len());
            continue;
        }
        if mode == Mode::Json {
            match bytes[i] {
                b'"' => in_json_string = !in_json_string,
                b'\\' if in_json_string => i += 1,
                _ => {}
            }
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    filters.sort();
    filters.dedup();
    Ok(Scan { filters })
}

#[cfg(test)]
mod tests;

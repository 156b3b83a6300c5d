//! `{{name}}` templates: text with named holes, parsed once and rendered many times.
//!
//! Used by the Slack and Redis destinations, and as the fast path of [`super::Jinja`] for
//! templates that are only holes (`"{{first_name}} {{last_name}}"`). The syntax is deliberately tiny: `{{ name }}` with
//! optional spaces or tabs around a name made of letters, digits, `_`, `.` and `-`. There is
//! no escaping and no logic; the caller decides what each name means.
//!
//! Braces outside a `{{ … }}` are literal text. In a run of three or more opening braces the
//! variable opens at the last two, and the first `}}` after the name closes it, so JSON
//! bodies like `{"records":{{records}}}` or `[{{{x}}}]` read as expected.

use std::fmt;
use std::ops::Range;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// A piece of a template; ranges index into `Template::source`, so rendering never allocates
/// per part.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Range<usize>),
    Variable(Range<usize>),
}

/// A piece of a template, as [`Template::parts`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Text written as it is.
    Literal(&'a str),
    /// A variable's name.
    Variable(&'a str),
}

/// Why a template could not be parsed or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{` with no `}}` after it on the same line.
    #[error("failed to parse template: `{{{{` at {at} has no closing `}}}}`")]
    Unclosed {
        /// Where the `{{` is.
        at: Position,
    },
    /// `{{}}` or `{{  }}`.
    #[error("failed to parse template: empty variable name at {at}")]
    EmptyName {
        /// Where the `{{` is.
        at: Position,
    },
    /// A name with characters other than letters, digits, `_`, `.` and `-`.
    #[error(
        "failed to parse template: {name:?} at {at} is not a variable name (use letters, digits, `_`, `.` and `-`)"
    )]
    InvalidName {
        /// The offending text (shortened when long).
        name: String,
        /// Where the `{{` is.
        at: Position,
    },
    /// Rendering met a variable the caller does not know.
    #[error("failed to render template: unknown variable {0:?}")]
    Unknown(String),
}

/// A place in a template's text: 1-based line, and 1-based column counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl Position {
    fn of(text: &str, byte: usize) -> Position {
        let before = &text[..byte];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Longest name quoted in an [`TemplateError::InvalidName`] message.
const MAX_QUOTED_NAME: usize = 40;

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn is_padding(c: char) -> bool {
    c == ' ' || c == '\t'
}

impl Template {
    /// Parses `text`. Errors name the line and column of the offending `{{`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let bytes = text.as_bytes();
        let mut parts = Vec::new();
        let mut literal_start = 0;
        let mut cursor = 0;
        while let Some(found) = text[cursor..].find("{{") {
            let mut open = cursor + found;
            // In `{{{x}}` the variable opens at the last two braces; the first is literal.
            while bytes.get(open + 2) == Some(&b'{') {
                open += 1;
            }
            let inner_start = open + 2;
            let at = || Position::of(text, open);
            let close = match text[inner_start..].find("}}") {
                Some(offset) => inner_start + offset,
                None => return Err(TemplateError::Unclosed { at: at() }),
            };
            let inner = &text[inner_start..close];
            // A newline or another `{{` before the `}}` means this `{{` was never closed;
            // the `}}` found belongs to something later.
            if inner.contains('\n') || inner.contains("{{") {
                return Err(TemplateError::Unclosed { at: at() });
            }
            let name = inner.trim_matches(is_padding);
            if name.is_empty() {
                return Err(TemplateError::EmptyName { at: at() });
            }
            if !name.chars().all(is_name_char) {
                let mut shown: String = name.chars().take(MAX_QUOTED_NAME).collect();
                if shown.len() < name.len() {
                    shown.push('…');
                }
                return Err(TemplateError::InvalidName {
                    name: shown,
                    at: at(),
                });
            }
            let name_start = inner_start + (inner.len() - inner.trim_start_matches(is_padding).len());
            if literal_start < open {
                parts.push(Part::Literal(literal_start..open));
            }
            parts.push(Part::Variable(name_start..name_start + name.len()));
            cursor = close + 2;
            literal_start = cursor;
        }
        if literal_start < text.len() {
            parts.push(Part::Literal(literal_start..text.len()));
        }
        Ok(Template {
            source: text.to_owned(),
            parts,
        })
    }

    /// The text the template was parsed from.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The literal text and variable names, in order.
    pub fn parts(&self) -> impl Iterator<Item = Piece<'_>> + '_ {
        self.parts.iter().map(|part| match part {
            Part::Literal(range) => Piece::Literal(&self.source[range.clone()]),
            Part::Variable(range) => Piece::Variable(&self.source[range.clone()]),
        })
    }

    /// The variable names, in order of appearance (a name used twice appears twice). Use it to
    /// reject unknown names before anything is rendered.
    pub fn variables(&self) -> impl Iterator<Item = &str> + '_ {
        self.parts.iter().filter_map(|part| match part {
            Part::Variable(range) => Some(&self.source[range.clone()]),
            Part::Literal(_) => None,
        })
    }

    /// Renders with `lookup` giving each variable's text (`String`, `&str` or `Cow<str>`);
    /// `None` fails with [`TemplateError::Unknown`].
    pub fn render<F, S>(&self, lookup: F) -> Result<String, TemplateError>
    where
        F: FnMut(&str) -> Option<S>,
        S: AsRef<str>,
    {
        let mut out = String::with_capacity(self.source.len());
        self.render_into(&mut out, lookup)?;
        Ok(out)
    }

    /// Like [`Template::render`], appending to `out`. On error `out` holds a partial rendering.
    pub fn render_into<F, S>(&self, out: &mut String, mut lookup: F) -> Result<(), TemplateError>
    where
        F: FnMut(&str) -> Option<S>,
        S: AsRef<str>,
    {
        for part in &self.parts {
            match part {
                Part::Literal(range) => out.push_str(&self.source[range.clone()]),
                Part::Variable(range) => {
                    let name = &self.source[range.clone()];
                    match lookup(name) {
                        Some(value) => out.push_str(value.as_ref()),
                        None => return Err(TemplateError::Unknown(name.to_owned())),
                    }
                }
            }
        }
        Ok(())
    }

    /// Renders into bytes, letting `write_variable` write each variable's bytes straight into
    /// `out` (for large values such as a JSON array of records). `write_variable` returns
    /// `false` for a name it does not know, which fails with [`TemplateError::Unknown`]. On
    /// error `out` holds a partial rendering.
    pub fn write_into<F>(&self, out: &mut Vec<u8>, mut write_variable: F) -> Result<(), TemplateError>
    where
        F: FnMut(&str, &mut Vec<u8>) -> bool,
    {
        for part in &self.parts {
            match part {
                Part::Literal(range) => out.extend_from_slice(&self.source.as_bytes()[range.clone()]),
                Part::Variable(range) => {
                    let name = &self.source[range.clone()];
                    if !write_variable(name, out) {
                        return Err(TemplateError::Unknown(name.to_owned()));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    use super::*;

    fn vars(text: &str) -> Vec<String> {
        Template::parse(text)
            .unwrap()
            .variables()
            .map(str::to_owned)
            .collect()
    }

    fn render(text: &str, values: &[(&str, &str)]) -> Result<String, TemplateError> {
        let values: BTreeMap<&str, &str> = values.iter().copied().collect();
        Template::parse(text)
            .unwrap()
            .render(|name| values.get(name).copied())
    }

    #[test]
    fn variables_are_listed_in_order_with_optional_spaces() {
        assert_eq!(
            vars("{{first_name}} {{ last_name }}!{{\tsecret.api-key\t}}{{a.b_c-1}}"),
            ["first_name", "last_name", "secret.api-key", "a.b_c-1"]
        );
        assert_eq!(vars("no variables at all"), Vec::<String>::new());
        assert_eq!(vars(""), Vec::<String>::new());
    }

    #[test]
    fn render_substitutes_every_variable_and_keeps_literals() {
        assert_eq!(
            render(
                "Hello {{first}} {{ last }}, {{first}}!",
                &[("first", "Ada"), ("last", "Lovelace")]
            )
            .unwrap(),
            "Hello Ada Lovelace, Ada!"
        );
        assert_eq!(render("plain", &[]).unwrap(), "plain");
    }

    #[test]
    fn render_accepts_strings_and_cows_from_the_lookup() {
        let template = Template::parse("{{a}}-{{b}}").unwrap();
        let owned = template.render(|name| Some(name.to_uppercase())).unwrap();
        assert_eq!(owned, "A-B");
        let cow = template
            .render(|name| {
                Some(if name == "a" {
                    Cow::Borrowed("x")
                } else {
                    Cow::Owned("y".to_owned())
                })
            })
            .unwrap();
        assert_eq!(cow, "x-y");
    }

    #[test]
    fn an_unknown_variable_fails_rendering_with_its_name() {
        let err = render("{{known}} {{unknown}}", &[("known", "k")]).unwrap_err();
        assert_eq!(err, TemplateError::Unknown("unknown".into()));
        assert_eq!(
            err.to_string(),
            "failed to render template: unknown variable \"unknown\""
        );
    }

    #[test]
    fn a_brace_run_opens_the_variable_at_its_last_two_braces() {
        let template = Template::parse(r#"{"a":{{{x}}}}"#).unwrap();
        assert_eq!(template.variables().collect::<Vec<_>>(), ["x"]);
        assert_eq!(template.render(|_| Some("1")).unwrap(), r#"{"a":{1}}"#);
        assert_eq!(
            render(
                r#"{"operation":"{{operation}}","records":{{records}}}"#,
                &[("operation", "upsert"), ("records", "[]")]
            )
            .unwrap(),
            r#"{"operation":"upsert","records":[]}"#
        );
    }

    #[test]
    fn single_braces_and_lone_closing_braces_are_literal_text() {
        assert_eq!(render("{a} }} {", &[]).unwrap(), "{a} }} {");
    }

    #[test]
    fn an_unclosed_opening_is_an_error_naming_its_line_and_column() {
        let err = Template::parse("ok {{a}}\nthen {{broken").unwrap_err();
        assert_eq!(
            err,
            TemplateError::Unclosed {
                at: Position { line: 2, column: 6 }
            }
        );
        assert_eq!(
            err.to_string(),
            "failed to parse template: `{{` at line 2, column 6 has no closing `}}`"
        );
        // The `}}` on a later line does not close it.
        assert!(matches!(
            Template::parse("{{a\n}}"),
            Err(TemplateError::Unclosed { .. })
        ));
        assert!(matches!(
            Template::parse("{{a {{b}}"),
            Err(TemplateError::Unclosed { .. })
        ));
    }

    #[test]
    fn an_empty_name_is_an_error() {
        assert_eq!(
            Template::parse("x{{ }}").unwrap_err(),
            TemplateError::EmptyName {
                at: Position { line: 1, column: 2 }
            }
        );
        assert!(matches!(
            Template::parse("{{}}"),
            Err(TemplateError::EmptyName { .. })
        ));
    }

    #[test]
    fn names_with_other_characters_are_rejected() {
        let err = Template::parse("é {{first name}}").unwrap_err();
        assert_eq!(
            err,
            TemplateError::InvalidName {
                name: "first name".into(),
                at: Position { line: 1, column: 3 }
            }
        );
        assert!(err.to_string().contains("\"first name\" at line 1, column 3"));
        assert!(matches!(
            Template::parse("{{a|upper}}"),
            Err(TemplateError::InvalidName { .. })
        ));
    }

    #[test]
    fn write_into_lets_the_caller_write_variable_bytes_directly() {
        let template = Template::parse(r#"{"records":{{records}},"n":{{n}}}"#).unwrap();
        let mut out = Vec::new();
        template
            .write_into(&mut out, |name, out| match name {
                "records" => {
                    out.extend_from_slice(b"[1,2]");
                    true
                }
                "n" => {
                    out.push(b'2');
                    true
                }
                _ => false,
            })
            .unwrap();
        assert_eq!(out, br#"{"records":[1,2],"n":2}"#);
        let err = template.write_into(&mut Vec::new(), |_, _| false).unwrap_err();
        assert_eq!(err, TemplateError::Unknown("records".into()));
    }

    #[test]
    fn as_str_returns_the_source_text() {
        assert_eq!(Template::parse("a {{b}}").unwrap().as_str(), "a {{b}}");
    }
}

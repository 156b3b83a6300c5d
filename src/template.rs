//! Temporary minimal template (replaced by the http branch).

/// A parsed template.
#[derive(Debug)]
pub struct Template(Vec<(bool, String)>);

/// Template errors.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Unknown variable.
    #[error("unknown variable {0}")]
    Unknown(String),
    /// Syntax.
    #[error("bad template")]
    Syntax,
}

impl Template {
    /// Parses.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            parts.push((false, rest[..start].to_owned()));
            let end = rest[start..].find("}}").ok_or(TemplateError::Syntax)?;
            parts.push((true, rest[start + 2..start + end].trim().to_owned()));
            rest = &rest[start + end + 2..];
        }
        parts.push((false, rest.to_owned()));
        Ok(Template(parts))
    }
    /// Variables.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter(|p| p.0).map(|p| p.1.as_str())
    }
    /// Renders.
    pub fn render(&self, f: impl Fn(&str) -> Option<String>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for (var, text) in &self.0 {
            if *var {
                out.push_str(&f(text).ok_or_else(|| TemplateError::Unknown(text.clone()))?);
            } else {
                out.push_str(text);
            }
        }
        Ok(out)
    }
}

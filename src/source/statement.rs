//! A model query's statement type, read from its text before it is sent, for the warehouses
//! that cannot run a statement read-only (Snowflake, Databricks SQL).
//!
//! The check is a scan, not a full SQL parser: it skips comments, string literals, quoted
//! identifiers and `$$` blocks, and looks at the words outside parentheses. A query is accepted
//! when it is one statement whose verb is `SELECT` (`WITH … SELECT`, `(SELECT …)`, `VALUES` and
//! `TABLE x` too). What a `SELECT` can still change (a function with side effects) is for the
//! grants to forbid: the source docs name the least privilege.

/// Words that begin a statement; the first one outside parentheses is the query's verb.
const VERBS: &[&str] = &[
    "SELECT", "VALUES", "TABLE", "INSERT", "UPDATE", "DELETE", "MERGE", "CREATE", "DROP", "ALTER",
    "TRUNCATE", "COPY", "PUT", "GET", "REMOVE", "GRANT", "REVOKE", "CALL", "EXECUTE", "USE", "SET", "UNSET",
    "BEGIN", "START", "COMMIT", "ROLLBACK", "DESCRIBE", "DESC", "SHOW", "EXPLAIN", "LIST", "UNDROP",
    "COMMENT", "OPTIMIZE", "VACUUM", "REFRESH", "CACHE", "UNCACHE", "MSCK", "ANALYZE", "REPLACE", "RESTORE",
    "REPAIR", "FSCK", "CLONE", "UNLOAD",
];

/// Verbs that only read.
const READ_VERBS: &[&str] = &["SELECT", "VALUES", "TABLE"];

/// `Ok` when `query` is a single reading statement; otherwise why it is refused.
pub(super) fn check_read_only(query: &str) -> Result<(), String> {
    let scan = scan(query)?;
    let verb = scan
        .verb
        .ok_or_else(|| "a query without SELECT was refused before it ran".to_owned())?;
    if !READ_VERBS.contains(&verb.as_str()) {
        return Err(format!(
            "a {verb} statement was refused before it ran: only a single SELECT is allowed"
        ));
    }
    if scan.statements > 1 {
        return Err(
            "more than one statement was refused before it ran: only a single SELECT is allowed".to_owned(),
        );
    }
    Ok(())
}

struct Scan {
    verb: Option<String>,
    statements: usize,
}

fn scan(query: &str) -> Result<Scan, String> {
    let chars: Vec<char> = query.chars().collect();
    let mut i = 0;
    let mut depth: usize = 0;
    let mut verb: Option<String> = None;
    let mut statements = 0;
    let mut in_statement = false;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '-' if next == Some('-') => i = skip_until(&chars, i + 2, "\n"),
            '/' if next == Some('*') => i = skip_until(&chars, i + 2, "*/"),
            '\'' => i = skip_quoted(&chars, i + 1, '\'')?,
            '"' => i = skip_quoted(&chars, i + 1, '"')?,
            '`' => i = skip_quoted(&chars, i + 1, '`')?,
            '$' if next == Some('$') => i = skip_until(&chars, i + 2, "$$"),
            '(' => {
                depth = depth.saturating_add(1);
                in_statement = true;
                i += 1;
            }
            ')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            ';' => {
                if depth == 0 && in_statement {
                    statements += 1;
                    in_statement = false;
                }
                i += 1;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                if !in_statement {
                    in_statement = true;
                    if statements > 0 {
                        // A second statement: its verb does not matter, it is refused.
                        statements += 1;
                        return Ok(Scan { verb, statements });
                    }
                }
                let word: String = chars[start..i].iter().collect::<String>().to_ascii_uppercase();
                // The first verb at any depth decides: `(SELECT …)` has its verb inside the
                // parentheses, `WITH a AS (SELECT …) DELETE …` has it outside.
                if verb.is_none()
                    && VERBS.contains(&word.as_str())
                    && (depth == 0 || !has_with(&chars[..start]))
                {
                    verb = Some(word);
                }
            }
            _ => i += 1,
        }
    }
    if in_statement {
        statements += 1;
    }
    Ok(Scan { verb, statements })
}

/// True when the text before a word starts with `WITH` (so a verb inside parentheses belongs
/// to a common table expression, not to the statement).
fn has_with(before: &[char]) -> bool {
    let text: String = before.iter().collect();
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .find(|w| !w.is_empty())
        .is_some_and(|w| w.eq_ignore_ascii_case("WITH"))
}

fn skip_until(chars: &[char], mut i: usize, end: &str) -> usize {
    let end: Vec<char> = end.chars().collect();
    while i < chars.len() {
        if chars[i..].starts_with(&end) {
            return i + end.len();
        }
        i += 1;
    }
    chars.len()
}

fn skip_quoted(chars: &[char], mut i: usize, quote: char) -> Result<usize, String> {
    while i < chars.len() {
        if chars[i] == '\\' && quote == '\'' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            // A doubled quote is an escaped quote.
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Ok(i + 1);
        }
        i += 1;
    }
    Err("it has an unterminated quote".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_in_their_usual_shapes_are_accepted() {
        for q in [
            "SELECT 1",
            "  -- model\n select id from t;",
            "/* x; delete */ SELECT 'a;b' AS \"update\" FROM t",
            "WITH a AS (SELECT 1), b (x) AS (SELECT 2) SELECT * FROM a, b",
            "(SELECT 1) UNION ALL (SELECT 2)",
            "select $$ drop table x $$",
        ] {
            assert_eq!(check_read_only(q), Ok(()), "{q}");
        }
    }

    #[test]
    fn writes_and_second_statements_are_refused_naming_the_verb() {
        assert!(check_read_only("DELETE FROM t").unwrap_err().contains("DELETE"));
        assert!(
            check_read_only("insert into t select 1")
                .unwrap_err()
                .contains("INSERT")
        );
        assert!(
            check_read_only("WITH a AS (SELECT 1) DELETE FROM t")
                .unwrap_err()
                .contains("DELETE")
        );
        assert!(
            check_read_only("SELECT 1; DROP TABLE t")
                .unwrap_err()
                .contains("more than one")
        );
        assert!(check_read_only("CALL p()").unwrap_err().contains("CALL"));
        assert!(check_read_only("SELECT 'x").unwrap_err().contains("unterminated"));
        assert!(check_read_only("").is_err());
    }
}

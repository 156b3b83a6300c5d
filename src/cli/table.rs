//! Plain-text tables as kubectl prints them: upper-case headers, columns left-aligned and
//! three spaces apart, the last column not padded.

/// Rows under a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, extra cells are dropped.
    pub fn push(&mut self, mut row: Vec<String>) {
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines of text, each ending with a newline.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|c| {
                std::iter::once(&self.headers[c])
                    .chain(self.rows.iter().map(|r| &r[c]))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let last = row.len().saturating_sub(1);
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if c < last {
                    let pad = widths[c] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_on_the_widest_cell_and_the_last_is_not_padded() {
        let mut t = Table::new(&["name", "ready", "reason"]);
        t.push(vec!["customers".into(), "True".into(), String::new()]);
        t.push(vec!["a".into(), "False".into(), "SourceQueryFailed".into()]);
        assert_eq!(
            t.render(),
            "NAME        READY   REASON\n\
             customers   True\n\
             a           False   SourceQueryFailed\n"
        );
    }

    #[test]
    fn wide_characters_count_once_and_short_rows_are_filled() {
        let mut t = Table::new(&["key", "value"]);
        t.push(vec!["clé".into()]);
        t.push(vec!["k".into(), "v".into()]);
        assert_eq!(t.render(), "KEY   VALUE\nclé\nk     v\n");
        assert!(!t.is_empty());
    }
}

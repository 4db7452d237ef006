//! Tab-separated tables (BIDS `events.tsv`, confounds, `participants.tsv`, condition lists):
//! one reader, on the `csv` crate, so that quoting, line endings, a byte-order mark and line
//! numbers are handled once.
//!
//! Cells are handed through as text, trimmed of surrounding whitespace: a BIDS `n/a` stays
//! `n/a`, and what it means is the caller's to decide. Blank lines are skipped.

use std::path::Path;

/// Why a table could not be read: the file (or what the text is), the 1-based line, the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {}", self.detail())]
pub struct TsvError {
    /// The file, or what the text is.
    pub what: String,
    /// The 1-based line the problem is on, when it is on one.
    pub line: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl TsvError {
    /// The error without the file's name (`line 3: …`), for callers that name it themselves.
    pub fn detail(&self) -> String {
        match self.line {
            Some(line) => format!("line {line}: {}", self.reason),
            None => self.reason.clone(),
        }
    }
}

/// Whether every row must have the header's number of cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Every row as wide as the header, as BIDS demands of its tables.
    Rectangular,
    /// Rows may be shorter or longer than the header (a table others append to by hand).
    Ragged,
}

/// One data row: its cells and the 1-based line it starts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The line of the file the row starts on (the header is line 1 in most files).
    pub line: usize,
    /// Its cells, trimmed.
    pub cells: Vec<String>,
}

impl Row {
    /// Cell `i`, if the row has one.
    pub fn get(&self, i: usize) -> Option<&str> {
        self.cells.get(i).map(String::as_str)
    }
}

/// A table: the header's column names and the data rows, with what it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The file, or what the text is (named in errors).
    pub what: String,
    /// The column names (empty for a file with no header: empty or blank).
    pub header: Vec<String>,
    /// The data rows, in file order.
    pub rows: Vec<Row>,
}

impl Table {
    /// The index of the column named `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// An error about this table, at `line` when it is on one.
    pub fn error(&self, line: Option<usize>, reason: impl Into<String>) -> TsvError {
        TsvError { what: self.what.clone(), line, reason: reason.into() }
    }
}

/// Reads the tab-separated file `path`; every row must be as wide as the header.
pub fn read(path: &Path) -> Result<Table, TsvError> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| TsvError {
        what: what.clone(),
        line: None,
        reason: e.to_string(),
    })?;
    parse_bytes(&bytes, &what, Shape::Rectangular)
}

/// Parses tab-separated `text` (`what` names it in errors); every row must be as wide as the
/// header.
pub fn parse(text: &str, what: &str) -> Result<Table, TsvError> {
    parse_bytes(text.as_bytes(), what, Shape::Rectangular)
}

/// Parses tab-separated `text` as [`parse`] does, with rows of the given `shape`.
pub fn parse_as(text: &str, what: &str, shape: Shape) -> Result<Table, TsvError> {
    parse_bytes(text.as_bytes(), what, shape)
}

/// Parses comma-separated `text` (a design written by pandas or MATLAB's `writematrix`) as
/// [`parse`] parses tab-separated text.
pub fn parse_csv(text: &str, what: &str) -> Result<Table, TsvError> {
    parse_with(text.as_bytes(), what, Shape::Rectangular, b',')
}

fn parse_bytes(bytes: &[u8], what: &str, shape: Shape) -> Result<Table, TsvError> {
    parse_with(bytes, what, shape, b'\t')
}

fn parse_with(bytes: &[u8], what: &str, shape: Shape, delimiter: u8) -> Result<Table, TsvError> {
    let tabs = delimiter == b'\t';
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        // Widths are checked here, after blank lines are skipped, so that a line of spaces is
        // skipped as blank rather than refused as one cell.
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let mut table = Table { what: what.to_string(), header: Vec::new(), rows: Vec::new() };
    let mut record = csv::StringRecord::new();
    let mut has_header = false;
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_error(bytes, what, &e)),
        }
        if record.iter().all(str::is_empty) {
            continue;
        }
        let line = record.position().map_or(0, |p| line_of(bytes, p));
        let cells: Vec<String> = record.iter().map(str::to_string).collect();
        if !has_header {
            if let (true, [only]) = (tabs, cells.as_slice()) {
                if let Some(hint) = separator_hint(only) {
                    return Err(table.error(Some(line), format!("the header has no tab; {hint}")));
                }
            }
            table.header = cells;
            has_header = true;
            continue;
        }
        if shape == Shape::Rectangular && cells.len() != table.header.len() {
            let hint = match cells.as_slice() {
                [only] if tabs => separator_hint(only).map(|h| format!("; {h}")).unwrap_or_default(),
                _ => String::new(),
            };
            let (n, m) = (cells.len(), table.header.len());
            let s = if n == 1 { "" } else { "s" };
            return Err(table.error(Some(line), format!("{n} cell{s} where the header has {m}{hint}")));
        }
        table.rows.push(Row { line, cells });
    }
    Ok(table)
}

/// The 1-based line a record starts on: csv counts from the end of the record before, so
/// the empty lines it skipped in between are added here.
fn line_of(bytes: &[u8], p: &csv::Position) -> usize {
    let skipped = bytes.get(p.byte() as usize..).unwrap_or_default();
    let blank = skipped.iter().take_while(|b| matches!(b, b'\r' | b'\n'));
    p.line() as usize + blank.filter(|&&b| b == b'\n').count()
}

/// A hint when a lone cell looks like a whole comma- or whitespace-separated line.
fn separator_hint(cell: &str) -> Option<&'static str> {
    if cell.contains(',') {
        Some("is it comma-separated? BIDS files are tab-separated")
    } else if cell.contains(char::is_whitespace) {
        Some("is it whitespace-separated? BIDS files are tab-separated")
    } else {
        None
    }
}

fn csv_error(bytes: &[u8], what: &str, e: &csv::Error) -> TsvError {
    let line = e.position().map(|p| line_of(bytes, p));
    let reason = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
        csv::ErrorKind::Io(io) => io.to_string(),
        _ => e.to_string(),
    };
    TsvError { what: what.to_string(), line, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_trimmed_text_with_their_lines_and_blank_lines_are_skipped() {
        let t = parse(
            "\u{feff}onset\tduration\ttrial_type\n\n1\t2\tn/a\r\n  \n 3 \t4\t\"a\tb\"\r\n\r\n\n5\t6\t7\n",
            "x",
        )
        .unwrap();
        assert_eq!(t.header, ["onset", "duration", "trial_type"]);
        assert_eq!(t.column("trial_type"), Some(2));
        let rows: Vec<(usize, Vec<&str>)> =
            t.rows.iter().map(|r| (r.line, r.cells.iter().map(String::as_str).collect())).collect();
        assert_eq!(rows, [(3, vec!["1", "2", "n/a"]), (5, vec!["3", "4", "a\tb"]), (8, vec!["5", "6", "7"])]);
        let empty = parse(" \n\n", "x").unwrap();
        assert!(empty.header.is_empty() && empty.rows.is_empty());
    }

    #[test]
    fn rows_must_be_as_wide_as_the_header_unless_ragged() {
        let text = "a\tb\n1\t2\n3\n";
        let e = parse(text, "t.tsv").unwrap_err();
        assert_eq!(e.to_string(), "t.tsv: line 3: 1 cell where the header has 2");
        assert_eq!(e.line, Some(3));
        let t = parse_as(text, "t.tsv", Shape::Ragged).unwrap();
        assert_eq!(t.rows[1].get(0), Some("3"));
        assert_eq!(t.rows[1].get(1), None);
    }

    #[test]
    fn a_comma_or_whitespace_separated_file_is_named_as_such() {
        let e = parse("onset,duration\n1,2\n", "events.tsv").unwrap_err().to_string();
        assert_eq!(
            e,
            "events.tsv: line 1: the header has no tab; is it comma-separated? BIDS files are tab-separated"
        );
        let e = parse("onset duration\n1 2\n", "events.tsv").unwrap_err().to_string();
        assert!(e.contains("no tab; is it whitespace-separated?"), "{e}");
        let e = parse("onset\tduration\n1,2\n", "events.tsv").unwrap_err().to_string();
        assert!(e.contains("line 2: 1 cell where the header has 2; is it comma-separated?"), "{e}");
        // A one-column table is fine.
        assert_eq!(parse("participant_id\nsub-01\n", "p").unwrap().rows[0].cells, ["sub-01"]);
    }

    #[test]
    fn unreadable_files_and_invalid_text_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing.tsv");
        assert!(read(&p).unwrap_err().to_string().starts_with(&p.display().to_string()));
        std::fs::write(&p, b"a\tb\n1\t\xff\n").unwrap();
        let e = read(&p).unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (Some(2), "not valid UTF-8"));
    }
}

//! Tables, JSON and errors on the terminal.

use std::time::Duration;

use serde_json::json;

/// An operational failure, already scrubbed of secrets.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The Surety error kind (`unavailable`, `storage`, `configuration`...).
    pub kind: String,
    /// Whether running the command again may succeed.
    pub retryable: bool,
    /// The full error text: message, kind, verdict, context and cause.
    pub text: String,
    /// The process exit code: 1, or 3 for ids that were not found.
    pub exit_code: u8,
}

impl Failure {
    /// A Surety error, with `url`'s password scrubbed from its text.
    pub fn from_error(e: &surety_core::Error, url: Option<&str>) -> Failure {
        let mut text = surety_core::redact::scrub(&e.to_string(), url);
        // The commonest first-day mistake: the tables were never created (or another
        // prefix was meant).
        if e.kind() == surety_core::ErrorKind::Storage
            && (text.contains("does not exist") || text.contains("no such table"))
        {
            text.push_str(
                " (hint: run `surety migrate`, or check --table-prefix / SURETY_TABLE_PREFIX)",
            );
        }
        Failure {
            kind: e.kind().to_string(),
            retryable: e.is_retryable(),
            text,
            exit_code: 1,
        }
    }

    /// A failure found by the tool itself (nothing to re-drive...).
    pub fn operational(kind: &str, text: impl Into<String>) -> Failure {
        Failure {
            kind: kind.to_owned(),
            retryable: false,
            text: text.into(),
            exit_code: 1,
        }
    }

    /// Selected ids that do not exist: exit code 3, so scripts can tell it apart.
    pub fn not_found(text: impl Into<String>) -> Failure {
        Failure {
            exit_code: 3,
            ..Failure::operational("not_found", text)
        }
    }
}

pub(crate) fn print_error(e: &Failure, as_json: bool) {
    if as_json {
        let doc = json!({"error": {"kind": e.kind, "retryable": e.retryable, "message": e.text}});
        eprintln!("{doc}");
    } else {
        eprintln!("error: {}", e.text);
    }
}

pub(crate) fn print_json(doc: &serde_json::Value) {
    // Pretty for people who pipe it to a pager; still one document for `jq`.
    println!(
        "{}",
        serde_json::to_string_pretty(doc).unwrap_or_else(|_| doc.to_string())
    );
}

/// Prints rows under a header, columns padded to their widest cell.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `850ms`, `42s`, `12m 5s`, `3h 20m`, `2d 4h`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d {}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// Cuts `text` to `max` characters on one line, for table cells.
pub(crate) fn cell(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut cut: String = one_line.chars().take(max.saturating_sub(3)).collect();
        cut.push_str("...");
        cut
    }
}

//! The guarantee matrix: case × adapter → pass, fail or not supported.

use std::fmt::Write;
use std::sync::Mutex;

use crate::Observed;

/// How one case went on one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed, with what it observed.
    Pass(Observed),
    /// Failed, with why.
    Fail(String),
    /// The adapter lacks a capability the case needs.
    NotSupported(String),
}

/// One cell of the matrix.
#[derive(Clone, Debug)]
pub struct Row {
    /// The case.
    pub case: &'static str,
    /// The adapter.
    pub adapter: String,
    /// The result.
    pub verdict: Verdict,
}

/// Collects rows from concurrently running cases and renders them.
#[derive(Default)]
pub struct Report {
    rows: Mutex<Vec<Row>>,
}

impl Report {
    /// Adds a row.
    pub fn add(&self, case: &'static str, adapter: &str, verdict: Verdict) {
        self.rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Row {
                case,
                adapter: adapter.to_owned(),
                verdict,
            });
    }

    /// The rows so far, sorted by adapter then case order of `order`.
    pub fn rows(&self, order: &[&str]) -> Vec<Row> {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let position = |c: &str| order.iter().position(|o| *o == c).unwrap_or(usize::MAX);
        rows.sort_by(|a, b| (&a.adapter, position(a.case)).cmp(&(&b.adapter, position(b.case))));
        rows
    }

    /// The matrix as a markdown table.
    pub fn markdown(&self, order: &[&str]) -> String {
        let mut out = String::from(
            "| case | adapter | result | messages | lost | duplicated |\n|---|---|---|---:|---:|---:|\n",
        );
        for row in self.rows(order) {
            let (result, m, l, d) = match &row.verdict {
                Verdict::Pass(o) => (
                    "pass".to_owned(),
                    o.messages.to_string(),
                    o.lost.to_string(),
                    o.duplicated.to_string(),
                ),
                Verdict::Fail(why) => (
                    format!("**fail**: {}", why.replace('|', "/")),
                    "".into(),
                    "".into(),
                    "".into(),
                ),
                Verdict::NotSupported(why) => (
                    format!("not supported ({why})"),
                    "".into(),
                    "".into(),
                    "".into(),
                ),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                row.case, row.adapter, result, m, l, d
            );
        }
        out
    }
}

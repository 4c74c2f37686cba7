//! Hostile input: the conformance cases that send what a producer outside Surety writes
//! (forged control headers, oversized headers, unusable ids, bytes that are not text),
//! and the one that keeps a group's destinations apart, as one row of the matrix.

use super::FaultRow;
use crate::Fixture;
use crate::cases::CASES;

/// The case that is about isolation rather than foreign producers, run with them.
const ISOLATION_CASE: &str = "one_group_on_two_destinations_stays_apart";

/// Runs the hostile-input cases against `f` (its foreign producer sends them); each
/// failing case is a failure of the row.
pub async fn hostile_input(scenario: &str, broker: &str, f: &Fixture) -> Result<FaultRow, String> {
    if f.foreign.is_none() {
        return Ok(FaultRow::not_run(
            scenario,
            broker,
            "no foreign producer: an in-process broker has no wire a foreign client writes to",
        ));
    }
    let mut row = FaultRow::new(scenario, broker);
    let cases = CASES
        .iter()
        .filter(|c| c.needs_foreign || c.name == ISOLATION_CASE);
    let mut names = Vec::new();
    for case in cases {
        names.push(case.name);
        match (case.run)(f.clone()).await {
            Ok(observed) => {
                row.messages += observed.messages;
                row.lost += observed.lost;
                row.delivered_twice += observed.duplicated;
            }
            Err(why) => row.failures.push(format!("{}: {why}", case.name)),
        }
    }
    // The cases check their dead letters themselves (by id, reason and headers); the
    // row's dead-letter column counts only what a scenario reads back on its own.
    row.note = format!(
        "conformance cases {}; their dead letters are asserted inside the cases",
        names.join(", ")
    );
    Ok(row)
}

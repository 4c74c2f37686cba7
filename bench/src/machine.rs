//! The machine and brokers a run measured, and the results file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// Versions the scenarios learnt from the brokers and databases they talked to.
static VERSIONS: Mutex<BTreeMap<&'static str, String>> = Mutex::new(BTreeMap::new());

/// Records the version of a broker or database, for the machine line.
pub fn note_version(what: &'static str, version: impl Into<String>) {
    VERSIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(what, version.into());
}

/// The version `scripts/brokers` installed for a Java broker (`.brokers/<name>/libs/
/// .version` under the working directory or `SURETY_BROKERS_DIR`), if it is there.
pub fn installed_version(name: &str) -> Option<String> {
    let base = std::env::var("SURETY_BROKERS_DIR").unwrap_or_else(|_| ".brokers".into());
    std::fs::read_to_string(Path::new(&base).join(name).join("libs/.version"))
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn first_line_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':').or_else(|| l.split_once('=')))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
}

/// CPU model, cores, RAM, OS, build kind and the versions noted during the run.
pub async fn describe() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| first_line_value(&c, "model name"))
        .unwrap_or_else(|| "unknown CPU".into());
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| first_line_value(&m, "MemTotal"))
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(
            || "unknown RAM".into(),
            |kb| format!("{:.1} GiB RAM", kb / 1024.0 / 1024.0),
        );
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| first_line_value(&t, "PRETTY_NAME"))
        .unwrap_or_else(|| std::env::consts::OS.into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!(", Linux {}", k.trim()))
        .unwrap_or_default();
    let build = if cfg!(debug_assertions) {
        "debug build (numbers are not representative)"
    } else {
        "release build"
    };
    let versions = VERSIONS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let versions = if versions.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = versions.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!("; {}", list.join(", "))
    };
    format!("{cpu}, {cores} cores (nproc), {ram}, {os}{kernel}, {build}{versions}.")
}

/// Today's UTC date as `YYYY-MM-DD` (days-to-civil conversion, proleptic Gregorian).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Where the generated part of the results file starts and ends; everything outside
/// (the explanations written by people) is kept when the file is rewritten.
const BEGIN: &str = "<!-- surety-bench results: begin (generated; edit outside these markers) -->";
const END: &str = "<!-- surety-bench results: end -->";

/// The results file with `report` between the markers: `existing` with its generated part
/// replaced, or a new file.
pub fn document(existing: Option<&str>, command: &str, report: &str) -> String {
    let generated = format!(
        "{BEGIN}\n\nRun on {} with `{command}`.\n\n{report}\n{END}",
        today()
    );
    if let Some(text) = existing
        && let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END))
        && b < e
    {
        return format!("{}{generated}{}", &text[..b], &text[e + END.len()..]);
    }
    format!("# Benchmarks\n\n{generated}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_is_well_formed() {
        let d = today();
        assert_eq!(d.len(), 10, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn rewriting_keeps_what_is_outside_the_markers() {
        let first = document(None, "cmd", "table one");
        assert!(first.starts_with("# Benchmarks"));
        let edited = format!(
            "# Benchmarks\n\nintro\n\n{}\n\n## Why\n\nprose\n",
            &first[14..]
        );
        let second = document(Some(&edited), "cmd", "table two");
        assert!(second.contains("intro") && second.contains("## Why\n\nprose"));
        assert!(second.contains("table two") && !second.contains("table one"));
    }
}

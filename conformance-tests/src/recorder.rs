//! A metrics recorder for the case that checks what adapters record: it keeps every
//! counter and histogram with its labels, for the life of the process, and never resets
//! them (cases of several adapters read it at once; each looks only at its own labels).
//!
//! It is installed as the process's global recorder on first use. A process that has
//! another recorder already (an application running `surety verify` inside itself, say)
//! cannot run the metrics case: that is an error, not a pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// Label name → value of one series.
pub type Labels = BTreeMap<String, String>;

/// Every series recorded in this process.
#[derive(Default)]
pub struct Recording {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Key, Arc<Samples>>>,
}

/// How many values a histogram series received.
#[derive(Default)]
struct Samples(AtomicU64);

impl HistogramFn for Samples {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

static RECORDING: LazyLock<Recording> = LazyLock::new(Recording::default);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// The process's recording, installed as the global recorder on first use.
pub fn recording() -> Result<&'static Recording, String> {
    INSTALLED
        .get_or_init(|| {
            metrics::set_global_recorder(&*RECORDING).map_err(|_| {
                "another metrics recorder is installed in this process; the metrics case needs its own"
                    .to_owned()
            })
        })
        .clone()
        .map(|()| &*RECORDING)
}

fn labels_of(key: &Key) -> Labels {
    key.labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect()
}

fn matches(key: &Key, name: &str, with: &[(&str, &str)]) -> bool {
    key.name() == name
        && with
            .iter()
            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

impl Recording {
    /// The sum of counter `name` over the series carrying every label of `with`.
    pub fn counter(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .iter()
            .filter(|(key, _)| matches(key, name, with))
            .map(|(_, value)| value.load(Ordering::Relaxed))
            .sum()
    }

    /// How many values histogram `name` received over the series carrying `with`.
    pub fn histogram_count(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        let histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        histograms
            .iter()
            .filter(|(key, _)| matches(key, name, with))
            .map(|(_, samples)| samples.0.load(Ordering::Relaxed))
            .sum()
    }

    /// The labels of every series of `name` (counter or histogram) carrying `with`.
    pub fn series(&self, name: &str, with: &[(&str, &str)]) -> Vec<Labels> {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .keys()
            .chain(histograms.keys())
            .filter(|key| matches(key, name, with))
            .map(labels_of)
            .collect()
    }
}

impl Recorder for Recording {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let value = counters.entry(key.clone()).or_default().clone();
        Counter::from_arc(value)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        // No case reads a gauge (the outbox gauges are the SQL store's, set by its own
        // calls, not by an adapter's events).
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        let samples = histograms.entry(key.clone()).or_default().clone();
        Histogram::from_arc(samples)
    }
}

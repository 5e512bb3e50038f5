//! The metric types and the text they are exposed in.
//!
//! [`Counter`], [`Gauge`] and [`Histogram`] are plain atomics, so that
//! counting on the request path takes no lock and allocates nothing; they
//! are `const`-constructible, to live in statics. [`Exposition`] writes the
//! Prometheus text format 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>): one
//! `# HELP` and `# TYPE` line per family, label values escaped, histograms
//! as cumulative `_bucket` series with `le` up to `+Inf`, `_sum` and
//! `_count`. No client library: the format is a few lines of text, and a
//! dependency would bring its own registry and locks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A count that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Zero.
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Zero.
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }

    /// Adds `n` (which may be negative).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    /// The value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// The upper bounds, in seconds, of every latency histogram's buckets:
/// from 100 µs (a cached-KEK decryption on an idle daemon) to 10 s (a
/// master-key rotation step). `+Inf` is implied.
pub const LATENCY_BOUNDS: [f64; 15] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// [`LATENCY_BOUNDS`] in nanoseconds, for the request path (no float).
const LATENCY_BOUNDS_NS: [u64; 15] = {
    let mut ns = [0u64; 15];
    let us = [100u64, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000];
    let mut i = 0;
    while i < us.len() {
        ns[i] = us[i] * 1_000;
        i += 1;
    }
    ns[12] = 1_000_000_000;
    ns[13] = 2_500_000_000;
    ns[14] = 10_000_000_000;
    ns
};

/// A latency histogram with the fixed buckets of [`LATENCY_BOUNDS`]. Each
/// observation adds to one bucket (not cumulative: the exposition sums
/// them), the sum in nanoseconds and the count.
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    /// Empty.
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BOUNDS.len() + 1],
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.iter().position(|b| ns <= *b).unwrap_or(LATENCY_BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// The kind of a metric family, as its `# TYPE` line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `counter`: names end in `_total`.
    Counter,
    /// `gauge`.
    Gauge,
    /// `histogram`.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A text exposition being written. Call [`family`](Self::family) once per
/// metric name, then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts the family `name`: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name), "metric name {name}");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        self.labels(labels, None);
        self.out.push(' ');
        self.out.push_str(&number(value));
        self.out.push('\n');
    }

    /// A family with one sample: `name{labels} value`.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, labels: &[(&str, &str)], value: f64) {
        self.family(name, kind, help);
        self.sample(name, labels, value);
    }

    /// The samples of one histogram (its family started): the cumulative
    /// `_bucket` series up to `+Inf`, `_sum` in seconds and `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = LATENCY_BOUNDS.get(i).map_or_else(|| "+Inf".to_owned(), |v| number(*v));
            self.out.push_str(&bucket);
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        // The count is read after the buckets: a request observed in
        // between shows in `_count` and not yet in a bucket, never the
        // other way round (`+Inf` <= `_count`).
        let count = h.count.load(Relaxed).max(cumulative);
        let sum = h.sum_ns.load(Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, count as f64);
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            debug_assert!(valid_name(k) && !k.starts_with("__"), "label name {k}");
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label_value(&mut self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*` (labels without `:`).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A label value: backslash, double quote and line feed escaped.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A help text: backslash and line feed escaped.
fn escape_help(h: &str) -> String {
    h.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Go's `ParseFloat` reads it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_in_ns_match_the_bounds_in_seconds() {
        for (s, ns) in LATENCY_BOUNDS.iter().zip(LATENCY_BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
        assert!(LATENCY_BOUNDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_histogram_is_cumulative_and_ends_at_inf() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut e = Exposition::new();
        e.family("keyhaven_x_seconds", Kind::Histogram, "x");
        e.histogram("keyhaven_x_seconds", &[("operation", "op")], &h);
        let text = e.finish();
        assert!(text.contains("keyhaven_x_seconds_bucket{operation=\"op\",le=\"0.0001\"} 2\n"), "{text}");
        assert!(text.contains("keyhaven_x_seconds_bucket{operation=\"op\",le=\"0.0025\"} 2\n"), "{text}");
        assert!(text.contains("keyhaven_x_seconds_bucket{operation=\"op\",le=\"0.005\"} 3\n"), "{text}");
        assert!(text.contains("keyhaven_x_seconds_bucket{operation=\"op\",le=\"10\"} 3\n"), "{text}");
        assert!(text.contains("keyhaven_x_seconds_bucket{operation=\"op\",le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("keyhaven_x_seconds_count{operation=\"op\"} 4\n"), "{text}");
        assert!(text.contains("keyhaven_x_seconds_sum{operation=\"op\"} 60.00315\n"), "{text}");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new();
        e.single("keyhaven_t", Kind::Gauge, "a \\ b\nc", &[("l", "q\"\\\nz")], 1.5);
        assert_eq!(
            e.finish(),
            "# HELP keyhaven_t a \\\\ b\\nc\n# TYPE keyhaven_t gauge\nkeyhaven_t{l=\"q\\\"\\\\\\nz\"} 1.5\n"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(1e-4), "0.0001");
        assert_eq!(number(3.0), "3");
        assert!(valid_name("keyhaven_requests_total") && !valid_name("9x") && !valid_name("a-b"));
    }
}

//! Process-wide metrics in the Prometheus text exposition format (0.0.4) for `GET /metrics`:
//! counters and histograms kept in memory behind one mutex, written out by hand. It owns no
//! route and reads no database: callers record events, and the `/metrics` handler reads the
//! queue depth itself and passes it to [`Metrics::render`].

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the duration histograms' buckets, `+Inf` aside.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of the batch-size histogram's buckets, `+Inf` aside.
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Every family in output order: name, type, label names, help. Recording methods name their
/// family by the same string; a family without series still gets its `# HELP` and `# TYPE`.
const FAMILIES: &[(&str, &str, &[&str], &str)] = &[
    (
        "carina_http_requests_total",
        "counter",
        &["method", "route", "status"],
        "HTTP requests answered, by method, route template and status.",
    ),
    (
        "carina_http_request_duration_seconds",
        "histogram",
        &["method", "route"],
        "HTTP request duration in seconds, by method and route template.",
    ),
    (
        "carina_inference_duration_seconds",
        "histogram",
        &["model"],
        "Duration of one model run of a batch in seconds.",
    ),
    (
        "carina_inference_batch_size",
        "histogram",
        &["model"],
        "Images per model run.",
    ),
    (
        "carina_gradcam_duration_seconds",
        "histogram",
        &["model"],
        "Duration of one Grad-CAM computation in seconds.",
    ),
    (
        "carina_jobs",
        "gauge",
        &["kind", "state"],
        "Jobs in the queue, by kind and state, read at scrape time.",
    ),
    (
        "carina_job_outcomes_total",
        "counter",
        &["kind", "outcome"],
        "Job attempts finished, by kind and outcome.",
    ),
    (
        "carina_job_duration_seconds",
        "histogram",
        &["kind"],
        "Duration of one job attempt in seconds.",
    ),
    (
        "carina_dimse_associations_total",
        "counter",
        &["outcome"],
        "DIMSE associations ended, by outcome.",
    ),
    (
        "carina_dimse_stores_total",
        "counter",
        &["status"],
        "DIMSE C-STORE responses, by status.",
    ),
    (
        "carina_build_info",
        "gauge",
        &["version"],
        "Carina's version.",
    ),
    (
        "process_start_time_seconds",
        "gauge",
        &[],
        "Start time of the process since unix epoch in seconds.",
    ),
];

/// Label values of one series, in the order of the family's label names.
type Key = Vec<String>;

/// One histogram series.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative; those above every bound are only in `count`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        // A NaN would turn `_sum` into NaN for the rest of the process's life.
        if v.is_nan() {
            return;
        }
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            if let Some(c) = self.counts.get_mut(i) {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Every recorded series by family name, then by label values, so the output is stable.
#[derive(Debug, Default)]
struct State {
    counters: BTreeMap<&'static str, BTreeMap<Key, u64>>,
    histograms: BTreeMap<&'static str, BTreeMap<Key, Histogram>>,
}

/// Process-wide metrics.
#[derive(Debug)]
pub struct Metrics {
    state: Mutex<State>,
    /// Unix time (seconds) when [`Metrics::new`] ran.
    start_time: f64,
}

/// The metrics of this process, created on first use.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics; the process start time is now.
    pub fn new() -> Self {
        let start_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Self {
            state: Mutex::new(State::default()),
            start_time,
        }
    }

    /// A panic while the lock was held leaves plain numbers behind, still worth reporting.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, family: &'static str, key: Key) {
        let mut s = self.state();
        *s.counters
            .entry(family)
            .or_default()
            .entry(key)
            .or_insert(0) += 1;
    }

    fn observe(&self, family: &'static str, bounds: &'static [f64], key: Key, v: f64) {
        let mut s = self.state();
        s.histograms
            .entry(family)
            .or_default()
            .entry(key)
            .or_insert_with(|| Histogram::new(bounds))
            .observe(v);
    }

    /// An HTTP request finished: `route` is the matched route template (e.g. `/v1/jobs/{id}`)
    /// or `unmatched`, never the raw path, so label values stay few.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let key = vec![method.to_owned(), route.to_owned()];
        let mut with_status = key.clone();
        with_status.push(status.to_string());
        self.count("carina_http_requests_total", with_status);
        self.observe(
            "carina_http_request_duration_seconds",
            SECONDS,
            key,
            seconds,
        );
    }

    /// One model run of a batch.
    pub fn observe_inference(&self, model: &str, seconds: f64, batch_size: usize) {
        let key = vec![model.to_owned()];
        self.observe(
            "carina_inference_duration_seconds",
            SECONDS,
            key.clone(),
            seconds,
        );
        self.observe("carina_inference_batch_size", BATCH, key, batch_size as f64);
    }

    /// One Grad-CAM computation.
    pub fn observe_gradcam(&self, model: &str, seconds: f64) {
        let key = vec![model.to_owned()];
        self.observe("carina_gradcam_duration_seconds", SECONDS, key, seconds);
    }

    /// A job finished an attempt: `outcome` is `done`, `skipped`, `retry`, `dead` or `released`.
    pub fn job_outcome(&self, kind: &str, outcome: &str) {
        let key = vec![kind.to_owned(), outcome.to_owned()];
        self.count("carina_job_outcomes_total", key);
    }

    /// How long a job attempt ran.
    pub fn observe_job(&self, kind: &str, seconds: f64) {
        let key = vec![kind.to_owned()];
        self.observe("carina_job_duration_seconds", SECONDS, key, seconds);
    }

    /// A DIMSE association ended: `outcome` is `accepted`, `rejected` or `aborted`.
    pub fn dimse_association(&self, outcome: &str) {
        self.count("carina_dimse_associations_total", vec![outcome.to_owned()]);
    }

    /// A DIMSE C-STORE answered with this status, rendered as hex (`0x0000`, `0xa700`).
    pub fn dimse_store(&self, status: u16) {
        self.count("carina_dimse_stores_total", vec![format!("{status:#06x}")]);
    }

    /// Text exposition; `queue` is the current queue depth as (kind, state, count) rows read from
    /// the database at scrape time, rendered as the gauge `carina_jobs{kind,state}`.
    pub fn render(&self, queue: &[(String, String, i64)]) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_exposition(&mut out, queue);
        out
    }

    fn write_exposition(&self, out: &mut String, queue: &[(String, String, i64)]) -> fmt::Result {
        let s = self.state();
        for &(name, kind, names, help) in FAMILIES {
            writeln!(out, "# HELP {name} {help}")?;
            writeln!(out, "# TYPE {name} {kind}")?;
            if let Some(series) = s.counters.get(name) {
                for (key, n) in series {
                    writeln!(out, "{name}{} {n}", labels(names, key.as_slice(), None))?;
                }
            }
            if let Some(series) = s.histograms.get(name) {
                histograms(out, name, names, series)?;
            }
            match name {
                "carina_jobs" => jobs(out, names, queue)?,
                "carina_build_info" => {
                    let version = labels(names, &[env!("CARGO_PKG_VERSION")], None);
                    writeln!(out, "{name}{version} 1")?;
                }
                "process_start_time_seconds" => {
                    writeln!(out, "{name} {}", float(self.start_time))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn histograms(
    out: &mut String,
    name: &str,
    names: &[&str],
    series: &BTreeMap<Key, Histogram>,
) -> fmt::Result {
    for (key, h) in series {
        let key = key.as_slice();
        let mut cumulative: u64 = 0;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += *n;
            let le = labels(names, key, Some(float(*bound).as_str()));
            writeln!(out, "{name}_bucket{le} {cumulative}")?;
        }
        let all = labels(names, key, Some("+Inf"));
        writeln!(out, "{name}_bucket{all} {}", h.count)?;
        let plain = labels(names, key, None);
        writeln!(out, "{name}_sum{plain} {}", float(h.sum))?;
        writeln!(out, "{name}_count{plain} {}", h.count)?;
    }
    Ok(())
}

/// The queue gauge; duplicate (kind, state) rows are summed so no series appears twice.
fn jobs(out: &mut String, names: &[&str], queue: &[(String, String, i64)]) -> fmt::Result {
    let mut depth: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for (kind, state, count) in queue {
        let d = depth.entry((kind.as_str(), state.as_str())).or_insert(0);
        *d = d.saturating_add(*count);
    }
    for ((kind, state), count) in &depth {
        let l = labels(names, &[*kind, *state], None);
        writeln!(out, "carina_jobs{l} {count}")?;
    }
    Ok(())
}

/// `{a="x",b="y"}` with values escaped, `le` last; empty when there are no labels.
fn labels<S: AsRef<str>>(names: &[&str], values: &[S], le: Option<&str>) -> String {
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v.as_ref())))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

/// Escapes a label value as the exposition format asks: backslash, double quote, newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A float as Prometheus parses it (`+Inf`, `-Inf`, `NaN` spelled its way).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line whose name and labels are exactly `series`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn counters_increase() {
        let m = Metrics::new();
        m.observe_request("GET", "/v1/jobs/{id}", 200, 0.01);
        m.observe_request("GET", "/v1/jobs/{id}", 200, 0.02);
        m.observe_request("GET", "unmatched", 404, 0.001);
        m.job_outcome("analyse", "done");
        m.job_outcome("analyse", "done");
        m.job_outcome("analyse", "retry");
        m.dimse_association("accepted");
        m.dimse_store(0);
        m.dimse_store(0xA700);
        m.dimse_store(0xA700);
        let t = m.render(&[]);
        let get = |s: &str| value(&t, s);
        let route =
            r#"carina_http_requests_total{method="GET",route="/v1/jobs/{id}",status="200"}"#;
        assert_eq!(get(route), Some(2.0));
        let unmatched =
            r#"carina_http_requests_total{method="GET",route="unmatched",status="404"}"#;
        assert_eq!(get(unmatched), Some(1.0));
        let done = r#"carina_job_outcomes_total{kind="analyse",outcome="done"}"#;
        assert_eq!(get(done), Some(2.0));
        let retry = r#"carina_job_outcomes_total{kind="analyse",outcome="retry"}"#;
        assert_eq!(get(retry), Some(1.0));
        let accepted = r#"carina_dimse_associations_total{outcome="accepted"}"#;
        assert_eq!(get(accepted), Some(1.0));
        assert_eq!(
            get(r#"carina_dimse_stores_total{status="0x0000"}"#),
            Some(1.0)
        );
        assert_eq!(
            get(r#"carina_dimse_stores_total{status="0xa700"}"#),
            Some(2.0)
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.observe_inference("cxr", 0.5, 1);
        m.observe_inference("cxr", 2.0, 3);
        m.observe_inference("cxr", 100.0, 64);
        m.observe_gradcam("cxr", f64::NAN);
        let t = m.render(&[]);
        let d = |le: &str| {
            let s = format!(r#"carina_inference_duration_seconds_bucket{{model="cxr",le="{le}"}}"#);
            value(&t, &s)
        };
        assert_eq!(d("0.005"), Some(0.0));
        assert_eq!(d("0.25"), Some(0.0));
        assert_eq!(d("0.5"), Some(1.0));
        assert_eq!(d("1"), Some(1.0));
        assert_eq!(d("2.5"), Some(2.0));
        assert_eq!(d("60"), Some(2.0));
        assert_eq!(d("+Inf"), Some(3.0));
        let sum = r#"carina_inference_duration_seconds_sum{model="cxr"}"#;
        assert_eq!(value(&t, sum), Some(102.5));
        let count = r#"carina_inference_duration_seconds_count{model="cxr"}"#;
        assert_eq!(value(&t, count), Some(3.0));
        let b = |le: &str| {
            let s = format!(r#"carina_inference_batch_size_bucket{{model="cxr",le="{le}"}}"#);
            value(&t, &s)
        };
        assert_eq!(b("1"), Some(1.0));
        assert_eq!(b("2"), Some(1.0));
        assert_eq!(b("4"), Some(2.0));
        assert_eq!(b("32"), Some(2.0));
        assert_eq!(b("64"), Some(3.0));
        assert_eq!(b("+Inf"), Some(3.0));
        assert_eq!(
            value(&t, r#"carina_inference_batch_size_sum{model="cxr"}"#),
            Some(68.0)
        );
        // Every bucket series never decreases and ends at `_count`; NaN is not counted.
        let buckets: Vec<f64> = t
            .lines()
            .filter(|l| l.starts_with("carina_inference_duration_seconds_bucket"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), SECONDS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        let gradcam = r#"carina_gradcam_duration_seconds_count{model="cxr"}"#;
        assert_eq!(value(&t, gradcam), Some(0.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.observe_request("GET", "a\"b\\c\nd", 500, 0.1);
        let t = m.render(&[]);
        let s = r#"carina_http_requests_total{method="GET",route="a\"b\\c\nd",status="500"}"#;
        assert_eq!(value(&t, s), Some(1.0));
        assert!(t
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("carina_") || l.starts_with("process_")));
    }

    #[test]
    fn each_family_is_described_once() {
        let m = Metrics::new();
        for (method, route) in [("GET", "/a"), ("POST", "/b"), ("GET", "/c")] {
            m.observe_request(method, route, 200, 0.1);
            m.observe_request(method, route, 503, 0.2);
        }
        for model in ["a", "b"] {
            m.observe_inference(model, 0.1, 2);
            m.observe_gradcam(model, 0.3);
            m.observe_job(model, 1.0);
            m.job_outcome(model, "done");
        }
        m.dimse_association("accepted");
        m.dimse_association("aborted");
        m.dimse_store(0);
        m.dimse_store(0xC000);
        let queue = [
            ("analyse".to_owned(), "queued".to_owned(), 2),
            ("export".to_owned(), "queued".to_owned(), 1),
        ];
        let t = m.render(&queue);
        let families = [
            ("carina_http_requests_total", "counter"),
            ("carina_http_request_duration_seconds", "histogram"),
            ("carina_inference_duration_seconds", "histogram"),
            ("carina_inference_batch_size", "histogram"),
            ("carina_gradcam_duration_seconds", "histogram"),
            ("carina_jobs", "gauge"),
            ("carina_job_outcomes_total", "counter"),
            ("carina_job_duration_seconds", "histogram"),
            ("carina_dimse_associations_total", "counter"),
            ("carina_dimse_stores_total", "counter"),
            ("carina_build_info", "gauge"),
            ("process_start_time_seconds", "gauge"),
        ];
        for (name, kind) in families {
            let help = format!("# HELP {name} ");
            assert_eq!(
                t.lines().filter(|l| l.starts_with(&help)).count(),
                1,
                "{name}"
            );
            let ty = format!("# TYPE {name} {kind}");
            assert_eq!(t.lines().filter(|l| *l == ty).count(), 1, "{name}");
        }
        for (name, _) in families {
            let sampled = t.lines().any(|l| l.starts_with(name));
            assert!(
                sampled,
                "every recording method feeds a listed family: {name}"
            );
        }
        assert_eq!(t.lines().filter(|l| l.starts_with("# TYPE ")).count(), 12);
        assert_eq!(t.lines().filter(|l| l.starts_with("# HELP ")).count(), 12);
        let version = format!(
            r#"carina_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&t, &version), Some(1.0));
        assert!(value(&t, "process_start_time_seconds").unwrap() > 1.0e9);
    }

    #[test]
    fn queue_depth_is_a_gauge() {
        let m = Metrics::new();
        let queue = [
            ("analyse".to_owned(), "queued".to_owned(), 3),
            ("analyse".to_owned(), "running".to_owned(), 1),
            ("export".to_owned(), "dead".to_owned(), 0),
            ("analyse".to_owned(), "queued".to_owned(), 2),
        ];
        let t = m.render(&queue);
        assert!(t.contains("# TYPE carina_jobs gauge\n"));
        let get = |s: &str| value(&t, s);
        assert_eq!(
            get(r#"carina_jobs{kind="analyse",state="queued"}"#),
            Some(5.0)
        );
        assert_eq!(
            get(r#"carina_jobs{kind="analyse",state="running"}"#),
            Some(1.0)
        );
        assert_eq!(get(r#"carina_jobs{kind="export",state="dead"}"#), Some(0.0));
        assert_eq!(t.matches("carina_jobs{").count(), 3);
        assert!(!m.render(&[]).contains("carina_jobs{"));
    }

    #[test]
    fn global_is_one_instance() {
        assert!(std::ptr::eq(global(), global()));
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(1.0), "1");
        assert_eq!(float(0.005), "0.005");
    }
}

//! The dataplane benchmark's results: per-run figures for direct and through ztund (and their
//! ratio, taken within each run), summarised as median with min and max, checked against the
//! targets of issue 5, printed as a table and written as JSON. Knows nothing about how the
//! figures were measured.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// The figures of one metric over all runs.
#[derive(Debug, Default, Clone)]
pub struct Series {
    pub unit: &'static str,
    pub direct: Vec<f64>,
    pub ztund: Vec<f64>,
    /// ztund / direct, computed per run.
    pub ratio: Vec<f64>,
}

/// Median, min and max of some figures.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }

    fn json(self, values: &[f64]) -> serde_json::Value {
        serde_json::json!({
            "median": self.median, "min": self.min, "max": self.max, "runs": values,
        })
    }
}

/// Every metric, in the order first recorded.
#[derive(Debug, Default)]
pub struct Results {
    order: Vec<&'static str>,
    series: HashMap<&'static str, Series>,
}

impl Results {
    fn series(&mut self, name: &'static str, unit: &'static str) -> &mut Series {
        if !self.series.contains_key(name) {
            self.order.push(name);
        }
        let series = self.series.entry(name).or_default();
        series.unit = unit;
        series
    }

    /// One run's direct and ztund figures; the ratio is ztund / direct.
    pub fn pair(&mut self, name: &'static str, unit: &'static str, direct: f64, ztund: f64) {
        let series = self.series(name, unit);
        series.direct.push(direct);
        series.ztund.push(ztund);
        series.ratio.push(ztund / direct);
    }

    /// One run's figure that exists only through ztund (CPU, memory).
    pub fn ztund(&mut self, name: &'static str, unit: &'static str, value: f64) {
        self.series(name, unit).ztund.push(value);
    }

    pub fn get(&self, name: &str) -> Option<&Series> {
        self.series.get(name)
    }

    /// The width of the metric column: the longest name, 34 at least.
    fn name_width(&self) -> usize {
        self.order
            .iter()
            .map(|n| n.chars().count())
            .fold(34, usize::max)
    }

    /// The table: one row per metric, median [min..max] per column.
    pub fn table(&self) -> String {
        let w = self.name_width();
        let mut out = format!(
            "{:<w$} {:<10} {:>28} {:>28} {:>24}\n",
            "metric", "unit", "direct", "ztund", "ztund/direct"
        );
        for name in &self.order {
            let s = &self.series[name];
            let cell = |values: &[f64]| {
                Summary::of(values).map_or_else(
                    || "-".to_string(),
                    |m| format!("{} [{}..{}]", num(m.median), num(m.min), num(m.max)),
                )
            };
            let _ = writeln!(
                out,
                "{:<w$} {:<10} {:>28} {:>28} {:>24}",
                name,
                s.unit,
                cell(&s.direct),
                cell(&s.ztund),
                cell(&s.ratio)
            );
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let metrics: Vec<serde_json::Value> = self
            .order
            .iter()
            .map(|name| {
                let s = &self.series[name];
                let column = |values: &[f64]| {
                    Summary::of(values).map_or(serde_json::Value::Null, |m| m.json(values))
                };
                serde_json::json!({
                    "name": name,
                    "unit": s.unit,
                    "direct": column(&s.direct),
                    "ztund": column(&s.ztund),
                    "ratio": column(&s.ratio),
                })
            })
            .collect();
        serde_json::Value::Array(metrics)
    }
}

/// Three significant digits, without exponent noise.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Which column of a metric a target reads.
#[derive(Debug, Clone, Copy)]
pub enum Column {
    Ztund,
    Ratio,
}

/// One goal of issue 5, checked against a metric's median.
pub struct Target {
    pub goal: &'static str,
    pub metric: &'static str,
    pub column: Column,
    /// True when the median must be at least `bound`, false when at most.
    pub at_least: bool,
    pub bound: f64,
}

pub const TARGETS: &[Target] = &[
    Target {
        goal: "single-stream throughput >= 50% of direct",
        metric: "throughput, 1 stream",
        column: Column::Ratio,
        at_least: true,
        bound: 0.5,
    },
    Target {
        goal: "<= 1.0 core-s per GB, both hops",
        metric: "CPU per GB, both daemons",
        column: Column::Ztund,
        at_least: false,
        bound: 1.0,
    },
    Target {
        goal: "added p99 at 1000 req/s <= 0.2 ms",
        metric: "added p99 @1000/s",
        column: Column::Ztund,
        at_least: false,
        bound: 200.0,
    },
    Target {
        goal: "new connections/s >= 60% of direct",
        metric: "new connections",
        column: Column::Ratio,
        at_least: true,
        bound: 0.6,
    },
    Target {
        goal: "<= 4 KiB per idle tunneled connection",
        metric: "memory per idle conn, both",
        column: Column::Ztund,
        at_least: false,
        bound: 4.0,
    },
    Target {
        goal: "<= 0.05 vCPU per 1000 req/s",
        metric: "vCPU per 1000 req/s, both",
        column: Column::Ztund,
        at_least: false,
        bound: 0.05,
    },
];

/// `targets` with their medians and verdicts, as text and JSON.
pub fn check_targets(results: &Results, targets: &[Target]) -> (String, serde_json::Value) {
    let mut text = String::from("targets (medians):\n");
    let mut json = Vec::new();
    for target in targets {
        let median = results.get(target.metric).and_then(|s| {
            let values = match target.column {
                Column::Ztund => &s.ztund,
                Column::Ratio => &s.ratio,
            };
            Summary::of(values).map(|m| m.median)
        });
        let verdict = match median {
            None => "not measured",
            Some(m) if (m >= target.bound) == target.at_least => "met",
            Some(_) => "MISSED",
        };
        let shown = median.map_or_else(|| "-".to_string(), num);
        let _ = writeln!(text, "  {:<44} {:>10}  {verdict}", target.goal, shown);
        json.push(serde_json::json!({
            "goal": target.goal, "metric": target.metric, "median": median, "verdict": verdict,
        }));
    }
    (text, serde_json::Value::Array(json))
}

/// `target/<name>.json`, honouring CARGO_TARGET_DIR.
pub fn json_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join(format!("{name}.json"))
}

/// Before → after, per metric: the medians of the ztund column and of the ratio, and the change.
pub fn compare(before: &Results, after: &Results) -> String {
    let w = after.name_width();
    let mut out = comparison_header("before -> after (medians, same run)", w);
    for name in &after.order {
        let (Some(b), Some(a)) = (before.get(name), after.get(name)) else {
            continue;
        };
        let before = (median(&b.ztund), median(&b.ratio));
        comparison_row(&mut out, w, name, a, before);
    }
    out
}

/// This run against the last one written to `last` (the previous `dataplane.json`), for the
/// build measured as "this build": the medians of the ztund column and of the ratio. Across
/// runs the machine's drift is in every figure; the ratio column, taken within each run, is the
/// one to trust. `None` when there is no readable last run.
pub fn compare_with_last(last: &serde_json::Value, this: &Results) -> Option<String> {
    let build = last["builds"].as_array()?.last()?;
    let metrics = build["metrics"].as_array()?;
    let settings = &last["settings"];
    let quick = if settings["quick"] == true {
        ", quick"
    } else {
        ""
    };
    let w = this.name_width();
    let mut out = comparison_header(
        &format!(
            "this run vs the last (medians; the last: {} run(s) x {} s{quick}, build {})",
            settings["runs"],
            settings["seconds"],
            build["binary"].as_str().unwrap_or("?"),
        ),
        w,
    );
    let mut rows = 0;
    for name in &this.order {
        let Some(metric) = metrics.iter().find(|m| m["name"] == *name) else {
            continue;
        };
        let last = (
            metric["ztund"]["median"].as_f64(),
            metric["ratio"]["median"].as_f64(),
        );
        comparison_row(&mut out, w, name, &this.series[name], last);
        rows += 1;
    }
    (rows > 0).then_some(out)
}

fn median(values: &[f64]) -> Option<f64> {
    Summary::of(values).map(|m| m.median)
}

fn comparison_header(title: &str, w: usize) -> String {
    format!(
        "{title}\n{:<w$} {:<10} {:>24} {:>9} {:>22}\n",
        "metric", "unit", "ztund", "change", "ztund/direct"
    )
}

/// One metric: the earlier (ztund, ratio) medians against `now`'s, and the ztund change; `w`
/// is the metric column's width.
fn comparison_row(
    out: &mut String,
    w: usize,
    name: &str,
    now: &Series,
    earlier: (Option<f64>, Option<f64>),
) {
    let pair = |x: Option<f64>, y: Option<f64>| match (x, y) {
        // A change from zero has no percentage (0 -> 0 is no change, not NaN).
        (Some(x), Some(y)) => (
            format!("{} -> {}", num(x), num(y)),
            (x != 0.0).then(|| y / x - 1.0),
        ),
        _ => ("-".to_string(), None),
    };
    let (ztund, change) = pair(earlier.0, median(&now.ztund));
    let (ratio, _) = pair(earlier.1, median(&now.ratio));
    let change = change.map_or_else(|| "-".to_string(), |c| format!("{:+.0}%", c * 100.0));
    let _ = writeln!(
        out,
        "{:<w$} {:<10} {:>24} {:>9} {:>22}",
        name, now.unit, ztund, change, ratio
    );
}

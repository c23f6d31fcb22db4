//! The record of runs (one JSON line each) and the per-cell summary.
//!
//! The JSON-lines file is the experiment's only state: a run is done when
//! its line is there, so a killed experiment resumes by skipping those
//! runs. Each line is written whole and flushed after its run; a line cut
//! short by a kill does not parse and is ignored (that run runs again).
//!
//! The summary is seed 002's Table II per cell: mean, median, standard
//! deviation (n − 1), min, max and max:min of each figure.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::spec::{plain, Spec};
use super::ExperimentError;

/// The figures summarised, with the unit they are in.
pub const FIGURES: [(&str, &str); 4] = [
    ("total_time_ms", "ms"),
    ("downtime_ms", "ms"),
    ("guest_downtime_ms", "ms"),
    ("bytes_wire", "bytes"),
];

/// One run's line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Line {
    pub experiment: String,
    pub cell: usize,
    pub rep: u32,
    /// Factor key → level.
    pub factors: Map<String, Value>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `vmm migrate --json`'s report (null when the run failed).
    pub report: Value,
    /// Seed 001's prediction for the cell, where the model applies.
    #[serde(default)]
    pub model: Option<Value>,
    pub elapsed_s: f64,
    pub finished_unix_s: u64,
}

impl Line {
    /// Whether this line records the run (`factors`, `rep`).
    pub fn is_run(&self, factors: &Map<String, Value>, rep: u32) -> bool {
        self.rep == rep && &self.factors == factors
    }

    /// A figure of the report.
    pub fn figure(&self, name: &str) -> Option<f64> {
        self.report[name].as_f64()
    }
}

/// Reads every whole line of `path` (none if it does not exist yet).
pub fn read_lines(path: &Path) -> Result<Vec<Line>, ExperimentError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ExperimentError::Io {
                what: format!("reading {}", path.display()),
                source,
            })
        }
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Appends one line, on a line of its own even after a cut-short one.
pub fn append_line(path: &Path, line: &Line) -> Result<(), ExperimentError> {
    let io = |source| ExperimentError::Io {
        what: format!("appending to {}", path.display()),
        source,
    };
    let cut_short = std::fs::read(path).is_ok_and(|b| b.last().is_some_and(|c| *c != b'\n'));
    let mut text = if cut_short {
        "\n".to_string()
    } else {
        String::new()
    };
    text += &serde_json::to_string(line).expect("a line serializes");
    text.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_data().map_err(io)
}

/// Mean, median, std, min, max and max:min of some values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let var = if n > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Self {
            n,
            mean,
            median,
            std: var.sqrt(),
            min: v[0],
            max: v[n - 1],
        })
    }

    /// max:min (infinite when min is 0 and max is not).
    pub fn max_min(&self) -> f64 {
        if self.min == 0.0 && self.max == 0.0 {
            1.0
        } else {
            self.max / self.min
        }
    }
}

/// One cell's summary row.
pub struct Row {
    pub levels: Map<String, Value>,
    pub runs: usize,
    pub failed: usize,
    pub stats: Vec<Option<Stats>>,
}

/// Summarises `lines` per cell of `spec`, in the cells' order.
pub fn rows(spec: &Spec, lines: &[Line]) -> Vec<Row> {
    spec.cells()
        .into_iter()
        .map(|cell| {
            let mine: Vec<&Line> = lines.iter().filter(|l| l.factors == cell.levels).collect();
            let ok: Vec<&&Line> = mine.iter().filter(|l| l.ok).collect();
            let stats = FIGURES
                .iter()
                .map(|(f, _)| Stats::of(&ok.iter().filter_map(|l| l.figure(f)).collect::<Vec<_>>()))
                .collect();
            Row {
                levels: cell.levels,
                runs: mine.len(),
                failed: mine.len() - ok.len(),
                stats,
            }
        })
        .collect()
}

const STATS: [&str; 6] = ["mean", "median", "std", "min", "max", "max_min"];

fn stat_values(s: &Stats) -> [f64; 6] {
    [s.mean, s.median, s.std, s.min, s.max, s.max_min()]
}

/// The summary as CSV: the factors, runs, failed, then six columns a figure.
pub fn csv(spec: &Spec, rows: &[Row]) -> String {
    let mut head: Vec<String> = spec.factors.iter().map(|f| f.key.clone()).collect();
    head.extend(["runs".into(), "failed".into()]);
    for (f, _) in FIGURES {
        head.extend(STATS.iter().map(|s| format!("{f}_{s}")));
    }
    let mut out = head.join(",") + "\n";
    for r in rows {
        let mut cols: Vec<String> = levels_in_order(spec, r).map(csv_field).collect();
        cols.extend([r.runs.to_string(), r.failed.to_string()]);
        for s in &r.stats {
            match s {
                Some(s) => cols.extend(stat_values(s).iter().map(|v| format!("{v:.3}"))),
                None => cols.extend(std::iter::repeat_n(String::new(), 6)),
            }
        }
        out += &(cols.join(",") + "\n");
    }
    out
}

/// A row's levels in the order the factors are declared.
fn levels_in_order<'a>(spec: &'a Spec, r: &'a Row) -> impl Iterator<Item = &'a Value> + 'a {
    spec.factors
        .iter()
        .map(|f| r.levels.get(&f.key).unwrap_or(&Value::Null))
}

fn csv_field(v: &Value) -> String {
    let s = plain(v);
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The summary as Markdown: one table per figure, a row per cell.
pub fn markdown(spec: &Spec, rows: &[Row]) -> String {
    let mut out = format!("# {}: summary per cell\n", spec.name);
    let factors: Vec<String> = spec.factors.iter().map(|f| f.label()).collect();
    for (i, (fig, unit)) in FIGURES.iter().enumerate() {
        let _ = writeln!(out, "\n## {fig} ({unit})\n");
        let mut head = factors.clone();
        head.extend(["runs (failed)".into()]);
        head.extend(STATS.iter().map(|s| s.replace('_', ":")));
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
        for r in rows {
            let mut cols: Vec<String> = levels_in_order(spec, r).map(plain).collect();
            cols.push(format!("{} ({})", r.runs, r.failed));
            match &r.stats[i] {
                Some(s) => cols.extend(stat_values(s).iter().map(|v| format!("{v:.2}"))),
                None => cols.extend(std::iter::repeat_n("–".to_string(), 6)),
            }
            let _ = writeln!(out, "| {} |", cols.join(" | "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_seed_002s() {
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            (s.n, s.mean, s.median, s.min, s.max),
            (4, 2.5, 2.5, 1.0, 4.0)
        );
        assert!((s.std - 1.290_994).abs() < 1e-5);
        assert_eq!(s.max_min(), 4.0);
        assert_eq!(Stats::of(&[7.0]).unwrap().std, 0.0);
        assert!(Stats::of(&[]).is_none());
    }
}

//! The experiment file, and the cells it declares.
//!
//! An experiment is a *setup* (guest, migration, receiver, link, model
//! knobs) and *factors*: dotted keys into the setup, each with its levels.
//! A cell is one combination of levels; each cell runs `repetitions` times.
//!
//! Why factors are dotted keys into one tree, rather than a fixed list of
//! known factors: any `vmm run` workload key, any `vmm migrate` or `vmm
//! receive` flag and the link can then be varied without this module
//! knowing them; the setup is resolved (and checked) per cell by
//! substituting the levels into the tree and reading it as a [`Setup`].
//!
//! ```toml
//! name = "smoke"
//! repetitions = 2
//! seed = 7                      # run the runs in a seeded random order
//! link = "loopback"             # or "tbf:1gbit"
//! [guest]
//! memory = "128M"
//! workload = { wset = "16M", rate = 2000, fill = 100 }
//! [migration]                   # any `vmm migrate` flag: true = present
//! mode = "pre"
//! compression = "none"
//! [[factors]]
//! key = "guest.workload.rate"
//! levels = [0, 4000]
//! label = "w (pages/s)"
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ExperimentError;

/// The whole experiment file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Name used in file names and progress lines (default: the file's stem).
    #[serde(default)]
    pub name: String,
    /// Runs per cell.
    #[serde(default = "one")]
    pub repetitions: u32,
    /// When set, all runs (cell × repetition) go in an order shuffled with
    /// this seed, so that drift in the host does not line up with a factor.
    #[serde(default)]
    pub seed: Option<u64>,
    /// How long the source guest runs before the migration starts (ms).
    #[serde(default = "settle_ms")]
    pub settle_ms: u64,
    /// A run taking longer than this is ended and recorded as failed (s).
    #[serde(default = "timeout_s")]
    pub timeout_s: u64,
    /// `vmm run` settings: memory, vcpus, workload (table or string), image.
    #[serde(default)]
    pub guest: Map<String, Value>,
    /// `vmm migrate` flags, without the dashes (`max_downtime = "50ms"`).
    #[serde(default)]
    pub migration: Map<String, Value>,
    /// `vmm receive` flags (`prefault = true`).
    #[serde(default)]
    pub receive: Map<String, Value>,
    /// `loopback`, or `tbf:RATE` (a veth pair into a network namespace,
    /// shaped by tc's token bucket filter: `tbf:1gbit`, `tbf:100mbit`).
    #[serde(default = "loopback")]
    pub link: Value,
    /// Knobs of seed 001's model that the setup does not tell.
    #[serde(default)]
    pub model: Map<String, Value>,
    /// The factors, slowest-varying first.
    #[serde(default)]
    pub factors: Vec<Factor>,
    /// Line plots to draw (default: every numeric factor against Tm and Td).
    #[serde(default)]
    pub plots: Vec<LinePlot>,
    /// Heat maps to draw (default: the first two factors, Td).
    #[serde(default)]
    pub heatmaps: Vec<HeatMap>,
}

/// One factor: a dotted key into the setup and the levels it takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Factor {
    pub key: String,
    pub levels: Vec<Value>,
    /// Axis label, with its unit (default: the key).
    #[serde(default)]
    pub label: Option<String>,
}

impl Factor {
    /// What axes and tables call it.
    pub fn label(&self) -> String {
        self.label.clone().unwrap_or_else(|| self.key.clone())
    }
}

/// A figure against a factor, one line per level of `series`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinePlot {
    pub x: String,
    pub y: String,
    #[serde(default)]
    pub series: Option<String>,
    /// Draw seed 001's model beside the measurement (where it applies).
    #[serde(default = "yes")]
    pub model: bool,
}

/// A figure over two factors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeatMap {
    pub x: String,
    pub y: String,
    pub value: String,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn settle_ms() -> u64 {
    500
}
fn timeout_s() -> u64 {
    300
}
fn loopback() -> Value {
    Value::String("loopback".into())
}

/// One combination of levels, numbered in declaration order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub index: usize,
    /// Factor key → level.
    pub levels: Map<String, Value>,
}

impl Cell {
    /// `key=level` pairs, for progress lines.
    pub fn describe(&self) -> String {
        // Map order is the keys' order, close enough for a progress line.
        let parts: Vec<String> = self
            .levels
            .iter()
            .map(|(k, v)| format!("{}={}", short_key(k), plain(v)))
            .collect();
        parts.join(" ")
    }
}

/// The last part of a dotted key.
pub fn short_key(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// A level as text: strings without their quotes.
pub fn plain(v: &Value) -> String {
    if let Some(value) = bundle(v).map(|(value, _)| value) {
        return plain(value);
    }
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A level that sets several keys at once: `{ value = 256, set = {
/// "guest.memory" = "256M", "migration.max_bytes" = "768M" } }` (seed 002's
/// VMSIZE moves both the memory and the cap of 3 × VMSIZE). Its `value`
/// names it in tables and places it on axes.
pub fn bundle(level: &Value) -> Option<(&Value, &Map<String, Value>)> {
    let m = level.as_object()?;
    Some((m.get("value")?, m.get("set")?.as_object()?))
}

impl Spec {
    /// Reads a TOML file (or JSON, by the `.json` extension).
    pub fn load(path: &Path) -> Result<Self, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        let parsed: Result<Self, String> = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        let mut spec = parsed.map_err(|msg| ExperimentError::Parse {
            path: path.to_path_buf(),
            msg,
        })?;
        if spec.name.is_empty() {
            spec.name = path
                .file_stem()
                .map_or("experiment".into(), |s| s.to_string_lossy().into_owned());
        }
        spec.check()?;
        Ok(spec)
    }

    /// Refuses what would only fail later: no levels, unknown plot keys,
    /// a cell whose setup does not resolve.
    fn check(&self) -> Result<(), ExperimentError> {
        if self.repetitions == 0 {
            return Err(self.invalid("repetitions must be at least 1"));
        }
        for f in &self.factors {
            if f.levels.is_empty() {
                return Err(self.invalid(&format!("factor {} has no levels", f.key)));
            }
            let bundles = f.levels.iter().filter(|l| bundle(l).is_some()).count();
            let top = ["guest", "migration", "receive", "link", "model"];
            let is_path =
                f.key == "link" || top.iter().any(|t| f.key.starts_with(&format!("{t}.")));
            if bundles != f.levels.len() && !is_path {
                return Err(self.invalid(&format!(
                    "factor {}: not a key of the setup (guest.…, migration.…, receive.…, link, model.…), and its levels are not all {{ value, set }} tables",
                    f.key
                )));
            }
        }
        let known = |k: &str| self.factor(k).is_some();
        for p in &self.plots {
            if !known(&p.x) || p.series.as_deref().is_some_and(|s| !known(s)) {
                return Err(self.invalid(&format!("plot of {} against {}: not a factor", p.y, p.x)));
            }
        }
        for h in &self.heatmaps {
            if !known(&h.x) || !known(&h.y) {
                return Err(self.invalid(&format!("heat map over {}×{}: not factors", h.x, h.y)));
            }
        }
        for cell in self.cells() {
            super::setup::Setup::resolve(&self.setup_of(&cell))
                .map_err(|msg| self.invalid(&format!("cell {}: {msg}", cell.describe())))?;
        }
        Ok(())
    }

    fn invalid(&self, msg: &str) -> ExperimentError {
        ExperimentError::Invalid {
            name: self.name.clone(),
            msg: msg.to_string(),
        }
    }

    /// The factor with this key.
    pub fn factor(&self, key: &str) -> Option<&Factor> {
        self.factors.iter().find(|f| f.key == key)
    }

    /// Every combination of levels, the first factor varying slowest.
    pub fn cells(&self) -> Vec<Cell> {
        let mut combos: Vec<Map<String, Value>> = vec![Map::new()];
        for f in &self.factors {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    f.levels.iter().map(move |l| {
                        let mut c = c.clone();
                        c.insert(f.key.clone(), l.clone());
                        c
                    })
                })
                .collect();
        }
        combos
            .into_iter()
            .enumerate()
            .map(|(index, levels)| Cell { index, levels })
            .collect()
    }

    /// The setup tree with `cell`'s levels substituted.
    pub fn setup_of(&self, cell: &Cell) -> Value {
        let mut tree = serde_json::json!({
            "guest": self.guest,
            "migration": self.migration,
            "receive": self.receive,
            "link": self.link,
            "model": self.model,
        });
        for (key, level) in &cell.levels {
            match bundle(level) {
                Some((_, set)) => {
                    for (k, v) in set {
                        set_path(&mut tree, k, v.clone());
                    }
                }
                None => set_path(&mut tree, key, level.clone()),
            }
        }
        tree
    }

    /// Every run (cell, repetition), in the order they are to run.
    pub fn runs(&self) -> Vec<(Cell, u32)> {
        let mut runs: Vec<(Cell, u32)> = self
            .cells()
            .into_iter()
            .flat_map(|c| (0..self.repetitions).map(move |r| (c.clone(), r)))
            .collect();
        if let Some(seed) = self.seed {
            shuffle(&mut runs, seed);
        }
        runs
    }
}

/// Sets `tree[a][b][c] = value` for the key `a.b.c`, creating tables.
fn set_path(tree: &mut Value, key: &str, value: Value) {
    let mut node = tree;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let map = node.as_object_mut().expect("made an object above");
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return;
        }
        node = map.entry(part).or_insert(Value::Object(Map::new()));
    }
}

/// Fisher–Yates with splitmix64: the same seed gives the same order on
/// every machine and every run, which is what resuming relies on.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
        repetitions = 2
        seed = 3
        [guest]
        memory = "128M"
        workload = { wset = "16M", rate = 1000 }
        [[factors]]
        key = "guest.workload.rate"
        levels = [0, 4000]
        [[factors]]
        key = "migration.mode"
        levels = ["pre", "post"]
    "#;

    #[test]
    fn cells_cover_every_combination_and_runs_every_repetition() {
        let spec: Spec = toml::from_str(SPEC).unwrap();
        let cells = spec.cells();
        assert_eq!(cells.len(), 4);
        assert_eq!(cells[1].describe(), "rate=0 mode=post");
        let runs = spec.runs();
        assert_eq!(runs.len(), 8);
        assert_eq!(runs, spec.runs(), "the same seed gives the same order");
        let tree = spec.setup_of(&cells[3]);
        assert_eq!(tree["guest"]["workload"]["rate"], 4000);
        assert_eq!(tree["guest"]["workload"]["wset"], "16M");
        assert_eq!(tree["migration"]["mode"], "post");
    }

    #[test]
    fn a_json_file_reads_as_a_toml_one_does() {
        let path = std::env::temp_dir().join(format!("vmm-spec-{}.json", std::process::id()));
        let json = r#"{"guest": {"workload": {"wset": "16M"}},
            "factors": [{"key": "migration.mode", "levels": ["pre", "post"]}]}"#;
        std::fs::write(&path, json).unwrap();
        let spec = Spec::load(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(spec.name, path.file_stem().unwrap().to_string_lossy());
        assert_eq!((spec.cells().len(), spec.repetitions), (2, 1));
    }

    #[test]
    fn a_bundle_level_sets_several_keys() {
        let text = r#"
            [[factors]]
            key = "VMSIZE"
            levels = [{ value = 256, set = { "guest.memory" = "256M", "migration.max_bytes" = "768M" } }]
        "#;
        let spec: Spec = toml::from_str(text).unwrap();
        spec.check().unwrap();
        let cell = &spec.cells()[0];
        assert_eq!(cell.describe(), "VMSIZE=256");
        let tree = spec.setup_of(cell);
        assert_eq!(tree["guest"]["memory"], "256M");
        assert_eq!(tree["migration"]["max_bytes"], "768M");
        let typo: Spec =
            toml::from_str("[[factors]]\nkey = \"gest.memory\"\nlevels = [1]").unwrap();
        assert!(typo.check().is_err());
    }
}

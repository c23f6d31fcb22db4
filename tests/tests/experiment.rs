//! `vmm experiment` end to end: a 2 × 2 design with 2 repetitions of tiny
//! guests, run with real processes; its JSON lines, summary and pictures;
//! killed after its first run and resumed without redoing what was done;
//! and the same design over tbf-shaped veth links between namespaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{require_kvm, scratch, vmm_bin};

/// The design: 2 factors × 2 levels × 2 repetitions, 64M guests.
fn design(name: &str, link: &str, factors: &str) -> String {
    format!(
        r#"
name = "{name}"
repetitions = 2
seed = 13
settle_ms = 200
link = "{link}"
[guest]
memory = "64M"
workload = {{ wset = "16M", rate = 2000, fill = 100 }}
[migration]
mode = "pre"
compression = "none"
{factors}
"#
    )
}

const RATE_BY_MODE: &str = r#"
[[factors]]
key = "guest.workload.rate"
levels = [0, 4000]
label = "w (pages/s)"
[[factors]]
key = "migration.mode"
levels = ["pre", "post"]
"#;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line parses"))
        .collect()
}

fn experiment(file: &Path, out: &Path) -> Command {
    let mut c = Command::new(vmm_bin());
    c.arg("experiment")
        .arg(file)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null());
    c
}

/// Counts `tag` elements in an SVG file, after checking it is well-formed XML.
fn count_elements(svg: &Path, tag: &str) -> usize {
    let text = std::fs::read_to_string(svg).expect("reading the SVG");
    let doc =
        roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", svg.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.tag_name().name() == tag)
        .count()
}

/// Each (factors, rep) once: no run was redone.
fn assert_each_run_once(lines: &[Value], runs: usize) {
    let mut keys: Vec<String> = lines
        .iter()
        .map(|l| format!("{}#{}", l["factors"], l["rep"]))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), runs, "distinct runs");
    assert_eq!(lines.len(), runs, "lines: a run was redone or lost");
}

/// Checks what a finished 2 × 2 × 2 experiment left in `out`.
fn assert_outputs(out: &Path) {
    let runs = lines(&out.join("runs.jsonl"));
    assert_each_run_once(&runs, 8);
    for l in &runs {
        assert_eq!(l["ok"], Value::Bool(true), "{l}");
        assert!(l["report"]["total_time_ms"].as_f64().unwrap() > 0.0);
        assert!(l["factors"]["migration.mode"].is_string(), "{l}");
    }
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 5, "a header and 4 cells:\n{csv}");
    assert!(rows[0].contains("downtime_ms_max_min"), "{}", rows[0]);
    assert!(
        rows[1..].iter().all(|r| r.contains(",2,0,")),
        "2 runs, 0 failed:\n{csv}"
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("| max:min |") && md.contains("## bytes_wire"),
        "{md}"
    );
}

/// Checks the pictures of the rate × mode design: two series (pre, post)
/// of two points each, a band each, and the heat map's four cells.
fn assert_pictures(out: &Path, x: &str) {
    for fig in ["total_time_ms", "downtime_ms"] {
        let svg = out.join(format!("{fig}-vs-{x}.svg"));
        assert_eq!(
            count_elements(&svg, "circle"),
            4,
            "{}: points",
            svg.display()
        );
        assert_eq!(
            count_elements(&svg, "polygon"),
            2,
            "{}: bands",
            svg.display()
        );
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.contains("pre (mean") && text.contains("post (mean"),
            "legend"
        );
    }
    let heat = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("downtime_ms-over-")
        })
        .expect("a heat map");
    // The background and the four cells.
    assert_eq!(count_elements(&heat, "rect"), 5, "{}", heat.display());
}

fn wait_for_lines(path: &Path, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while lines_so_far(path) < n {
        assert!(Instant::now() < deadline, "no run finished in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines_so_far(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter(|l| serde_json::from_str::<Value>(l).is_ok())
                .count()
        })
        .unwrap_or(0)
}

/// No `vmm` started for the experiment in `out` outlives it (its
/// children die with it: PR_SET_PDEATHSIG).
fn assert_no_process_left(out: &Path) {
    let mark = out.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&mark))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left running: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_design(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("design.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn an_experiment_runs_is_killed_and_resumes_without_redoing_runs() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("experiment");
    let file = write_design(&dir, &design("loop", "loopback", RATE_BY_MODE));
    let out = dir.join("out");
    let jsonl = out.join("runs.jsonl");
    let mut first = experiment(&file, &out)
        .stderr(Stdio::null())
        .spawn()
        .expect("starting vmm experiment");
    wait_for_lines(&jsonl, 1, Duration::from_secs(60));
    first.kill().unwrap();
    first.wait().unwrap();
    assert_no_process_left(&out);
    let before = lines(&jsonl);
    assert!(
        !before.is_empty() && before.len() < 8,
        "killed midway: {} lines",
        before.len()
    );
    let resumed = experiment(&file, &out).output().unwrap();
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{} runs recorded, {} to run",
            before.len(),
            8 - before.len()
        )),
        "{err}"
    );
    let after = lines(&jsonl);
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "finished runs kept as they were"
    );
    assert_outputs(&out);
    assert_pictures(&out, "rate");
    // Nothing is left to do: a third start runs nothing.
    let again = experiment(&file, &out).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("8 runs recorded, 0 to run"));
    assert_eq!(lines(&jsonl).len(), 8);
    // `vmm plot` redraws one picture on demand.
    let plot = Command::new(vmm_bin())
        .args(["plot"])
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .args(["--x", "guest.workload.rate", "--y", "bytes_wire"])
        .output()
        .unwrap();
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
    assert_eq!(
        count_elements(&out.join("bytes_wire-vs-rate.svg"), "circle"),
        2
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failed_run_is_recorded_and_the_experiment_goes_on() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("experiment-fail");
    // `vmm migrate` refuses a downtime of "soon": that run fails, the
    // other one runs.
    let factors = r#"
[[factors]]
key = "migration.max_downtime"
levels = ["soon", "50ms"]
"#;
    let file = write_design(
        &dir,
        &design("fail", "loopback", factors).replace("repetitions = 2", "repetitions = 1"),
    );
    let out = dir.join("out");
    let run = experiment(&file, &out).output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    let runs = lines(&out.join("runs.jsonl"));
    assert_eq!(runs.len(), 2, "{err}");
    let failed: Vec<&Value> = runs
        .iter()
        .filter(|l| l["ok"] == Value::Bool(false))
        .collect();
    let ok = runs.len() - failed.len();
    eprintln!("{err}");
    assert!(ok >= 1, "{err}");
    for l in failed {
        assert!(l["error"].as_str().is_some_and(|e| !e.is_empty()), "{l}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_experiment_over_tbf_shaped_links() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("experiment-tbf");
    let factors = r#"
[[factors]]
key = "link"
levels = ["tbf:100mbit", "tbf:400mbit"]
label = "link rate (Mbit/s)"
[[factors]]
key = "migration.mode"
levels = ["pre", "post"]
"#;
    let file = write_design(&dir, &design("tbf", "loopback", factors));
    let out = dir.join("out");
    let run = experiment(&file, &out).output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    let runs = lines(&out.join("runs.jsonl"));
    if runs.iter().any(|l| {
        l["error"]
            .as_str()
            .is_some_and(|e| e.contains("ip netns") || e.contains("tc "))
    }) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot build the test network on CI: {err}"
        );
        eprintln!("skipping: cannot build the test network here: {err}");
        return;
    }
    assert!(run.status.success(), "{err}");
    assert_outputs(&out);
    assert_pictures(&out, "link");
    // The shaping held: no pre-copy round 0 beat its link (MB/s), and the
    // slower link took longer.
    for l in &runs {
        let link = l["factors"]["link"].as_str().unwrap();
        let cap = if link == "tbf:100mbit" { 12.5 } else { 50.0 };
        if l["factors"]["migration.mode"] == "pre" {
            let mbps = l["report"]["rounds"][0]["bandwidth_mb_s"].as_f64().unwrap();
            assert!(mbps < cap * 1.05, "{link}: round 0 at {mbps} MB/s");
        }
    }
    let tm = |link: &str| -> f64 {
        runs.iter()
            .filter(|l| l["factors"]["link"] == link)
            .map(|l| l["report"]["total_time_ms"].as_f64().unwrap())
            .sum()
    };
    assert!(
        tm("tbf:100mbit") > tm("tbf:400mbit"),
        "the slower link was not slower"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_shipped_experiments_parse_and_list_their_runs() {
    let dir = scratch("experiment-shipped");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    for (file, runs) in [
        ("seed001-fig2-3.toml", 54),
        ("seed001-fig2-3-reduced.toml", 9),
        ("seed002-table2.toml", 210),
        ("seed002-table2-reduced.toml", 12),
    ] {
        let out = experiment(&shipped.join(file), &dir.join(file))
            .arg("--dry-run")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {err}");
        assert!(
            err.contains(&format!("0 runs recorded, {runs} to run")),
            "{file}: {err}"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            runs,
            "{file}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stopped_with_sigterm_it_ends_its_processes_and_removes_its_link() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("experiment-term");
    let factors = r#"
[[factors]]
key = "migration.mode"
levels = ["pre", "post"]
"#;
    let text = design("term", "tbf:200mbit", factors).replace("repetitions = 2", "repetitions = 3");
    let file = write_design(&dir, &text);
    let out = dir.join("out");
    let jsonl = out.join("runs.jsonl");
    let child = experiment(&file, &out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting vmm experiment");
    wait_for_lines(&jsonl, 1, Duration::from_secs(60));
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    if err.contains("ip netns") || err.contains("tc ") {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{err}");
        eprintln!("skipping: cannot build the test network here: {err}");
        return;
    }
    assert!(output.status.success(), "{err}");
    assert!(err.contains("stopped; the runs recorded stay in"), "{err}");
    assert_no_process_left(&out);
    // Its own namespace (other tests may run theirs meanwhile).
    let ns = err
        .split_whitespace()
        .find(|w| w.starts_with("vmmexp"))
        .expect("the experiment names its namespace");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&netns.stdout).into_owned();
    assert!(
        !left.split_whitespace().any(|w| w == ns),
        "namespace {ns} left behind: {left}"
    );
    let recorded = lines(&jsonl).len();
    assert!((1..6).contains(&recorded), "{recorded} runs recorded");
    let _ = std::fs::remove_dir_all(dir);
}

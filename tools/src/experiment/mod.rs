//! `vmm experiment FILE` and `vmm plot FILE`: declared experiments over
//! real migrations, and their pictures.
//!
//! Why a command and not another `cargo bench`: an experiment is data (a
//! file that can be shared, reviewed and rerun), it may take hours, and it
//! must survive being stopped. So every run's report is appended to a
//! JSON-lines file as soon as it ends, and that file is the only state:
//! rerunning the same command skips the runs it already holds. The summary
//! and the pictures are derived from it, and `vmm plot` redraws them.
//!
//! Output, under `--out` (default `target/experiments/NAME/`):
//! `runs.jsonl`, `summary.csv`, `summary.md`, and SVG pictures.

mod plot;
mod runner;
mod setup;
mod spec;
mod summary;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use spec::{HeatMap, LinePlot, Spec};
use summary::Line;

/// Why an experiment could not run (a failed *run* is no error: it is
/// recorded, and the experiment goes on).
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("experiment {name}: {msg}")]
    Invalid { name: String, msg: String },
    #[error("drawing {}: {msg}", path.display())]
    Plot { path: PathBuf, msg: String },
}

/// Arguments of `vmm experiment`.
#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// The experiment file (TOML, or JSON by its extension).
    file: PathBuf,
    /// Output directory (default: target/experiments/NAME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run again the runs recorded as failed (they are skipped otherwise).
    #[arg(long)]
    retry_failed: bool,
    /// List the runs still to do, in order, and stop.
    #[arg(long)]
    dry_run: bool,
    /// Render each SVG to PNG as well (with rsvg-convert, if installed).
    #[arg(long)]
    png: bool,
}

/// Arguments of `vmm plot`.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// The experiment file whose runs to draw.
    file: PathBuf,
    /// Output directory of the experiment (default: target/experiments/NAME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw only this: a factor key for the x axis...
    #[arg(long, requires = "y")]
    x: Option<String>,
    /// ... and a report figure (total_time_ms, downtime_ms, ...).
    #[arg(long, requires = "x")]
    y: Option<String>,
    /// One line per level of this factor.
    #[arg(long, requires = "x")]
    series: Option<String>,
    /// Render each SVG to PNG as well (with rsvg-convert, if installed).
    #[arg(long)]
    png: bool,
}

fn out_dir(spec: &Spec, out: Option<PathBuf>) -> PathBuf {
    out.unwrap_or_else(|| Path::new("target/experiments").join(&spec.name))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ExperimentError {
    move |source| ExperimentError::Io { what, source }
}

/// `vmm experiment FILE`.
pub fn experiment(args: ExperimentArgs) -> Result<(), String> {
    run_experiment(args).map_err(|e| e.to_string())
}

fn run_experiment(args: ExperimentArgs) -> Result<(), ExperimentError> {
    let spec = Spec::load(&args.file)?;
    let out = out_dir(&spec, args.out);
    std::fs::create_dir_all(&out).map_err(io_err(format!("creating {}", out.display())))?;
    let jsonl = out.join("runs.jsonl");
    let done = summary::read_lines(&jsonl)?;
    let todo: Vec<_> = spec
        .runs()
        .into_iter()
        .filter(|(c, rep)| {
            !done
                .iter()
                .any(|l| l.is_run(&c.levels, *rep) && (l.ok || !args.retry_failed))
        })
        .collect();
    let total = spec.cells().len() * spec.repetitions as usize;
    eprintln!(
        "experiment {}: {} cells × {} repetitions; {} runs recorded, {} to run; output in {}",
        spec.name,
        spec.cells().len(),
        spec.repetitions,
        total - todo.len(),
        todo.len(),
        out.display()
    );
    if args.dry_run {
        for (c, rep) in &todo {
            println!("cell {} rep {rep}: {}", c.index, c.describe());
        }
        return Ok(());
    }
    let stop = crate::signals::Termination::install_saying(
        "stopping once the current run's processes are ended (run the same command to resume)",
        |_| {},
    )
    .map_err(|e| ExperimentError::Invalid {
        name: spec.name.clone(),
        msg: e.to_string(),
    })?;
    let stopped = stop.clone();
    let runner = runner::Runner {
        vmm: std::env::current_exe().map_err(io_err("finding the vmm binary".into()))?,
        work: out.join("work"),
        net_id: net_id(&out),
        settle: Duration::from_millis(spec.settle_ms),
        timeout: Duration::from_secs(spec.timeout_s),
        interrupted: Box::new(move || stopped.received().is_some()),
    };
    eprintln!(
        "shaped links (tbf) run through network namespace {}",
        runner::Netns::name(runner.net_id)
    );
    let mut progress = Progress::new(todo.len());
    for (cell, rep) in todo {
        let tree = spec.setup_of(&cell);
        let setup = setup::Setup::resolve(&tree).map_err(|msg| ExperimentError::Invalid {
            name: spec.name.clone(),
            msg,
        })?;
        progress.starting(&format!(
            "cell {} rep {rep}: {}",
            cell.index,
            cell.describe()
        ));
        let started = Instant::now();
        let result = runner.run(&setup);
        if stop.received().is_some() {
            // The interrupted run is not recorded: it runs on resume.
            progress.done();
            eprintln!("stopped; the runs recorded stay in {}", jsonl.display());
            return Ok(());
        }
        let line = Line {
            experiment: spec.name.clone(),
            cell: cell.index,
            rep,
            factors: cell.levels.clone(),
            ok: result.is_ok(),
            error: result.as_ref().err().cloned(),
            report: result.unwrap_or(Value::Null),
            model: setup.predict().and_then(|p| serde_json::to_value(p).ok()),
            elapsed_s: started.elapsed().as_secs_f64(),
            finished_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        summary::append_line(&jsonl, &line)?;
        progress.finished(
            &line,
            &format!("cell {} rep {rep}: {}", cell.index, cell.describe()),
        );
    }
    progress.done();
    let _ = std::fs::remove_dir_all(&runner.work);
    write_outputs(&spec, &out, None, args.png)
}

/// A namespace id stable for one output directory, so that a resumed
/// run finds (and removes) what a killed one left.
fn net_id(out: &Path) -> u32 {
    let path = out.canonicalize().unwrap_or_else(|_| out.to_path_buf());
    let h = path
        .to_string_lossy()
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    h % 10_000
}

/// `vmm plot FILE`: redraws the summary and pictures from the runs file.
pub fn plot(args: PlotArgs) -> Result<(), String> {
    let spec = Spec::load(&args.file).map_err(|e| e.to_string())?;
    let out = out_dir(&spec, args.out);
    let only = args.x.zip(args.y).map(|(x, y)| LinePlot {
        x,
        y,
        series: args.series,
        model: true,
    });
    write_outputs(&spec, &out, only, args.png).map_err(|e| e.to_string())
}

/// The summary (CSV, Markdown) and the pictures, from `runs.jsonl`.
fn write_outputs(
    spec: &Spec,
    out: &Path,
    only: Option<LinePlot>,
    png: bool,
) -> Result<(), ExperimentError> {
    let lines = summary::read_lines(&out.join("runs.jsonl"))?;
    let rows = summary::rows(spec, &lines);
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(io_err(format!("writing {}", p.display())))
    };
    write("summary.csv", summary::csv(spec, &rows))?;
    write("summary.md", summary::markdown(spec, &rows))?;
    let (plots, heatmaps) = match only {
        Some(p) => (vec![p], vec![]),
        None => (line_plots(spec), heat_maps(spec)),
    };
    for p in &plots {
        let file = out.join(format!("{}-vs-{}.svg", p.y, spec::short_key(&p.x)));
        let d = plot::line_plot(spec, &lines, p, &file)?;
        eprintln!(
            "drawn {}: {} series, {} points, {} model curves",
            file.display(),
            d.series,
            d.points,
            d.model_curves
        );
        if png {
            render_png(&file);
        }
    }
    for h in &heatmaps {
        let file = out.join(format!(
            "{}-over-{}-{}.svg",
            h.value,
            spec::short_key(&h.x),
            spec::short_key(&h.y)
        ));
        let n = plot::heat_map(spec, &lines, h, &file)?;
        eprintln!("drawn {}: {n} cells", file.display());
        if png {
            render_png(&file);
        }
    }
    eprintln!("summary: {}", out.join("summary.md").display());
    Ok(())
}

/// Renders `svg` to a PNG beside it with rsvg-convert (librsvg2-bin):
/// plotters' own bitmap backend would need the host's fonts, SVG leaves
/// the text to the renderer. A missing tool is a warning, not a failure.
fn render_png(svg: &Path) {
    let png = svg.with_extension("png");
    let done = std::process::Command::new("rsvg-convert")
        .arg(svg)
        .arg("-o")
        .arg(&png)
        .status();
    match done {
        Ok(st) if st.success() => eprintln!("rendered {}", png.display()),
        Ok(st) => eprintln!("warning: rsvg-convert {} failed: {st}", svg.display()),
        Err(e) => eprintln!("warning: no PNG: rsvg-convert (package librsvg2-bin): {e}"),
    }
}

/// The declared line plots, or Tm and Td against each numeric factor,
/// one line per level of the next factor.
fn line_plots(spec: &Spec) -> Vec<LinePlot> {
    if !spec.plots.is_empty() {
        return spec.plots.clone();
    }
    let numeric = |f: &&spec::Factor| f.levels.iter().all(|l| plot::level_number(l).is_some());
    let mut plots = Vec::new();
    for (i, f) in spec.factors.iter().enumerate().filter(|(_, f)| numeric(f)) {
        let series = spec
            .factors
            .iter()
            .enumerate()
            .find(|(j, _)| *j != i)
            .map(|(_, s)| s.key.clone());
        for y in ["total_time_ms", "downtime_ms"] {
            plots.push(LinePlot {
                x: f.key.clone(),
                y: y.into(),
                series: series.clone(),
                model: true,
            });
        }
    }
    plots
}

/// The declared heat maps, or Td over the first two factors.
fn heat_maps(spec: &Spec) -> Vec<HeatMap> {
    if !spec.heatmaps.is_empty() || spec.factors.len() < 2 {
        return spec.heatmaps.clone();
    }
    vec![HeatMap {
        x: spec.factors[0].key.clone(),
        y: spec.factors[1].key.clone(),
        value: "downtime_ms".into(),
    }]
}

/// Progress with an ETA: a bar on a terminal, else one line per run.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    total: usize,
    finished: usize,
}

impl Progress {
    fn new(total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("[{pos}/{len}] {wide_msg} ETA {eta}")
                    .expect("valid template"),
            );
            b
        });
        Self {
            bar,
            started: Instant::now(),
            total,
            finished: 0,
        }
    }

    fn starting(&self, what: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("running {what}"));
        }
    }

    /// The time left, from the mean time of the runs done so far.
    fn eta(&self) -> Duration {
        let each = self.started.elapsed().as_secs_f64() / self.finished.max(1) as f64;
        Duration::from_secs_f64(each * (self.total - self.finished) as f64)
    }

    fn finished(&mut self, line: &Line, what: &str) {
        self.finished += 1;
        let outcome = match &line.error {
            None => format!(
                "Tm {:.2} s, Td {:.1} ms, guest Td {:.1} ms, {:.1} MB",
                line.figure("total_time_ms").unwrap_or(f64::NAN) / 1e3,
                line.figure("downtime_ms").unwrap_or(f64::NAN),
                line.figure("guest_downtime_ms").unwrap_or(f64::NAN),
                line.figure("bytes_wire").unwrap_or(f64::NAN) / 1e6
            ),
            Some(e) => format!("FAILED: {e}"),
        };
        let eta = self.eta().as_secs();
        let text = format!(
            "[{}/{}] {what}: {outcome} ({:.1} s; ETA {}:{:02})",
            self.finished,
            self.total,
            line.elapsed_s,
            eta / 60,
            eta % 60
        );
        match &self.bar {
            Some(b) => {
                b.println(text);
                b.inc(1);
            }
            None => eprintln!("{text}"),
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

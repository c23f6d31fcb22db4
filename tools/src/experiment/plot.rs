//! Pictures of an experiment, drawn as SVG with plotters (SVG needs no
//! fonts on the host: text stays text for the viewer to draw).
//!
//! - A line plot: a figure against a numeric factor, one line per level of
//!   another factor, the mean of the repetitions as points on a line, their
//!   min–max as a shaded band and, where seed 001's model applies (mode
//!   pre, post or hybrid with r, w and μ known), the model's curve dashed
//!   in the same colour: measurement and theory on the same axes.
//! - A heat map: a figure's mean over two factors, seed 002's figures.

use std::path::Path;

use plotters::prelude::*;
use serde_json::{Map, Value};

use super::setup::Setup;
use super::spec::{plain, Cell, HeatMap, LinePlot, Spec};
use super::summary::{Line, Stats};
use super::ExperimentError;

/// How a figure is shown: axis label and the factor from its unit.
fn figure_axis(figure: &str) -> (String, f64) {
    match figure {
        "total_time_ms" => ("migration time Tm (s)".into(), 1e-3),
        "downtime_ms" => ("downtime Td (ms)".into(), 1.0),
        "guest_downtime_ms" => ("downtime the guest saw (ms)".into(), 1.0),
        "bytes_wire" => ("bytes on the wire (MB)".into(), 1e-6),
        other => (other.to_string(), 1.0),
    }
}

/// The model's value of a figure, in the figure's own unit (ms, bytes).
fn model_figure(figure: &str, setup: &Setup) -> Option<f64> {
    let p = setup.predict()?;
    match figure {
        "total_time_ms" => p.tm_s.map(|s| s * 1e3),
        "downtime_ms" | "guest_downtime_ms" => Some(p.td_s * 1e3),
        _ => None,
    }
}

/// A level as a number on an axis: numbers as they are, sizes in MiB,
/// tbf links in Mbit/s.
pub fn level_number(v: &Value) -> Option<f64> {
    if let Some((value, _)) = super::spec::bundle(v) {
        return level_number(value);
    }
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    let s = v.as_str()?;
    if let Some(rate) = s.strip_prefix("tbf:") {
        return migration::rate_limit::parse_bandwidth(rate)
            .ok()
            .map(|b| b as f64 * 8.0 / 1e6);
    }
    s.parse()
        .ok()
        .or_else(|| Some(vmm::config::parse_size(s).ok()? as f64 / 1048576.0))
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::Plot {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Series colours that stay apart on white and in grey print.
const SERIES_COLORS: [RGBColor; 6] = [
    RGBColor(213, 62, 79),
    RGBColor(50, 136, 189),
    RGBColor(26, 152, 80),
    RGBColor(153, 112, 171),
    RGBColor(244, 109, 67),
    RGBColor(90, 90, 90),
];

/// One measured series: (x, mean, min, max) per level of x.
struct Series {
    name: String,
    points: Vec<(f64, f64, f64, f64)>,
    model: Vec<(f64, f64)>,
}

/// The figure's values (scaled) in the runs matching `levels`.
fn values(lines: &[Line], levels: &Map<String, Value>, figure: &str, scale: f64) -> Vec<f64> {
    lines
        .iter()
        .filter(|l| l.ok && levels.iter().all(|(k, v)| l.factors.get(k) == Some(v)))
        .filter_map(|l| l.figure(figure))
        .map(|v| v * scale)
        .collect()
}

/// The model along x: sampled finely when x's levels are plain numbers,
/// at the levels otherwise; other factors at `fixed`, or their first level.
fn model_curve(
    spec: &Spec,
    plot: &LinePlot,
    fixed: &Map<String, Value>,
    scale: f64,
) -> Vec<(f64, f64)> {
    let Some(xf) = spec.factor(&plot.x) else {
        return Vec::new();
    };
    let xs: Vec<Value> = if xf.levels.iter().all(Value::is_number) {
        let nums: Vec<f64> = xf.levels.iter().filter_map(Value::as_f64).collect();
        let (lo, hi) = (
            nums.iter().copied().fold(f64::MAX, f64::min),
            nums.iter().copied().fold(f64::MIN, f64::max),
        );
        (0..=80)
            .map(|i| Value::from(lo + (hi - lo) * i as f64 / 80.0))
            .collect()
    } else {
        xf.levels.clone()
    };
    xs.into_iter()
        .filter_map(|x| {
            let mut levels: Map<String, Value> = spec
                .factors
                .iter()
                .map(|f| {
                    (
                        f.key.clone(),
                        fixed.get(&f.key).unwrap_or(&f.levels[0]).clone(),
                    )
                })
                .collect();
            levels.insert(plot.x.clone(), x.clone());
            let tree = spec.setup_of(&Cell { index: 0, levels });
            let setup = Setup::resolve(&tree).ok()?;
            Some((level_number(&x)?, model_figure(&plot.y, &setup)? * scale))
        })
        .collect()
}

fn series(spec: &Spec, lines: &[Line], plot: &LinePlot, scale: f64) -> Result<Vec<Series>, String> {
    let xf = spec.factor(&plot.x).ok_or("x is not a factor")?;
    let groups: Vec<(String, Map<String, Value>)> =
        match plot.series.as_deref().and_then(|s| spec.factor(s)) {
            Some(sf) => sf
                .levels
                .iter()
                .map(|l| (plain(l), Map::from_iter([(sf.key.clone(), l.clone())])))
                .collect(),
            None => vec![("measured".into(), Map::new())],
        };
    groups
        .into_iter()
        .map(|(name, fixed)| {
            let mut points = Vec::new();
            for level in &xf.levels {
                let x = level_number(level)
                    .ok_or_else(|| format!("level {level} of {} is not a number", xf.key))?;
                let mut at = fixed.clone();
                at.insert(xf.key.clone(), level.clone());
                if let Some(s) = Stats::of(&values(lines, &at, &plot.y, scale)) {
                    points.push((x, s.mean, s.min, s.max));
                }
            }
            let model = if plot.model {
                model_curve(spec, plot, &fixed, scale)
            } else {
                Vec::new()
            };
            Ok(Series {
                name,
                points,
                model,
            })
        })
        .collect()
}

/// What a drawn line plot holds, for the caller (and the tests) to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drawn {
    pub series: usize,
    pub points: usize,
    pub model_curves: usize,
}

/// Draws `plot` from `lines` into the SVG file `path`.
pub fn line_plot(
    spec: &Spec,
    lines: &[Line],
    plot: &LinePlot,
    path: &Path,
) -> Result<Drawn, ExperimentError> {
    let (y_label, scale) = figure_axis(&plot.y);
    let all = series(spec, lines, plot, scale).map_err(|e| plot_err(path, e))?;
    let x_label = spec.factor(&plot.x).map_or(plot.x.clone(), |f| f.label());
    let xs = all.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (x0, x1) = if x0 > x1 {
        (0.0, 1.0)
    } else if x0 == x1 {
        (x0 - 1.0, x1 + 1.0)
    } else {
        (x0, x1)
    };
    let measured_max = all
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.3))
        .fold(0.0, f64::max);
    let model_max = all
        .iter()
        .flat_map(|s| s.model.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    // The model may run off to infinity (pre-copy as w → μ): keep the
    // measurement readable, and clip the model at three times its top.
    let top = if measured_max > 0.0 {
        measured_max.max(model_max.min(3.0 * measured_max))
    } else {
        model_max.max(1.0)
    };
    let y1 = top * 1.1;
    let root = SVGBackend::new(path, (720, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let title = format!("{}: {}", spec.name, y_label);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let mut drawn = Drawn {
        series: 0,
        points: 0,
        model_curves: 0,
    };
    for (i, s) in all.iter().enumerate() {
        let color = SERIES_COLORS[i % SERIES_COLORS.len()].to_rgba();
        draw_band(&mut chart, s, color).map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|e| plot_err(path, e))?
            .label(format!("{} (mean, min–max band)", s.name))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled()));
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
            )
            .map_err(|e| plot_err(path, e))?;
        drawn.series += 1;
        drawn.points += s.points.len();
        let model: Vec<(f64, f64)> = s.model.iter().copied().filter(|p| p.1 <= y1).collect();
        if model.len() >= 2 {
            chart
                .draw_series(DashedLineSeries::new(model, 6, 4, color.stroke_width(1)))
                .map_err(|e| plot_err(path, e))?
                .label(format!("{}: seed 001's model", s.name))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(1))
                });
            drawn.model_curves += 1;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(drawn)
}

type Chart<'a> = ChartContext<
    'a,
    SVGBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The min–max band of a series, as one translucent polygon.
fn draw_band(chart: &mut Chart<'_>, s: &Series, color: RGBAColor) -> Result<(), String> {
    if s.points.len() < 2 {
        return Ok(());
    }
    let mut outline: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, p.3)).collect();
    outline.extend(s.points.iter().rev().map(|p| (p.0, p.2)));
    chart
        .draw_series(std::iter::once(Polygon::new(
            outline,
            color.mix(0.2).filled(),
        )))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Viridis-like: dark blue for the least, yellow for the most.
fn heat_color(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 5] = [
        (68, 1, 84),
        (59, 82, 139),
        (33, 145, 140),
        (94, 201, 98),
        (253, 231, 37),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Draws `map` (the mean of a figure over two factors) into `path`;
/// returns the number of cells with a value.
pub fn heat_map(
    spec: &Spec,
    lines: &[Line],
    map: &HeatMap,
    path: &Path,
) -> Result<usize, ExperimentError> {
    let (xf, yf) = match (spec.factor(&map.x), spec.factor(&map.y)) {
        (Some(x), Some(y)) => (x, y),
        _ => return Err(plot_err(path, "heat map axes must be factors")),
    };
    let (label, scale) = figure_axis(&map.value);
    let (mut cells, mut failed) = (Vec::new(), Vec::new());
    for (i, xl) in xf.levels.iter().enumerate() {
        for (j, yl) in yf.levels.iter().enumerate() {
            let at = Map::from_iter([(xf.key.clone(), xl.clone()), (yf.key.clone(), yl.clone())]);
            match Stats::of(&values(lines, &at, &map.value, scale)) {
                Some(s) => cells.push((i, j, s.mean)),
                None if lines
                    .iter()
                    .any(|l| at.iter().all(|(k, v)| l.factors.get(k) == Some(v))) =>
                {
                    failed.push((i as u32, j as u32));
                }
                None => {}
            }
        }
    }
    let (lo, hi) = cells
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), c| (a.min(c.2), b.max(c.2)));
    // Integer axes on a doubled grid: cell i spans [2i, 2i+2], its label
    // sits at 2i+1 (plotters formats integer key points, not f64 ones).
    let (nx, ny) = (xf.levels.len() as u32, yf.levels.len() as u32);
    let root = SVGBackend::new(path, (640, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let centres = |n: u32| (0..n).map(|i| 2 * i + 1).collect::<Vec<_>>();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: mean {label}", spec.name), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (0..2 * nx).with_key_points(centres(nx)),
            (0..2 * ny).with_key_points(centres(ny)),
        )
        .map_err(|e| plot_err(path, e))?;
    let name_of =
        |levels: &[Value], v: u32| levels.get(v as usize / 2).map(plain).unwrap_or_default();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(xf.label())
        .y_desc(yf.label())
        .x_label_formatter(&|v| name_of(&xf.levels, *v))
        .y_label_formatter(&|v| name_of(&yf.levels, *v))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let t = |v: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    chart
        .draw_series(cells.iter().map(|&(i, j, v)| {
            let (x, y) = (2 * i as u32, 2 * j as u32);
            Rectangle::new([(x, y), (x + 2, y + 2)], heat_color(t(v)).filled())
        }))
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(cells.iter().map(|&(i, j, v)| {
            let color = if t(v) > 0.6 { BLACK } else { WHITE };
            let at = (2 * i as u32 + 1, 2 * j as u32 + 1);
            Text::new(
                format!("{v:.1}"),
                at,
                ("sans-serif", 15).into_font().color(&color),
            )
        }))
        .map_err(|e| plot_err(path, e))?;
    // Cells whose every run failed: grey, and said so.
    let grey = RGBColor(200, 200, 200);
    chart
        .draw_series(
            failed.iter().map(|&(i, j)| {
                Rectangle::new([(2 * i, 2 * j), (2 * i + 2, 2 * j + 2)], grey.filled())
            }),
        )
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(failed.iter().map(|&(i, j)| {
            Text::new(
                "failed",
                (2 * i + 1, 2 * j + 1),
                ("sans-serif", 15).into_font(),
            )
        }))
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(cells.len())
}

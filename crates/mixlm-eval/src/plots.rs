//! Report figures as PNG and SVG: line panels (validation loss per domain over
//! tokens, proportion trajectories) and grouped bars (per-domain perplexity).
//!
//! Drawn with plotters and a font compiled into the binary (an ASCII subset of DejaVu
//! Sans, 11 KB, `assets/`), so a figure renders the same on a headless GPU node
//! without system fonts. Callers hand over plain series; nothing here knows about
//! runs or methods. Files are written to a temporary name and renamed, so a report
//! never points to half a picture.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// Matplotlib's "tab10": distinct, colour-blind friendlier than plotters' palette.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of the `i`-th series, the same in every figure of a report.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One line: `(x, y)` points in drawing order; non-finite `y` are skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a [`LineFigure`].
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Panels side by side with shared axis names and one legend for all of them (series
/// with the same label have the same colour in every panel).
#[derive(Debug, Clone, PartialEq)]
pub struct LineFigure {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub panels: Vec<Panel>,
    /// Fix the y axis to this range (e.g. `0..1` for proportions); else fitted.
    pub y_range: Option<(f64, f64)>,
}

/// Grouped bars: for every group (domain), one bar per series (method).
#[derive(Debug, Clone, PartialEq)]
pub struct BarFigure {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<String>,
    /// `(label, one value per group)`.
    pub series: Vec<(String, Vec<f64>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw {path}: {message}")]
    Draw { path: String, message: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Empty(String),
}

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font (checked by a test); plotters keeps the
        // first registration.
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// Tokens and other counts as axis labels: 0, 950, 12k, 3.5M, 1.2B.
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    let (x, unit) = if a >= 1e9 {
        (v / 1e9, "B")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{x:.1}");
    let s = s.strip_suffix(".0").unwrap_or(&s);
    format!("{s}{unit}")
}

/// Writes `<stem>.png` and `<stem>.svg`; returns their paths.
pub fn write_lines(stem: &Path, figure: &LineFigure) -> Result<[PathBuf; 2], PlotError> {
    if figure.panels.iter().all(|p| p.series.is_empty()) {
        return Err(PlotError::Empty(format!(
            "{}: no data to plot",
            stem.display()
        )));
    }
    let (rows, cols) = grid(figure.panels.len());
    let size = (cols as u32 * 460, rows as u32 * 320 + 90);
    render(stem, size, Figure::Lines(figure))
}

/// Writes `<stem>.png` and `<stem>.svg`; returns their paths.
pub fn write_bars(stem: &Path, figure: &BarFigure) -> Result<[PathBuf; 2], PlotError> {
    if figure.groups.is_empty() || figure.series.is_empty() {
        return Err(PlotError::Empty(format!(
            "{}: no data to plot",
            stem.display()
        )));
    }
    let width = (180 + figure.groups.len() * (30 + 14 * figure.series.len())).max(640) as u32;
    render(stem, (width, 440), Figure::Bars(figure))
}

enum Figure<'a> {
    Lines(&'a LineFigure),
    Bars(&'a BarFigure),
}

impl Figure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        match self {
            Figure::Lines(f) => draw_lines(root, f),
            Figure::Bars(f) => draw_bars(root, f),
        }
    }
}

/// Draws one picture onto a bitmap and an SVG backend.
fn render(stem: &Path, size: (u32, u32), figure: Figure) -> Result<[PathBuf; 2], PlotError> {
    register();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let draw_err = |path: &Path, message: String| PlotError::Draw {
        path: path.display().to_string(),
        message,
    };
    if let Some(parent) = png.parent() {
        std::fs::create_dir_all(parent).map_err(|source| PlotError::Io {
            path: parent.display().to_string(),
            source,
        })?;
    }
    // The image encoder picks the format from the extension: keep `.png` last.
    let tmp = stem.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        figure.draw(&root).map_err(|m| draw_err(&png, m))?;
        root.present().map_err(|e| draw_err(&png, e.to_string()))?;
    }
    rename(&tmp, &png)?;
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        figure.draw(&root).map_err(|m| draw_err(&svg, m))?;
        root.present().map_err(|e| draw_err(&svg, e.to_string()))?;
    }
    let tmp = stem.with_extension("tmp.svg");
    std::fs::write(&tmp, text).map_err(|source| PlotError::Io {
        path: tmp.display().to_string(),
        source,
    })?;
    rename(&tmp, &svg)?;
    Ok([png, svg])
}

/// Moves a finished temporary file into place, flushed to disk first so a crash
/// right after cannot leave an empty or partial figure under the final name.
fn rename(from: &Path, to: &Path) -> Result<(), PlotError> {
    std::fs::File::open(from)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::rename(from, to))
        .map_err(|source| PlotError::Io {
            path: to.display().to_string(),
            source,
        })
}

type DrawResult = Result<(), String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Range of the finite values, padded by 5% (a flat series gets a unit band).
fn fitted_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad, hi + pad)
}

/// A legend strip: coloured marks and labels in a row, wrapping when full.
fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, labels: &[String]) -> DrawResult {
    let style = TextStyle::from((FAMILY, 15).into_font());
    let (width, _) = area.dim_in_pixel();
    let (mut x, mut y) = (20i32, 8i32);
    for (i, label) in labels.iter().enumerate() {
        let text_w = area
            .estimate_text_size(label, &style)
            .map_or(9 * label.len() as u32, |(w, _)| w);
        let w = 46 + text_w as i32;
        if x + w > width as i32 && x > 20 {
            x = 20;
            y += 22;
        }
        area.draw(&Rectangle::new(
            [(x, y + 4), (x + 22, y + 12)],
            color(i).filled(),
        ))
        .map_err(err)?;
        area.draw_text(label, &style, (x + 28, y)).map_err(err)?;
        x += w;
    }
    Ok(())
}

/// The chart area and the legend strip of a picture.
type Areas<DB> = (DrawingArea<DB, Shift>, DrawingArea<DB, Shift>);

/// A white picture with `title` on top: its chart area and the legend strip below.
fn frame<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
) -> Result<Areas<DB>, String> {
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, (FAMILY, 22).into_font()).map_err(err)?;
    let (_, height) = root.dim_in_pixel();
    Ok(root.split_vertically(height.saturating_sub(52)))
}

/// `(rows, cols)` of a panel grid: at most three panels a row.
fn grid(panels: usize) -> (usize, usize) {
    let cols = panels.clamp(1, 3);
    (panels.div_ceil(cols), cols)
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, f: &LineFigure) -> DrawResult {
    let (charts, legend) = frame(root, &f.title)?;
    // One colour per label across panels, in order of first appearance.
    let mut labels: Vec<String> = Vec::new();
    for s in f.panels.iter().flat_map(|p| &p.series) {
        if !labels.contains(&s.label) {
            labels.push(s.label.clone());
        }
    }
    let (rows, cols) = grid(f.panels.len());
    let x_fmt = |v: &f64| short_number(*v);
    for (panel, area) in f.panels.iter().zip(charts.split_evenly((rows, cols))) {
        let points = || panel.series.iter().flat_map(|s| s.points.iter());
        let x_max = points().map(|p| p.0).fold(0.0f64, f64::max).max(1.0);
        let x_min = points().map(|p| p.0).fold(x_max, f64::min).min(0.0);
        let (y0, y1) = f
            .y_range
            .unwrap_or_else(|| fitted_range(points().map(|p| p.1)));
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, (FAMILY, 17).into_font())
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(52)
            .build_cartesian_2d(x_min..x_max, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(&f.x_label)
            .y_desc(&f.y_label)
            .x_labels(5)
            .y_labels(6)
            .x_label_formatter(&x_fmt)
            .label_style((FAMILY, 12).into_font())
            .axis_desc_style((FAMILY, 13).into_font())
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for s in &panel.series {
            let i = labels.iter().position(|l| l == &s.label).unwrap_or(0);
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color(i).stroke_width(2)))
                .map_err(err)?;
        }
    }
    draw_legend(&legend, &labels)
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, f: &BarFigure) -> DrawResult {
    let (chart_area, legend) = frame(root, &f.title)?;
    let n = f.groups.len();
    let top = f
        .series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.08;
    // Groups sit at integers; labels are asked for every half unit so the integers
    // are among them, and only those are named.
    let names = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            f.groups[i as usize].clone()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(&chart_area)
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n + 1)
        .x_label_formatter(&names)
        .y_desc(&f.y_label)
        .label_style((FAMILY, 13).into_font())
        .axis_desc_style((FAMILY, 14).into_font())
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let k = f.series.len() as f64;
    let width = 0.8 / k;
    for (j, (_, values)) in f.series.iter().enumerate() {
        let bars = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(g, v)| {
                let x0 = g as f64 - 0.4 + j as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, *v)], color(j).filled())
            });
        chart.draw_series(bars).map_err(err)?;
    }
    let labels: Vec<String> = f.series.iter().map(|s| s.0.clone()).collect();
    draw_legend(&legend, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(950.0), "950");
        assert_eq!(short_number(12_000.0), "12k");
        assert_eq!(short_number(3_500_000.0), "3.5M");
        assert_eq!(short_number(1.25e9), "1.2B");
    }

    #[test]
    fn ranges_are_padded_and_ignore_non_finite() {
        let (lo, hi) = fitted_range([1.0, 3.0, f64::NAN, f64::INFINITY].into_iter());
        assert!((lo - 0.9).abs() < 1e-12 && (hi - 3.1).abs() < 1e-12);
        assert_eq!(fitted_range([2.0].into_iter()), (1.5, 2.5));
        assert_eq!(fitted_range(std::iter::empty()), (0.0, 1.0));
    }

    #[test]
    fn embedded_font_parses() {
        assert!(register_font("mixlm-test", FontStyle::Normal, FONT).is_ok());
    }

    #[test]
    fn figures_are_written_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let series = |label: &str, slope: f64| Series {
            label: label.into(),
            points: (0..20)
                .map(|i| (i as f64 * 1000.0, 4.0 - slope * i as f64))
                .collect(),
        };
        let figure = LineFigure {
            title: "Validation loss".into(),
            x_label: "tokens".into(),
            y_label: "loss".into(),
            panels: vec![
                Panel {
                    title: "arxiv".into(),
                    series: vec![series("stratified", 0.1), series("aioli", 0.12)],
                },
                Panel {
                    title: "github".into(),
                    series: vec![series("aioli", 0.05)],
                },
            ],
            y_range: None,
        };
        let [png, svg] = write_lines(&dir.path().join("loss"), &figure).unwrap();
        if let Some(keep) = std::env::var_os("MIXLM_KEEP_PLOTS") {
            std::fs::copy(&png, Path::new(&keep).join("loss.png")).unwrap();
        }
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let text = std::fs::read_to_string(&svg).unwrap();
        // Titles, panel captions and legend labels are text in the SVG.
        for label in [
            "Validation loss",
            "arxiv",
            "github",
            "stratified",
            "aioli",
            "10k",
        ] {
            assert!(text.contains(label), "{label} missing from the SVG");
        }
        // Two series in panel 1, one in panel 2: three polylines.
        assert_eq!(text.matches("stroke-width=\"2\" points").count(), 3);
        let no_tmp = std::fs::read_dir(dir.path())
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().contains("tmp"));
        assert!(no_tmp, "temporary files left behind");

        let bars = BarFigure {
            title: "Test perplexity".into(),
            y_label: "ppl".into(),
            groups: vec!["arxiv".into(), "github".into(), "c4".into()],
            series: vec![
                ("stratified".into(), vec![10.0, 5.0, 20.0]),
                ("aioli".into(), vec![9.0, f64::NAN, 19.0]),
            ],
        };
        let [_, svg] = write_bars(&dir.path().join("ppl"), &bars).unwrap();
        let text = std::fs::read_to_string(svg).unwrap();
        for label in ["arxiv", "github", "c4", "stratified", "aioli"] {
            assert!(text.contains(label), "{label} missing from the SVG");
        }
        // Five finite values: five filled bars in the palette's first two colours.
        let fills =
            text.matches("fill=\"#1F77B4\"").count() + text.matches("fill=\"#FF7F0E\"").count();
        assert!(fills >= 5, "{fills} bars");

        let empty = LineFigure {
            panels: vec![],
            ..figure
        };
        assert!(write_lines(&dir.path().join("x"), &empty)
            .unwrap_err()
            .to_string()
            .contains("no data"));
    }
}

//! The figures of a comparison report, drawn from the saved results alone (so
//! `mixlm compare --report-only` redraws them without the runs).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use mixlm_eval::plots::{self, BarFigure, LineFigure, Panel, PlotError, Series};

use crate::compare::{CompareResults, RunResult};
use mixlm_train::metrics::CurvePoint;

/// One figure of the report: its files (relative to the report) and what it shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub title: String,
    pub caption: String,
    pub png: String,
    pub svg: String,
}

/// Writes every figure there is data for into `dir`.
pub fn write_figures(dir: &Path, results: &CompareResults) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut add = |stem: &str,
                   title: &str,
                   caption: &str,
                   written: Result<[std::path::PathBuf; 2], PlotError>| {
        match written {
            Ok(_) => {
                figures.push(Figure {
                    title: title.into(),
                    caption: caption.into(),
                    png: format!("{stem}.png"),
                    svg: format!("{stem}.svg"),
                });
                Ok(())
            }
            // Results without trajectories (written before they were kept) have no
            // lines to draw; the tables still stand.
            Err(PlotError::Empty(_)) => Ok(()),
            Err(e) => Err(e),
        }
    };
    add(
        "val_loss",
        "Validation loss per domain",
        "Per-domain validation loss of each method's final run over training tokens \
         (mean over seeds); the last panel is the mean over domains.",
        plots::write_lines(&dir.join("val_loss"), &val_loss_figure(results)),
    )?;
    add(
        "proportions",
        "Proportion trajectories",
        "The mixture each method's final run sampled from, step by step (first seed). \
         Methods with a search train their final run on its learned mixture; their \
         search runs' trajectories are in their own run folders.",
        plots::write_lines(&dir.join("proportions"), &proportions_figure(results)),
    )?;
    add(
        "test_ppl",
        "Test perplexity per domain",
        "Token-weighted test perplexity of each domain and their mean (the average \
         test perplexity per group), mean over seeds.",
        plots::write_bars(&dir.join("test_ppl"), &ppl_figure(results)),
    )?;
    Ok(figures)
}

fn runs_of<'a>(
    results: &'a CompareResults,
    method: &'a str,
) -> impl Iterator<Item = &'a RunResult> {
    results.results.iter().filter(move |r| r.method == method)
}

/// Domain names in the order of the evaluation report.
fn domains(results: &CompareResults) -> Vec<String> {
    results
        .results
        .iter()
        .flat_map(|r| r.eval.splits.iter())
        .next()
        .map(|s| s.domains.iter().map(|d| d.domain.clone()).collect())
        .unwrap_or_default()
}

/// Mean over seeds of `value(point)` at every token count, in token order.
fn mean_curve(runs: &[&RunResult], value: impl Fn(&CurvePoint) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut at: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for p in r.curves.val_loss.iter().filter(|p| p.tokens > 0) {
            if let Some(v) = value(p) {
                at.entry(p.tokens).or_default().push(v);
            }
        }
    }
    at.into_iter()
        .map(|(t, v)| (t as f64, v.iter().sum::<f64>() / v.len() as f64))
        .collect()
}

/// One panel per domain and one for the mean over domains; one line per method. The
/// evaluation before the first step (log of the vocabulary size) is left out so the
/// axis shows the differences.
fn val_loss_figure(results: &CompareResults) -> LineFigure {
    let domains = domains(results);
    let mut panels: Vec<Panel> = domains
        .iter()
        .chain(std::iter::once(&"mean over domains".to_string()))
        .map(|d| Panel {
            title: d.clone(),
            series: Vec::new(),
        })
        .collect();
    for m in &results.methods {
        let runs: Vec<&RunResult> = runs_of(results, m).collect();
        for (i, d) in domains.iter().enumerate() {
            let points = mean_curve(&runs, |p| p.values.get(d).copied());
            if !points.is_empty() {
                panels[i].series.push(Series {
                    label: m.clone(),
                    points,
                });
            }
        }
        let mean = mean_curve(&runs, |p| {
            let v: Vec<f64> = domains
                .iter()
                .filter_map(|d| p.values.get(d).copied())
                .collect();
            (v.len() == domains.len() && !v.is_empty())
                .then(|| v.iter().sum::<f64>() / v.len() as f64)
        });
        if !mean.is_empty() {
            panels[domains.len()].series.push(Series {
                label: m.clone(),
                points: mean,
            });
        }
    }
    panels.retain(|p| !p.series.is_empty());
    LineFigure {
        title: "Validation loss per domain".into(),
        x_label: "training tokens".into(),
        y_label: "loss (nats/token)".into(),
        panels,
        y_range: None,
    }
}

/// One panel per method (its first seed), one line per domain.
fn proportions_figure(results: &CompareResults) -> LineFigure {
    let domains = domains(results);
    let panels = results
        .methods
        .iter()
        .filter_map(|m| {
            let run = runs_of(results, m).min_by_key(|r| r.seed)?;
            let series: Vec<Series> = domains
                .iter()
                .map(|d| Series {
                    label: d.clone(),
                    points: run
                        .curves
                        .proportions
                        .iter()
                        .filter_map(|p| p.values.get(d).map(|v| (p.tokens as f64, *v)))
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            (!series.is_empty()).then(|| Panel {
                title: m.clone(),
                series,
            })
        })
        .collect();
    LineFigure {
        title: "Mixture proportions over training".into(),
        x_label: "training tokens".into(),
        y_label: "proportion".into(),
        panels,
        y_range: Some((0.0, 1.0)),
    }
}

/// Groups: the domains and their mean; bars: the methods.
fn ppl_figure(results: &CompareResults) -> BarFigure {
    let domains = domains(results);
    let series = results
        .methods
        .iter()
        .filter_map(|m| {
            let tests: Vec<_> = runs_of(results, m)
                .filter_map(|r| r.eval.splits.iter().find(|s| s.split == "test"))
                .collect();
            if tests.is_empty() {
                return None;
            }
            let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let mut values: Vec<f64> = domains
                .iter()
                .map(|d| {
                    mean(
                        tests
                            .iter()
                            .filter_map(|s| s.domains.iter().find(|x| &x.domain == d))
                            .map(|x| x.token_ppl)
                            .collect(),
                    )
                })
                .collect();
            values.push(mean(tests.iter().map(|s| s.average_ppl).collect()));
            Some((m.clone(), values))
        })
        .collect();
    let mut groups = domains;
    groups.push("average".into());
    BarFigure {
        title: "Test perplexity per domain".into(),
        y_label: "perplexity".into(),
        groups,
        series,
    }
}

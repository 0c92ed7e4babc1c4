//! What one run folder turns into for reading: `report.md` with its figures (`mixlm
//! report`, and the end of `mixlm train`), CSV tables (`mixlm export csv`) and
//! TensorBoard event files (`mixlm export tensorboard`), all from `metrics.jsonl`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mixlm_eval::plots::{self, LineFigure, Panel, PlotError, Series};
use serde_json::Value;

/// The records of a run's `metrics.jsonl`, in order; a line that does not parse (the
/// torn last line of a killed run) is skipped.
pub fn read_records(run_dir: &Path) -> Result<Vec<Value>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is {} a run folder, runs/<name>?)",
            path.display(),
            run_dir.display()
        )
    })?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r.get("kind").is_some())
        .collect())
}

fn of_kind<'a>(records: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records
        .iter()
        .filter(move |r| r.get("kind").and_then(Value::as_str) == Some(kind))
}

/// A record's values as flat columns: nested objects joined with `/`
/// (`val_loss/wiki`, `time_s/model`), `kind` left out.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}/{k}")
                };
                if key != "kind" {
                    flatten(&key, v, out);
                }
            }
        }
        Value::Null => out.push((prefix.into(), String::new())),
        Value::String(s) => out.push((prefix.into(), s.clone())),
        other => out.push((prefix.into(), other.to_string())),
    }
}

/// Writes `train.csv` (one row per step) and `eval.csv` (one row per evaluation) into
/// `out`: every field of the records, nested ones as `field/domain` columns, in the
/// order they first appear; a value a row lacks is empty.
pub fn export_csv(run_dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let records = read_records(run_dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    for kind in ["train", "eval"] {
        let rows: Vec<Vec<(String, String)>> = of_kind(&records, kind)
            .map(|r| {
                let mut row = Vec::new();
                flatten("", r, &mut row);
                row
            })
            .collect();
        let mut columns: Vec<String> = Vec::new();
        for (k, _) in rows.iter().flatten() {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
        let path = out.join(format!("{kind}.csv"));
        let mut w = csv::Writer::from_path(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_record(&columns)?;
        for row in &rows {
            let row: BTreeMap<&str, &str> =
                row.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            w.write_record(
                columns
                    .iter()
                    .map(|c| row.get(c.as_str()).copied().unwrap_or("")),
            )?;
        }
        w.flush()
            .with_context(|| format!("cannot write {} (disk full?)", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Per-domain values of a record's field (`proportions`, `val_loss`).
fn per_domain(record: &Value, field: &str) -> BTreeMap<String, f64> {
    record
        .get(field)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn tokens(r: &Value) -> f64 {
    r.get("tokens").and_then(Value::as_f64).unwrap_or(0.0)
}

/// One series per domain of `field` over training tokens (records with no tokens, the
/// evaluation before training, left out when `skip_start`).
fn domain_series<'a>(
    records: impl Iterator<Item = &'a Value>,
    field: &str,
    skip_start: bool,
) -> Vec<Series> {
    let mut by_domain: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records.filter(|r| !skip_start || tokens(r) > 0.0) {
        for (d, v) in per_domain(r, field) {
            if v.is_finite() {
                by_domain.entry(d).or_default().push((tokens(r), v));
            }
        }
    }
    by_domain
        .into_iter()
        .map(|(label, points)| Series { label, points })
        .collect()
}

/// Writes `report.md` and its figures (`figures/*.png`, `*.svg`) into the run folder:
/// training and per-domain validation loss over tokens, the proportions over tokens,
/// and the final per-domain table. Returns the report's path.
pub fn write_report(run_dir: &Path) -> Result<PathBuf> {
    let records = read_records(run_dir)?;
    let Some(last) = of_kind(&records, "train").last() else {
        bail!(
            "{} has no training step yet: nothing to report",
            run_dir.join("metrics.jsonl").display()
        );
    };
    let name = run_dir
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().into_owned());
    let figures = run_dir.join("figures");
    std::fs::create_dir_all(&figures)
        .with_context(|| format!("cannot create {}", figures.display()))?;

    let train_loss = Series {
        label: "training loss".into(),
        points: of_kind(&records, "train")
            .filter_map(|r| Some((tokens(r), r.get("loss")?.as_f64()?)))
            .filter(|p| p.1.is_finite())
            .collect(),
    };
    let loss = LineFigure {
        title: format!("{name}: loss"),
        x_label: "training tokens".into(),
        y_label: "loss (nats/token)".into(),
        panels: vec![
            Panel {
                title: "training loss (each step)".into(),
                series: vec![train_loss],
            },
            Panel {
                title: "validation loss per domain".into(),
                series: domain_series(of_kind(&records, "eval"), "val_loss", true),
            },
        ]
        .into_iter()
        .filter(|p| p.series.iter().any(|s| !s.points.is_empty()))
        .collect(),
        y_range: None,
    };
    let proportions = LineFigure {
        title: format!("{name}: mixture proportions"),
        x_label: "training tokens".into(),
        y_label: "proportion".into(),
        panels: vec![Panel {
            title: "proportions sampled at each step".into(),
            series: domain_series(of_kind(&records, "train"), "proportions", false),
        }],
        y_range: Some((0.0, 1.0)),
    };

    let mut md = format!("# Run `{name}`\n\n");
    let step = last.get("step").and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(
        md,
        "{step} steps, {} training tokens, final training loss {:.4}, {:.0} tokens/s.\n",
        tokens(last),
        last.get("loss").and_then(Value::as_f64).unwrap_or(f64::NAN),
        last.get("tokens_per_s")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
    );
    for (stem, title, figure) in [
        ("loss", "Loss", &loss),
        ("proportions", "Proportions", &proportions),
    ] {
        match plots::write_lines(&figures.join(stem), figure) {
            Ok(_) => {
                let _ = writeln!(
                    md,
                    "## {title}\n\n![{title}](figures/{stem}.png)\n\n([SVG](figures/{stem}.svg))\n"
                );
            }
            Err(PlotError::Empty(_)) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot draw {stem} in {}", figures.display()))
            }
        }
    }
    md.push_str(&final_table(&records));
    let path = run_dir.join("report.md");
    crate::checkpoint::write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// The first and last evaluation's per-domain validation loss and perplexity.
fn final_table(records: &[Value]) -> String {
    let evals: Vec<&Value> = of_kind(records, "eval").collect();
    let (Some(first), Some(last)) = (evals.first(), evals.last()) else {
        return "No evaluation was recorded (`[eval] every = 0` and the run did not finish).\n"
            .into();
    };
    let step = |r: &Value| r.get("step").and_then(Value::as_u64).unwrap_or(0);
    let (before, after) = (per_domain(first, "val_loss"), per_domain(last, "val_loss"));
    let mut md = format!(
        "## Validation per domain\n\nAt step {} (and at step {} for comparison).\n\n\
         | domain | loss | perplexity | loss at step {} |\n|---|---:|---:|---:|\n",
        step(last),
        step(first),
        step(first)
    );
    for (d, loss) in &after {
        let earlier = before.get(d).map_or("".into(), |l| format!("{l:.4}"));
        let _ = writeln!(md, "| {d} | {loss:.4} | {:.3} | {earlier} |", loss.exp());
    }
    if !after.is_empty() {
        let mean = after.values().sum::<f64>() / after.len() as f64;
        let _ = writeln!(
            md,
            "| mean over domains | {mean:.4} | {:.3} | |",
            mean.exp()
        );
    }
    md
}

/// Writes a run's TensorBoard event files afresh from its `metrics.jsonl` (a run from
/// before they existed, or one trained with `[run] tensorboard = false`).
pub fn export_tensorboard(run_dir: &Path) -> Result<PathBuf> {
    let board = crate::tensorboard::Board::open(run_dir, &read_records(run_dir)?);
    let dir = crate::tensorboard::dir(run_dir);
    if !board.is_writing() {
        bail!(
            "the event files in {} could not be written (see the warning above)",
            dir.display()
        );
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"kind":"eval","step":0,"tokens":0,"val_loss":{"a,b":4.8,"c":4.9},"val_ppl":{"a,b":121.5,"c":134.3}}"#,
            r#"{"kind":"train","step":1,"tokens":64,"lr":0.001,"loss":4.5,"grad_norm":1.5,"domain_loss":{"a,b":4.4,"c":null},"proportions":{"a,b":0.25,"c":0.75},"time_s":{"data":0.1,"model":0.2}}"#,
            r#"{"kind":"train","step":2,"tokens":128,"lr":0.002,"loss":4.0,"grad_norm":1.2,"domain_loss":{"a,b":3.9,"c":4.1},"proportions":{"a,b":0.5,"c":0.5},"method":{"reward":{"a,b":0.1,"c":0.2}},"time_s":{"data":0.1,"model":0.2}}"#,
            r#"{"kind":"eval","step":2,"tokens":128,"val_loss":{"a,b":3.5,"c":3.0},"val_ppl":{"a,b":33.1,"c":20.1}}"#,
            r#"{"kind":"train","step":3,"tok"#,
        ];
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        dir
    }

    /// Every field becomes a column (nested ones as `field/domain`, a domain name with
    /// a comma quoted), a missing value an empty cell, the torn line is skipped.
    #[test]
    fn csv_holds_every_field_of_every_record() {
        let dir = run_dir();
        let out = dir.path().join("csv");
        let files = export_csv(dir.path(), &out).unwrap();
        let train = std::fs::read_to_string(&files[0]).unwrap();
        let mut reader = csv::Reader::from_reader(train.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        for column in [
            "step",
            "loss",
            "domain_loss/a,b",
            "proportions/c",
            "time_s/model",
            "method/reward/c",
        ] {
            assert!(header.iter().any(|h| h == column), "{column} in {header:?}");
        }
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        let cell = |row: usize, column: &str| {
            rows[row][header.iter().position(|h| h == column).unwrap()].to_string()
        };
        assert_eq!(cell(0, "domain_loss/c"), "");
        assert_eq!(cell(0, "method/reward/c"), "");
        assert_eq!(cell(1, "method/reward/c"), "0.2");
        assert_eq!(cell(1, "proportions/a,b"), "0.5");
        let eval = std::fs::read_to_string(&files[1]).unwrap();
        assert_eq!(eval.lines().count(), 3, "{eval}");
        assert!(eval.contains("\"val_loss/a,b\""), "{eval}");
    }

    /// The report names the final and first evaluation, links both figures, which
    /// exist as PNG and SVG.
    #[test]
    fn report_has_figures_and_the_final_table() {
        let dir = run_dir();
        let path = write_report(dir.path()).unwrap();
        let md = std::fs::read_to_string(&path).unwrap();
        assert!(
            md.contains("2 steps, 128 training tokens, final training loss 4.0000"),
            "{md}"
        );
        assert!(md.contains("| c | 3.0000 | 20.086 | 4.9000 |"), "{md}");
        assert!(
            md.contains("| mean over domains | 3.2500 | 25.790 | |"),
            "{md}"
        );
        for stem in ["loss", "proportions"] {
            assert!(md.contains(&format!("figures/{stem}.png")), "{md}");
            for ext in ["png", "svg"] {
                let f = dir.path().join(format!("figures/{stem}.{ext}"));
                assert!(
                    std::fs::metadata(&f).unwrap().len() > 500,
                    "{}",
                    f.display()
                );
            }
        }
        let empty = tempfile::tempdir().unwrap();
        let err = write_report(empty.path()).unwrap_err().to_string();
        assert!(
            err.contains("metrics.jsonl") && err.contains("run folder"),
            "{err}"
        );
    }
}

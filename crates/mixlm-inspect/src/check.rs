//! `mixlm check-backend`: before a long job, checks on the user's own device that what
//! training runs there computes what the CPU reference computes, and how fast.
//!
//! - The attention kernels, forward and backward, against Burn's own attention on
//!   random inputs: small shapes that probe the tiling (sequences shorter than, equal
//!   to and not a multiple of a tile), and on GPU backends every preset's
//!   `[heads, head_dim]` at sequence 2048, where both are also timed.
//! - A few training steps of the tiny preset against the same steps on the CPU
//!   backend in f32 (the whole step: fusion, autotuned matmuls, the optimizer, the
//!   requested precision).
//! - The same steps through the data-parallel machinery with one peer against the
//!   plain path (what `--devices N` runs).
//!
//! A driver, CUDA or Burn update that breaks one of these shows here in a minute, not
//! as a loss curve that drifts after a day.

use std::path::Path;

use anyhow::{Context, Result};
use mixlm_model::attention::{AttentionAgreement, PROBE_SHAPES};
use mixlm_model::{AttentionKernel, ModelConfig, Precision, PRESETS};

use crate::doctor::{Finding, Level};
use mixlm_train::backend::{train_on, BackendKind};
use mixlm_train::config::RunConfig;
use mixlm_train::engine::{on_engine, Engine};
use mixlm_train::trainer::TrainOptions;

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub backend: BackendKind,
    /// The compute precision training would use (`run.precision`).
    pub precision: Precision,
    /// Also check and time attention at the presets' shapes (sequence 2048); slow on
    /// the CPU, where the "kernel" is the tensor-algebra reference itself.
    pub preset_shapes: bool,
    /// Training steps compared with the CPU.
    pub steps: u64,
}

impl CheckOptions {
    /// The defaults for a backend: preset shapes on GPU backends, 8 training steps.
    pub fn new(backend: BackendKind, precision: Precision) -> Self {
        Self {
            backend,
            precision,
            preset_shapes: backend != BackendKind::Cpu,
            steps: 8,
        }
    }
}

/// Sequence length of the preset shapes (what the presets train at); Burn's attention
/// at two heads of it keeps a 32 MiB f32 score matrix.
pub const PRESET_SEQ: usize = 2048;

/// The distinct `[1, heads, 2048, head_dim]` attention shapes of the built-in presets
/// (the tiny test presets left out), each with the first preset that has it.
pub fn preset_shapes() -> Vec<(&'static str, [usize; 4])> {
    let mut shapes: Vec<(&'static str, [usize; 4])> = Vec::new();
    for name in PRESETS.iter().filter(|n| !n.starts_with("tiny")) {
        let c = ModelConfig::preset(name).expect("built-in preset");
        let shape = [1, c.n_heads, PRESET_SEQ, c.head_dim];
        if !shapes.iter().any(|(_, s)| *s == shape) {
            shapes.push((name, shape));
        }
    }
    shapes
}

/// Largest relative difference of two runs' step losses allowed: f32 leaves room for
/// another summation order; on CUDA, Burn's tensor-core matmuls read f32 inputs as
/// TF32 (10-bit mantissa, like PyTorch's `allow_tf32`); half precision computes
/// against the f32 reference.
pub fn loss_tolerance(precision: Precision, backend: BackendKind) -> f64 {
    match (precision, backend) {
        (Precision::F32, BackendKind::Cuda) => 1e-2,
        (Precision::F32, _) => 1e-3,
        (Precision::Bf16 | Precision::F16, _) => 5e-2,
    }
}

/// Runs every check, reporting each finding as it is made (the preset shapes take a
/// while on slow devices), and returns them all. An error is a check that could not
/// run at all (the backend is not compiled in, the temporary folder is not writable).
pub fn check_backend(
    options: &CheckOptions,
    mut report: impl FnMut(&Finding) + Send,
) -> Result<Vec<Finding>> {
    options.backend.check_compiled()?;
    let mut findings = Vec::new();
    let mut push = |f: Finding| {
        report(&f);
        findings.push(f);
    };
    let usable = on_engine(options.backend, |engine| {
        attention_checks(engine, options, &mut push)
    })?;
    if usable {
        training_checks(options, &mut push)?;
    }
    Ok(findings)
}

fn finding(level: Level, message: String) -> Finding {
    Finding { level, message }
}

/// The device, its precision, and the attention kernels; whether the device computes
/// in the requested precision (else nothing else runs).
fn attention_checks(
    engine: &dyn Engine,
    options: &CheckOptions,
    push: &mut impl FnMut(Finding),
) -> Result<bool> {
    let precision = options.precision;
    push(finding(
        Level::Ok,
        format!("backend {}: {}", options.backend.name(), engine.describe()),
    ));
    if let Err(e) = engine.check_precision(precision) {
        push(finding(Level::Fail, format!("{e:#}")));
        return Ok(false);
    }
    let describe = |worst: &[f32; 4]| {
        AttentionAgreement::PARTS
            .iter()
            .zip(worst)
            .map(|(p, w)| format!("{p} {w:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Presets that share a head size share their check shape: compared once.
    let mut compared: Vec<([usize; 4], [f32; 4])> = Vec::new();
    let mut agreement = |label: String, shape: [usize; 4]| {
        let worst = match compared.iter().find(|(s, _)| *s == shape) {
            Some((_, worst)) => *worst,
            None => {
                let a = engine.attention_agreement(shape, precision);
                compared.push((shape, a.worst));
                a.worst
            }
        };
        let passed = AttentionAgreement {
            shape,
            precision,
            worst,
        }
        .passed();
        let level = if passed { Level::Ok } else { Level::Fail };
        let message = format!(
            "attention {label}{shape:?} {}: worst error / tolerance: {}",
            precision.name(),
            describe(&worst)
        );
        (level, message)
    };
    for shape in PROBE_SHAPES {
        let (level, message) = agreement(String::new(), shape);
        push(finding(level, message));
    }
    if !options.preset_shapes {
        return Ok(true);
    }
    // Correctness on two heads (heads are independent; Burn's attention keeps the
    // whole score matrix, beyond wgpu's buffer limit at some presets' full width);
    // timing at the preset's full width, Burn's only on CUDA for that reason.
    let time_burn = options.backend == BackendKind::Cuda;
    for (preset, shape) in preset_shapes() {
        let [_, heads, seq, head_dim] = shape;
        let run = std::panic::AssertUnwindSafe(|| -> Result<(Level, String, bool)> {
            let (level, mut message) =
                agreement(format!("{preset} "), [1, heads.min(2), seq, head_dim]);
            let time = |kernel| engine.time_attention(shape, precision, kernel, 5);
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            let fused = time(AttentionKernel::Fused)?;
            message += &format!(
                "; forward + backward at {shape:?}: fused {:.2} ms",
                ms(fused)
            );
            let mut slower = false;
            if time_burn {
                let burn = time(AttentionKernel::Burn)?;
                slower = fused > burn;
                message += &format!(
                    ", Burn's {:.2} ms ({:.2}x)",
                    ms(burn),
                    burn.as_secs_f64() / fused.as_secs_f64().max(1e-12)
                );
            }
            Ok((level, message, slower))
        });
        // A device that cannot run a shape panics inside Burn: report it, and stop
        // (the device may be left unusable).
        let (level, message, slower) = match std::panic::catch_unwind(run) {
            Ok(result) => result?,
            Err(panic) => {
                let why = mixlm_train::distributed::panic_message(&panic);
                push(finding(
                    Level::Fail,
                    format!(
                        "attention {preset} {shape:?}: the device failed: {}",
                        why.lines().next().unwrap_or("")
                    ),
                ));
                return Ok(false);
            }
        };
        push(finding(level, message));
        if level == Level::Ok && slower {
            push(finding(
                Level::Warn,
                format!(
                    "the fused attention is slower than Burn's at {preset}'s shape on this \
                         device: run.attention = \"burn\" trains faster there (at the memory \
                         cost of the score matrix)"
                ),
            ));
        }
    }
    Ok(true)
}

/// The tiny preset's initial weights drawn on the CPU into `dir/init`: every run of
/// the check starts from them (`model.init_from`), since each backend draws other
/// random numbers from the same seed.
fn initial_weights(dir: &Path) -> Result<std::path::PathBuf> {
    let model = RunConfig::embedded(&[])?
        .model
        .resolve()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join("init");
    mixlm_train::checkpoint::write_cpu_initial_weights(&path, &model, 0)?;
    Ok(path)
}

/// A short run of the tiny preset on the built-in corpus in `dir`, from the weights in
/// `init`; the step losses.
fn step_losses(
    dir: &Path,
    init: &Path,
    name: &str,
    backend: BackendKind,
    precision: Precision,
    steps: u64,
    extra: &[&str],
) -> Result<Vec<f64>> {
    let mut overrides: Vec<String> = vec![
        format!(
            "run.out_dir={}",
            mixlm_train::config::toml_string(&dir.display().to_string())
        ),
        format!("run.name=\"{name}\""),
        format!(
            "model.init_from={}",
            mixlm_train::config::toml_string(&init.display().to_string())
        ),
        format!("run.backend=\"{}\"", backend.name()),
        format!("run.precision=\"{}\"", precision.name()),
        format!("run.steps={steps}"),
        "run.batch_size=4".into(),
        "run.seq_len=64".into(),
        "run.log_every=0".into(),
        "schedule.warmup_steps=2".into(),
        "eval.every=0".into(),
        "eval.sequences=4".into(),
        "checkpoint.every=0".into(),
        "checkpoint.save_final=false".into(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let config = RunConfig::embedded(&overrides)?;
    let outcome = train_on(backend, &config, &TrainOptions::quiet())
        .with_context(|| format!("the check's training run on {}", backend.name()))?;
    let path = outcome.run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap_or(f64::NAN))
        .collect())
}

/// Largest relative difference between two runs' step losses (infinite when they
/// differ in length or one is not finite).
pub fn largest_relative_difference(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) / y.abs().max(1e-12)).abs())
        .fold(
            0.0,
            |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        )
}

/// `losses FIRST .. LAST` of a run's step losses.
fn span(losses: &[f64]) -> String {
    let at = |l: Option<&f64>| l.copied().unwrap_or(f64::NAN);
    format!(
        "losses {:.4} .. {:.4}",
        at(losses.first()),
        at(losses.last())
    )
}

fn training_checks(options: &CheckOptions, push: &mut impl FnMut(Finding)) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("mixlm-check-")
        .tempdir()
        .context("cannot create a temporary folder for the check's training runs")?;
    let (backend, precision, steps) = (options.backend, options.precision, options.steps);
    let init = initial_weights(dir.path())?;
    let run = |name: &str, backend, precision, extra: &[&str]| {
        step_losses(dir.path(), &init, name, backend, precision, steps, extra)
    };
    let target = run("target", backend, precision, &[])?;
    let compare = |push: &mut dyn FnMut(Finding), what: String, got: &[f64], reference: &[f64]| {
        let (d, tolerance) = (
            largest_relative_difference(got, reference),
            loss_tolerance(precision, backend),
        );
        let level = if d <= tolerance {
            Level::Ok
        } else {
            Level::Fail
        };
        push(finding(
            level,
            format!(
                "{what}: largest relative difference of the {} step losses {d:.2e} \
                 (tolerance {tolerance:.0e}); {}",
                got.len(),
                span(got),
            ),
        ));
    };
    if backend == BackendKind::Cpu && precision == Precision::F32 {
        push(finding(
            Level::Ok,
            format!(
                "training: {} steps of the tiny preset on cpu (the reference the other \
                 backends are checked against); {}",
                target.len(),
                span(&target)
            ),
        ));
    } else if !BackendKind::Cpu.compiled() {
        push(finding(
            Level::Warn,
            format!(
                "training against cpu: not run, this is the nccl build (no cpu backend); \
                 run `check-backend` with a build without nccl for it. {} steps on {}: {}",
                target.len(),
                backend.name(),
                span(&target)
            ),
        ));
    } else {
        let reference = run("cpu", BackendKind::Cpu, Precision::F32, &[])?;
        compare(
            push,
            format!(
                "training: {steps} steps of the tiny preset on {} ({}) against cpu (f32)",
                backend.name(),
                precision.name()
            ),
            &target,
            &reference,
        );
    }
    let collective = run(
        "collective",
        backend,
        precision,
        &["distributed.always_collective=true"],
    )?;
    compare(
        push,
        format!(
            "data-parallel path (one peer through the collective) against the plain path on {}",
            backend.name()
        ),
        &collective,
        &target,
    );
    if mixlm_train::distributed::NCCL_BUILD && backend == BackendKind::Cuda {
        let nccl = run(
            "nccl",
            backend,
            precision,
            &["distributed.communication=\"nccl\""],
        )?;
        compare(
            push,
            "data-parallel path with gradients all-reduced through NCCL during backward \
             (one peer) against the plain path on cuda"
                .into(),
            &nccl,
            &target,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_shapes_are_distinct_and_cover_the_presets_head_sizes() {
        let shapes = preset_shapes();
        let names: Vec<&str> = shapes.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"pythia-160m"), "{names:?}");
        assert_eq!(
            shapes.iter().find(|(n, _)| *n == "pythia-160m").unwrap().1,
            [1, 12, 2048, 64]
        );
        for (i, (_, a)) in shapes.iter().enumerate() {
            assert!(shapes[i + 1..].iter().all(|(_, b)| a != b));
        }
        for name in PRESETS.iter().filter(|n| !n.starts_with("tiny")) {
            let c = ModelConfig::preset(name).unwrap();
            assert!(
                shapes
                    .iter()
                    .any(|(_, s)| s[1] == c.n_heads && s[3] == c.head_dim),
                "{name}"
            );
        }
    }

    #[test]
    fn relative_difference_of_losses() {
        assert_eq!(largest_relative_difference(&[2.0, 4.0], &[2.0, 4.0]), 0.0);
        let d = largest_relative_difference(&[2.0, 4.1], &[2.0, 4.0]);
        assert!((d - 0.025).abs() < 1e-12, "{d}");
        assert_eq!(
            largest_relative_difference(&[2.0], &[2.0, 4.0]),
            f64::INFINITY
        );
        assert_eq!(
            largest_relative_difference(&[f64::NAN], &[2.0]),
            f64::INFINITY
        );
        assert_eq!(largest_relative_difference(&[], &[]), f64::INFINITY);
    }

    fn levels(findings: &[Finding]) -> Vec<Level> {
        findings.iter().map(|f| f.level).collect()
    }

    /// On the CPU every check passes and the collective path equals the plain one to
    /// the bit; what is reported as it goes is what is returned.
    #[test]
    fn the_cpu_backend_passes_its_checks() {
        let mut options = CheckOptions::new(BackendKind::Cpu, Precision::F32);
        assert!(!options.preset_shapes);
        options.steps = 3;
        let mut reported = Vec::new();
        let findings = check_backend(&options, |f| reported.push(f.clone())).unwrap();
        assert_eq!(reported, findings);
        assert!(
            findings.iter().all(|f| f.level == Level::Ok),
            "{findings:?}"
        );
        assert_eq!(findings.len(), 1 + PROBE_SHAPES.len() + 2, "{findings:?}");
        let last = &findings.last().unwrap().message;
        assert!(
            last.starts_with("data-parallel path") && last.contains("of the 3 step losses 0.00e0"),
            "{last}"
        );
    }

    /// A precision the device lacks fails the check with the trainer's reason, and
    /// nothing that needs it runs.
    #[test]
    fn a_precision_the_device_lacks_fails_first() {
        let options = CheckOptions::new(BackendKind::Cpu, Precision::Bf16);
        let findings = check_backend(&options, |_| {}).unwrap();
        assert_eq!(levels(&findings), [Level::Ok, Level::Fail], "{findings:?}");
        assert!(
            findings[1].message.contains("run.precision = \"bf16\"")
                && findings[1].message.contains("use precision = \"f32\""),
            "{}",
            findings[1].message
        );
    }

    /// The GPU code path on lavapipe: kernels within tolerance, and training from the
    /// same weights as the CPU within 1e-3 (measured: ~5e-8).
    #[cfg(feature = "wgpu")]
    #[test]
    fn the_wgpu_backend_passes_its_checks() {
        if !mixlm_model::vulkan_driver_installed() {
            return;
        }
        let mut options = CheckOptions::new(BackendKind::Wgpu, Precision::F32);
        options.preset_shapes = false;
        options.steps = 3;
        let findings = check_backend(&options, |f| println!("{f}")).unwrap();
        assert!(
            findings.iter().all(|f| f.level == Level::Ok),
            "{findings:?}"
        );
        assert!(findings.iter().any(|f| f
            .message
            .starts_with("training: 3 steps of the tiny preset on wgpu (f32)")));
    }
}

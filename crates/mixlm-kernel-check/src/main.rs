//! `mixlm-kernel-check`: every CubeCL kernel of mixlm compiled for CUDA without a GPU,
//! with the resources each needs and the occupancy that gives. Exits non-zero when a
//! kernel fails to compile or assemble. `scripts/cuda-kernels.sh` installs NVRTC and
//! ptxas from PyPI and runs it; `.ci/run` runs that.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cubecl::prelude::*;
use cubecl_ir::{ElemType, FloatKind};
use mixlm_kernel_check::nvrtc::{self, Toolkit};
use mixlm_kernel_check::occupancy::{occupancy, Occupancy, Sm};
use mixlm_kernel_check::ptxas;
use mixlm_kernel_check::step::{fresh_autotune, training_step_kernels, StepShape};
use mixlm_kernel_check::target::{cuda_source, panic_text, Arch, CudaTarget, Launched};
use mixlm_model::attention::cube::kernel_tasks;
use mixlm_model::{ModelConfig, Precision, PRESETS};

#[derive(Parser)]
#[command(about = "Compile mixlm's CubeCL kernels for CUDA (sm_80, sm_90) without a GPU")]
struct Args {
    /// A CUDA toolkit folder, or the `nvidia` folder of NVIDIA's pip wheels
    /// (default: $CUDA_PATH).
    #[arg(long)]
    cuda: Option<PathBuf>,
    /// Compute capabilities, times ten.
    #[arg(long, value_delimiter = ',', default_values_t = [80, 90])]
    arch: Vec<u32>,
    /// Storage precisions.
    #[arg(long, value_delimiter = ',', default_values = ["f32", "bf16", "f16"])]
    dtype: Vec<String>,
    /// Head sizes (default: every one a built-in preset uses).
    #[arg(long, value_delimiter = ',')]
    head_dim: Vec<usize>,
    /// Where the .cu and .ptx files and table.md go.
    #[arg(long, default_value = "target/cuda-kernels")]
    out: PathBuf,
    /// Append a line that is not C++ to this kernel's source (forward,
    /// backward_query, backward_key): shows that a broken kernel fails the check.
    #[arg(long, value_name = "KERNEL")]
    break_kernel: Option<String>,
    /// Presets whose training step (forward, loss, backward, AdamW on Burn's CUDA
    /// backend) is recorded and its kernels compiled too; `none` for mixlm's kernels only.
    #[arg(long, value_delimiter = ',', default_values = ["tiny", "tiny-llama"])]
    step: Vec<String>,
    /// Architectures the step's kernels are compiled for (compute capability x10).
    #[arg(long, value_delimiter = ',', default_values_t = [90])]
    step_arch: Vec<u32>,
    /// The precision the recorded step computes in.
    #[arg(long, default_value = "bf16")]
    step_precision: String,
    /// Vocabulary, sequences and sequence length of the recorded step.
    #[arg(long, default_value_t = 50_304)]
    step_vocab: usize,
    #[arg(long, default_value_t = 4)]
    step_batch: usize,
    #[arg(long, default_value_t = 128)]
    step_seq_len: usize,
}

impl Row {
    /// Resident blocks and occupancy on this row's SM, from its block size, registers
    /// and shared memory (dynamic and static).
    fn occupancy(&self, res: &ptxas::Resources) -> Occupancy {
        occupancy(
            Sm::of(self.arch),
            self.block,
            res.registers,
            self.shared + res.static_shared_bytes,
        )
    }
}

/// One row of a table: its leading columns, then the resources.
struct Row {
    labels: Vec<String>,
    /// Whether a failure of this row fails the check: not for Burn's kernels whose
    /// expansion panics (CubeCL's own bug, caught by the device runner there too).
    fatal: bool,
    arch: Arch,
    block: u32,
    shared: u32,
    outcome: Result<ptxas::Resources>,
}

fn storage(name: &str) -> Result<StorageType> {
    let kind = match name {
        "f32" => FloatKind::F32,
        "bf16" => FloatKind::BF16,
        "f16" => FloatKind::F16,
        other => bail!("--dtype {other}: use f32, bf16 or f16"),
    };
    Ok(ElemType::Float(kind).into())
}

/// The distinct head sizes of the built-in presets.
fn preset_head_dims() -> Vec<usize> {
    let mut dims: Vec<usize> = PRESETS
        .iter()
        .filter_map(|p| ModelConfig::preset(p))
        .map(|c| c.head_dim)
        .collect();
    dims.sort_unstable();
    dims.dedup();
    dims
}

fn main() -> std::process::ExitCode {
    // Panics in CubeCL's expansion of Burn's kernels are expected (reported in the
    // table): one line each instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = panic_text(info.payload());
        let first = message
            .lines()
            .find(|l| !l.starts_with("An error"))
            .unwrap_or("");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()));
        eprintln!("panic: {first}{}", at.unwrap_or_default());
    }));
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let root = match args.cuda.clone().or_else(|| std::env::var_os("CUDA_PATH").map(PathBuf::from)) {
        Some(root) => root,
        None => bail!("give --cuda DIR (a CUDA toolkit, or the `nvidia` folder of NVIDIA's pip wheels) or set CUDA_PATH"),
    };
    let toolkit = Toolkit::find(&root)?;
    let (major, minor) = nvrtc::version()
        .context("NVRTC (put the folder holding libnvrtc.so on LD_LIBRARY_PATH)")?;
    let head_dims = match args.head_dim.is_empty() {
        true => preset_head_dims(),
        false => args.head_dim.clone(),
    };
    for &version in args.arch.iter().chain(&args.step_arch) {
        if ![80, 90].contains(&version) {
            bail!("--arch {version}: the target knows 80 (A100) and 90 (H100, H200)");
        }
    }
    let step_precision = match args.step_precision.as_str() {
        "f32" => Precision::F32,
        "bf16" => Precision::Bf16,
        other => bail!("--step-precision {other}: training computes in f32 or bf16"),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    fresh_autotune(&args.out.join("autotune"));
    println!(
        "mixlm-kernel-check: NVRTC {major}.{minor}, {}; head sizes {head_dims:?}; sources in {}",
        toolkit.ptxas.display(),
        args.out.display()
    );
    // One thread per architecture: NVRTC and ptxas run one kernel at a time each.
    let mut rows: Vec<Row> = std::thread::scope(|scope| {
        let workers: Vec<_> = args
            .arch
            .iter()
            .map(|&version| {
                let (args, toolkit, head_dims) = (&args, &toolkit, &head_dims);
                scope.spawn(move || check_arch(Arch { version }, args, toolkit, head_dims))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a kernel check thread panicked"))
            .collect::<Result<Vec<Vec<Row>>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let mut table = table(&["kernel", "dtype", "head"], &rows);
    let step: Vec<&str> = args
        .step
        .iter()
        .map(String::as_str)
        .filter(|p| *p != "none")
        .collect();
    let mut step_rows = Vec::new();
    if !step.is_empty() {
        // Recorded one architecture at a time (the recorder is one list), compiled in
        // parallel.
        let mut recorded = Vec::new();
        for &version in &args.step_arch {
            let arch = Arch { version };
            let mut kernels = Vec::new();
            for &preset in &step {
                let shape = StepShape {
                    preset: preset.to_string(),
                    vocab: args.step_vocab,
                    batch: args.step_batch,
                    seq_len: args.step_seq_len,
                };
                kernels.extend(training_step_kernels(arch, &shape, step_precision)?);
            }
            recorded.push((arch, kernels));
        }
        println!(
            "\nBurn's CUDA step ({}; {} precision; vocab {}, {}x{} tokens): {} distinct kernels",
            step.join(", "),
            step_precision.name(),
            args.step_vocab,
            args.step_batch,
            args.step_seq_len,
            recorded.iter().map(|(_, k)| k.len()).sum::<usize>()
        );
        // NVRTC and ptxas compile one kernel at a time: one thread per core.
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let jobs: Vec<(Arch, usize, &Launched)> = recorded
            .iter()
            .flat_map(|(arch, kernels)| kernels.iter().enumerate().map(|(i, k)| (*arch, i, k)))
            .collect();
        let chunk = jobs.len().div_ceil(threads).max(1);
        step_rows = std::thread::scope(|scope| {
            let workers: Vec<_> = jobs
                .chunks(chunk)
                .map(|jobs| {
                    let (args, toolkit) = (&args, &toolkit);
                    scope.spawn(move || {
                        jobs.iter()
                            .map(|&(arch, i, k)| check_step_kernel(arch, i, k, args, toolkit))
                            .collect::<Vec<Row>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a kernel check thread panicked"))
                .collect::<Vec<Vec<Row>>>()
        })
        .into_iter()
        .flatten()
        .collect();
        println!("{table}");
        let summary = step_summary(&step_rows);
        println!("{summary}");
        println!(
            "(every kernel of the step: {})",
            args.out.join("table.md").display()
        );
        table.push_str(&format!(
            "\nBurn's kernels of one training step ({}, {}):\n\n{summary}\n",
            step.join(", "),
            step_precision.name()
        ));
        table.push_str(&self::table(&["#", "kernel", "mode"], &step_rows));
    } else {
        println!("{table}");
    }
    std::fs::write(args.out.join("table.md"), &table)?;
    rows.extend(step_rows);
    let unexpanded = rows
        .iter()
        .filter(|r| r.outcome.is_err() && !r.fatal)
        .count();
    if unexpanded > 0 {
        println!(
            "note: {unexpanded} of Burn's kernels panicked in CubeCL's expansion (NOT EXPANDED \
             above); on a device the runner catches that panic and the launch does nothing"
        );
    }
    let failed = rows
        .iter()
        .filter(|r| r.outcome.is_err() && r.fatal)
        .count();
    if failed > 0 {
        bail!("{failed} of {} kernel builds failed (above)", rows.len());
    }
    Ok(())
}

/// Every kernel, precision and head size for `arch`.
fn check_arch(arch: Arch, args: &Args, toolkit: &Toolkit, head_dims: &[usize]) -> Result<Vec<Row>> {
    let client = ComputeClient::<CudaTarget>::load(&arch);
    let mut rows = Vec::new();
    for dtype in &args.dtype {
        for &head_dim in head_dims {
            for kernel in kernel_tasks(&client, storage(dtype)?, head_dim) {
                let stem = args.out.join(format!(
                    "{}_{dtype}_d{head_dim}_{}",
                    kernel.name,
                    arch.nvrtc_name()
                ));
                let broken = args.break_kernel.as_deref() == Some(kernel.name);
                let compiled = cuda_source(kernel.task.as_ref(), arch, ExecutionMode::Checked);
                let shared = compiled.as_ref().map_or(0, |s| s.shared_memory as u32);
                let outcome = compiled.and_then(|mut source| {
                    if broken {
                        source.source.push_str("\nthis line is not C++;\n");
                    }
                    build(&source, &stem, arch, toolkit)
                });
                if let Err(e) = &outcome {
                    eprintln!(
                        "FAILED {} {dtype} d{head_dim} {}: {e:#}",
                        kernel.name,
                        arch.nvrtc_name()
                    );
                }
                rows.push(Row {
                    labels: vec![kernel.name.into(), dtype.clone(), head_dim.to_string()],
                    fatal: true,
                    arch,
                    block: kernel.units,
                    shared,
                    outcome,
                });
            }
        }
    }
    Ok(rows)
}

/// Kernel `i` the recorded step launched on `arch`, assembled as the device would
/// (its CUDA source was generated at the launch).
fn check_step_kernel(
    arch: Arch,
    i: usize,
    launched: &Launched,
    args: &Args,
    toolkit: &Toolkit,
) -> Row {
    let name = short_name(launched.name);
    let stem = args.out.join(format!(
        "step{i:03}_{}_{}",
        file_name(&name),
        arch.nvrtc_name()
    ));
    let compiled = launched.source.as_ref().map_err(|e| anyhow::anyhow!("{e}"));
    let (block, shared) = compiled
        .as_ref()
        .map_or((0, 0), |s| (s.block, s.shared_memory as u32));
    let outcome = compiled.and_then(|source| build(source, &stem, arch, toolkit));
    let expansion = launched.source.is_err();
    if let Err(e) = &outcome {
        let what = if expansion { "NOT EXPANDED" } else { "FAILED" };
        eprintln!("{what} step kernel {i} {name} {}: {e:#}", arch.nvrtc_name());
    }
    let mode = match launched.mode {
        ExecutionMode::Checked => "checked",
        _ => "unchecked",
    };
    Row {
        labels: vec![i.to_string(), name, mode.into()],
        fatal: !expansion,
        arch,
        block,
        shared,
        outcome,
    }
}

/// The step's kernels by kind (the type name up to its generic arguments): how many,
/// how many were expanded, assembled, spill, or run below 25% occupancy, and the most
/// registers one uses.
fn step_summary(rows: &[Row]) -> String {
    #[derive(Default)]
    struct Kind {
        kernels: usize,
        unexpanded: usize,
        failed: usize,
        spilling: usize,
        low: usize,
        registers: u32,
    }
    let mut kinds: std::collections::BTreeMap<(String, String), Kind> = Default::default();
    for r in rows {
        let name = r.labels[1].split('<').next().unwrap_or("").to_string();
        let kind = kinds.entry((name, r.arch.nvrtc_name())).or_default();
        kind.kernels += 1;
        match &r.outcome {
            Ok(res) => {
                let o = r.occupancy(res);
                kind.spilling += res.spills() as usize;
                kind.low += (o.fraction < 0.25) as usize;
                kind.registers = kind.registers.max(res.registers);
            }
            Err(_) if !r.fatal => kind.unexpanded += 1,
            Err(_) => kind.failed += 1,
        }
    }
    let mut out = String::from(
        "| kernel of the step | arch | kernels | not expanded | failed | spill | occupancy < 25% | max registers |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for ((name, arch), k) in kinds {
        out.push_str(&format!(
            "| {name} | {arch} | {} | {} | {} | {} | {} | {} |\n",
            k.kernels, k.unexpanded, k.failed, k.spilling, k.low, k.registers
        ));
    }
    out
}

/// A kernel's Rust type name without module paths, generic arguments shortened the
/// same way and runtime arguments dropped: `MatmulEntry<TensorMapArgs, ..>`,
/// `KernelBinop<MulOp>`, `ElemwiseFuse`.
fn short_name(type_name: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let last = word.rsplit("::").next().unwrap_or("").to_string();
        let runtime = last == "CudaTarget";
        if !runtime {
            out.push_str(&last);
        }
        word.clear();
        runtime
    };
    for c in type_name.chars() {
        match c {
            '<' | '>' | ',' => {
                let dropped = flush(&mut word, &mut out);
                if dropped && out.ends_with(", ") {
                    out.truncate(out.len() - 2);
                }
                if dropped && c == ',' {
                    continue;
                }
                out.push(c);
                if c == ',' {
                    out.push(' ');
                }
            }
            ' ' => {}
            _ => word.push(c),
        }
    }
    flush(&mut word, &mut out);
    out.replace("<>", "")
}

/// `name` with only letters, digits and underscores.
fn file_name(name: &str) -> String {
    let head = name.split('<').next().unwrap_or(name);
    head.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// CUDA source to PTX to ptxas's resource report; the files are kept next to `stem`.
fn build(
    source: &mixlm_kernel_check::target::CudaSource,
    stem: &Path,
    arch: Arch,
    toolkit: &Toolkit,
) -> Result<ptxas::Resources> {
    let cu = stem.with_extension("cu");
    std::fs::write(&cu, &source.source)?;
    let ptx = nvrtc::compile(&source.source, &source.entrypoint, arch, toolkit)
        .with_context(|| format!("NVRTC on {}", cu.display()))?;
    let ptx_file = stem.with_extension("ptx");
    std::fs::write(&ptx_file, ptx)?;
    ptxas::assemble(&toolkit.ptxas, &ptx_file, &source.entrypoint, arch)
}

fn table(labels: &[&str], rows: &[Row]) -> String {
    let mut out = format!(
        "| {} | arch | threads | registers | stack B | spill st/ld B | shared B | blocks/SM | occupancy | limited by | note |\n\
         |{}---|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
        labels.join(" | "),
        "---|".repeat(labels.len())
    );
    for r in rows {
        let labels = r.labels.join(" | ");
        let line = match &r.outcome {
            Ok(res) => {
                let sm = Sm::of(r.arch);
                let o = r.occupancy(res);
                let mut notes = Vec::new();
                if res.spills() {
                    notes.push("SPILLS");
                }
                if o.fraction < 0.25 {
                    notes.push("occupancy < 25%");
                }
                format!(
                    "| {labels} | {} | {} | {} | {} | {}/{} | {} | {} | {:.1}% ({}) | {} | {} |",
                    r.arch.nvrtc_name(),
                    r.block,
                    res.registers,
                    res.stack_bytes,
                    res.spill_store_bytes,
                    res.spill_load_bytes,
                    r.shared + res.static_shared_bytes,
                    o.blocks,
                    100.0 * o.fraction,
                    sm.name,
                    o.limited_by,
                    notes.join(", ")
                )
            }
            Err(_) => format!(
                "| {labels} | {} | {} | | | | {} | | | | {} |",
                r.arch.nvrtc_name(),
                r.block,
                r.shared,
                if r.fatal {
                    "FAILED"
                } else {
                    "NOT EXPANDED (panicked in CubeCL)"
                }
            ),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_paths_and_the_runtime() {
        assert_eq!(
            short_name("burn_cubecl::kernel::binary::kernel_binop::KernelBinop<burn_cubecl::kernel::binary::MulOp, mixlm_kernel_check::target::CudaTarget>"),
            "KernelBinop<MulOp>"
        );
        assert_eq!(
            short_name("burn_cubecl_fusion::optim::elemwise::optimization::elemwise_fuse::ElemwiseFuse<mixlm_kernel_check::target::CudaTarget>"),
            "ElemwiseFuse"
        );
        assert_eq!(file_name("MatmulEntry<TensorMapArgs, X>"), "MatmulEntry");
    }
}

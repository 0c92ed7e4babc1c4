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
use mixlm_kernel_check::occupancy::{occupancy, Sm};
use mixlm_kernel_check::ptxas;
use mixlm_kernel_check::target::{cuda_source, Arch, CudaTarget};
use mixlm_model::attention::cube::kernel_tasks;
use mixlm_model::{ModelConfig, PRESETS};

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
}

/// One row of the table.
struct Row {
    kernel: &'static str,
    dtype: String,
    head_dim: usize,
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
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    println!(
        "mixlm-kernel-check: NVRTC {major}.{minor}, {}; head sizes {head_dims:?}; sources in {}",
        toolkit.ptxas.display(),
        args.out.display()
    );
    // One thread per architecture: NVRTC and ptxas run one kernel at a time each.
    let rows: Vec<Row> = std::thread::scope(|scope| {
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
    let table = table(&rows);
    println!("{table}");
    std::fs::write(args.out.join("table.md"), &table)?;
    let failed = rows.iter().filter(|r| r.outcome.is_err()).count();
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
                    kernel: kernel.name,
                    dtype: dtype.clone(),
                    head_dim,
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

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| kernel | dtype | head | arch | threads | registers | stack B | spill st/ld B | shared B | blocks/SM | occupancy | limited by | note |\n\
         |---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for r in rows {
        let line = match &r.outcome {
            Ok(res) => {
                let sm = Sm::of(r.arch);
                let o = occupancy(
                    sm,
                    r.block,
                    res.registers,
                    r.shared + res.static_shared_bytes,
                );
                let mut notes = Vec::new();
                if res.spills() {
                    notes.push("SPILLS");
                }
                if o.fraction < 0.25 {
                    notes.push("occupancy < 25%");
                }
                format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {:.1}% ({}) | {} | {} |",
                    r.kernel,
                    r.dtype,
                    r.head_dim,
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
                "| {} | {} | {} | {} | {} | | | | {} | | | | FAILED |",
                r.kernel,
                r.dtype,
                r.head_dim,
                r.arch.nvrtc_name(),
                r.block,
                r.shared
            ),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

//! `mixlm check-backend`: whether a device computes what the CPU does (attention
//! kernels, a few training steps, the data-parallel path), before a long job.

use anyhow::Result;
use mixlm_model::Precision;
use mixlm_train::BackendKind;

#[derive(clap::Args)]
pub struct Args {
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cuda")]
    pub backend: String,
    /// Compute precision training would use: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Skip the presets' attention shapes (sequence 2048) and their timings.
    #[arg(long)]
    pub quick: bool,
    /// Training steps compared with the CPU.
    #[arg(long, default_value_t = 8)]
    pub steps: u64,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        backend,
        precision,
        quick,
        steps,
    } = args;
    let precision = match precision.as_str() {
        "f32" => Precision::F32,
        "bf16" => Precision::Bf16,
        other => anyhow::bail!("--precision {other}: use f32 or bf16"),
    };
    let mut options =
        mixlm_inspect::check::CheckOptions::new(backend.parse::<BackendKind>()?, precision);
    options.preset_shapes &= !quick;
    options.steps = steps;
    let findings = mixlm_inspect::check::check_backend(&options, |f| println!("{f}"))?;
    let failed = mixlm_inspect::doctor::failures(&findings);
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed on the {backend} backend");
    }
    match BackendKind::Cpu.compiled() {
        true => println!("the {backend} backend computes what the CPU reference does"),
        false => println!(
            "the {backend} backend passed the checks this build can make (without the \
             CPU reference: see the warning above)"
        ),
    }
    Ok(())
}

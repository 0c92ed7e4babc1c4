//! The kernels' CUDA source, generated without CUDA installed; NVRTC and ptxas on it
//! where a toolkit is given (`CUDA_PATH`, libnvrtc on the library path), skipped with
//! the reason otherwise (`scripts/cuda-kernels.sh` and `.ci/run` run them all).

use std::path::PathBuf;

use cubecl::prelude::*;
use cubecl_ir::{ElemType, FloatKind};
use mixlm_kernel_check::nvrtc::{self, Toolkit};
use mixlm_kernel_check::target::{cuda_source, Arch, CudaSource, CudaTarget};
use mixlm_kernel_check::{occupancy, ptxas};
use mixlm_model::attention::cube::{geometry, kernel_tasks};

fn sources(arch: Arch, kind: FloatKind, head_dim: usize) -> Vec<(&'static str, u32, CudaSource)> {
    let client = ComputeClient::<CudaTarget>::load(&arch);
    kernel_tasks(&client, ElemType::Float(kind).into(), head_dim)
        .into_iter()
        .map(|k| {
            let source = cuda_source(k.task.as_ref(), arch, ExecutionMode::Checked).unwrap();
            (k.name, k.units, source)
        })
        .collect()
}

#[test]
fn every_kernel_becomes_cuda_source_for_both_architectures() {
    for arch in [Arch::SM80, Arch::SM90] {
        let kernels = sources(arch, FloatKind::BF16, 64);
        let names: Vec<_> = kernels.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(names, ["forward", "backward_query", "backward_key"]);
        for (name, units, s) in &kernels {
            // 64 rows per block fit at head size 64, each shared by 4 units of 16
            // elements.
            let expected_units = 256;
            assert_eq!(*units, expected_units, "{name}");
            assert!(s.source.contains("extern \"C\" __global__"), "{name}");
            assert!(
                s.source
                    .contains(&format!("__launch_bounds__({expected_units})")),
                "{name}"
            );
            assert!(s.source.contains("cuda_bf16.h"), "{name}");
            // Two [64, 64] f32 tiles; the key side also stages two [64] vectors
            // (log-sum-exp and delta).
            let tiles = 2 * 64 * 64 * 4;
            let expected = if *name == "backward_key" {
                tiles + 2 * 64 * 4
            } else {
                tiles
            };
            assert_eq!(s.shared_memory, expected, "{name}");
        }
    }
}

#[test]
fn cuda_splits_rows_into_parts_of_16_and_the_code_stays_small() {
    let client = ComputeClient::<CudaTarget>::load(&Arch::SM90);
    // (head size, rows per block, lanes): at most 512 units per cube.
    for (d, block, lanes) in [(16, 64, 1), (64, 64, 4), (128, 64, 8), (256, 32, 16)] {
        assert_eq!(geometry(&client, d), (block, lanes), "head size {d}");
    }
    // Each unit unrolls its 16 elements whatever the head size, so the source does not
    // grow with it (unrolled whole rows made a megabyte per kernel at 256).
    let len = |d| -> usize {
        sources(Arch::SM90, FloatKind::F32, d)
            .iter()
            .map(|(_, _, s)| s.source.len())
            .sum()
    };
    let (d64, d256) = (len(64), len(256));
    assert!(d256 < 2 * d64, "{d64} {d256}");
}

#[test]
fn a_folder_without_a_toolkit_is_named() {
    let e = Toolkit::find(&PathBuf::from("/nonexistent/cuda"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/nonexistent/cuda: no CUDA headers"), "{e}");
}

/// The toolkit of `CUDA_PATH`, when NVRTC loads too.
fn toolkit() -> Option<Toolkit> {
    let Some(root) = std::env::var_os("CUDA_PATH") else {
        println!("skipped: CUDA_PATH is not set (scripts/cuda-kernels.sh compiles the kernels)");
        return None;
    };
    if !nvrtc::available() {
        println!("skipped: libnvrtc is not on the library path");
        return None;
    }
    Some(Toolkit::find(&PathBuf::from(root)).unwrap())
}

#[test]
fn nvrtc_and_ptxas_take_the_forward_kernel_and_refuse_a_broken_one() {
    let Some(toolkit) = toolkit() else { return };
    let (_, units, s) = sources(Arch::SM90, FloatKind::BF16, 64).remove(0);
    let dir = tempfile::tempdir().unwrap();
    let ptx = nvrtc::compile(&s.source, &s.entrypoint, Arch::SM90, &toolkit).unwrap();
    let file = dir.path().join("forward.ptx");
    std::fs::write(&file, ptx).unwrap();
    let r = ptxas::assemble(&toolkit.ptxas, &file, &s.entrypoint, Arch::SM90).unwrap();
    assert!(r.registers > 0 && r.registers <= 255, "{r:?}");
    let o = occupancy::occupancy(
        occupancy::Sm::H100,
        units,
        r.registers,
        s.shared_memory as u32,
    );
    assert!(o.blocks > 0, "{o:?}");
    let broken = format!("{}\nthis line is not C++;\n", s.source);
    let e = nvrtc::compile(&broken, &s.entrypoint, Arch::SM90, &toolkit)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NVRTC failed"), "{e}");
}

/// One bf16 training step of the tiny preset on Burn's CUDA backend, recorded: it
/// launches Burn's matmul (tensor-core candidates among them on sm_90), fused
/// element-wise kernels and mixlm's three attention kernels, each as CUDA C++.
#[test]
fn the_recorded_training_step_launches_matmul_fusion_and_attention_as_cuda() {
    use mixlm_kernel_check::step::{fresh_autotune, training_step_kernels, StepShape};
    let dir = tempfile::tempdir().unwrap();
    fresh_autotune(&dir.path().join("autotune"));
    let shape = StepShape {
        preset: "tiny".into(),
        vocab: 512,
        batch: 2,
        seq_len: 64,
    };
    let kernels = training_step_kernels(Arch::SM90, &shape, mixlm_model::Precision::Bf16).unwrap();
    let named = |part: &str| {
        kernels
            .iter()
            .filter(|k| k.name.contains(part))
            .collect::<Vec<_>>()
    };
    for kind in [
        "MatmulEntry",
        "ElemwiseFuse",
        "ForwardKernel",
        "BackwardQueryKernel",
        "BackwardKeyKernel",
    ] {
        assert!(
            !named(kind).is_empty(),
            "no {kind} among {} kernels",
            kernels.len()
        );
    }
    // Every matmul is CUDA source for the launch's block; attention's are as in
    // kernel_tasks.
    for k in named("MatmulEntry") {
        let s = k.source.as_ref().unwrap();
        assert!(s.source.contains("extern \"C\" __global__"));
        assert!(s.block >= 32, "{}", k.name);
    }
    let uses_tensor_cores = named("MatmulEntry").iter().any(|k| {
        let s = &k.source.as_ref().unwrap().source;
        s.contains("mma.sync") || s.contains("wmma::")
    });
    assert!(uses_tensor_cores, "no matmul kernel uses the tensor cores");
    // The first step tuned the matmuls (every candidate launched once); a second one
    // launches only the chosen ones.
    let second = training_step_kernels(Arch::SM90, &shape, mixlm_model::Precision::Bf16).unwrap();
    let matmuls = |ks: &[mixlm_kernel_check::target::Launched]| {
        ks.iter().filter(|k| k.name.contains("MatmulEntry")).count()
    };
    assert!(
        0 < matmuls(&second) && matmuls(&second) < named("MatmulEntry").len(),
        "{} matmul kernels in the first step, {} in the second",
        named("MatmulEntry").len(),
        matmuls(&second)
    );
}

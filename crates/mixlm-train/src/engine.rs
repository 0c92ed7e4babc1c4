//! A backend's device behind non-generic methods: everything `mixlm eval`, SampleMix's
//! scoring and embedding, and `mixlm check-backend` ask of a backend.
//!
//! Those commands live in other crates (`mixlm-inspect`, `mixlm-experiments`). When
//! each ran its own generic job through [`dispatch`], each compiled Burn's generic
//! model, tensor, autodiff and fusion code again for every backend, because a release
//! build does not share generic instances between crates. That was most of the first
//! build's time (benches/RESULTS.md, "The first build"). Through [`on_engine`] the
//! generic code is instantiated once, here, next to the trainer's own instances of
//! the same model, and the other crates hold a `&dyn Engine` and a
//! `Box<dyn LanguageModel>`. A call costs one virtual dispatch per batch.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use mixlm_eval::diversity::{assign, kmeans, KMeans};
use mixlm_eval::model::{BurnModel, LanguageModel};
use mixlm_model::attention::{
    attention_agreement, causal_attention, time_attention, AttentionAgreement,
};
use mixlm_model::{AttentionKernel, Compute, Precision, TrainBackend};

use crate::backend::{dispatch, BackendKind, OnBackend};

/// One device of one backend (see the module's documentation).
pub trait Engine {
    /// The device and Burn's name for the backend, for reports.
    fn describe(&self) -> String;

    /// Refuses a `run.precision` the device cannot compute in
    /// ([`crate::trainer::check_precision`]).
    fn check_precision(&self, precision: Precision) -> Result<()>;

    /// The model of a checkpoint folder ([`crate::checkpoint::load_model`]), computing
    /// as `compute` says (the default precision and attention when `None`).
    fn load_model(&self, dir: &Path, compute: Option<Compute>) -> Result<Box<dyn LanguageModel>>;

    /// [`mixlm_eval::diversity::kmeans`] on this device.
    fn kmeans(&self, points: &[f32], dim: usize, k: usize, max_iters: usize, seed: u64) -> KMeans;

    /// [`mixlm_eval::diversity::assign`] on this device.
    fn assign(&self, points: &[f32], centroids: &[f32], dim: usize) -> (Vec<usize>, Vec<f32>);

    /// The fused causal attention against Burn's in f32 on `shape`
    /// ([`mixlm_model::attention::attention_agreement`]).
    fn attention_agreement(&self, shape: [usize; 4], precision: Precision) -> AttentionAgreement;

    /// One forward and backward pass of `kernel` ([`mixlm_model::attention::time_attention`]).
    fn time_attention(
        &self,
        shape: [usize; 4],
        precision: Precision,
        kernel: AttentionKernel,
        iterations: usize,
    ) -> Result<Duration>;
}

/// The [`Engine`] of backend `B` (an autodiff backend, as training runs it; inference
/// runs on its inner backend).
struct BackendEngine<B: TrainBackend> {
    device: B::Device,
}

impl<B: TrainBackend> Engine for BackendEngine<B> {
    fn describe(&self) -> String {
        format!("device {:?} ({})", self.device, B::name(&self.device))
    }

    fn check_precision(&self, precision: Precision) -> Result<()> {
        crate::trainer::check_precision::<B>(precision, &self.device)
    }

    fn load_model(&self, dir: &Path, compute: Option<Compute>) -> Result<Box<dyn LanguageModel>> {
        let (model, config) = crate::checkpoint::load_model::<B::InnerBackend>(dir, &self.device)?;
        let model = match compute {
            Some(c) => model.with_compute(c),
            None => model,
        };
        Ok(Box::new(BurnModel::<B::InnerBackend> {
            model,
            config,
            device: self.device.clone(),
        }))
    }

    fn kmeans(&self, points: &[f32], dim: usize, k: usize, max_iters: usize, seed: u64) -> KMeans {
        kmeans::<B::InnerBackend>(points, dim, k, max_iters, seed, &self.device)
    }

    fn assign(&self, points: &[f32], centroids: &[f32], dim: usize) -> (Vec<usize>, Vec<f32>) {
        assign::<B::InnerBackend>(points, centroids, dim, &self.device)
    }

    fn attention_agreement(&self, shape: [usize; 4], precision: Precision) -> AttentionAgreement {
        attention_agreement::<B>(shape, precision, &self.device, causal_attention)
    }

    fn time_attention(
        &self,
        shape: [usize; 4],
        precision: Precision,
        kernel: AttentionKernel,
        iterations: usize,
    ) -> Result<Duration> {
        Ok(time_attention::<B>(
            shape,
            precision,
            kernel,
            iterations,
            &self.device,
        )?)
    }
}

/// Runs `work` with the [`Engine`] of `kind`'s default device (on the CPU, on one of
/// rayon's workers, as [`dispatch`] runs every job).
pub fn on_engine<T: Send>(
    kind: BackendKind,
    work: impl FnOnce(&dyn Engine) -> Result<T> + Send,
) -> Result<T> {
    let mut work = Some(work);
    let mut out = None;
    run_engine(kind, &mut |engine| {
        let work = work.take().expect("an engine job runs once");
        out = Some(work(engine)?);
        Ok(())
    })?;
    Ok(out.expect("the engine job ran"))
}

/// [`on_engine`] without its type parameters: the one place the jobs are
/// instantiated for each backend.
fn run_engine(
    kind: BackendKind,
    work: &mut (dyn FnMut(&dyn Engine) -> Result<()> + Send),
) -> Result<()> {
    struct Job<'a>(&'a mut (dyn FnMut(&dyn Engine) -> Result<()> + Send));
    impl OnBackend for Job<'_> {
        type Output = ();
        fn run<B: TrainBackend>(self, device: &B::Device) -> Result<()> {
            (self.0)(&BackendEngine::<B> {
                device: device.clone(),
            })
        }
    }
    dispatch(kind, Job(work))
}

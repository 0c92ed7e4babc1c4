//! Per-domain validation losses during training: for the metrics, and for the
//! schedulers that learn from them.

use std::sync::Arc;

use anyhow::Result;
use burn::module::AutodiffModule;
use mixlm_data::TokenSource;
use mixlm_eval::validation_losses;
use mixlm_mixing::DomainLosses;
use mixlm_model::{TrainBackend, Transformer};

use crate::config::RunConfig;
use crate::distributed::Peer;

/// The run's validation windows (`eval.sequences` per domain).
pub struct Validation {
    source: Arc<dyn TokenSource>,
    seq_len: usize,
    sequences: usize,
    batch_size: usize,
}

impl Validation {
    pub fn new(source: Arc<dyn TokenSource>, config: &RunConfig) -> Self {
        Self {
            source,
            seq_len: config.run.seq_len,
            sequences: config.eval.sequences,
            batch_size: config.eval.batch_size,
        }
    }

    /// Each domain's mean loss over its validation windows.
    pub fn losses<B: TrainBackend>(
        &self,
        model: &Transformer<B>,
        device: &B::Device,
    ) -> DomainLosses {
        validation_losses(
            &model.valid(),
            self.source.as_ref(),
            self.seq_len,
            self.sequences,
            self.batch_size,
            device,
        )
    }

    /// [`Self::losses`] as a scheduler learns them, the same on every peer: peer 0
    /// measures them and hands them to the others.
    pub fn shared<B: TrainBackend>(
        &self,
        model: &Transformer<B>,
        peer: &Peer<B::InnerBackend>,
        device: &B::Device,
    ) -> Result<DomainLosses> {
        if !peer.collective() {
            return Ok(self.losses(model, device));
        }
        let k = self.source.domain_names().len();
        let mine = match peer.rank().is_leader() {
            true => self.losses(model, device).0,
            false => vec![None; k],
        };
        let encoded: Vec<f64> = mine.iter().map(|l| l.unwrap_or(f64::NAN)).collect();
        let all = peer.gather("validation losses", &encoded)?;
        Ok(DomainLosses(
            all[0].iter().map(|&l| (!l.is_nan()).then_some(l)).collect(),
        ))
    }
}

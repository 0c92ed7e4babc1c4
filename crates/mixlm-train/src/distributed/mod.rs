//! Data-parallel training on Burn's collective engine (`burn-collective`).
//!
//! Every peer holds a full replica of the model and runs the same training loop on
//! its own device. Per step it reads its share of the global batch, computes its
//! gradients, and then, through the [`Peer`] handle (the trainer's only way to talk to
//! the others):
//! - the gradients are averaged over the peers ([`Peer::mean_grads`], in buckets of
//!   consecutive parameters), so every replica takes the same AdamW step;
//! - the per-domain loss sums and counts are gathered ([`Peer::gather`]), so every
//!   peer's scheduler is fed the global batch's losses and makes the same proportion
//!   decision, which is checked each step by comparing a hash of the proportions.
//!
//! [`run_peers`] runs the peers as threads of this process and watches them: a peer
//! that fails makes the others stop at once, and one that stops answering makes them
//! stop after `distributed.timeout_s`, each with an error naming the peer.
//!
//! The modules: [`peer`] (the handle and its operations), [`launch`] (peer threads
//! and their watchdog), [`nccl`] (gradients all-reduced during the backward pass on
//! CUDA) and [`nodes`] (multi-node runs and their orchestrator).

pub mod launch;
pub mod nccl;
pub mod nodes;
pub mod peer;
pub mod shard;
#[cfg(test)]
mod tests;

use anyhow::{bail, Result};

pub use launch::{panic_message, run_peers, Heartbeat, PeerPanic};
pub use nccl::{mark_for_all_reduce, GradSyncServer, NCCL_BUILD};
pub use nodes::run_orchestrator;
pub use peer::{materialize, sum_domain_losses, Peer};
pub use shard::{Shard, ShardLayout};

/// This peer's place in a data-parallel run: `rank` of `world` peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
}

impl Rank {
    /// A run on one device.
    pub const SOLO: Rank = Rank { rank: 0, world: 1 };

    /// Peer 0 writes the metrics, checkpoints and progress; the others only compute.
    pub fn is_leader(self) -> bool {
        self.rank == 0
    }
}

/// A 64-bit hash of some numbers, as four 16-bit pieces (exact through [`Peer::gather`]).
pub fn checksum(values: &[f64]) -> [f64; 4] {
    let words: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
    let h = mixlm_data::seeding::hash_words(&words);
    std::array::from_fn(|i| ((h >> (16 * i)) & 0xffff) as f64)
}

/// Fails loudly when the peers disagree on `what` (each sent [`checksum`]s of theirs).
pub fn check_agreement(what: &str, step: u64, sums: &[Vec<f64>]) -> Result<()> {
    if let Some((rank, _)) = sums.iter().enumerate().find(|(_, s)| *s != &sums[0]) {
        bail!(
            "peers diverged at step {step}: peer {rank}'s {what} differ from peer 0's. Every \
             peer must be fed the same losses; this is a bug in mixlm or in the mixing \
             method's determinism (please report it with the run's config)"
        );
    }
    Ok(())
}

/// Tests that start collectives take this first: burn-collective has one server per
/// backend and process, and `cargo test` runs tests as threads of one process.
#[cfg(test)]
pub(crate) static ONE_GROUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

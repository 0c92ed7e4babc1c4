//! Drawing and reading micro-batches on a background thread, so the accelerator does
//! not wait on the sampler or on page faults into memory-mapped shards.
//!
//! The trainer *requests* a micro-batch as soon as it knows the proportions it must
//! be drawn with and *takes* it when it needs the tokens. Requests are served in
//! order by one worker that owns the [`MixtureSampler`], so the batches are exactly
//! those the sampler would give on the main thread, whatever the timing. Each batch
//! carries the sampler state right after it was drawn: a checkpoint taken after
//! consuming it saves that state, not the worker's (which may be ahead).

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use mixlm_mixing::{Composition, DomainId, Proportions};

use crate::sampler::{fetch_batch, MixtureSampler, SamplerState};
use crate::source::{Split, TokenSource};

/// One micro-batch read ahead.
#[derive(Debug, Clone, PartialEq)]
pub struct Prefetched {
    /// `(domain, window index)` of each sequence.
    pub picks: Vec<(DomainId, u64)>,
    /// `[picks.len(), seq_len + 1]` tokens, row-major.
    pub windows: Vec<u32>,
    /// The sampler state after this batch was drawn.
    pub state_after: SamplerState,
}

/// A background reader of mixture batches (see the module docs).
pub struct Prefetcher {
    requests: Option<Sender<(Proportions, Composition)>>,
    batches: Receiver<Prefetched>,
    worker: Option<JoinHandle<()>>,
    /// Requested and not yet taken.
    pending: usize,
    /// The state after the last batch taken (what a checkpoint saves).
    consumed: SamplerState,
    /// Proportions of the requests not yet taken, oldest first (for [`Self::queued`]).
    queued: VecDeque<Proportions>,
}

impl Prefetcher {
    /// Starts the worker: it draws `batch_size` sequences of `seq_len + 1` tokens
    /// from `split` per request, continuing `sampler`'s sequence.
    pub fn spawn(
        source: Arc<dyn TokenSource>,
        sampler: MixtureSampler,
        split: Split,
        batch_size: usize,
        seq_len: usize,
    ) -> Self {
        Self::spawn_shard(source, sampler, split, batch_size, seq_len, 0, 1)
    }

    /// [`Prefetcher::spawn`] for data-parallel peer `rank` of `world`: every request
    /// draws `world` micro-batches from the shared stream and reads only the
    /// `rank`-th. The peers thus split, between them, exactly the batches one device
    /// would draw, and their sampler states stay identical (one checkpoint serves all).
    pub fn spawn_shard(
        source: Arc<dyn TokenSource>,
        mut sampler: MixtureSampler,
        split: Split,
        batch_size: usize,
        seq_len: usize,
        rank: usize,
        world: usize,
    ) -> Self {
        assert!(rank < world, "peer {rank} of {world}");
        let consumed = sampler.state();
        let (req_tx, req_rx) = channel::<(Proportions, Composition)>();
        let (batch_tx, batch_rx) = channel::<Prefetched>();
        let worker = std::thread::Builder::new()
            .name("mixlm-prefetch".into())
            .spawn(move || {
                for (proportions, composition) in req_rx {
                    let mut picks = Vec::new();
                    for peer in 0..world {
                        let drawn = sampler.next_batch_as(&proportions, composition, batch_size);
                        if peer == rank {
                            picks = drawn;
                        }
                    }
                    let windows = fetch_batch(source.as_ref(), split, &picks, seq_len);
                    let batch = Prefetched {
                        picks,
                        windows,
                        state_after: sampler.state(),
                    };
                    if batch_tx.send(batch).is_err() {
                        return; // the trainer has gone
                    }
                }
            })
            .expect("cannot start the prefetch thread");
        Self {
            requests: Some(req_tx),
            batches: batch_rx,
            worker: Some(worker),
            pending: 0,
            consumed,
            queued: VecDeque::new(),
        }
    }

    /// Queues one micro-batch drawn with `proportions`, split among domains as
    /// `composition` says (after all earlier requests).
    pub fn request(&mut self, proportions: &Proportions, composition: Composition) {
        let sent = self
            .requests
            .as_ref()
            .expect("requests open until drop")
            .send((proportions.clone(), composition));
        if sent.is_err() {
            self.worker_failed();
        }
        self.pending += 1;
        self.queued.push_back(proportions.clone());
    }

    /// The oldest requested micro-batch, waiting for it if it is not ready yet.
    /// Panics if nothing was requested.
    pub fn take(&mut self) -> Prefetched {
        assert!(self.pending > 0, "Prefetcher::take with no batch requested");
        let batch = match self.batches.recv() {
            Ok(b) => b,
            Err(_) => self.worker_failed(),
        };
        self.pending -= 1;
        self.queued.pop_front();
        self.consumed = batch.state_after.clone();
        batch
    }

    /// Micro-batches requested and not yet taken.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The proportions of the requests not yet taken, oldest first.
    pub fn queued(&self) -> impl Iterator<Item = &Proportions> {
        self.queued.iter()
    }

    /// The sampler state after the last batch taken: what to checkpoint.
    pub fn consumed_state(&self) -> &SamplerState {
        &self.consumed
    }

    /// The worker has stopped: it panicked (a source read failed). Re-raise its panic
    /// here so the message reaches the user.
    fn worker_failed(&mut self) -> ! {
        self.requests = None;
        match self.worker.take().map(JoinHandle::join) {
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            _ => panic!("the prefetch thread stopped unexpectedly"),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the request channel ends the worker's loop; batches it is still
        // reading are dropped with the receiver.
        self.requests = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{SyntheticConfig, SyntheticCorpus};

    fn corpus() -> Arc<dyn TokenSource> {
        Arc::new(SyntheticCorpus::new(&SyntheticConfig::default()).unwrap())
    }

    /// Three peers' shards interleave into exactly the stream one device draws, and
    /// every peer carries the same sampler state.
    #[test]
    fn peer_shards_partition_the_single_device_stream() {
        let source = corpus();
        let k = source.domain_names().len();
        let p = Proportions::from_weights((1..=k).map(|i| i as f64).collect()).unwrap();
        for composition in [Composition::Sample, Composition::Fixed] {
            let mut reference = MixtureSampler::new(k, 5, composition);
            let mut peers: Vec<Prefetcher> = (0..3)
                .map(|rank| {
                    Prefetcher::spawn_shard(
                        source.clone(),
                        MixtureSampler::new(k, 5, composition),
                        Split::Train,
                        4,
                        7,
                        rank,
                        3,
                    )
                })
                .collect();
            for _ in 0..5 {
                let mut states = Vec::new();
                for peer in &mut peers {
                    peer.request(&p, composition);
                    let got = peer.take();
                    assert_eq!(got.picks, reference.next_batch(&p, 4));
                    assert_eq!(
                        got.windows,
                        fetch_batch(source.as_ref(), Split::Train, &got.picks, 7)
                    );
                    states.push(got.state_after);
                }
                assert!(states.iter().all(|s| *s == reference.state()));
            }
        }
    }

    #[test]
    fn prefetched_batches_equal_the_synchronous_ones_and_carry_their_state() {
        let source = corpus();
        let k = source.domain_names().len();
        let props = |i: usize| {
            let mut w = vec![1.0; k];
            w[i % k] = 5.0;
            Proportions::from_weights(w).unwrap()
        };
        for composition in [Composition::Sample, Composition::Fixed, Composition::Single] {
            let mut reference = MixtureSampler::new(k, 11, composition);
            let mut pf = Prefetcher::spawn(
                source.clone(),
                MixtureSampler::new(k, 11, composition),
                Split::Train,
                6,
                9,
            );
            // Requests run ahead of takes by up to 3, as a trainer's would.
            let mut next_request = 0;
            for i in 0..12 {
                while next_request < (i + 3).min(12) {
                    pf.request(&props(next_request), composition);
                    next_request += 1;
                }
                assert_eq!(pf.pending(), next_request - i);
                assert_eq!(pf.queued().next(), Some(&props(i)));
                let got = pf.take();
                let picks = reference.next_batch(&props(i), 6);
                assert_eq!(got.picks, picks);
                assert_eq!(
                    got.windows,
                    fetch_batch(source.as_ref(), Split::Train, &picks, 9)
                );
                assert_eq!(got.state_after, reference.state());
                // The consumed state lags the worker's, which is ahead.
                assert_eq!(*pf.consumed_state(), reference.state());
            }
            // Resuming from a consumed state continues the same sequence.
            let saved = pf.consumed_state().clone();
            drop(pf);
            let mut resumed = Prefetcher::spawn(
                source.clone(),
                MixtureSampler::from_state(saved, composition),
                Split::Train,
                6,
                9,
            );
            resumed.request(&props(12), composition);
            assert_eq!(resumed.take().picks, reference.next_batch(&props(12), 6));
        }
    }

    #[test]
    fn a_failing_source_surfaces_its_panic_on_take() {
        struct Broken;
        impl TokenSource for Broken {
            fn domain_names(&self) -> Vec<String> {
                vec!["only".into()]
            }
            fn vocab_size(&self) -> usize {
                4
            }
            fn eos_id(&self) -> u32 {
                0
            }
            fn natural_weights(&self) -> Vec<f64> {
                vec![1.0]
            }
            fn num_windows(&self, _: DomainId, _: Split, _: usize) -> Option<u64> {
                None
            }
            fn window_into(&self, _: DomainId, _: Split, _: u64, _: usize, _: &mut Vec<u32>) {
                panic!("disk read failed: shard train/only.bin");
            }
            fn floor_loss(&self, _: DomainId, _: usize) -> Option<f64> {
                None
            }
        }
        let mut pf = Prefetcher::spawn(
            Arc::new(Broken),
            MixtureSampler::new(1, 0, Composition::Sample),
            Split::Train,
            2,
            3,
        );
        pf.request(&Proportions::uniform(1), Composition::Sample);
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pf.take()))
            .expect_err("take must re-raise the worker's panic");
        let msg = err
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(msg.contains("shard train/only.bin"), "{msg}");
    }
}

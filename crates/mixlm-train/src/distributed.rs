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

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, CollectiveError, PeerId, ReduceOperation};

use crate::config::{port_of, DistributedSection};
use mixlm_eval::DomainAccumulator;

/// PyTorch DDP's default bucket: large enough that per-message latency is amortised,
/// small enough to keep the extra copy of the gradients it makes small.
const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

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

/// What the watchdog of [`run_peers`] sees of one peer.
#[derive(Debug, Default)]
pub struct Heartbeat {
    /// The optimizer step it is in.
    step: AtomicU64,
    /// Set while it waits in a collective operation: which one, since when.
    waiting: Mutex<Option<(&'static str, Instant)>>,
    /// Its work returned `Ok` (a thread that ended without it failed).
    succeeded: AtomicBool,
    /// Its error, when its work returned one (for the report when the others cannot
    /// be stopped).
    failure: Mutex<Option<String>>,
}

impl Heartbeat {
    /// Records the step the peer works on (named in hang reports).
    pub fn at_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// Runs `f` marked as waiting for the other peers in `what`, so the watchdog
    /// names a peer that never arrives.
    fn waiting_in<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        *self.waiting.lock().expect("heartbeat lock") = Some((what, Instant::now()));
        let out = f();
        *self.waiting.lock().expect("heartbeat lock") = None;
        out
    }

    fn waiting_since(&self) -> Option<(&'static str, Instant)> {
        *self.waiting.lock().expect("heartbeat lock")
    }
}

/// `config` joined to the other nodes of a multi-node run, as `[distributed]` says
/// (`nodes`, `orchestrator`, `node_address`, `all_reduce`).
fn with_nodes(d: &DistributedSection, config: CollectiveConfig) -> Result<CollectiveConfig> {
    let ws = |a: &str| -> Result<burn_communication::Address> {
        format!("ws://{a}")
            .parse()
            .map_err(|e| anyhow!("address {a}: {e}"))
    };
    let port = port_of(&d.node_address)
        .ok_or_else(|| anyhow!("distributed.node_address = {:?}: no port", d.node_address))?;
    Ok(config
        .with_global_all_reduce_strategy(d.all_reduce.strategy())
        .with_num_nodes(d.nodes as u32)
        .with_global_address(ws(&d.orchestrator)?)
        .with_node_address(ws(&d.node_address)?)
        .with_data_service_port(port))
}

/// Serves the meeting point of a multi-node run on `port` until the process is
/// stopped (`mixlm orchestrator`).
pub fn run_orchestrator(port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the orchestrator's runtime: {e}"))?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// A collective operation that ended because another peer stopped: a consequence,
/// never the root cause [`run_peers`] reports when the peer that stopped has its own.
#[derive(Debug, thiserror::Error)]
#[error(
    "peer {rank}: the {what} was cut off ({cause}): another peer stopped, here or on \
     another node (a failure reported above, a killed process or a lost connection); \
     resume from the last checkpoint with `mixlm train --resume`"
)]
struct CutOff {
    rank: usize,
    what: &'static str,
    cause: String,
}

/// A peer thread that panicked, kept as its own error so the caller can still tell
/// what the panic said (Burn reports exhausted device memory by panicking).
#[derive(Debug, thiserror::Error)]
#[error("peer {rank} panicked: {message}")]
pub struct PeerPanic {
    pub rank: usize,
    pub message: String,
}

/// One peer's handle on the collective (see the module docs). A [`Rank::SOLO`] peer
/// talks to no one: every operation returns its input.
pub struct Peer<B: Backend> {
    rank: Rank,
    /// Gradients are all-reduced in buckets of about this many bytes.
    bucket_bytes: usize,
    /// Talks through burn-collective (false only for a solo peer).
    collective: bool,
    /// Gradients are all-reduced by Burn's `distributed` engine (NCCL) during the
    /// backward pass of a model marked with [`mark_for_all_reduce`], not here.
    grads_in_backward: bool,
    id: PeerId,
    heartbeat: Arc<Heartbeat>,
    device: B::Device,
    _backend: PhantomData<B>,
}

impl<B: Backend> Peer<B> {
    /// The peer of a run on one device.
    pub fn solo(device: &B::Device) -> Self {
        Self {
            rank: Rank::SOLO,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            collective: false,
            grads_in_backward: false,
            id: PeerId(0),
            heartbeat: Arc::default(),
            device: device.clone(),
            _backend: PhantomData,
        }
    }

    /// Joins the collective of `rank.world` peers of this process (blocks until all
    /// have joined).
    pub fn register(rank: Rank, device: &B::Device, heartbeat: Arc<Heartbeat>) -> Result<Self> {
        Self::register_on_nodes(rank, rank.world, None, device, heartbeat)
    }

    /// Joins the collective as global peer `rank` (of `rank.world` over all nodes),
    /// one of `local_peers` in this process; with `nodes` (a multi-node run's
    /// `[distributed]`), through the orchestrator. A world of one joins a collective
    /// of one (to measure its cost).
    pub fn register_on_nodes(
        rank: Rank,
        local_peers: usize,
        nodes: Option<&DistributedSection>,
        device: &B::Device,
        heartbeat: Arc<Heartbeat>,
    ) -> Result<Self> {
        let peer = Self {
            rank,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            collective: true,
            grads_in_backward: false,
            id: PeerId(rank.rank as u32),
            heartbeat,
            device: device.clone(),
            _backend: PhantomData,
        };
        let mut config = CollectiveConfig::default().with_num_devices(local_peers);
        if let Some(d) = nodes {
            config = with_nodes(d, config)?;
        }
        peer.wait("registration", || {
            burn_collective::register::<B>(peer.id, device.clone(), config)
        })?;
        Ok(peer)
    }

    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// All-reduces gradients in buckets of about `mb` MiB (0: one per parameter).
    pub fn with_bucket_mb(mut self, mb: usize) -> Self {
        self.bucket_bytes = mb << 20;
        self
    }

    /// Whether operations go through burn-collective (else they return their input).
    pub fn collective(&self) -> bool {
        self.collective
    }

    /// Leaves the gradients' all-reduce to Burn's `distributed` engine (NCCL, during
    /// the backward pass of a model marked with [`mark_for_all_reduce`]); the other
    /// operations still go through burn-collective.
    pub fn with_grads_in_backward(mut self, on: bool) -> Self {
        self.grads_in_backward = on;
        self
    }

    /// Whether gradients come out of the backward pass already averaged over the
    /// peers (the `nccl` communication).
    pub fn grads_in_backward(&self) -> bool {
        self.grads_in_backward
    }

    /// Runs a backward pass whose gradients are all-reduced as it goes: it waits for
    /// the other peers like any collective operation, so the watchdog sees a peer
    /// that never arrives.
    pub fn backward_all_reduce<T>(&self, backward: impl FnOnce() -> T) -> T {
        self.heartbeat
            .waiting_in("backward pass's gradient all-reduce (nccl)", backward)
    }

    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// Runs one collective operation, visible to the watchdog while it waits.
    fn wait<T>(
        &self,
        what: &'static str,
        op: impl FnOnce() -> Result<T, CollectiveError>,
    ) -> Result<T> {
        // burn-collective panics when its server has stopped (a reset, or a lost
        // connection to another node): that is an error like the others.
        let result = self.heartbeat.waiting_in(what, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(op))
        });
        let cause = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => format!("{e:?}"),
            Err(_) => "the collective server stopped".to_string(),
        };
        Err(CutOff {
            rank: self.rank.rank,
            what,
            cause,
        }
        .into())
    }

    /// One all-reduce of `tensor` with the other peers (the same call on every peer).
    fn all_reduce<const D: usize>(
        &self,
        what: &'static str,
        tensor: Tensor<B, D>,
        op: ReduceOperation,
    ) -> Result<Tensor<B, D>> {
        let reduced = self.wait(what, || {
            burn_collective::all_reduce::<B>(self.id, tensor.into_primitive().tensor(), op)
        })?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(reduced)))
    }

    /// Averages each parameter's gradient over the peers, in the module's parameter
    /// order (the same on every peer, whatever the parameter ids). Every peer must
    /// have a gradient for every parameter.
    pub fn mean_grads<AB, M>(&self, model: &M, grads: GradientsParams) -> Result<GradientsParams>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.reduce_grads(model, grads, ReduceOperation::Mean)
    }

    /// Sums each parameter's gradient over the peers, a missing one counting as
    /// zeros: for gradients some peers may not have, such as those of a domain that
    /// only some peers drew this step.
    pub fn sum_grads<AB, M>(&self, model: &M, grads: GradientsParams) -> Result<GradientsParams>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.reduce_grads(model, grads, ReduceOperation::Sum)
    }

    fn reduce_grads<AB, M>(
        &self,
        model: &M,
        grads: GradientsParams,
        op: ReduceOperation,
    ) -> Result<GradientsParams>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        if !self.collective {
            return Ok(grads);
        }
        // Every gradient flattened, in module order, then reduced in buckets of
        // consecutive parameters: a few large all-reduces instead of one per
        // parameter (each costs a round of messages between the peers). Elementwise,
        // the sums are the same whatever the bucketing.
        let mut take = TakeFlat::<AB> {
            rank: self.rank.rank,
            grads,
            zeros_for_missing: op == ReduceOperation::Sum,
            flat: Vec::new(),
            error: None,
        };
        model.visit(&mut take);
        if let Some(e) = take.error {
            return Err(e);
        }
        let sizes: Vec<usize> = take.flat.iter().map(|t| t.dims()[0]).collect();
        let element_bytes = take.flat.first().map_or(4, |t| t.dtype().size());
        let mut flat = take.flat.into_iter();
        let mut reduced = Vec::with_capacity(sizes.len());
        for bucket in buckets(&sizes, self.bucket_bytes / element_bytes) {
            let parts: Vec<Tensor<B, 1>> = flat.by_ref().take(bucket.len()).collect();
            let joined = Tensor::cat(parts, 0);
            let joined = self.all_reduce("gradient all-reduce", joined, op)?;
            reduced.extend(joined.split_with_sizes(sizes[bucket].to_vec(), 0));
        }
        let mut put = PutBack::<AB> {
            grads: take.grads,
            reduced: reduced.into_iter(),
        };
        model.visit(&mut put);
        Ok(put.grads)
    }

    /// Gives every peer peer 0's parameters (a fresh model is initialised on each
    /// peer, and random initialisation need not agree across devices or processes).
    pub fn broadcast_model<AB, M>(&self, model: M) -> Result<M>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        if !self.collective {
            return Ok(model);
        }
        let mut mapper = Broadcast::<AB> {
            peer: self,
            error: None,
        };
        let model = model.map(&mut mapper);
        match mapper.error {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }

    /// Every peer's `values`, indexed by rank, identical on every peer to the bit.
    ///
    /// Each peer writes its values into its own slots of a zero vector and the vectors
    /// are summed: every slot then has one non-zero term, so the sum is exact
    /// whatever order the all-reduce adds in. An `f64` travels as two `f32`s (its
    /// rounding and the remainder), which keeps about 48 bits of it.
    pub fn gather(&self, what: &'static str, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        let world = self.rank.world;
        if !self.collective {
            return Ok(vec![values.to_vec()]);
        }
        let m = values.len();
        let mut slots = vec![0f32; world * m * 2];
        for (i, &v) in values.iter().enumerate() {
            let hi = v as f32;
            let lo = if v.is_finite() && hi.is_finite() {
                (v - f64::from(hi)) as f32
            } else {
                0.0
            };
            slots[(self.rank.rank * m + i) * 2] = hi;
            slots[(self.rank.rank * m + i) * 2 + 1] = lo;
        }
        let n = slots.len();
        let tensor = Tensor::<B, 1>::from_data(TensorData::new(slots, [n]), &self.device);
        let summed: Vec<f32> = self
            .all_reduce(what, tensor, ReduceOperation::Sum)?
            .into_data()
            .to_vec()
            .map_err(|e| anyhow!("gathered values: {e:?}"))?;
        Ok(summed
            .chunks_exact(m * 2)
            .map(|peer| {
                peer.chunks_exact(2)
                    .map(|p| f64::from(p[0]) + f64::from(p[1]))
                    .collect()
            })
            .collect())
    }

    /// Leaves the collective (after the last operation).
    pub fn finish(&self) {
        if self.collective {
            let _ = burn_collective::finish_collective::<B>(self.id);
        }
    }
}

/// Consecutive ranges of `sizes` (elements) holding up to `capacity` elements each;
/// a tensor larger than that is a bucket of its own.
fn buckets(sizes: &[usize], capacity: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && filled + n > capacity {
            out.push(start..i);
            (start, filled) = (i, 0);
        }
        filled += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Takes every parameter's gradient out of `grads`, flattened, in module order.
struct TakeFlat<AB: AutodiffBackend> {
    rank: usize,
    grads: GradientsParams,
    /// A parameter without a gradient counts as zeros (else it is an error).
    zeros_for_missing: bool,
    flat: Vec<Tensor<AB::InnerBackend, 1>>,
    error: Option<anyhow::Error>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for TakeFlat<AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if self.error.is_some() {
            return;
        }
        let grad = match self.grads.remove::<AB::InnerBackend, D>(param.id) {
            Some(grad) => grad,
            None if self.zeros_for_missing => param.val().inner().zeros_like(),
            None => {
                self.error = Some(anyhow!(
                    "peer {}: a parameter has no gradient, so the peers cannot average them",
                    self.rank
                ));
                return;
            }
        };
        let n = grad.shape().num_elements();
        self.flat.push(grad.reshape([n]));
    }
}

/// Registers the reduced gradients, in module order, in their parameters' shapes.
struct PutBack<AB: AutodiffBackend> {
    grads: GradientsParams,
    reduced: std::vec::IntoIter<Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for PutBack<AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let flat = self
            .reduced
            .next()
            .expect("one reduced gradient per parameter");
        let grad: Tensor<AB::InnerBackend, D> = flat.reshape(param.val().shape());
        self.grads.register(param.id, grad);
    }
}

struct Broadcast<'a, AB: AutodiffBackend> {
    peer: &'a Peer<AB::InnerBackend>,
    error: Option<anyhow::Error>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Broadcast<'_, AB> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        if self.error.is_some() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        // Peer 0's values plus zeros from the others: exact, and unlike
        // burn-collective 0.21's broadcast it also works between nodes.
        let mut mine = tensor.clone().inner();
        if !self.peer.rank.is_leader() {
            mine = mine.zeros_like();
        }
        match self.peer.all_reduce(
            "broadcast of the initial weights",
            mine,
            ReduceOperation::Sum,
        ) {
            Ok(t) => Param::from_mapped_value(id, Tensor::from_inner(t).require_grad(), mapper),
            Err(e) => {
                self.error = Some(e);
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
    }
}

/// Draws a fresh model's initial weights now, in parameter order. Burn initialises
/// parameters lazily, on first use; left so, the draws from the backend's seeded
/// generator would happen whenever each peer first touched each parameter, and
/// peer 0's weights would depend on the other threads.
pub fn materialize<AB: AutodiffBackend, M: AutodiffModule<AB>>(model: M) -> M {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    model.visit(&mut Touch);
    model
}

/// Marks every parameter of `model` for Burn's `distributed` engine: a backward pass
/// through the marked model all-reduces (averages over the peers) each parameter's
/// gradient through NCCL as soon as it is complete, while the rest of the backward
/// runs. The mark lives on the parameter tensors: mark the model each step, after the
/// optimizer replaced them.
/// Whether this build all-reduces gradients through NCCL during the backward pass
/// (the `nccl` feature): what `communication = "nccl"` needs.
pub const NCCL_BUILD: bool = cfg!(feature = "nccl");

#[cfg(feature = "nccl")]
pub fn mark_for_all_reduce<AB: AutodiffBackend, M: AutodiffModule<AB>>(model: M) -> M {
    use burn::tensor::backend::distributed::DistributedParamId;
    struct Mark;
    impl<AB: AutodiffBackend> ModuleMapper<AB> for Mark {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<AB, D>>,
        ) -> Param<Tensor<AB, D>> {
            let id = DistributedParamId::from(param.id.val());
            param.map(|t| t.set_distributed(id))
        }
    }
    model.map(&mut Mark)
}

/// Without the `nccl` build there is no engine to mark parameters for
/// ([`GradSyncServer::start`] refuses such a run before any step).
#[cfg(not(feature = "nccl"))]
pub fn mark_for_all_reduce<AB: AutodiffBackend, M: AutodiffModule<AB>>(_model: M) -> M {
    unreachable!("communication = \"nccl\" is refused by builds without the nccl feature")
}

/// Burn's per-process server that pairs the peers' gradients for NCCL (the `nccl`
/// communication); stopped when dropped, so the next run starts a fresh one.
pub struct GradSyncServer<B: mixlm_model::AutodiffInner> {
    device: B::Device,
}

impl<B: mixlm_model::AutodiffInner> GradSyncServer<B> {
    /// Starts the server for one peer per device of `devices`.
    pub fn start(devices: &[B::Device]) -> Result<Self> {
        #[cfg(feature = "nccl")]
        {
            use burn::tensor::backend::distributed::{DistributedConfig, ReduceOperation};
            B::start_communication_server(
                devices,
                DistributedConfig {
                    all_reduce_op: ReduceOperation::Mean,
                },
            );
            Ok(Self {
                device: devices[0].clone(),
            })
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = devices;
            bail!(
                "distributed.communication = \"nccl\" needs a mixlm built with the nccl \
                 feature (`cargo build --release -p mixlm-cli --features nccl`); this one was \
                 not. Use communication = \"collective\" with this binary"
            )
        }
    }
}

impl<B: mixlm_model::AutodiffInner> Drop for GradSyncServer<B> {
    fn drop(&mut self) {
        #[cfg(feature = "nccl")]
        B::close_communication_server(&self.device);
        #[cfg(not(feature = "nccl"))]
        let _ = &self.device;
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

/// Sums each of `parts` over the data-parallel peers (one collective operation), in
/// rank order, so every peer gets the same totals to the bit; also gathers `extra`,
/// a few values of each peer (by rank).
pub fn sum_domain_losses<B: Backend>(
    peer: &Peer<B>,
    what: &'static str,
    parts: &[&DomainAccumulator],
    extra: &[f64],
) -> Result<(Vec<DomainAccumulator>, Vec<Vec<f64>>)> {
    let n = parts.len();
    let k = parts.first().map_or(0, |a| a.counts().len());
    let mut values: Vec<f64> = Vec::with_capacity(n * 2 * k + extra.len());
    for acc in parts {
        values.extend_from_slice(acc.sums());
        values.extend(acc.counts().iter().map(|&c| c as f64));
    }
    values.extend_from_slice(extra);
    let all = peer.gather(what, &values)?;
    let mut summed: Vec<DomainAccumulator> = (0..n).map(|_| DomainAccumulator::new(k)).collect();
    for theirs in &all {
        for (i, acc) in summed.iter_mut().enumerate() {
            let part = &theirs[i * 2 * k..(i + 1) * 2 * k];
            let counts: Vec<usize> = part[k..].iter().map(|&c| c as usize).collect();
            acc.merge(&part[..k], &counts);
        }
    }
    let extras = all.iter().map(|v| v[n * 2 * k..].to_vec()).collect();
    Ok((summed, extras))
}

/// Runs `body` on `world` peers, threads of this process, and returns peer 0's result.
///
/// A watchdog polls the peers: when one fails (an error or a panic), the collective
/// is reset so the others' waits end at once; when one has waited in a collective
/// operation for `timeout` while a peer has not arrived, the others are stopped the
/// same way and the error names the late peer and its step. The error returned is
/// the first peer's own (not the others' "another peer stopped").
pub fn run_peers<B, T, F>(world: usize, timeout: Duration, body: F) -> Result<T>
where
    B: Backend,
    T: Send,
    F: Fn(Rank, Arc<Heartbeat>) -> Result<T> + Sync,
{
    let beats: Vec<Arc<Heartbeat>> = (0..world).map(|_| Arc::default()).collect();
    // Set once the watchdog has stopped the peers (it then only waits for them).
    let mut failed = false;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let beat = beats[rank].clone();
                let body = &body;
                std::thread::Builder::new()
                    .name(format!("mixlm-peer-{rank}"))
                    .spawn_scoped(s, move || {
                        let result = body(Rank { rank, world }, beat.clone());
                        if let Err(e) = &result {
                            *beat.failure.lock().expect("heartbeat lock") = Some(format!("{e:#}"));
                        }
                        beat.succeeded.store(result.is_ok(), Ordering::SeqCst);
                        result
                    })
                    .expect("cannot start a peer thread")
            })
            .collect();
        let mut hang: Option<anyhow::Error> = None;
        // Once the peers were told to stop: what to say if some never return, and when.
        let mut gave_up: Option<(String, Instant)> = None;
        let grace = (2 * timeout).min(HANG_GRACE);
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            if let Some((report, at)) = &gave_up {
                // A peer stuck in its own work (a hung kernel, a deadlock, an NCCL
                // all-reduce waiting for a peer that failed) never returns, and a
                // thread cannot be killed: after a grace period for the others to
                // wind down, the process ends with the report.
                if at.elapsed() > grace {
                    eprintln!("error: {report}");
                    std::process::exit(1);
                }
            }
            if failed {
                continue;
            }
            let ended_badly = handles
                .iter()
                .zip(&beats)
                .position(|(h, b)| h.is_finished() && !b.succeeded.load(Ordering::SeqCst));
            if let Some(rank) = ended_badly {
                // A peer failed: the others would wait for it forever.
                failed = true;
                reset::<B>();
                gave_up = Some((
                    stuck_after_failure(rank, &beats[rank], grace),
                    Instant::now(),
                ));
                continue;
            }
            if let Some(report) = hung_peer(&beats, timeout) {
                failed = true;
                gave_up = Some((report.clone(), Instant::now()));
                hang = Some(anyhow!(report));
                reset::<B>();
            }
        }
        let mut results: Vec<Result<T>> = handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|panic| {
                    let message = match panic_message(&panic) {
                        "" => "(no message)",
                        msg => msg,
                    };
                    Err(PeerPanic {
                        rank,
                        message: message.to_string(),
                    }
                    .into())
                })
            })
            .collect();
        reset::<B>();
        if let Some(hang) = hang {
            return Err(hang);
        }
        // The root cause: an error that is not a consequence of another peer's.
        let first = results.iter().position(|r| {
            r.as_ref()
                .is_err_and(|e| e.downcast_ref::<CutOff>().is_none())
        });
        if let Some(i) = first {
            let e = results.swap_remove(i).err().expect("an error");
            return Err(e.context(format!("data-parallel training stopped: peer {i} failed")));
        }
        if let Some(i) = results.iter().position(Result::is_err) {
            let e = results.swap_remove(i).err().expect("an error");
            return Err(e.context("data-parallel training stopped"));
        }
        results.swap_remove(0)
    })
}

/// Ends every pending collective operation of this process (its waiters get an
/// error). Tolerates a collective server that has already stopped.
fn reset<B: Backend>() {
    let _ = std::panic::catch_unwind(burn_collective::reset_collective::<B>);
}

/// How long a hung peer may take to return once the others have given up on it (at
/// most twice `distributed.timeout_s`).
const HANG_GRACE: Duration = Duration::from_secs(30);

/// The report when peer `rank` failed and some others did not return after `grace`.
fn stuck_after_failure(rank: usize, beat: &Heartbeat, grace: Duration) -> String {
    let cause = beat
        .failure
        .lock()
        .expect("heartbeat lock")
        .clone()
        .unwrap_or_else(|| "it panicked (the message is above)".into());
    format!(
        "data-parallel training stopped: peer {rank} failed: {cause}; the other peers did \
         not stop within {:.1}s (stuck in a device operation, such as a gradient all-reduce \
         waiting for the failed peer); resume from the last checkpoint with `mixlm train \
         --resume`",
        grace.as_secs_f64()
    )
}

/// A report when some peer has waited in a collective operation for longer than
/// `timeout`: which peers never arrived, and where each one was.
fn hung_peer(beats: &[Arc<Heartbeat>], timeout: Duration) -> Option<String> {
    let (what, since) = beats
        .iter()
        .filter_map(|b| b.waiting_since())
        .min_by_key(|(_, since)| *since)?;
    if since.elapsed() < timeout {
        return None;
    }
    let late: Vec<String> = beats
        .iter()
        .enumerate()
        .filter(|(_, b)| b.waiting_since().is_none())
        .map(|(rank, b)| {
            format!(
                "peer {rank} (at step {})",
                b.step.load(Ordering::Relaxed) + 1
            )
        })
        .collect();
    let late = if late.is_empty() {
        "a peer on another node (every peer of this one is waiting)".to_string()
    } else {
        late.join(", ")
    };
    Some(format!(
        "data-parallel training stopped: peers waited {:.1}s in the {what} for {late}, \
         which stopped answering (distributed.timeout_s = {}); resume from the last \
         checkpoint with `mixlm train --resume`",
        since.elapsed().as_secs_f64(),
        timeout.as_secs()
    ))
}

/// Tests that start collectives take this first: burn-collective has one server per
/// backend and process, and `cargo test` runs tests as threads of one process.
#[cfg(test)]
pub(crate) static ONE_GROUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The text a panic was raised with ("" when it carries none).
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::module::Module;
    use mixlm_model::{ModelConfig, Transformer};

    type AB = Autodiff<NdArray<f32>>;
    type IB = NdArray<f32>;

    fn flat(model: &Transformer<AB>) -> Vec<f32> {
        struct Collect(Vec<f32>);
        impl ModuleVisitor<AB> for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                self.0
                    .extend(param.val().into_data().to_vec::<f32>().unwrap());
            }
        }
        let mut c = Collect(Vec::new());
        model.visit(&mut c);
        c.0
    }

    /// Three peers: the gather hands every peer every peer's values exactly, and the
    /// broadcast gives every peer peer 0's weights.
    #[test]
    fn gather_is_exact_and_broadcast_copies_peer_zero() {
        let _one_group = ONE_GROUP.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let config = ModelConfig::preset("tiny").unwrap();
        let reference = {
            <AB as Backend>::seed(&device, 1);
            flat(&config.init::<AB>(&device))
        };
        let seen = Mutex::new(Vec::new());
        run_peers::<IB, _, _>(3, Duration::from_secs(60), |rank, beat| {
            let peer = Peer::<IB>::register(rank, &device, beat)?;
            let r = rank.rank as f64;
            let mine = [1.0 / 3.0 + r, -1e-9 * r, f64::NAN, 7.0];
            let all = peer.gather("test", &mine)?;
            // Peer 0 has the reference weights; the others some other ones.
            let model = {
                let _lock = INIT_TEST.lock().unwrap();
                <AB as Backend>::seed(&device, if rank.rank == 0 { 1 } else { 99 });
                materialize(config.init::<AB>(&device))
            };
            let model = peer.broadcast_model(model)?;
            peer.finish();
            seen.lock().unwrap().push((rank.rank, all, flat(&model)));
            Ok(())
        })
        .unwrap();
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 3);
        for (rank, all, weights) in &seen {
            assert_eq!(all.len(), 3, "peer {rank}");
            for (r, values) in all.iter().enumerate() {
                let want = [1.0 / 3.0 + r as f64, -1e-9 * r as f64];
                for (got, want) in values.iter().zip(want) {
                    assert!(
                        (got - want).abs() <= want.abs() * 1e-14,
                        "peer {rank} got {got} for peer {r}'s {want}"
                    );
                }
                assert!(values[2].is_nan());
                assert_eq!(values[3], 7.0);
            }
            // Bit-identical on every peer.
            let bits = |v: &Vec<Vec<f64>>| -> Vec<u64> {
                v.iter().flatten().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(all), bits(&seen[0].1));
            assert!(*weights == reference, "peer {rank} has other weights");
        }
    }

    /// A peer that fails makes the others stop at once (they are waiting for it in
    /// a collective operation), and the error is that peer's own.
    #[test]
    fn a_failing_peer_stops_the_others_with_its_error() {
        let _one_group = ONE_GROUP.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let started = Instant::now();
        let e = run_peers::<IB, (), _>(3, Duration::from_secs(600), |rank, beat| {
            let peer = Peer::<IB>::register(rank, &device, beat)?;
            for step in 0..100u64 {
                peer.heartbeat().at_step(step);
                if rank.rank == 1 && step == 3 {
                    bail!("peer 1 ran out of memory at step 4");
                }
                peer.gather("per-domain losses", &[step as f64])?;
            }
            Ok(())
        })
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("peer 1 failed") && e.contains("ran out of memory at step 4"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stopped at once"
        );
    }

    /// Without the nccl build, the nccl communication is refused before any step,
    /// saying how to build for it.
    #[cfg(not(feature = "nccl"))]
    #[test]
    fn the_nccl_communication_needs_the_nccl_build() {
        let e = GradSyncServer::<IB>::start(&[Default::default()])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("needs a mixlm built with the nccl feature")
                && e.contains("--features nccl"),
            "{e}"
        );
    }

    /// The child process of the test below: peer 0 fails while peer 1 is stuck in
    /// work the watchdog cannot interrupt (as in an NCCL all-reduce waiting for peer
    /// 0). Runs only when the test below starts it.
    #[test]
    #[ignore = "the child process of a_peer_stuck_after_another_failed_ends_the_process"]
    fn stuck_peer_child() {
        if std::env::var_os("MIXLM_STUCK_PEER_CHILD").is_none() {
            return;
        }
        let device = Default::default();
        let _ = run_peers::<IB, (), _>(2, Duration::from_millis(300), |rank, beat| {
            let peer = Peer::<IB>::register(rank, &device, beat)?;
            peer.gather("per-domain losses", &[1.0])?;
            if rank.rank == 0 {
                bail!("out of memory at step 7");
            }
            peer.backward_all_reduce(|| loop {
                std::thread::sleep(Duration::from_secs(1));
            })
        });
        unreachable!("the watchdog ends the process");
    }

    /// When a peer fails and another never returns, the process ends after the grace
    /// period with the failed peer's error instead of hanging.
    #[test]
    fn a_peer_stuck_after_another_failed_ends_the_process() {
        let started = Instant::now();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "distributed::tests::stuck_peer_child",
                "--include-ignored",
                "--nocapture",
            ])
            .env("MIXLM_STUCK_PEER_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(
                "error: data-parallel training stopped: peer 0 failed: out of memory at step \
                 7; the other peers did not stop within 0.6s"
            ) && stderr.contains("mixlm train --resume"),
            "{stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    /// A peer that stops answering makes the others stop after the timeout, naming it
    /// and its step; it is the one not waiting.
    #[test]
    fn a_hung_peer_is_named_after_the_timeout() {
        let _one_group = ONE_GROUP.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let started = Instant::now();
        // Peer 1 comes back after the others gave up on it, within the grace period.
        let e = run_peers::<IB, (), _>(2, Duration::from_secs(1), |rank, beat| {
            let peer = Peer::<IB>::register(rank, &device, beat)?;
            for step in 0..10u64 {
                peer.heartbeat().at_step(step);
                if rank.rank == 1 && step == 2 {
                    std::thread::sleep(Duration::from_secs(2));
                }
                peer.gather("per-domain losses", &[step as f64])?;
            }
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "s in the per-domain losses for peer 1 (at step 3), which stopped answering"
            ) && e.contains("distributed.timeout_s"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn buckets_hold_consecutive_parameters_up_to_the_capacity() {
        assert_eq!(
            buckets(&[3, 4, 2, 10, 1, 1], 8),
            vec![0..2, 2..3, 3..4, 4..6]
        );
        assert_eq!(buckets(&[3, 4], 0), vec![0..1, 1..2]);
        assert_eq!(buckets(&[3, 4], 7), vec![0..2]);
        assert_eq!(buckets(&[], 8), Vec::<std::ops::Range<usize>>::new());
    }

    #[test]
    fn disagreeing_peers_are_named() {
        let same = vec![checksum(&[0.25, 0.75]).to_vec(); 3];
        check_agreement("mixture proportions", 4, &same).unwrap();
        let mut differ = same.clone();
        differ[2] = checksum(&[0.25, 0.75000001]).to_vec();
        let e = check_agreement("mixture proportions", 4, &differ)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("step 4") && e.contains("peer 2's mixture proportions"),
            "{e}"
        );
    }

    static INIT_TEST: Mutex<()> = Mutex::new(());
}

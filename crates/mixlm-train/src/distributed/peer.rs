//! One peer's handle on the collective: gradient averaging in buckets, gathers of
//! a few numbers, and the model broadcast that makes every replica start equal.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Result};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use mixlm_eval::DomainAccumulator;

use super::launch::Heartbeat;
use super::nodes::with_nodes;
use super::shard::{Shard, ShardLayout};
use super::Rank;
use crate::config::DistributedSection;
use crate::optim::StepGrads;

/// PyTorch DDP's default bucket: large enough that per-message latency is amortised,
/// small enough to keep the extra copy of the gradients it makes small.
const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// A collective operation that ended because another peer stopped: a consequence,
/// never the root cause [`run_peers`] reports when the peer that stopped has its own.
#[derive(Debug, thiserror::Error)]
#[error(
    "peer {rank}: the {what} was cut off ({cause}): another peer stopped, here or on \
     another node (a failure reported above, a killed process or a lost connection); \
     resume from the last checkpoint with `mixlm train --resume`"
)]
pub(super) struct CutOff {
    rank: usize,
    what: &'static str,
    cause: String,
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
    /// What the peers split between them (`distributed.shard`).
    shard: Shard,
    /// Which slices this peer owns, made from the model on first use.
    layout: OnceLock<Arc<ShardLayout>>,
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
            shard: Shard::None,
            layout: OnceLock::new(),
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
            shard: Shard::None,
            layout: OnceLock::new(),
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

    pub fn device(&self) -> &B::Device {
        &self.device
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

    /// Splits the optimizer state (and, with [`Shard::Gradients`], the averaged
    /// gradients) between the peers (`distributed.shard`).
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// What the peers split between them: [`Shard::None`] for a peer outside a
    /// collective, which has no one to split with.
    pub fn shard(&self) -> Shard {
        if self.collective {
            self.shard
        } else {
            Shard::None
        }
    }

    /// Which slice of every parameter this peer owns, when the run is sharded.
    pub fn shard_layout<AB, M>(&self, model: &M) -> Option<Arc<ShardLayout>>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        if self.shard() == Shard::None {
            return None;
        }
        let layout = self.layout.get_or_init(|| {
            Arc::new(ShardLayout::of::<AB, M>(
                model,
                self.bucket_bytes / 4,
                self.rank,
            ))
        });
        Some(layout.clone())
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

    /// The step's gradient averaged over the peers, as the optimizer takes it: whole,
    /// or, with [`Shard::Gradients`], only this peer's slices (a reduce-scatter).
    pub fn step_grads<AB, M>(&self, model: &M, grads: GradientsParams) -> Result<StepGrads>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        match self.shard_layout(model) {
            Some(layout) if self.shard == Shard::Gradients => self
                .reduce_scatter(model, grads, &layout)
                .map(StepGrads::Owned),
            _ => self.mean_grads(model, grads).map(StepGrads::Whole),
        }
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
            reduced: reduced
                .into_iter()
                .map(Some)
                .collect::<Vec<_>>()
                .into_iter(),
            flat: false,
        };
        model.visit(&mut put);
        Ok(put.grads)
    }

    /// ZeRO-2's reduce-scatter: each bucket is all-reduced (averaged) as
    /// [`Self::mean_grads`] does, and this peer keeps its slice of it, registered
    /// flat under each parameter's id; the rest is dropped bucket by bucket.
    fn reduce_scatter<AB, M>(
        &self,
        model: &M,
        grads: GradientsParams,
        layout: &ShardLayout,
    ) -> Result<GradientsParams>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut take = TakeFlat::<AB> {
            rank: self.rank.rank,
            grads,
            zeros_for_missing: false,
            flat: Vec::new(),
            error: None,
        };
        model.visit(&mut take);
        if let Some(e) = take.error {
            return Err(e);
        }
        let mut flat = take.flat.into_iter();
        let mut owned = Vec::with_capacity(layout.params.len());
        for (range, _) in &layout.buckets {
            let params = &layout.params[range.clone()];
            let joined = Tensor::cat(flat.by_ref().take(params.len()).collect(), 0);
            let joined =
                self.all_reduce("gradient reduce-scatter", joined, ReduceOperation::Mean)?;
            for p in params {
                let at = p.offset + p.owned.start..p.offset + p.owned.end;
                owned.push((!at.is_empty()).then(|| joined.clone().slice(at)));
            }
        }
        let mut put = PutBack::<AB> {
            grads: take.grads,
            reduced: owned.into_iter(),
            flat: true,
        };
        model.visit(&mut put);
        Ok(put.grads)
    }

    /// The all-gather of one bucket of `len` elements: every peer gives its owned
    /// part (`owned`, starting at element `start` of the bucket) and gets the whole
    /// bucket back, exactly (see the [`super::shard`] docs).
    pub fn all_gather(
        &self,
        what: &'static str,
        owned: Vec<Tensor<B, 1>>,
        start: usize,
        len: usize,
    ) -> Result<Tensor<B, 1>> {
        let mine: usize = owned.iter().map(|t| t.dims()[0]).sum();
        let mut parts = Vec::with_capacity(owned.len() + 2);
        if start > 0 {
            parts.push(Tensor::zeros([start], &self.device));
        }
        parts.extend(owned);
        if start + mine < len {
            parts.push(Tensor::zeros([len - start - mine], &self.device));
        }
        self.all_reduce(what, Tensor::cat(parts, 0), ReduceOperation::Sum)
    }

    /// The sum over the peers of each peer's `values` (the same on every peer).
    pub fn sum(&self, what: &'static str, values: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        if !self.collective {
            return Ok(values);
        }
        self.all_reduce(what, values, ReduceOperation::Sum)
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
pub(super) fn buckets(sizes: &[usize], capacity: usize) -> Vec<std::ops::Range<usize>> {
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

/// Registers the reduced gradients, in module order, in their parameters' shapes, or
/// `flat` (a peer's slices under ZeRO-2); `None`: this peer keeps none of it.
struct PutBack<AB: AutodiffBackend> {
    grads: GradientsParams,
    reduced: std::vec::IntoIter<Option<Tensor<AB::InnerBackend, 1>>>,
    flat: bool,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for PutBack<AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let reduced = self
            .reduced
            .next()
            .expect("one reduced gradient per parameter");
        match reduced {
            Some(flat) if self.flat => self.grads.register(param.id, flat),
            Some(flat) => {
                let grad: Tensor<AB::InnerBackend, D> = flat.reshape(param.val().shape());
                self.grads.register(param.id, grad);
            }
            None => {}
        }
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

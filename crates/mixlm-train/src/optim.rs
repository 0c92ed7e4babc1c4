//! AdamW with decoupled weight decay and global-norm gradient clipping.
//!
//! Burn ships an AdamW, but its clipping is per parameter tensor, while pretraining
//! recipes (GPT-NeoX, nanoGPT, torchtitan) clip the norm of *all* gradients together.
//! Keeping the optimizer here also gives its state stable names (module paths such
//! as `blocks.0.attn.qkv.weight`), which checkpoints store as safetensors.
//!
//! Under `distributed.shard` each peer keeps the moments of its own slices only and
//! updates only them ([`AdamW::apply`]); see [`crate::distributed::shard`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::Result;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};
use mixlm_model::adamw::AdamWStep;
use mixlm_model::ModelBackend;

use crate::config::OptimizerSection;
use crate::distributed::shard::{owned_range, ShardLayout};
use crate::distributed::Peer;

/// A step's gradient averaged over the data-parallel peers, as the optimizer takes it.
pub enum StepGrads {
    /// Every parameter's, in its shape.
    Whole(GradientsParams),
    /// ZeRO-2: this peer's slice of each parameter it owns part of, flat
    /// (`[owned elements]`), under the parameter's id.
    Owned(GradientsParams),
}

impl StepGrads {
    /// The whole gradient, unless this peer holds only its slices of it.
    pub fn as_whole(&self) -> Option<&GradientsParams> {
        match self {
            Self::Whole(g) => Some(g),
            Self::Owned(_) => None,
        }
    }
}

/// AdamW moments by parameter path, on the host: what a checkpoint writes.
pub type HostMoments = Vec<(String, Vec<f32>, Vec<f32>)>;

/// First and second moments of one parameter, flattened.
#[derive(Clone)]
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

/// AdamW state: moments by parameter path, and the number of updates taken.
pub struct AdamW<B: Backend> {
    pub config: OptimizerSection,
    /// Whole moments; under sharding, those of this peer's slice of each parameter.
    pub moments: HashMap<String, Moments<B>>,
    /// Updates applied so far (the `t` of the bias correction).
    pub steps: u64,
    /// This peer's slices (`distributed.shard`), or `None`: it updates everything.
    pub shard: Option<Arc<ShardLayout>>,
}

/// What one optimizer step did, for logging.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the update was applied: not when the norm is NaN or infinite.
    pub applied: bool,
}

impl StepStats {
    pub fn not_applied(grad_norm: f64) -> Self {
        Self {
            grad_norm,
            applied: false,
        }
    }
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: OptimizerSection) -> Self {
        Self {
            config,
            moments: HashMap::new(),
            steps: 0,
            shard: None,
        }
    }

    /// An optimizer that keeps and updates only this peer's slices of `layout`.
    pub fn sharded(config: OptimizerSection, layout: Option<Arc<ShardLayout>>) -> Self {
        Self {
            shard: layout,
            ..Self::new(config)
        }
    }

    /// Bytes of optimizer state this peer holds.
    pub fn state_bytes(&self) -> usize {
        self.moments
            .values()
            .map(|Moments { m, v }| {
                m.shape().num_elements() * m.dtype().size()
                    + v.shape().num_elements() * v.dtype().size()
            })
            .sum()
    }

    /// One update from the step's averaged gradient: [`Self::step`], or, when the
    /// run is sharded, this peer's slices only, then gathered to every peer.
    pub fn apply<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        grads: StepGrads,
        peer: &Peer<B>,
    ) -> Result<(M, StepStats)>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        B: ModelBackend,
        M: AutodiffModule<AB>,
    {
        match (self.shard.clone(), grads) {
            (None, StepGrads::Whole(grads)) => Ok(self.step(lr, module, grads)),
            (Some(layout), grads) => self.sharded_step(lr, module, grads, &layout, peer),
            (None, StepGrads::Owned(_)) => {
                unreachable!("sliced gradients come from a sharded run's peer")
            }
        }
    }

    /// The whole moments, gathered from every peer's slices when sharded (a
    /// collective call on every peer: all must make it); `None` on peers other than
    /// peer 0 of a sharded run, which write no checkpoint.
    pub fn host_moments(&self, peer: &Peer<B>) -> Result<Option<HostMoments>> {
        let to_host = |t: &Tensor<B, 1>| -> Vec<f32> {
            t.clone()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32")
        };
        let Some(layout) = &self.shard else {
            if !peer.rank().is_leader() {
                return Ok(None);
            }
            let mut out: HostMoments = self
                .moments
                .iter()
                .map(|(k, Moments { m, v })| (k.clone(), to_host(m), to_host(v)))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok(Some(out));
        };
        let leader = layout.rank.is_leader();
        let mut out = HostMoments::new();
        // Before the first update there are none, on every peer alike.
        if self.steps == 0 {
            return Ok(leader.then_some(out));
        }
        for (range, len) in &layout.buckets {
            let params = &layout.params[range.clone()];
            let mut owned = Vec::new();
            for p in params.iter().filter(|p| !p.owned.is_empty()) {
                let n = p.owned.len();
                let (m, v) = match self.moments.get(&p.path) {
                    Some(Moments { m, v }) => (m.clone(), v.clone()),
                    None => {
                        let device = peer.device();
                        (Tensor::zeros([n], device), Tensor::zeros([n], device))
                    }
                };
                owned.push((m, v));
            }
            // m and v of the bucket in one message: [m (len) | v (len)].
            let start = owned_range(*len, layout.rank).start;
            let (ms, vs): (Vec<_>, Vec<_>) = owned.into_iter().unzip();
            let m = peer.all_gather("gather of the optimizer state", ms, start, *len)?;
            let v = peer.all_gather("gather of the optimizer state", vs, start, *len)?;
            if !leader {
                continue;
            }
            let (m, v) = (to_host(&m), to_host(&v));
            for p in params {
                let at = p.offset..p.offset + p.len;
                out.push((p.path.clone(), m[at.clone()].to_vec(), v[at].to_vec()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(leader.then_some(out))
    }

    /// The constants of this step's update of a parameter with `dims` dimensions.
    fn update_constants(&self, lr: f64, clip: f64, dims: usize) -> AdamWStep {
        let c = &self.config;
        let t = self.steps as i32;
        AdamWStep {
            clip,
            beta1: c.beta1,
            beta2: c.beta2,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            eps: c.eps,
            // Decoupled decay on matrices and embeddings only (nanoGPT, GPT-NeoX).
            decay: (dims >= 2 && c.weight_decay > 0.0).then_some(1.0 - lr * c.weight_decay),
            lr,
        }
    }

    /// The clipping factor for gradient norm `grad_norm`.
    fn clip_factor(&self, grad_norm: f64) -> f64 {
        if self.config.grad_clip > 0.0 && grad_norm > self.config.grad_clip {
            self.config.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        }
    }

    /// One moment update of a flat slice: `[param, m, v]` after it; the moments are
    /// taken from and put back under `key`.
    fn update_flat(
        &mut self,
        key: &str,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        step: AdamWStep,
    ) -> Tensor<B, 1>
    where
        B: ModelBackend,
    {
        let moments = self
            .moments
            .remove(key)
            .map(|Moments { m, v }| (m.into_primitive().tensor(), v.into_primitive().tensor()));
        let [p, m, v] = B::adamw_update(
            param.into_primitive().tensor(),
            grad.into_primitive().tensor(),
            moments,
            step,
        );
        let float = |x| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(x));
        self.moments.insert(
            key.to_string(),
            Moments {
                m: float(m),
                v: float(v),
            },
        );
        float(p)
    }

    /// ZeRO's update: the global gradient norm (from the whole gradient, or summed
    /// over the peers' slices), this peer's slices updated, and every bucket's
    /// updated slices gathered to every peer while the module's parameters are
    /// replaced, one bucket at a time.
    fn sharded_step<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        grads: StepGrads,
        layout: &ShardLayout,
        peer: &Peer<B>,
    ) -> Result<(M, StepStats)>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        B: ModelBackend,
        M: AutodiffModule<AB>,
    {
        let (whole, mut grads) = match grads {
            StepGrads::Whole(g) => (true, g),
            StepGrads::Owned(g) => (false, g),
        };
        // From a whole gradient, the unsharded run's norm.
        let whole_norm = whole.then(|| squared_norm::<AB, M>(&module, &grads));
        // The owned slices of every parameter and of its gradient, in module order.
        let mut take = TakeOwned::<B> {
            layout,
            grads: &mut grads,
            whole,
            at: 0,
            slices: Vec::new(),
        };
        module.visit(&mut take);
        let slices = take.slices;
        let grad_norm = if let Some(sum) = whole_norm {
            sum
        } else {
            let local = slices
                .iter()
                .filter_map(|s| s.as_ref().and_then(|(_, g)| g.as_ref()))
                .map(|g| g.clone().square().sum())
                .reduce(|a, b| a + b);
            let local = local.unwrap_or_else(|| Tensor::zeros([1], peer.device()));
            Some(peer.sum("gradient norm", local)?)
        };
        let grad_norm = grad_norm
            .map(|s| s.into_scalar().elem::<f64>())
            .unwrap_or(0.0)
            .sqrt();
        if !grad_norm.is_finite() {
            return Ok((module, StepStats::not_applied(grad_norm)));
        }
        let clip = self.clip_factor(grad_norm);
        self.steps += 1;
        let mut updated = Vec::with_capacity(slices.len());
        for (p, slice) in layout.params.iter().zip(slices) {
            updated.push(slice.map(|(param, grad)| match grad {
                Some(grad) => {
                    let step = self.update_constants(lr, clip, p.rank);
                    self.update_flat(&p.path, param, grad, step)
                }
                // No gradient: the slice stays as it is.
                None => param,
            }));
        }
        let mut gather = GatherUpdated::<B> {
            layout,
            peer,
            updated: updated.into_iter(),
            at: 0,
            bucket: VecDeque::new(),
            error: None,
        };
        let module = module.map(&mut gather);
        match gather.error {
            Some(e) => Err(e),
            None => Ok((
                module,
                StepStats {
                    grad_norm,
                    applied: true,
                },
            )),
        }
    }

    /// Applies one update with learning rate `lr` to `module` from `grads`.
    pub fn step<AB, M>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        B: ModelBackend,
        M: AutodiffModule<AB>,
    {
        let grad_norm = squared_norm::<AB, M>(&module, &grads)
            .map(|s| s.into_scalar().elem::<f64>())
            .unwrap_or(0.0)
            .sqrt();
        if !grad_norm.is_finite() {
            return (module, StepStats::not_applied(grad_norm));
        }
        let clip = self.clip_factor(grad_norm);
        self.steps += 1;
        let mut mapper = Update {
            opt: self,
            grads: &mut grads,
            lr,
            clip,
            path: Vec::new(),
        };
        let module = module.map(&mut mapper);
        (
            module,
            StepStats {
                grad_norm,
                applied: true,
            },
        )
    }
}

/// The sum of the squares of every gradient of `module`'s parameters (`None`: none).
fn squared_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> Option<Tensor<AB::InnerBackend, 1>> {
    let mut norm = GradNorm::<AB::InnerBackend> { grads, sum: None };
    module.visit(&mut norm);
    norm.sum
}

/// Sums the squares of every gradient (one device reduction per parameter, one sync).
struct GradNorm<'a, B: Backend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for GradNorm<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
            let sq = g.square().sum();
            self.sum = Some(match self.sum.take() {
                Some(s) => s + sq,
                None => sq,
            });
        }
    }
}

struct Update<'a, B: Backend> {
    opt: &'a mut AdamW<B>,
    grads: &'a mut GradientsParams,
    lr: f64,
    clip: f64,
    path: Vec<String>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, AB::InnerBackend>
where
    AB::InnerBackend: ModelBackend,
{
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let shape = tensor.shape();
        let n = shape.num_elements();
        let step = self.opt.update_constants(self.lr, self.clip, D);
        let p = self.opt.update_flat(
            &self.path.join("."),
            tensor.inner().reshape([n]),
            grad.reshape([n]),
            step,
        );
        let p = Tensor::<AB, D>::from_inner(p.reshape(shape)).require_grad();
        Param::from_mapped_value(id, p, mapper)
    }
}

/// Takes, in module order, this peer's slice of each parameter it owns part of,
/// with the slice of its gradient (`None`: the parameter has no gradient this step).
struct TakeOwned<'a, B: Backend> {
    layout: &'a ShardLayout,
    grads: &'a mut GradientsParams,
    /// The gradients are whole (else already sliced: ZeRO-2).
    whole: bool,
    at: usize,
    #[allow(clippy::type_complexity)]
    slices: Vec<Option<(Tensor<B, 1>, Option<Tensor<B, 1>>)>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for TakeOwned<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let slot = &self.layout.params[self.at];
        self.at += 1;
        if slot.owned.is_empty() {
            // Another peer's: its gradient is not needed here.
            let _ = self.grads.remove::<AB::InnerBackend, D>(param.id);
            self.slices.push(None);
            return;
        }
        let n = slot.len;
        let value = param.val().inner().reshape([n]).slice(slot.owned.clone());
        let grad = match self.whole {
            true => self
                .grads
                .remove::<AB::InnerBackend, D>(param.id)
                .map(|g| g.reshape([n]).slice(slot.owned.clone())),
            false => self.grads.remove::<AB::InnerBackend, 1>(param.id),
        };
        self.slices.push(Some((value, grad)));
    }
}

/// Replaces every parameter with its updated value: at the first parameter of each
/// bucket, the peers' updated slices of that bucket are gathered.
struct GatherUpdated<'a, B: Backend> {
    layout: &'a ShardLayout,
    peer: &'a Peer<B>,
    updated: std::vec::IntoIter<Option<Tensor<B, 1>>>,
    at: usize,
    /// The gathered bucket's parameters not yet put in place.
    bucket: VecDeque<Tensor<B, 1>>,
    error: Option<anyhow::Error>,
}

impl<B: Backend> GatherUpdated<'_, B> {
    /// Gathers the bucket that parameter `self.at` begins.
    fn gather(&mut self) -> Result<()> {
        let b = self.layout.params[self.at].bucket;
        let (range, len) = &self.layout.buckets[b];
        let params = &self.layout.params[range.clone()];
        let owned: Vec<Tensor<B, 1>> = self.updated.by_ref().take(params.len()).flatten().collect();
        let start = owned_range(*len, self.layout.rank).start;
        let whole = self
            .peer
            .all_gather("gather of the updated parameters", owned, start, *len)?;
        let sizes = params.iter().map(|p| p.len).collect();
        self.bucket = whole.split_with_sizes(sizes, 0).into();
        Ok(())
    }
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for GatherUpdated<'_, AB::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let first = self.layout.params[self.at].offset == 0;
        if self.error.is_none() && first {
            if let Err(e) = self.gather() {
                self.error = Some(e);
            }
        }
        self.at += 1;
        match self.bucket.pop_front() {
            Some(flat) if self.error.is_none() => {
                let p = Tensor::<AB, D>::from_inner(flat.reshape(tensor.shape())).require_grad();
                Param::from_mapped_value(id, p, mapper)
            }
            _ => Param::from_mapped_value(id, tensor, mapper),
        }
    }
}

/// Learning rate at optimizer step `step` (0-based): linear warmup from `lr / warmup`
/// to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total` steps.
pub fn lr_at(step: u64, lr: f64, min_lr: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(0, 1.0, 0.1, 10, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 0.1, 10, 110) - 1.0).abs() < 1e-12);
        // Halfway through the cosine: (lr + min_lr) / 2.
        assert!((lr_at(60, 1.0, 0.1, 10, 110) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, 1.0, 0.1, 10, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, 1.0, 0.1, 10, 110) - 0.1).abs() < 1e-12);
    }

    fn single_weight(w: f32) -> Linear<B> {
        let device = Default::default();
        let mut l: Linear<B> = LinearConfig::new(1, 1).with_bias(true).init(&device);
        l.weight = Param::from_tensor(Tensor::from_data(TensorData::new(vec![w], [1, 1]), &device));
        l.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![0.0f32], [1]),
            &device,
        )));
        l
    }

    /// Two AdamW steps on `loss = w * x + b` with x = 2 (grad w = 2, grad b = 1),
    /// compared with the update rule computed by hand.
    #[test]
    fn adamw_matches_hand_computation() {
        let device = Default::default();
        let config = OptimizerSection {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.5,
            grad_clip: 0.0,
        };
        let mut opt = AdamW::<NdArray<f32>>::new(config);
        let mut model = single_weight(1.0);
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![2.0f32], [1, 1]), &device);
        for _ in 0..2 {
            let loss = model.forward(x.clone()).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step(0.1, model, grads).0;
        }
        // Gradient is constant, so m_hat = g and v_hat = g^2: each update is lr * g/(|g| + eps) = lr.
        // w: decay then step: w1 = 1*(1 - 0.05) - 0.1 = 0.85; w2 = 0.85*0.95 - 0.1 = 0.7075.
        // b (1-D, no decay): b2 = -0.2.
        let w: f32 = model.weight.val().into_scalar();
        let b: f32 = model.bias.as_ref().unwrap().val().into_scalar();
        assert!((w - 0.7075).abs() < 1e-5, "{w}");
        assert!((b + 0.2).abs() < 1e-5, "{b}");
        assert_eq!(opt.moments.len(), 2);
        assert!(opt.moments.contains_key("weight") && opt.moments.contains_key("bias"));
    }

    #[test]
    fn global_norm_clipping_scales_all_gradients() {
        let device = Default::default();
        let config = OptimizerSection {
            lr: 1.0,
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            weight_decay: 0.0,
            grad_clip: 1.0,
        };
        let mut opt = AdamW::<NdArray<f32>>::new(config);
        let model = single_weight(1.0);
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![2.0f32], [1, 1]), &device);
        let loss = model.forward(x).sum().mul_scalar(3.0);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (model, stats) = opt.step(1.0, model, grads);
        // grads (6, 3): global norm sqrt(45).
        assert!((stats.grad_norm - 45f64.sqrt()).abs() < 1e-5);
        // beta = 0: the update is sign(g) * lr regardless of scale; the moments show the clipping.
        let m: Vec<f32> = opt.moments["weight"]
            .m
            .clone()
            .into_data()
            .to_vec()
            .unwrap();
        assert!((m[0] as f64 - 6.0 / 45f64.sqrt()).abs() < 1e-5, "{m:?}");
        let w: f32 = model.weight.val().into_scalar();
        assert!((w - 0.0).abs() < 1e-5);
    }
}

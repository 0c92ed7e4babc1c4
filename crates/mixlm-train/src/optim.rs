//! AdamW with decoupled weight decay and global-norm gradient clipping.
//!
//! Burn ships an AdamW, but its clipping is per parameter tensor, while pretraining
//! recipes (GPT-NeoX, nanoGPT, torchtitan) clip the norm of *all* gradients together.
//! Keeping the optimizer here also gives its state stable names (module paths such
//! as `blocks.0.attn.qkv.weight`), which checkpoints store as safetensors.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};
use mixlm_model::adamw::AdamWStep;
use mixlm_model::ModelBackend;

use crate::config::OptimizerSection;

/// First and second moments of one parameter, flattened.
#[derive(Clone)]
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

/// AdamW state: moments by parameter path, and the number of updates taken.
pub struct AdamW<B: Backend> {
    pub config: OptimizerSection,
    pub moments: HashMap<String, Moments<B>>,
    /// Updates applied so far (the `t` of the bias correction).
    pub steps: u64,
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
        }
    }

    /// Applies one update with learning rate `lr` to `module` from `grads`.
    pub fn step<AB, M>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        B: ModelBackend,
        M: AutodiffModule<AB>,
    {
        let mut norm = GradNorm::<B> {
            grads: &grads,
            sum: None,
        };
        module.visit(&mut norm);
        let grad_norm = norm
            .sum
            .map(|s| s.into_scalar().elem::<f64>())
            .unwrap_or(0.0)
            .sqrt();
        if !grad_norm.is_finite() {
            return (module, StepStats::not_applied(grad_norm));
        }
        let clip = if self.config.grad_clip > 0.0 && grad_norm > self.config.grad_clip {
            self.config.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
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
        let c = &self.opt.config;
        let t = self.opt.steps as i32;
        let shape = tensor.shape();
        let n = shape.num_elements();
        let flat = |x: Tensor<AB::InnerBackend, D>| x.reshape([n]).into_primitive().tensor();
        let key = self.path.join(".");
        let step = AdamWStep {
            clip: self.clip,
            beta1: c.beta1,
            beta2: c.beta2,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            eps: c.eps,
            // Decoupled decay on matrices and embeddings only (nanoGPT, GPT-NeoX).
            decay: (D >= 2 && c.weight_decay > 0.0).then_some(1.0 - self.lr * c.weight_decay),
            lr: self.lr,
        };
        let moments = self
            .opt
            .moments
            .remove(&key)
            .map(|Moments { m, v }| (m.into_primitive().tensor(), v.into_primitive().tensor()));
        let [p, m, v] = <AB::InnerBackend as ModelBackend>::adamw_update(
            flat(tensor.inner()),
            flat(grad),
            moments,
            step,
        );
        let float = |x| Tensor::<AB::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(x));
        self.opt.moments.insert(
            key,
            Moments {
                m: float(m),
                v: float(v),
            },
        );
        let p = float(p);
        let p = Tensor::<AB, D>::from_inner(p.reshape(shape)).require_grad();
        Param::from_mapped_value(id, p, mapper)
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

//! Causal self-attention as a backend operation with its own backward pass.
//!
//! Burn 0.21's autodiff runs `attention` through `attention_fallback`, which keeps the
//! `[batch, heads, seq, seq]` probabilities (and builds their gradient) for every layer.
//! [`ModelBackend::causal_attention`] instead saves only `q, k, v`, the output and one
//! log-sum-exp per row, and recomputes the probabilities in the backward pass
//! (flash-attention style). GPU backends (CubeCL: wgpu, CUDA) run tiled kernels that
//! never materialise the score matrix (`cube` module); the CPU backend runs the same
//! two functions as tensor algebra ([`reference_forward`], [`reference_backward`]),
//! which are also the reference the kernels are tested against.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Bool, Tensor, TensorPrimitive};

use crate::config::{AttentionKernel, Precision};
use crate::gelu::{GeluBackward, RetroGelu};
use crate::loss::TokenNllBackward;
use crate::norm::{LayerNormBackward, RetroLayerNorm};

#[cfg(feature = "cubecl")]
pub mod cube;

/// The backends mixlm's model runs on: Burn's [`Backend`] plus causal attention whose
/// backward recomputes the probabilities instead of storing them.
///
/// Tensors are `[batch, heads, seq, head_dim]`; `q` is multiplied by `scale` before the
/// dot products (`1/sqrt(head_dim)` in the model). The log-sum-exp is `[batch, heads,
/// seq]` and always f32, whatever the compute precision, because the backward pass
/// exponentiates differences of it.
pub trait ModelBackend: Backend {
    /// `softmax(causal(q kᵀ · scale)) v` and each row's log-sum-exp of the scaled scores.
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients `[dq, dk, dv]` from the forward inputs, its output and log-sum-exp, and
    /// the output gradient `grad`.
    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> [FloatTensor<Self>; 3];

    /// Causal attention output; autodiff backends override this to record the fused
    /// backward.
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        Self::causal_attention_forward(q, k, v, scale).0
    }

    /// The token cross-entropy's forward pass (see [`crate::loss`]): `logits: [b, t, v]`,
    /// `targets: [b, t]` give the losses `[b, t]` and each row's maximum and sum of
    /// `exp(x - max)`, `[b, t, 1]`.
    fn token_nll_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        crate::loss::nll_parts::<Self>(logits, targets)
    }

    /// Its backward pass: d nll / d logits for the upstream gradient `grad: [b, t]`.
    fn token_nll_backward(
        logits: FloatTensor<Self>,
        max: FloatTensor<Self>,
        sum: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        crate::loss::nll_backward::<Self>(logits, max, sum, targets, grad)
    }

    /// One AdamW step of a flat parameter `[n]` (see [`crate::adamw`]): the new
    /// parameter and moments `[param, m, v]`.
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: crate::adamw::AdamWStep,
    ) -> [FloatTensor<Self>; 3] {
        crate::adamw::update::<Self>(param, grad, moments, step)
    }

    /// LayerNorm over the last dimension (see [`crate::norm`]): Burn's own `layer_norm`.
    fn fused_layer_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        <Self as burn::tensor::ops::ModuleOps<Self>>::layer_norm(x, gamma, Some(beta), eps)
    }

    /// Its backward pass: `[dx, dgamma, dbeta]` for the output gradient `grad`.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> [FloatTensor<Self>; 3] {
        crate::norm::backward::<Self>(x, gamma, grad, eps)
    }

    /// LayerNorm; autodiff backends override this to record the fused backward.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        Self::fused_layer_norm_forward(x, gamma, beta, eps)
    }

    /// GELU's forward values (see [`crate::gelu`]): Burn's own `gelu`.
    fn exact_gelu_forward(x: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as burn::tensor::ops::ActivationOps<Self>>::gelu(x)
    }

    /// GELU's exact derivative times `grad`: `grad · (Φ(x) + x · φ(x))`.
    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::gelu::backward::<Self>(x, grad)
    }

    /// GELU; autodiff backends override this to record the exact backward.
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::exact_gelu_forward(x)
    }

    /// The token cross-entropy; autodiff backends override this to record the fused
    /// backward.
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let [nll, _, _] = Self::token_nll_forward(logits, targets);
        nll
    }
}

/// What training needs: an autodiff [`ModelBackend`] whose inner backend (used for
/// evaluation without a graph) is one too.
pub trait TrainBackend:
    AutodiffBackend<InnerBackend: ModelBackend + AutodiffInner> + ModelBackend
{
}

impl<B> TrainBackend for B
where
    B: AutodiffBackend + ModelBackend,
    B::InnerBackend: ModelBackend + AutodiffInner,
{
}

#[cfg(feature = "distributed")]
use burn::tensor::backend::distributed::DistributedBackend as Wrappable;
#[cfg(not(feature = "distributed"))]
use burn::tensor::backend::Backend as Wrappable;

/// The backends Burn's `Autodiff` wraps in this build: any backend, or, with Burn's
/// `distributed` feature (mixlm's `nccl` build), only those that can all-reduce
/// gradients while the backward pass runs. Naming it lets generic code say either.
pub trait AutodiffInner: Wrappable {}
impl<B: Wrappable> AutodiffInner for B {}

/// Causal attention on tensors, scaled by `1/sqrt(head_dim)` (what the model calls).
pub fn causal_attention<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let scale = (q.dims()[3] as f32).sqrt().recip();
    let out = B::causal_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        scale,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

pub(crate) fn tensor<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

pub(crate) fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

/// Scaled scores with the future masked to -inf: `[batch, heads, seq, seq]`.
fn masked_scores<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, scale: f32) -> Tensor<B, 4> {
    let t = q.dims()[2];
    let future = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &q.device()).unsqueeze::<4>();
    q.matmul(k.swap_dims(2, 3))
        .mul_scalar(scale)
        .mask_fill(future, f32::NEG_INFINITY)
}

/// [`ModelBackend::causal_attention_forward`] in tensor algebra (materialises the scores).
pub fn reference_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f32,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let scores = masked_scores(q, k, scale);
    let max = scores.clone().max_dim(3);
    let p = (scores - max.clone()).exp();
    let sum = p.clone().sum_dim(3);
    let out = p.matmul(v) / sum.clone();
    let lse = (max + sum.log()).squeeze_dim::<3>(3);
    (out, lse)
}

/// [`ModelBackend::causal_attention_backward`] in tensor algebra: with `P = exp(S - lse)`,
/// `dV = Pᵀ dO`, `dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))`, `dQ = dS K · scale`,
/// `dK = dSᵀ Q · scale`.
pub fn reference_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    grad: Tensor<B, 4>,
    scale: f32,
) -> [Tensor<B, 4>; 3] {
    let p = (masked_scores(q.clone(), k.clone(), scale) - lse.unsqueeze_dim::<4>(3)).exp();
    let delta = (grad.clone() * out).sum_dim(3);
    let dv = p.clone().swap_dims(2, 3).matmul(grad.clone());
    let ds = p * (grad.matmul(v.swap_dims(2, 3)) - delta);
    let dq = ds.clone().matmul(k).mul_scalar(scale);
    let dk = ds.swap_dims(2, 3).matmul(q).mul_scalar(scale);
    [dq, dk, dv]
}

/// Runs the reference pair on a backend's primitives (the CPU backend's implementation).
fn reference_forward_primitives<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (out, lse) = reference_forward::<B>(tensor(q), tensor(k), tensor(v), scale);
    (primitive(out), primitive(lse))
}

#[allow(clippy::too_many_arguments)]
fn reference_backward_primitives<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    scale: f32,
) -> [FloatTensor<B>; 3] {
    reference_backward::<B>(
        tensor(q),
        tensor(k),
        tensor(v),
        tensor(out),
        tensor(lse),
        tensor(grad),
        scale,
    )
    .map(primitive)
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> ModelBackend
    for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference_forward_primitives::<Self>(q, k, v, scale)
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> [FloatTensor<Self>; 3] {
        reference_backward_primitives::<Self>(q, k, v, out, lse, grad, scale)
    }

    fn token_nll_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        match crate::loss::cpu::forward(&logits, &targets) {
            Some(parts) => parts,
            None => crate::loss::nll_parts::<Self>(logits, targets),
        }
    }

    fn token_nll_backward(
        logits: FloatTensor<Self>,
        max: FloatTensor<Self>,
        sum: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match crate::loss::cpu::backward(&logits, &max, &sum, &targets, &grad) {
            Some(d) => d,
            None => crate::loss::nll_backward::<Self>(logits, max, sum, targets, grad),
        }
    }

    fn fused_layer_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        match crate::norm::cpu::forward(&x, &gamma, &beta, eps) {
            Some(y) => y,
            None => {
                <Self as burn::tensor::ops::ModuleOps<Self>>::layer_norm(x, gamma, Some(beta), eps)
            }
        }
    }

    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> [FloatTensor<Self>; 3] {
        match crate::norm::cpu::backward(&x, &gamma, &grad, eps) {
            Some(d) => d,
            None => crate::norm::backward::<Self>(x, gamma, grad, eps),
        }
    }

    fn exact_gelu_forward(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match crate::gelu::cpu::forward(&x) {
            Some(y) => y,
            None => <Self as burn::tensor::ops::ActivationOps<Self>>::gelu(x),
        }
    }

    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        match crate::gelu::cpu::backward(&x, &grad) {
            Some(d) => d,
            None => crate::gelu::backward::<Self>(x, grad),
        }
    }

    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: crate::adamw::AdamWStep,
    ) -> [FloatTensor<Self>; 3] {
        let fast =
            crate::adamw::cpu::update(&param, &grad, moments.as_ref().map(|(m, v)| (m, v)), step);
        match fast {
            Some(updated) => updated,
            None => crate::adamw::update::<Self>(param, grad, moments, step),
        }
    }
}

/// The backward node: `q, k, v` are checkpointed (so a checkpointing strategy may
/// recompute them), the output and log-sum-exp are kept.
#[derive(Debug)]
struct CausalAttentionBackward;

impl<B: ModelBackend> Backward<B, 3> for CausalAttentionBackward {
    type State = (NodeId, NodeId, NodeId, FloatTensor<B>, FloatTensor<B>, f32);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, out, lse, scale) = ops.state;
        let q = checkpointer.retrieve_node_output(q);
        let k = checkpointer.retrieve_node_output(k);
        let v = checkpointer.retrieve_node_output(v);
        let grads_qkv = B::causal_attention_backward(q, k, v, out, lse, grad, scale);
        for (parent, g) in ops.parents.into_iter().zip(grads_qkv) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: ModelBackend + AutodiffInner, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    /// Not differentiable itself (the result carries no graph); [`Self::causal_attention`] is.
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, lse) = B::causal_attention_forward(q.primitive, k.primitive, v.primitive, scale);
        (Self::from_inner(out), Self::from_inner(lse))
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> [FloatTensor<Self>; 3] {
        B::causal_attention_backward(
            q.primitive,
            k.primitive,
            v.primitive,
            out.primitive,
            lse.primitive,
            grad.primitive,
            scale,
        )
        .map(Self::from_inner)
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        match CausalAttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = (
                    prep.checkpoint(&q),
                    prep.checkpoint(&k),
                    prep.checkpoint(&v),
                );
                let (out, lse) =
                    B::causal_attention_forward(q.primitive, k.primitive, v.primitive, scale);
                let state = (ids.0, ids.1, ids.2, out.clone(), lse, scale);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                B::causal_attention_forward(q.primitive, k.primitive, v.primitive, scale).0,
            ),
        }
    }

    fn token_nll_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        B::token_nll_forward(logits.primitive, targets).map(Self::from_inner)
    }

    fn token_nll_backward(
        logits: FloatTensor<Self>,
        max: FloatTensor<Self>,
        sum: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::token_nll_backward(
            logits.primitive,
            max.primitive,
            sum.primitive,
            targets,
            grad.primitive,
        ))
    }

    fn fused_layer_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::fused_layer_norm_forward(
            x.primitive,
            gamma.primitive,
            beta.primitive,
            eps,
        ))
    }

    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> [FloatTensor<Self>; 3] {
        B::fused_layer_norm_backward(x.primitive, gamma.primitive, grad.primitive, eps)
            .map(Self::from_inner)
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let retro = RetroLayerNorm::<B> {
            inputs: [x.node.id, gamma.node.id, beta.node.id],
            eps,
            backend: std::marker::PhantomData,
        };
        match LayerNormBackward
            .prepare::<C>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
            .memory_bound()
            .retro_forward(retro)
            .parents([&x, &gamma, &beta])
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&gamma), eps);
                let y =
                    B::fused_layer_norm_forward(x.primitive, gamma.primitive, beta.primitive, eps);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_layer_norm_forward(
                x.primitive,
                gamma.primitive,
                beta.primitive,
                eps,
            )),
        }
    }

    fn exact_gelu_forward(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::exact_gelu_forward(x.primitive))
    }

    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::exact_gelu_backward(x.primitive, grad.primitive))
    }

    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let retro = RetroGelu::<B> {
            input: x.node.id,
            backend: std::marker::PhantomData,
        };
        match GeluBackward
            .prepare::<C>([x.node.clone()])
            .memory_bound()
            .retro_forward(retro)
            .parents([&x])
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::exact_gelu_forward(x.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::exact_gelu_forward(x.primitive)),
        }
    }

    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        match TokenNllBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [nll, max, sum] =
                    B::token_nll_forward(logits.primitive.clone(), targets.clone());
                prep.finish((logits.primitive, max, sum, targets), nll)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_nll(logits.primitive, targets)),
        }
    }
}

/// `[batch, heads, seq, head_dim]` shapes that probe the kernels: one position;
/// sequences shorter than, equal to and not a multiple of the row block; head sizes 8
/// to 128; and rows whose work passes llvmpipe's loop cap (see the `cube` module).
pub const PROBE_SHAPES: [[usize; 4]; 8] = [
    [1, 1, 1, 8],
    [2, 3, 17, 16],
    [1, 2, 64, 32],
    [1, 1, 70, 64],
    [2, 2, 129, 64],
    [1, 1, 40, 128],
    [1, 1, 1100, 64],
    [1, 1, 600, 128],
];

/// Burn's own causal attention (under autodiff: `attention_fallback`, which keeps the
/// score matrix), what [`causal_attention`] is checked against.
pub fn burn_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let options = burn::tensor::ops::AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    burn::tensor::module::attention(q, k, v, None, None, options)
}

/// How closely an attention implementation follows [`burn_attention`] in f32 on the
/// same random inputs: the output and the three gradients of `sum(attention · w)`,
/// each as its worst element's error in units of the tolerance (at most 1 passes).
///
/// This is how the kernels are tested, and what `mixlm check-backend` runs on a user's
/// device before a long job. In half precision the inputs are rounded to the dtype
/// once, so both sides see the same values, and the tolerance grows with the dtype's
/// rounding step.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionAgreement {
    /// `[batch, heads, seq, head_dim]`.
    pub shape: [usize; 4],
    pub precision: Precision,
    /// Worst error over tolerance of `[output, dq, dk, dv]`.
    pub worst: [f32; 4],
}

impl AttentionAgreement {
    pub const PARTS: [&'static str; 4] = ["output", "dq", "dk", "dv"];

    /// Every part within tolerance (a NaN fails).
    pub fn passed(&self) -> bool {
        self.worst.iter().all(|w| *w <= 1.0)
    }

    /// `(absolute, relative)` tolerance of an element: f32 allows accumulation-order
    /// differences; half precision 16 rounding steps of its dtype.
    pub fn tolerance(precision: Precision) -> (f32, f32) {
        match precision {
            Precision::F32 => (2e-4, 2e-3),
            Precision::F16 => (16.0 * 2f32.powi(-11), 16.0 * 2f32.powi(-11)),
            Precision::Bf16 => (16.0 * 2f32.powi(-8), 16.0 * 2f32.powi(-8)),
        }
    }
}

/// Random `q, k, v` and output weights `w` of `shape` in f32, rounded to `precision`'s
/// dtype (seeded: the same values on every call and device).
fn attention_inputs<B: Backend>(
    shape: [usize; 4],
    precision: Precision,
    device: &B::Device,
) -> [Tensor<B, 4>; 4] {
    B::seed(device, 1);
    [0, 1, 2, 3].map(|_| {
        Tensor::<B, 4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), device)
            .cast(precision.dtype())
            .cast(burn::tensor::FloatDType::F32)
    })
}

/// Output and gradients `[out, dq, dk, dv]` of `sum(attention(q, k, v) · w)` with the
/// inputs in `precision`, returned in f32.
fn attention_outputs<B: AutodiffBackend>(
    inputs: &[Tensor<B::InnerBackend, 4>; 4],
    precision: Precision,
    attention: &impl Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> [Tensor<B::InnerBackend, 4>; 4] {
    let [q, k, v, w] = inputs
        .clone()
        .map(|x| Tensor::<B, 4>::from_inner(x.cast(precision.dtype())));
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = attention(q.clone(), k.clone(), v.clone());
    let grads = (out.clone() * w).sum().backward();
    let grad = |x: &Tensor<B, 4>| x.grad(&grads).expect("input gradient");
    [out.inner(), grad(&q), grad(&k), grad(&v)].map(|t| t.cast(burn::tensor::FloatDType::F32))
}

/// Compares `attention` (run with inputs in `precision`) against [`burn_attention`] in
/// f32 on the same inputs; see [`AttentionAgreement`].
pub fn attention_agreement<B: AutodiffBackend>(
    shape: [usize; 4],
    precision: Precision,
    device: &B::Device,
    attention: impl Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> AttentionAgreement {
    let inputs = attention_inputs::<B::InnerBackend>(shape, precision, device);
    let expected = attention_outputs::<B>(&inputs, Precision::F32, &burn_attention);
    let got = attention_outputs::<B>(&inputs, precision, &attention);
    let (atol, rtol) = AttentionAgreement::tolerance(precision);
    let mut worst = [0f32; 4];
    for (w, (e, g)) in worst.iter_mut().zip(expected.into_iter().zip(got)) {
        let (e, g) = (
            e.into_data().to_vec::<f32>().expect("f32 data"),
            g.into_data().to_vec::<f32>().expect("f32 data"),
        );
        *w = e
            .iter()
            .zip(&g)
            .map(|(e, g)| (e - g).abs() / (atol + rtol * e.abs()))
            .fold(0.0f32, |a, x| if x.is_nan() || x > a { x } else { a });
    }
    AttentionAgreement {
        shape,
        precision,
        worst,
    }
}

/// Mean wall-clock time of one forward and backward pass of `kernel` on `shape` in
/// `precision`, over `iterations` after two warm-up passes (autotuning, compilation),
/// synchronised with the device.
pub fn time_attention<B: AutodiffBackend + ModelBackend>(
    shape: [usize; 4],
    precision: Precision,
    kernel: AttentionKernel,
    iterations: usize,
    device: &B::Device,
) -> Result<std::time::Duration, burn::tensor::backend::ExecutionError> {
    let inputs = attention_inputs::<B::InnerBackend>(shape, precision, device);
    let pass = || match kernel {
        AttentionKernel::Fused => attention_outputs::<B>(&inputs, precision, &causal_attention),
        AttentionKernel::Burn => attention_outputs::<B>(&inputs, precision, &burn_attention),
    };
    for _ in 0..2 {
        drop(pass());
        B::sync(device)?;
    }
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        drop(pass());
    }
    B::sync(device)?;
    Ok(start.elapsed() / iterations.max(1) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::ndarray::NdArray;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Distribution, Tolerance};

    type Cpu = NdArray<f32>;
    type Ad = Autodiff<Cpu>;

    fn random<B: Backend>(shape: [usize; 4], seed: u64, device: &B::Device) -> Tensor<B, 4> {
        B::seed(device, seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// Checks `fused` against Burn's own attention (autodiff through the fallback).
    pub(crate) fn assert_matches_fallback<B: AutodiffBackend>(
        shape: [usize; 4],
        precision: Precision,
        device: &B::Device,
        fused: impl Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> AttentionAgreement {
        let a = attention_agreement(shape, precision, device, fused);
        println!("{shape:?} {}: {:?} x tolerance", precision.name(), a.worst);
        assert!(a.passed(), "{a:?}: differs from Burn's attention");
        a
    }

    #[test]
    fn cpu_fused_attention_matches_burn_fallback_with_gradients() {
        let device = Default::default();
        for shape in PROBE_SHAPES {
            assert_matches_fallback::<Ad>(shape, Precision::F32, &device, causal_attention);
        }
    }

    /// The comparison catches what a broken kernel gets wrong: attending to the future,
    /// a wrong scale, one position off; each fails with the part it breaks.
    #[test]
    fn the_agreement_check_catches_broken_attention() {
        let device = Default::default();
        let shape = [1, 2, 33, 16];
        let not_causal = |q: Tensor<Ad, 4>, k: Tensor<Ad, 4>, v: Tensor<Ad, 4>| {
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            };
            attention(q, k, v, None, None, options)
        };
        let a = attention_agreement(shape, Precision::F32, &device, not_causal);
        assert!(a.worst.iter().all(|w| *w > 10.0), "{a:?}");
        let rescaled = |q: Tensor<Ad, 4>, k, v| causal_attention(q.mul_scalar(1.01), k, v);
        let a = attention_agreement(shape, Precision::F32, &device, rescaled);
        assert!(!a.passed() && a.worst[2] > 1.0, "{a:?}");
        // The last query row sees the second-to-last one's values.
        let shifted = |q: Tensor<Ad, 4>, k, v: Tensor<Ad, 4>| {
            let out = causal_attention(q, k, v);
            let t = out.dims()[2];
            Tensor::cat(
                vec![out.clone().narrow(2, 0, t - 1), out.narrow(2, t - 2, 1)],
                2,
            )
        };
        let a = attention_agreement(shape, Precision::F32, &device, shifted);
        assert!(a.worst[0] > 1.0 && a.worst[3] > 1.0, "{a:?}");
        assert!(!AttentionAgreement {
            worst: [0.5, f32::NAN, 0.0, 0.0],
            ..a
        }
        .passed());
    }

    /// The CubeCL kernels through the fusion backend, as training runs them: shapes with
    /// sequences shorter than, equal to and not a multiple of the row block, the head
    /// sizes of the presets, and rows whose work exceeds lavapipe's loop cap.
    #[cfg(feature = "cubecl")]
    #[test]
    fn wgpu_kernels_match_burn_fallback_with_gradients() {
        if !crate::vulkan_driver_installed() {
            return;
        }
        type Gpu = Autodiff<burn::backend::Wgpu>;
        let device = Default::default();
        for shape in PROBE_SHAPES {
            assert_matches_fallback::<Gpu>(shape, Precision::F32, &device, causal_attention);
        }
        // Half precision (lavapipe has f16, not bf16): within the dtype's tolerance,
        // and not f32's result (the kernel really ran in f16).
        for shape in [[2, 3, 17, 16], [1, 1, 300, 32]] {
            let a =
                assert_matches_fallback::<Gpu>(shape, Precision::F16, &device, causal_attention);
            let (atol, _) = AttentionAgreement::tolerance(Precision::F16);
            assert!(a.worst[0] * atol > 1e-6, "{a:?}: f16 gave f32's output");
        }
    }

    #[test]
    fn log_sum_exp_is_of_the_visible_scaled_scores() {
        let device = Default::default();
        let q = random::<Cpu>([1, 1, 3, 4], 5, &device);
        let k = random::<Cpu>([1, 1, 3, 4], 6, &device);
        let v = random::<Cpu>([1, 1, 3, 4], 7, &device);
        let (_, lse) = reference_forward(q.clone(), k.clone(), v, 0.5);
        let q = q.into_data().to_vec::<f32>().unwrap();
        let k = k.into_data().to_vec::<f32>().unwrap();
        let lse = lse.into_data().to_vec::<f32>().unwrap();
        for i in 0..3 {
            let expected = (0..=i)
                .map(|j| {
                    let dot: f32 = (0..4).map(|c| q[i * 4 + c] * k[j * 4 + c]).sum();
                    (0.5 * dot).exp()
                })
                .sum::<f32>()
                .ln();
            assert!(
                (lse[i] - expected).abs() < 1e-5,
                "row {i}: {} vs {expected}",
                lse[i]
            );
        }
    }

    #[test]
    fn untracked_inputs_give_the_forward_output() {
        let device = Default::default();
        let q = random::<Ad>([1, 2, 9, 8], 1, &device);
        let k = random::<Ad>([1, 2, 9, 8], 2, &device);
        let v = random::<Ad>([1, 2, 9, 8], 3, &device);
        let expected = burn_attention(q.clone(), k.clone(), v.clone()).into_data();
        causal_attention(q, k, v)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
    }
}

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
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, Tensor, TensorPrimitive};

#[cfg(feature = "cubecl")]
mod cube;

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
}

/// What training needs: an autodiff [`ModelBackend`] whose inner backend (used for
/// evaluation without a graph) is one too.
pub trait TrainBackend: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

impl<B> TrainBackend for B
where
    B: AutodiffBackend + ModelBackend,
    B::InnerBackend: ModelBackend,
{
}

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

fn tensor<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
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

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
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

    fn fallback<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        attention(q, k, v, None, None, options)
    }

    /// Output and the three gradients of `sum(attention(q, k, v) * w)` for `run`.
    pub(crate) fn outputs_and_grads<B: AutodiffBackend>(
        shape: [usize; 4],
        device: &B::Device,
        run: impl Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> [Tensor<B::InnerBackend, 4>; 4] {
        let q = random::<B>(shape, 1, device).require_grad();
        let k = random::<B>(shape, 2, device).require_grad();
        let v = random::<B>(shape, 3, device).require_grad();
        let w = random::<B>(shape, 4, device);
        let out = run(q.clone(), k.clone(), v.clone());
        let grads = (out.clone() * w).sum().backward();
        [
            out.inner(),
            q.grad(&grads).unwrap(),
            k.grad(&grads).unwrap(),
            v.grad(&grads).unwrap(),
        ]
    }

    /// Checks `fused` against Burn's own `attention` (autodiff through the fallback).
    pub(crate) fn assert_matches_fallback<B: AutodiffBackend>(
        shape: [usize; 4],
        device: &B::Device,
        fused: impl Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
    ) {
        let expected = outputs_and_grads::<B>(shape, device, fallback);
        let got = outputs_and_grads::<B>(shape, device, fused);
        for (name, (e, g)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(expected.into_iter().zip(got))
        {
            let (e, g) = (
                e.into_data().to_vec::<f32>().unwrap(),
                g.into_data().to_vec::<f32>().unwrap(),
            );
            let worst = e
                .iter()
                .zip(&g)
                .map(|(e, g)| (e - g).abs() / (2e-4 + 2e-3 * e.abs()))
                .fold(0.0f32, |a, x| if x.is_nan() || x > a { x } else { a });
            assert!(
                worst <= 1.0,
                "{name} of {shape:?} differs from the fallback: {worst} x tolerance"
            );
        }
    }

    #[test]
    fn cpu_fused_attention_matches_burn_fallback_with_gradients() {
        let device = Default::default();
        for shape in [[1, 1, 1, 8], [2, 3, 17, 16], [1, 2, 64, 32], [1, 1, 70, 64]] {
            assert_matches_fallback::<Ad>(shape, &device, causal_attention);
        }
    }

    /// The CubeCL kernels through the fusion backend, as training runs them: shapes with
    /// sequences shorter than, equal to and not a multiple of the row block, and the
    /// head sizes of the presets.
    #[cfg(feature = "cubecl")]
    #[test]
    fn wgpu_kernels_match_burn_fallback_with_gradients() {
        if !crate::vulkan_driver_installed() {
            return;
        }
        type Gpu = Autodiff<burn::backend::Wgpu>;
        let device = Default::default();
        for shape in [
            [1, 1, 1, 8],
            [2, 3, 17, 16],
            [1, 2, 64, 32],
            [1, 1, 70, 64],
            [2, 2, 129, 64],
            [1, 1, 40, 128],
        ] {
            assert_matches_fallback::<Gpu>(shape, &device, causal_attention);
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
        let expected = fallback(q.clone(), k.clone(), v.clone()).into_data();
        causal_attention(q, k, v)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
    }
}

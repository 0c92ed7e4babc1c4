//! Token cross-entropy as one operation with its own backward pass.
//!
//! Written as `log_softmax(logits).gather(target)`, Burn's autodiff records six
//! operations over the `[batch, seq, vocab]` logits (max, subtract, exp, sum, log,
//! subtract), keeps their full-size inputs, and in the backward pass builds a
//! zero tensor to scatter the gradient into and runs the six backward rules, each a
//! pass over `vocab` values per token. At a 50k vocabulary these passes are most of a
//! small model's step on the CPU. [`token_nll`] computes the same numbers in three
//! passes forward (max, exp of the shifted logits, their sum) and keeps only the
//! logits and two values per token; its backward is `exp(x - max) · g / sum`, with
//! `g` subtracted at the target: three passes and a scatter of one value per token.
//!
//! Every value is computed with the same operations in the same order as the composed
//! version, so losses and gradients are equal to the bit (the sign of an exact zero
//! gradient aside): training runs are unchanged, only faster.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use crate::attention::ModelBackend;

/// Negative log-likelihood of `targets: [b, t]` under `logits: [b, t, v]`, in nats:
/// `log Σ exp(x - max) - (x_target - max)` per token.
pub fn token_nll<B: ModelBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::token_nll(
        logits.into_primitive().tensor(),
        targets.into_primitive(),
    )))
}

/// The forward pass: the losses `[b, t]`, and each row's maximum and sum of
/// `exp(x - max)` (`[b, t, 1]`), which the backward pass needs.
pub(crate) struct NllParts<B: Backend> {
    pub nll: Tensor<B, 2>,
    pub max: Tensor<B, 3>,
    pub sum: Tensor<B, 3>,
}

pub(crate) fn nll_parts<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> NllParts<B> {
    let [b, t, _] = logits.dims();
    let max = logits.clone().max_dim(2);
    let shifted_target = logits.clone().gather(2, targets.unsqueeze_dim(2)) - max.clone();
    let sum = (logits - max.clone()).exp().sum_dim(2);
    // `-(shifted - log sum)` as `log sum - shifted`: IEEE subtraction is antisymmetric.
    let nll = (sum.clone().log() - shifted_target).reshape([b, t]);
    NllParts { nll, max, sum }
}

/// d nll / d logits for the upstream gradient `grad: [b, t]`:
/// `exp(x - max) · (grad · 1/sum)`, minus `grad` at each target. The reciprocal
/// and the order of the products are those of Burn's `log` and `exp` backward rules.
pub(crate) fn nll_backward<B: Backend>(
    logits: Tensor<B, 3>,
    max: Tensor<B, 3>,
    sum: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    grad: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [b, t, _] = logits.dims();
    let grad = grad.reshape([b, t, 1]);
    let coef = grad.clone() * sum.recip();
    let softmax_part = coef * (logits - max).exp();
    softmax_part.scatter(
        2,
        targets.unsqueeze_dim(2),
        grad.neg(),
        IndexingUpdateOp::Add,
    )
}

/// The backward node of [`ModelBackend::token_nll`] under autodiff: keeps the logits
/// (no copy: the tensor the forward pass read), the row maxima and sums, and the
/// targets.
#[derive(Debug)]
pub(crate) struct TokenNllBackward;

impl<B: Backend> Backward<B, 1> for TokenNllBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (logits, max, sum, targets) = ops.state;
        let float = |t| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(t));
        let d = nll_backward::<B>(
            float(logits),
            float(max),
            float(sum),
            Tensor::from_primitive(targets),
            Tensor::from_primitive(TensorPrimitive::Float(grad)),
        );
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, d.into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, Tensor, TensorData};

    type B = Autodiff<NdArray<f32>>;

    /// `log_softmax(logits).gather(target)`, negated: what [`super::token_nll`] replaces.
    fn composed(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t, _] = logits.dims();
        log_softmax(logits, 2)
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .reshape([b, t])
            .neg()
    }

    fn bits(t: Tensor<B, 3>) -> Vec<f32> {
        t.into_data().into_vec().unwrap()
    }

    /// Losses and logit gradients equal to the composed version's, value for value
    /// (`==`, so an exact zero may differ in sign), under a weighted sum that gives
    /// every token its own upstream gradient, and without a graph.
    #[test]
    fn equals_the_composed_log_softmax_to_the_bit() {
        let device = Default::default();
        let (b, t, vocab) = (3, 7, 300);
        let values: Vec<f32> = (0..b * t * vocab)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 40.0)
            .collect();
        let ids: Vec<i64> = (0..b * t).map(|i| (i * 89 % vocab) as i64).collect();
        let weights: Vec<f32> = (0..b * t).map(|i| 0.1 + i as f32 * 0.37).collect();
        let logits = || {
            Tensor::<B, 3>::from_data(TensorData::new(values.clone(), [b, t, vocab]), &device)
                .require_grad()
        };
        let targets =
            || Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), &device);
        let w = Tensor::<B, 2>::from_data(TensorData::new(weights, [b, t]), &device);

        let (x1, x2) = (logits(), logits());
        let fused = super::token_nll(x1.clone(), targets());
        let reference = composed(x2.clone(), targets());
        let f: Vec<f32> = fused.clone().into_data().into_vec().unwrap();
        let r: Vec<f32> = reference.clone().into_data().into_vec().unwrap();
        assert_eq!(f, r, "losses");
        let g1 = (fused * w.clone()).sum().backward();
        let g2 = (reference * w).sum().backward();
        let (d1, d2) = (x1.grad(&g1).unwrap(), x2.grad(&g2).unwrap());
        assert_eq!(
            bits(Tensor::from_inner(d1)),
            bits(Tensor::from_inner(d2)),
            "gradients"
        );

        // Without autodiff (evaluation): the same losses.
        let inner = super::token_nll(logits().inner(), targets().inner());
        assert_eq!(inner.into_data().into_vec::<f32>().unwrap(), r);
    }
}

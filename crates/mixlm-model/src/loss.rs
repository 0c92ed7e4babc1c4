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
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use crate::attention::{primitive, tensor as float, ModelBackend};

/// Negative log-likelihood of `targets: [b, t]` under `logits: [b, t, v]`, in nats:
/// `log Σ exp(x - max) - (x_target - max)` per token.
pub fn token_nll<B: ModelBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    float(B::token_nll(primitive(logits), targets.into_primitive()))
}

/// The forward pass in tensor operations (every backend but the CPU's): the losses
/// `[b, t]`, and each row's maximum and sum of `exp(x - max)` (`[b, t, 1]`), which the
/// backward pass needs.
pub(crate) fn nll_parts<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> [FloatTensor<B>; 3] {
    let logits: Tensor<B, 3> = float(logits);
    let targets: Tensor<B, 2, Int> = Tensor::from_primitive(targets);
    let [b, t, _] = logits.dims();
    let max = logits.clone().max_dim(2);
    let shifted_target = logits.clone().gather(2, targets.unsqueeze_dim(2)) - max.clone();
    let sum = (logits - max.clone()).exp().sum_dim(2);
    // `-(shifted - log sum)` as `log sum - shifted`: IEEE subtraction is antisymmetric.
    let nll = (sum.clone().log() - shifted_target).reshape([b, t]);
    [primitive(nll), primitive(max), primitive(sum)]
}

/// The backward pass in tensor operations: d nll / d logits for the upstream gradient
/// `grad: [b, t]`, `exp(x - max) · (grad · 1/sum)`, minus `grad` at each target. The
/// reciprocal and the order of the products are those of Burn's `log` and `exp`
/// backward rules.
pub(crate) fn nll_backward<B: Backend>(
    logits: FloatTensor<B>,
    max: FloatTensor<B>,
    sum: FloatTensor<B>,
    targets: IntTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let logits: Tensor<B, 3> = float(logits);
    let [b, t, _] = logits.dims();
    let grad = float::<B, 2>(grad).reshape([b, t, 1]);
    let coef = grad.clone() * float::<B, 3>(sum).recip();
    let softmax_part = coef * (logits - float::<B, 3>(max)).exp();
    let targets: Tensor<B, 2, Int> = Tensor::from_primitive(targets);
    primitive(softmax_part.scatter(
        2,
        targets.unsqueeze_dim(2),
        grad.neg(),
        IndexingUpdateOp::Add,
    ))
}

/// Both passes on the CPU backend for f32 logits: rows in parallel (Burn's ndarray
/// element-wise operations run on one thread), reading the logits in place, and
/// without a full-size temporary in the forward pass. Each value is computed by the
/// same operations as the tensor version, the sum of a row by ndarray's own
/// `sum` (what `sum_dim` calls on a row), so the results are equal to the bit.
/// `None` when the tensors are not contiguous f32 (the caller falls back).
pub(crate) mod cpu {
    use burn::backend::ndarray::NdArrayTensor;
    use ndarray::ArrayView1;
    use rayon::prelude::*;

    use crate::cpu::{f32_view, tensor};

    fn indices(t: &NdArrayTensor) -> Option<Vec<usize>> {
        match t {
            NdArrayTensor::I64(s) => Some(s.view().iter().map(|&i| i as usize).collect()),
            NdArrayTensor::I32(s) => Some(s.view().iter().map(|&i| i as usize).collect()),
            _ => None,
        }
    }

    /// `[nll, max, sum]` as [`super::nll_parts`] computes them.
    pub fn forward(logits: &NdArrayTensor, targets: &NdArrayTensor) -> Option<[NdArrayTensor; 3]> {
        let view = f32_view(logits)?;
        let x = view.as_slice()?;
        let targets = indices(targets)?;
        let &[b, t, v] = view.shape() else {
            return None;
        };
        let rows: Vec<(f32, f32, f32)> = x
            .par_chunks(v)
            .zip(targets.par_iter())
            .map_init(
                || vec![0f32; v],
                |scratch, (row, &target)| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    for (e, &xi) in scratch.iter_mut().zip(row) {
                        *e = (xi - max).exp();
                    }
                    let sum = ArrayView1::from(&scratch[..]).sum();
                    (sum.ln() - (row[target] - max), max, sum)
                },
            )
            .collect();
        let column = |f: fn(&(f32, f32, f32)) -> f32| rows.iter().map(f).collect::<Vec<f32>>();
        Some([
            tensor(column(|r| r.0), &[b, t]),
            tensor(column(|r| r.1), &[b, t, 1]),
            tensor(column(|r| r.2), &[b, t, 1]),
        ])
    }

    /// d nll / d logits as [`super::nll_backward`] computes it.
    pub fn backward(
        logits: &NdArrayTensor,
        max: &NdArrayTensor,
        sum: &NdArrayTensor,
        targets: &NdArrayTensor,
        grad: &NdArrayTensor,
    ) -> Option<NdArrayTensor> {
        let view = f32_view(logits)?;
        let x = view.as_slice()?;
        let (max, sum, grad) = (f32_view(max)?, f32_view(sum)?, f32_view(grad)?);
        let (max, sum, grad) = (max.as_slice()?, sum.as_slice()?, grad.as_slice()?);
        let targets = indices(targets)?;
        let v = *view.shape().last()?;
        let mut d = vec![0f32; x.len()];
        d.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .enumerate()
            .for_each(|(r, (out, row))| {
                let coef = grad[r] * (1.0 / sum[r]);
                for (o, &xi) in out.iter_mut().zip(row) {
                    *o = coef * (xi - max[r]).exp();
                }
                out[targets[r]] += -grad[r];
            });
        Some(tensor(d, view.shape()))
    }
}

/// The backward node of [`ModelBackend::token_nll`] under autodiff: keeps the logits
/// (no copy: the tensor the forward pass read), the row maxima and sums, and the
/// targets.
#[derive(Debug)]
pub(crate) struct TokenNllBackward;

impl<B: ModelBackend> Backward<B, 1> for TokenNllBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (logits, max, sum, targets) = ops.state;
        let d = B::token_nll_backward(logits, max, sum, targets, grad);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, d);
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

    /// The CPU's row-parallel passes and the tensor-operation passes other backends
    /// run give the same values.
    #[test]
    fn the_cpu_passes_equal_the_tensor_operations() {
        use super::{cpu, nll_backward, nll_parts};
        type C = NdArray<f32>;
        let device = Default::default();
        let (b, t, vocab) = (2, 5, 1000);
        let values: Vec<f32> = (0..b * t * vocab)
            .map(|i| ((i as f32 * 0.754_877_7).fract() - 0.5) * 30.0)
            .collect();
        let logits = Tensor::<C, 3>::from_data(TensorData::new(values, [b, t, vocab]), &device)
            .into_primitive()
            .tensor();
        let ids: Vec<i64> = (0..b * t).map(|i| (i * 263 % vocab) as i64).collect();
        let targets =
            Tensor::<C, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device).into_primitive();
        let grad: Vec<f32> = (0..b * t).map(|i| 0.3 - i as f32 * 0.07).collect();
        let grad = Tensor::<C, 2>::from_data(TensorData::new(grad, [b, t]), &device)
            .into_primitive()
            .tensor();
        let values = |t: burn::tensor::ops::FloatTensor<C>| -> Vec<f32> {
            Tensor::<C, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(t))
                .into_data()
                .into_vec()
                .unwrap()
        };
        let ops = nll_parts::<C>(logits.clone(), targets.clone());
        let rows = cpu::forward(&logits, &targets).expect("contiguous f32");
        for (a, b) in ops.iter().zip(&rows) {
            assert_eq!(values(a.clone()), values(b.clone()));
        }
        let [_, max, sum] = rows;
        let by_ops = nll_backward::<C>(
            logits.clone(),
            max.clone(),
            sum.clone(),
            targets.clone(),
            grad.clone(),
        );
        let by_rows = cpu::backward(&logits, &max, &sum, &targets, &grad).unwrap();
        assert_eq!(values(by_ops), values(by_rows));
    }
}

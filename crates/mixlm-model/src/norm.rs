//! LayerNorm over the last dimension as one operation with its own backward pass.
//!
//! Burn 0.21's `layer_norm` is a chain of nine tensor operations (mean, subtract,
//! square, mean, add, square root, divide, scale, shift); under autodiff each is
//! recorded and differentiated on its own, with broadcasting reductions for the
//! scale and shift. On a small model's CPU step these passes cost as much as the
//! matrix products. This operation computes the same forward values (the same f32
//! operations in the same order, so equal to the bit) and differentiates in closed
//! form, `x̂ = (x - μ)/σ`, `ĝ = g · γ`:
//! `dx = (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂)) / σ`, `dγ = Σ g · x̂`, `dβ = Σ g`,
//! the rule PyTorch's `layer_norm_backward` uses (aten `LayerNormBackwardKernelImpl`).
//!
//! On the CPU backend both passes run over rows in parallel; the sums for `dγ`, `dβ`
//! are taken per fixed block of rows and then added in block order, so results do not
//! depend on the thread count. Other backends run tensor operations, which fusion
//! compiles. The operation is memory-bound: under a checkpointing strategy its output
//! is recomputed from its inputs, and the backward pass recomputes `μ` and `σ`.

use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::Tensor;

use crate::attention::{primitive, tensor as float, ModelBackend};

/// `(x - mean) / sqrt(var + eps) · gamma + beta` over the last dimension of `x`.
pub fn layer_norm<B: ModelBackend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    float(B::fused_layer_norm(
        primitive(x),
        primitive(gamma),
        primitive(beta),
        eps,
    ))
}

/// The backward pass in tensor operations (every backend but the CPU's):
/// `[dx, dgamma, dbeta]` for `x: [b, t, d]` and the output gradient `grad`.
pub(crate) fn backward<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    grad: FloatTensor<B>,
    eps: f64,
) -> [FloatTensor<B>; 3] {
    let x: Tensor<B, 3> = float(x);
    let [b, t, d] = x.dims();
    let x = x.reshape([b * t, d]);
    let g = float::<B, 3>(grad).reshape([b * t, d]);
    let mean = x.clone().mean_dim(1);
    let centered = x - mean;
    let var = (centered.clone() * centered.clone()).mean_dim(1);
    let sigma = var.add_scalar(eps).sqrt();
    let xhat = centered / sigma.clone();
    let dbeta = g.clone().sum_dim(0).reshape([d]);
    let dgamma = (g.clone() * xhat.clone()).sum_dim(0).reshape([d]);
    let dxhat = g * float::<B, 1>(gamma).reshape([1, d]);
    let a = dxhat.clone().mean_dim(1);
    let c = (dxhat.clone() * xhat.clone()).mean_dim(1);
    let dx = (dxhat - a - xhat * c) / sigma;
    [
        primitive(dx.reshape([b, t, d])),
        primitive(dgamma),
        primitive(dbeta),
    ]
}

/// Both passes on the CPU backend for contiguous f32 tensors; `None` otherwise (the
/// caller falls back to tensor operations).
pub(crate) mod cpu {
    use burn::backend::ndarray::NdArrayTensor;
    use ndarray::{ArrayView1, ArrayViewD};
    use rayon::prelude::*;

    use crate::cpu::{f32_view, tensor};

    /// Rows per parallel task, and per partial sum of `dγ`, `dβ` (fixed, so the sums
    /// do not depend on the thread count).
    const ROWS: usize = 32;

    /// Row `x`'s centred values (into `centered`) and `σ`, as Burn's ndarray
    /// operations compute them: means are ndarray's lane sums divided by `d`.
    fn moments(x: &[f32], centered: &mut [f32], squares: &mut [f32], eps: f32) -> f32 {
        let n = x.len() as f32;
        let mean = ArrayView1::from(x).sum() / n;
        for ((c, s), &xi) in centered.iter_mut().zip(squares.iter_mut()).zip(x) {
            *c = xi - mean;
            *s = *c * *c;
        }
        let var = ArrayView1::from(&*squares).sum() / n;
        (var + eps).sqrt()
    }

    /// Contiguous f32 views of `x` (`[.., d]`) and `gamma` (`[d]`), and `d`.
    fn views<'a>(
        x: &'a NdArrayTensor,
        gamma: &'a NdArrayTensor,
    ) -> Option<(ArrayViewD<'a, f32>, ArrayViewD<'a, f32>, usize)> {
        let (xv, gv) = (f32_view(x)?, f32_view(gamma)?);
        let d = *xv.shape().last()?;
        (gv.len() == d && d > 0).then_some((xv, gv, d))
    }

    pub fn forward(
        x: &NdArrayTensor,
        gamma: &NdArrayTensor,
        beta: &NdArrayTensor,
        eps: f64,
    ) -> Option<NdArrayTensor> {
        let ((xv, gv, d), bv) = (views(x, gamma)?, f32_view(beta)?);
        let (xs, gs, bs) = (xv.as_slice()?, gv.as_slice()?, bv.as_slice()?);
        if bs.len() != d {
            return None;
        }
        let eps = eps as f32;
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(ROWS * d)
            .zip(xs.par_chunks(ROWS * d))
            .for_each(|(out, x)| {
                let (mut centered, mut squares) = (vec![0f32; d], vec![0f32; d]);
                for (o, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                    let sigma = moments(x, &mut centered, &mut squares, eps);
                    for (((o, &c), &g), &b) in o.iter_mut().zip(&centered).zip(gs).zip(bs) {
                        *o = (c / sigma) * g + b;
                    }
                }
            });
        Some(tensor(out, xv.shape()))
    }

    pub fn backward(
        x: &NdArrayTensor,
        gamma: &NdArrayTensor,
        grad: &NdArrayTensor,
        eps: f64,
    ) -> Option<[NdArrayTensor; 3]> {
        let ((xv, gv, d), dv) = (views(x, gamma)?, f32_view(grad)?);
        let (xs, gs, dys) = (xv.as_slice()?, gv.as_slice()?, dv.as_slice()?);
        if dys.len() != xs.len() {
            return None;
        }
        let (eps, n) = (eps as f32, d as f32);
        let mut dx = vec![0f32; xs.len()];
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(ROWS * d)
            .zip(xs.par_chunks(ROWS * d).zip(dys.par_chunks(ROWS * d)))
            .map(|(dx, (x, dy))| {
                let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
                let (mut xhat, mut squares, mut dxhat) =
                    (vec![0f32; d], vec![0f32; d], vec![0f32; d]);
                for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                    let sigma = moments(x, &mut xhat, &mut squares, eps);
                    let (mut a, mut c) = (0f32, 0f32);
                    for i in 0..d {
                        xhat[i] /= sigma;
                        dxhat[i] = dy[i] * gs[i];
                        a += dxhat[i];
                        c += dxhat[i] * xhat[i];
                        dgamma[i] += dy[i] * xhat[i];
                        dbeta[i] += dy[i];
                    }
                    let (a, c) = (a / n, c / n);
                    for i in 0..d {
                        dx[i] = (dxhat[i] - a - xhat[i] * c) / sigma;
                    }
                }
                (dgamma, dbeta)
            })
            .collect();
        let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
        for (pg, pb) in &partials {
            dgamma.iter_mut().zip(pg).for_each(|(s, p)| *s += p);
            dbeta.iter_mut().zip(pb).for_each(|(s, p)| *s += p);
        }
        Some([
            tensor(dx, xv.shape()),
            tensor(dgamma, &[d]),
            tensor(dbeta, &[d]),
        ])
    }
}

/// The backward node under autodiff: `x` and `gamma` are checkpointed.
#[derive(Debug)]
pub(crate) struct LayerNormBackward;

impl<B: ModelBackend> Backward<B, 3> for LayerNormBackward {
    type State = (NodeId, NodeId, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, eps) = ops.state;
        let x = ckpt.retrieve_node_output(x);
        let gamma = ckpt.retrieve_node_output(gamma);
        let d = B::fused_layer_norm_backward(x, gamma, grad, eps);
        for (parent, g) in ops.parents.into_iter().zip(d) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// Recomputes the output from the inputs when a checkpointing strategy dropped it.
#[derive(Debug, Clone)]
pub(crate) struct RetroLayerNorm<B> {
    pub inputs: [NodeId; 3],
    pub eps: f64,
    pub backend: PhantomData<B>,
}

impl<B: ModelBackend> RetroForward for RetroLayerNorm<B> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let [x, gamma, beta] = self
            .inputs
            .map(|id| states.get_state::<FloatTensor<B>>(&id));
        states.save(
            out_node,
            B::fused_layer_norm_forward(x, gamma, beta, self.eps),
        );
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Tensor, TensorData};

    use crate::cpu::values;

    type C = NdArray<f32>;
    type B = Autodiff<C>;

    /// Equal within `tol` of the largest magnitude in each block of `d` values (a row
    /// of `dx`, or the whole of `dγ`, `dβ`): f32 rounding of the centred values scales
    /// with a row's offset over its spread.
    fn close(a: &[f32], b: &[f32], d: usize, tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (r, (x, y)) in a.chunks(d).zip(b.chunks(d)).enumerate() {
            let scale = y.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert!(
                    (x - y).abs() <= tol * scale,
                    "{what}[{r}, {i}]: {x} against {y}"
                );
            }
        }
    }

    /// The closed-form backward in f64, from the f32 inputs.
    fn closed_form(x: &[f32], gamma: &[f32], dy: &[f32], d: usize, eps: f64) -> [Vec<f32>; 3] {
        let (mut dx, mut dg, mut db) = (vec![], vec![0f64; d], vec![0f64; d]);
        for (x, dy) in x.chunks(d).zip(dy.chunks(d)) {
            let n = d as f64;
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = x
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let sigma = (var + eps).sqrt();
            let xhat: Vec<f64> = x.iter().map(|&v| (f64::from(v) - mean) / sigma).collect();
            let dxhat: Vec<f64> = dy
                .iter()
                .zip(gamma)
                .map(|(&g, &w)| f64::from(g * w))
                .collect();
            let a = dxhat.iter().sum::<f64>() / n;
            let c = dxhat.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / n;
            for i in 0..d {
                dx.push(((dxhat[i] - a - xhat[i] * c) / sigma) as f32);
                dg[i] += f64::from(dy[i]) * xhat[i];
                db[i] += f64::from(dy[i]);
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
        [dx, f(dg), f(db)]
    }

    /// Rows with offsets and spreads far apart (a row's mean from -5 to 5, its spread
    /// from 0.1 to 10), 70 rows so the CPU pass has a partial block.
    fn inputs(b: usize, t: usize, d: usize) -> Vec<f32> {
        (0..b * t * d)
            .map(|i| {
                let row = i / d;
                let spread = 0.1 * 10f32.powi((row % 3) as i32);
                (row % 11) as f32 - 5.0 + ((i as f32 * 0.618_034).fract() - 0.5) * spread
            })
            .collect()
    }

    /// Forward values equal to Burn's `LayerNorm` to the bit. Gradients of `x`, `γ` and
    /// `β`, on the CPU pass and on the tensor-operation path other backends run, equal
    /// the closed form in f64 within f32 rounding, as Burn's composed operations do.
    #[test]
    fn matches_burns_layer_norm() {
        let device = Default::default();
        let (b, t, d) = (2, 35, 48);
        let xs = inputs(b, t, d);
        let gamma: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.03).collect();
        let beta: Vec<f32> = (0..d).map(|i| i as f32 * 0.01 - 0.2).collect();
        let dy: Vec<f32> = (0..b * t * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02)
            .collect();
        let eps = 1e-5;

        let mut reference = LayerNormConfig::new(d).with_epsilon(eps).init::<B>(&device);
        let param = |v: &Vec<f32>| {
            burn::module::Param::from_tensor(Tensor::<B, 1>::from_data(
                TensorData::new(v.clone(), [d]),
                &device,
            ))
        };
        reference.gamma = param(&gamma);
        reference.beta = Some(param(&beta));
        let x_of = || {
            Tensor::<B, 3>::from_data(TensorData::new(xs.clone(), [b, t, d]), &device)
                .require_grad()
        };
        let w = Tensor::<B, 3>::from_data(TensorData::new(dy.clone(), [b, t, d]), &device);

        let x1 = x_of();
        let y1 = reference.forward(x1.clone());
        let g1 = (y1.clone() * w.clone()).sum().backward();

        let x2 = x_of();
        let (g, be) = (
            reference.gamma.val().detach().require_grad(),
            reference
                .beta
                .as_ref()
                .unwrap()
                .val()
                .detach()
                .require_grad(),
        );
        let y2 = super::layer_norm(x2.clone(), g.clone(), be.clone(), eps);
        assert_eq!(values(y2.clone().inner()), values(y1.inner()), "forward");
        let g2 = (y2 * w.clone()).sum().backward();

        let exact = closed_form(&xs, &gamma, &dy, d, eps);
        let grad = |t: &Tensor<B, 3>, gr| values(t.grad(gr).unwrap());
        let pg = |p: &Tensor<B, 1>, gr| values(p.grad(gr).unwrap());
        let beta_ref = reference.beta.as_ref().unwrap().val();
        let burn = [
            grad(&x1, &g1),
            pg(&reference.gamma.val(), &g1),
            pg(&beta_ref, &g1),
        ];
        let ours = [grad(&x2, &g2), pg(&g, &g2), pg(&be, &g2)];
        let names = ["dx", "dgamma", "dbeta"];
        for i in 0..3 {
            close(
                &burn[i],
                &exact[i],
                d,
                2e-5,
                &format!("Burn's {}", names[i]),
            );
            close(&ours[i], &exact[i], d, 2e-5, names[i]);
        }

        // The tensor-operation backward (wgpu, CUDA), and the CPU pass called directly.
        let rows = |v: &Vec<f32>| {
            Tensor::<C, 3>::from_data(TensorData::new(v.clone(), [b, t, d]), &device)
                .into_primitive()
                .tensor()
        };
        let gamma = Tensor::<C, 1>::from_data(TensorData::new(gamma, [d]), &device)
            .into_primitive()
            .tensor();
        let by_ops = super::backward::<C>(rows(&xs), gamma.clone(), rows(&dy), eps);
        let by_rows =
            super::cpu::backward(&rows(&xs), &gamma, &rows(&dy), eps).expect("contiguous f32");
        let flat = |p| values(crate::attention::tensor::<C, 1>(p));
        for (i, (o, r)) in by_ops.into_iter().zip(by_rows).enumerate() {
            let what = format!("tensor operations' {}", names[i]);
            close(&flat(o), &exact[i], d, 2e-5, &what);
            assert_eq!(
                flat(r),
                ours[i],
                "the CPU pass's {} under autodiff",
                names[i]
            );
        }
    }
}

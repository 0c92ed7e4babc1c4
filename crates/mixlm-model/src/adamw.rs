//! AdamW's update of one parameter as one backend operation.
//!
//! Written in tensor operations the update is fifteen passes over the parameter,
//! each allocating its result (and on the CPU each on one thread): at a 50k
//! vocabulary the embedding and output matrices make it as costly as the loss. The
//! CPU backend runs it as one parallel pass over the elements ([`cpu`]); other
//! backends run the tensor operations ([`update`]), which fusion compiles into a few
//! kernels. Both compute every value with the same f32 operations in the same order,
//! so the results are equal to the bit.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use crate::attention::{primitive, tensor};

/// The step's constants, in f64 as the optimizer holds them; each is rounded to the
/// parameter's float type before use, as Burn's scalar operations round them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Gradient scale from norm clipping (1 when not clipped).
    pub clip: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// `1 - beta1^t` and `1 - beta2^t`.
    pub bias1: f64,
    pub bias2: f64,
    pub eps: f64,
    /// `1 - lr · weight_decay` for decayed parameters, `None` for the others.
    pub decay: Option<f64>,
    pub lr: f64,
}

/// `[param, m, v]` after one step from `grad` (all flat, `[n]`); `moments` are `None`
/// at the first step.
pub(crate) fn update<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moments: Option<(FloatTensor<B>, FloatTensor<B>)>,
    s: AdamWStep,
) -> [FloatTensor<B>; 3] {
    let float = tensor::<B, 1>;
    let grad = float(grad).mul_scalar(s.clip);
    let (m, v) = match moments {
        Some((m, v)) => (
            float(m).mul_scalar(s.beta1) + grad.clone().mul_scalar(1.0 - s.beta1),
            float(v).mul_scalar(s.beta2) + grad.square().mul_scalar(1.0 - s.beta2),
        ),
        None => (
            grad.clone().mul_scalar(1.0 - s.beta1),
            grad.square().mul_scalar(1.0 - s.beta2),
        ),
    };
    let m_hat = m.clone().div_scalar(s.bias1);
    let v_hat = v.clone().div_scalar(s.bias2);
    let step = m_hat.div(v_hat.sqrt().add_scalar(s.eps));
    let mut p = float(param);
    if let Some(decay) = s.decay {
        p = p.mul_scalar(decay);
    }
    let p = p - step.mul_scalar(s.lr);
    [p, m, v].map(primitive::<B, 1>)
}

/// The update on the CPU backend for contiguous f32 tensors: one pass, rows of 4,096
/// elements in parallel. `None` otherwise (the caller falls back to [`update`]).
pub(crate) mod cpu {
    use burn::backend::ndarray::NdArrayTensor;
    use rayon::prelude::*;

    use super::AdamWStep;
    use crate::cpu::{f32_view, tensor};

    fn values(t: &NdArrayTensor) -> Option<Vec<f32>> {
        f32_view(t)?.as_slice().map(<[f32]>::to_vec)
    }

    pub fn update(
        param: &NdArrayTensor,
        grad: &NdArrayTensor,
        moments: Option<(&NdArrayTensor, &NdArrayTensor)>,
        s: AdamWStep,
    ) -> Option<[NdArrayTensor; 3]> {
        let mut p = values(param)?;
        let g = f32_view(grad)?;
        let g = g.as_slice()?;
        let (mut m, mut v, first) = match moments {
            Some((m, v)) => (values(m)?, values(v)?, false),
            None => (vec![0.0; p.len()], vec![0.0; p.len()], true),
        };
        let f = |x: f64| x as f32;
        let (clip, b1, b2, c1, c2) = (
            f(s.clip),
            f(s.beta1),
            f(s.beta2),
            f(1.0 - s.beta1),
            f(1.0 - s.beta2),
        );
        let (bias1, bias2, eps, lr) = (f(s.bias1), f(s.bias2), f(s.eps), f(s.lr));
        let decay = s.decay.map(f);
        const CHUNK: usize = 4096;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let gi = g[i] * clip;
                    let (mi, vi) = match first {
                        true => (gi * c1, (gi * gi) * c2),
                        false => (m[i] * b1 + gi * c1, v[i] * b2 + (gi * gi) * c2),
                    };
                    let step = (mi / bias1) / ((vi / bias2).sqrt() + eps);
                    let pi = match decay {
                        Some(d) => p[i] * d,
                        None => p[i],
                    };
                    p[i] = pi - step * lr;
                    m[i] = mi;
                    v[i] = vi;
                }
            });
        let n = [p.len()];
        Some([tensor(p, &n), tensor(m, &n), tensor(v, &n)])
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    use super::{cpu, update, AdamWStep};

    type C = NdArray<f32>;

    fn tensor(values: Vec<f32>) -> burn::tensor::ops::FloatTensor<C> {
        let n = values.len();
        Tensor::<C, 1>::from_data(TensorData::new(values, [n]), &Default::default())
            .into_primitive()
            .tensor()
    }

    fn values(t: burn::tensor::ops::FloatTensor<C>) -> Vec<f32> {
        Tensor::<C, 1>::from_primitive(TensorPrimitive::Float(t))
            .into_data()
            .into_vec()
            .unwrap()
    }

    /// Three steps (the first without moments), with and without decay and clipping:
    /// the CPU's one pass gives the tensor operations' parameters and moments to the
    /// bit, and the first step's values match the formula.
    #[test]
    fn the_cpu_pass_equals_the_tensor_operations() {
        let n = 10_000;
        let wave = |k: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * k).fract() - 0.5) * 0.02)
                .collect()
        };
        for decay in [None, Some(1.0 - 6e-4 * 0.1)] {
            let (mut p_ops, mut p_cpu) = (tensor(wave(0.618)), tensor(wave(0.618)));
            let mut m_ops: Option<(_, _)> = None;
            let mut m_cpu: Option<(_, _)> = None;
            for t in 1..=3 {
                let step = AdamWStep {
                    clip: if t == 2 { 0.37 } else { 1.0 },
                    beta1: 0.9,
                    beta2: 0.95,
                    bias1: 1.0 - 0.9f64.powi(t),
                    bias2: 1.0 - 0.95f64.powi(t),
                    eps: 1e-8,
                    decay,
                    lr: 6e-4,
                };
                let g = wave(0.754 + t as f32 * 0.01);
                let [p, m, v] = update::<C>(p_ops, tensor(g.clone()), m_ops, step);
                let moments = m_cpu.as_ref().map(|(m, v)| (m, v));
                let [pc, mc, vc] = cpu::update(&p_cpu, &tensor(g.clone()), moments, step).unwrap();
                assert_eq!(
                    values(p.clone()),
                    values(pc.clone()),
                    "parameters at step {t}"
                );
                assert_eq!(values(m.clone()), values(mc.clone()), "m at step {t}");
                assert_eq!(values(v.clone()), values(vc.clone()), "v at step {t}");
                if t == 1 {
                    // m̂ = g, v̂ = g², so the step is lr · g / (|g| + eps).
                    let (p0, p1) = (wave(0.618), values(pc.clone()));
                    for i in [0, 17, 9_999] {
                        let gi = g[i] as f64;
                        let want =
                            p0[i] as f64 * decay.unwrap_or(1.0) - 6e-4 * gi / (gi.abs() + 1e-8);
                        assert!(
                            (p1[i] as f64 - want).abs() < 1e-7,
                            "{i}: {} vs {want}",
                            p1[i]
                        );
                    }
                }
                (p_ops, p_cpu) = (p, pc);
                m_ops = Some((m, v));
                m_cpu = Some((mc, vc));
            }
        }
    }
}

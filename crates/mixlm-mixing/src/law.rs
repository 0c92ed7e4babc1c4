//! Data mixing laws: fit `L_i(p) = b_i + a_i exp(sum_j m_ij p_j)` per group from the
//! losses of static-mixture runs, and pick the mixture that minimises the mean
//! predicted loss (the "DML" / log-linear mixing-law baseline; in the form
//! `c_i + b_i exp(-sum_j A_ij p_j)` with `A = -m`).
//!
//! As in the Aioli authors' `mixing_law_fitting.py`, each group is fitted on its own
//! by nonlinear least squares from `a = 1, b = 1, m = -1` (they use scipy's
//! `curve_fit`, Levenberg-Marquardt; so does this, on nalgebra). The minimiser there
//! is Nelder-Mead over `softmax(y)`; here it is mirror descent on the simplex
//! (`p <- p * exp(-step * grad)`, normalised), which reaches the same minimum of this
//! smooth objective deterministically.

use crate::proportions::softmax;
use nalgebra::{DMatrix, DVector};

/// One group's fitted law.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupLaw {
    pub a: f64,
    pub b: f64,
    pub m: Vec<f64>,
}

impl GroupLaw {
    pub fn predict(&self, p: &[f64]) -> f64 {
        self.b + self.a * dot(&self.m, p).exp()
    }

    /// `d L / d p_j = a m_j exp(m . p)`.
    fn gradient(&self, p: &[f64]) -> Vec<f64> {
        let e = self.a * dot(&self.m, p).exp();
        self.m.iter().map(|mj| e * mj).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Fits one group's law to `(mixture, loss)` observations by Levenberg-Marquardt.
/// Returns the law and its root-mean-square residual.
pub fn fit_group(mixtures: &[Vec<f64>], losses: &[f64]) -> (GroupLaw, f64) {
    assert_eq!(mixtures.len(), losses.len(), "one loss per mixture");
    let k = mixtures[0].len();
    let n = mixtures.len();
    // theta = [a, b, m_1..m_k]
    let mut theta = DVector::from_fn(k + 2, |i, _| match i {
        0 | 1 => 1.0,
        _ => -1.0,
    });
    let residuals = |t: &DVector<f64>| -> DVector<f64> {
        DVector::from_fn(n, |r, _| {
            let e = (0..k).map(|j| t[2 + j] * mixtures[r][j]).sum::<f64>().exp();
            t[0] * e + t[1] - losses[r]
        })
    };
    let jacobian = |t: &DVector<f64>| -> DMatrix<f64> {
        DMatrix::from_fn(n, k + 2, |r, c| {
            let e = (0..k).map(|j| t[2 + j] * mixtures[r][j]).sum::<f64>().exp();
            match c {
                0 => e,
                1 => 1.0,
                j => t[0] * e * mixtures[r][j - 2],
            }
        })
    };
    let mut r = residuals(&theta);
    let mut cost = r.norm_squared();
    let mut lambda = 1e-3;
    for _ in 0..10_000 {
        let j = jacobian(&theta);
        let jtj = j.transpose() * &j;
        let g = j.transpose() * &r;
        let mut damped = jtj.clone();
        for i in 0..k + 2 {
            damped[(i, i)] += lambda * jtj[(i, i)].max(1e-12);
        }
        let Some(delta) = damped.lu().solve(&(-&g)) else {
            lambda *= 10.0;
            continue;
        };
        let candidate = &theta + &delta;
        let r_new = residuals(&candidate);
        let new_cost = r_new.norm_squared();
        if new_cost.is_finite() && new_cost < cost {
            let improvement = cost - new_cost;
            theta = candidate;
            r = r_new;
            cost = new_cost;
            lambda = (lambda / 10.0).max(1e-12);
            if improvement <= 1e-15 * cost.max(1e-30) || cost < 1e-28 {
                break;
            }
        } else {
            lambda *= 10.0;
            if lambda > 1e12 {
                break;
            }
        }
    }
    let law = GroupLaw {
        a: theta[0],
        b: theta[1],
        m: theta.iter().skip(2).copied().collect(),
    };
    (law, (cost / n as f64).sqrt())
}

/// The mixture minimising the mean predicted loss over `laws`, by mirror descent
/// from the uniform mixture.
pub fn minimise_mean_loss(laws: &[GroupLaw]) -> Vec<f64> {
    let k = laws[0].m.len();
    let mut p = vec![1.0 / k as f64; k];
    let step = 0.5;
    for _ in 0..20_000 {
        let mut grad = vec![0.0; k];
        for law in laws {
            for (g, d) in grad.iter_mut().zip(law.gradient(&p)) {
                *g += d / laws.len() as f64;
            }
        }
        let logits: Vec<f64> = p
            .iter()
            .zip(&grad)
            .map(|(pi, g)| pi.max(1e-300).ln() - step * g)
            .collect();
        p = softmax(&logits);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::grid_points;

    fn truth() -> Vec<GroupLaw> {
        vec![
            GroupLaw {
                a: 1.5,
                b: 2.0,
                m: vec![-2.0, -0.5, 0.0],
            },
            GroupLaw {
                a: 1.0,
                b: 2.5,
                m: vec![-0.3, -1.8, -0.2],
            },
            GroupLaw {
                a: 2.0,
                b: 1.0,
                m: vec![0.0, -0.4, -1.5],
            },
        ]
    }

    #[test]
    fn fit_recovers_a_known_law_from_a_sweep() {
        let mixtures: Vec<Vec<f64>> = grid_points(3, 12, 1.0, 5)
            .iter()
            .map(|p| p.as_slice().to_vec())
            .collect();
        for law in truth() {
            let losses: Vec<f64> = mixtures.iter().map(|p| law.predict(p)).collect();
            let (fit, rms) = fit_group(&mixtures, &losses);
            assert!(rms < 1e-6, "rms {rms}: {fit:?}");
            // Predictions agree away from the sweep's points too (a and m are only
            // identified up to a shift of m, as sum(p) = 1).
            for p in [[0.2, 0.3, 0.5], [0.9, 0.05, 0.05], [1.0 / 3.0; 3]] {
                assert!(
                    (fit.predict(&p) - law.predict(&p)).abs() < 1e-4,
                    "{p:?}: {fit:?}"
                );
            }
        }
    }

    #[test]
    fn minimiser_matches_a_brute_force_search() {
        let laws = truth();
        let p = minimise_mean_loss(&laws);
        let mean = |p: &[f64]| laws.iter().map(|l| l.predict(p)).sum::<f64>() / 3.0;
        let mut best = (f64::INFINITY, [0.0; 3]);
        let steps = 200;
        for i in 0..=steps {
            for j in 0..=steps - i {
                let q = [
                    i as f64 / steps as f64,
                    j as f64 / steps as f64,
                    (steps - i - j) as f64 / steps as f64,
                ];
                if mean(&q) < best.0 {
                    best = (mean(&q), q);
                }
            }
        }
        assert!(
            mean(&p) <= best.0 + 1e-9,
            "{p:?} {} vs {:?} {}",
            mean(&p),
            best.1,
            best.0
        );
        for (x, y) in p.iter().zip(best.1) {
            assert!((x - y).abs() < 0.01, "{p:?} vs {:?}", best.1);
        }
    }
}

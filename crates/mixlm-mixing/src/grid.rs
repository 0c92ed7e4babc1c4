//! Candidate static mixtures for grid search and data-mixing-law fits.
//!
//! For two domains, an even grid of interior points. For more, Aioli's Dirichlet
//! cover (`dirichlet_cover.py` of the authors' code): draw `16 n` points from a
//! symmetric Dirichlet(`alpha`), then repeatedly replace the closest pair by its
//! midpoint until `n` remain, so the sweep covers the simplex without near-duplicates.

use crate::Proportions;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// How many more points than asked for the cover draws before merging.
pub const OVERSAMPLE: usize = 16;

/// `n` mixtures over `k` domains (see the module docs); deterministic in `seed`.
pub fn grid_points(k: usize, n: usize, alpha: f64, seed: u64) -> Vec<Proportions> {
    assert!(k >= 1 && n >= 1, "need at least one domain and one point");
    if k == 1 {
        return vec![Proportions::uniform(1)];
    }
    let points: Vec<Vec<f64>> = if k == 2 {
        (1..=n)
            .map(|i| {
                let w = i as f64 / (n + 1) as f64;
                vec![w, 1.0 - w]
            })
            .collect()
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let draws = (0..n * OVERSAMPLE)
            .map(|_| dirichlet(k, alpha, &mut rng))
            .collect();
        merge_closest(draws, n)
    };
    points
        .into_iter()
        .map(|p| Proportions::from_weights(p).expect("points lie on the simplex"))
        .collect()
}

/// One symmetric Dirichlet(`alpha`) draw over `k` domains: independent
/// Gamma(`alpha`, 1) draws, normalised.
fn dirichlet(k: usize, alpha: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha > 0");
    let g: Vec<f64> = (0..k).map(|_| gamma.sample(rng)).collect();
    let sum: f64 = g.iter().sum();
    g.iter().map(|x| x / sum).collect()
}

fn distance2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Replaces the closest pair by its midpoint until `n` points remain.
fn merge_closest(mut points: Vec<Vec<f64>>, n: usize) -> Vec<Vec<f64>> {
    while points.len() > n {
        let mut best = (f64::INFINITY, 0, 1);
        for i in 0..points.len() {
            for j in i + 1..points.len() {
                let d = distance2(&points[i], &points[j]);
                if d < best.0 {
                    best = (d, i, j);
                }
            }
        }
        let (_, i, j) = best;
        let b = points.swap_remove(j);
        for (x, y) in points[i].iter_mut().zip(&b) {
            *x = (*x + y) / 2.0;
        }
    }
    points
}

/// The smallest distance between two of `points`.
pub fn min_distance(points: &[Proportions]) -> f64 {
    let mut best = f64::INFINITY;
    for i in 0..points.len() {
        for j in i + 1..points.len() {
            best = best.min(distance2(points[i].as_slice(), points[j].as_slice()).sqrt());
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_domains_get_an_even_interior_grid() {
        let g = grid_points(2, 9, 1.0, 0);
        assert_eq!(g.len(), 9);
        for (i, p) in g.iter().enumerate() {
            let w = (i + 1) as f64 / 10.0;
            assert!(
                (p.as_slice()[0] - w).abs() < 1e-12 && (p.as_slice()[1] - (1.0 - w)).abs() < 1e-12
            );
        }
    }

    #[test]
    fn dirichlet_cover_spreads_points_and_is_deterministic() {
        let g = grid_points(7, 20, 1.0, 3);
        assert_eq!(g.len(), 20);
        assert_eq!(g, grid_points(7, 20, 1.0, 3));
        assert_ne!(g, grid_points(7, 20, 1.0, 4));
        // Merging spreads the points: the closest pair of the cover is farther apart
        // than the closest pair of as many raw Dirichlet draws.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let raw: Vec<Proportions> = (0..20)
            .map(|_| Proportions::from_weights(dirichlet(7, 1.0, &mut rng)).unwrap())
            .collect();
        assert!(
            min_distance(&g) > min_distance(&raw),
            "{} vs {}",
            min_distance(&g),
            min_distance(&raw)
        );
    }

    #[test]
    fn dirichlet_draws_have_the_right_mean_and_spread() {
        // Symmetric Dirichlet(alpha) over k: mean 1/k, variance (k-1) / (k^2 (k alpha + 1)).
        let (k, alpha, n) = (4, 1.5, 20_000);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let draws: Vec<Vec<f64>> = (0..n).map(|_| dirichlet(k, alpha, &mut rng)).collect();
        let mean = draws.iter().map(|d| d[0]).sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d[0] - mean).powi(2)).sum::<f64>() / n as f64;
        let want_var = (k as f64 - 1.0) / ((k * k) as f64 * (k as f64 * alpha + 1.0));
        assert!((mean - 0.25).abs() < 0.005, "{mean}");
        assert!(
            (var - want_var).abs() < 0.1 * want_var,
            "{var} vs {want_var}"
        );
        assert!(draws
            .iter()
            .all(|d| (d.iter().sum::<f64>() - 1.0).abs() < 1e-12));
    }

    #[test]
    fn merging_replaces_the_closest_pair_by_its_midpoint() {
        let pts = vec![
            vec![1.0, 0.0, 0.0],
            vec![0.5, 0.5, 0.0],
            vec![0.4, 0.6, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        let merged = merge_closest(pts, 3);
        assert_eq!(merged.len(), 3);
        assert!(
            merged
                .iter()
                .any(|p| distance2(p, &[0.45, 0.55, 0.0]) < 1e-20),
            "{merged:?}"
        );
    }
}

//! Document diversity for SampleMix: embeddings, k-means on the device, and each
//! document's diversity from its cluster (the formula is
//! [`mixlm_mixing::samplemix::cluster_diversity`]).
//!
//! Embeddings come from a model (mean-pooled hidden states, see the trainer's scoring
//! command) or, model-free, from [`hashed_tfidf`]: unigram and bigram token ids hashed
//! into `dim` buckets, TF-IDF weighted and L2-normalised. k-means runs on Burn
//! tensors (distances as one matmul per iteration, centroid sums as another), so it
//! uses the GPU when the backend is one; k-means++ picks the initial centroids.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mixlm_mixing::samplemix::{cluster_diversity, SampleMixError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Model-free document embeddings: `[documents, dim]` row-major, each row L2-normalised
/// (zero for an empty document). Unigrams and bigrams of token ids are hashed into
/// `dim` buckets; a bucket's weight is its term frequency times
/// `idf = ln((1 + N) / (1 + df)) + 1` over the `N` documents.
pub fn hashed_tfidf(documents: &[&[u32]], dim: usize) -> Vec<f32> {
    assert!(dim > 0, "embedding dimension must be > 0");
    let bucket = |a: u32, b: Option<u32>| -> usize {
        // SplitMix64 finaliser over the n-gram: cheap and well spread.
        let mut z = (a as u64) << 32 | b.map_or(0xFFFF_FFFF, |b| b as u64);
        z = z.wrapping_add(b.map_or(0x9E37_79B9_7F4A_7C15, |_| 0xBF58_476D_1CE4_E5B9));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % dim as u64) as usize
    };
    let mut out = vec![0f32; documents.len() * dim];
    let mut df = vec![0u32; dim];
    for (row, doc) in out.chunks_exact_mut(dim).zip(documents) {
        for (i, &t) in doc.iter().enumerate() {
            row[bucket(t, None)] += 1.0;
            if let Some(&next) = doc.get(i + 1) {
                row[bucket(t, Some(next))] += 1.0;
            }
        }
        for (d, &v) in df.iter_mut().zip(row.iter()) {
            *d += u32::from(v > 0.0);
        }
    }
    let n = documents.len() as f32;
    let idf: Vec<f32> = df
        .iter()
        .map(|&d| ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0)
        .collect();
    for row in out.chunks_exact_mut(dim) {
        for (v, w) in row.iter_mut().zip(&idf) {
            *v *= w;
        }
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    out
}

/// A k-means clustering of `n` points.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    pub k: usize,
    pub dim: usize,
    /// `[k, dim]` row-major.
    pub centroids: Vec<f32>,
    /// Cluster of each point.
    pub assignment: Vec<usize>,
    /// Euclidean distance of each point to its centroid.
    pub distance: Vec<f32>,
    /// Iterations run (stops early when no assignment changes).
    pub iterations: usize,
}

/// Squared distances `[n, k]` between the rows of `x` and `c`.
fn squared_distances<B: Backend>(x: &Tensor<B, 2>, c: &Tensor<B, 2>) -> Tensor<B, 2> {
    let xx = x.clone().powi_scalar(2).sum_dim(1); // [n, 1]
    let cc = c.clone().powi_scalar(2).sum_dim(1).transpose(); // [1, k]
    (xx + cc - x.clone().matmul(c.clone().transpose()).mul_scalar(2.0)).clamp_min(0.0)
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 tensor")
}

/// k-means with k-means++ initialisation on `points` (`[n, dim]` row-major), at most
/// `max_iters` Lloyd iterations, deterministic for a `seed`. An empty cluster keeps
/// its centroid. `k` is capped at `n`.
pub fn kmeans<B: Backend>(
    points: &[f32],
    dim: usize,
    k: usize,
    max_iters: usize,
    seed: u64,
    device: &B::Device,
) -> KMeans {
    assert!(
        dim > 0 && points.len().is_multiple_of(dim),
        "points must be [n, dim]"
    );
    let n = points.len() / dim;
    let k = k.min(n).max(1);
    let x: Tensor<B, 2> = Tensor::from_data(TensorData::new(points.to_vec(), [n, dim]), device);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    // k-means++: each next centroid drawn with probability proportional to the squared
    // distance to the nearest centroid chosen so far.
    let mut chosen = vec![rng.random_range(0..n)];
    let row = |i: usize| x.clone().slice([i..i + 1, 0..dim]);
    let mut nearest = to_vec(squared_distances(&x, &row(chosen[0])));
    while chosen.len() < k {
        let total: f64 = nearest.iter().map(|&d| d as f64).sum();
        let next = if total > 0.0 {
            let mut r = rng.random::<f64>() * total;
            nearest
                .iter()
                .position(|&d| {
                    r -= d as f64;
                    r < 0.0
                })
                .unwrap_or(n - 1)
        } else {
            // Fewer distinct points than k: any unused index.
            (0..n).find(|i| !chosen.contains(i)).unwrap_or(0)
        };
        chosen.push(next);
        let d = to_vec(squared_distances(&x, &row(next)));
        nearest.iter_mut().zip(d).for_each(|(a, b)| *a = a.min(b));
    }
    let index = Tensor::<B, 1, Int>::from_data(
        TensorData::new(chosen.iter().map(|&i| i as i64).collect::<Vec<_>>(), [k]),
        device,
    );
    let mut centroids = x.clone().select(0, index);

    let mut assignment: Vec<usize> = Vec::new();
    let mut iterations = 0;
    for _ in 0..max_iters.max(1) {
        iterations += 1;
        let assign = squared_distances(&x, &centroids).argmin(1).reshape([n]);
        let new: Vec<usize> = assign
            .clone()
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("indices")
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let changed = new != assignment;
        assignment = new;
        if !changed {
            break;
        }
        let one_hot: Tensor<B, 2> = assign.one_hot::<2>(k).float(); // [n, k]
        let counts = one_hot.clone().sum_dim(0).transpose(); // [k, 1]
        let sums = one_hot.transpose().matmul(x.clone()); // [k, dim]
        let empty = counts.clone().equal_elem(0.0).expand([k, dim]);
        let means = sums / counts.clamp_min(1.0).expand([k, dim]);
        centroids = means.mask_where(empty, centroids);
    }
    let d2 = to_vec(squared_distances(&x, &centroids));
    let distance = assignment
        .iter()
        .enumerate()
        .map(|(i, &c)| d2[i * k + c].sqrt())
        .collect();
    KMeans {
        k,
        dim,
        centroids: to_vec(centroids),
        assignment,
        distance,
        iterations,
    }
}

impl KMeans {
    /// Members of each cluster.
    pub fn sizes(&self) -> Vec<usize> {
        let mut s = vec![0; self.k];
        self.assignment.iter().for_each(|&c| s[c] += 1);
        s
    }

    /// Mean distance of each cluster's members to its centroid (0 when empty).
    pub fn compactness(&self) -> Vec<f64> {
        let mut sum = vec![0f64; self.k];
        for (&c, &d) in self.assignment.iter().zip(&self.distance) {
            sum[c] += d as f64;
        }
        sum.iter()
            .zip(self.sizes())
            .map(|(s, n)| if n == 0 { 0.0 } else { s / n as f64 })
            .collect()
    }

    /// Distance from each centroid to the nearest other one (0 for a single cluster
    /// or an empty one).
    pub fn separation(&self) -> Vec<f64> {
        let sizes = self.sizes();
        let c = |i: usize| &self.centroids[i * self.dim..(i + 1) * self.dim];
        (0..self.k)
            .map(|i| {
                if sizes[i] == 0 {
                    return 0.0;
                }
                (0..self.k)
                    .filter(|&j| j != i && sizes[j] > 0)
                    .map(|j| {
                        c(i).iter()
                            .zip(c(j))
                            .map(|(a, b)| ((a - b) as f64).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.min(d))))
                    .unwrap_or(0.0)
            })
            .collect()
    }

    /// Each point's diversity in `[0, 1]`: its cluster's
    /// [`cluster_diversity`] (compactness x separation, min-max normalised).
    pub fn diversity(&self) -> Result<Vec<f64>, SampleMixError> {
        let per_cluster = cluster_diversity(&self.compactness(), &self.separation())?;
        Ok(self.assignment.iter().map(|&c| per_cluster[c]).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    /// `per` points around each centre, spread by `radius` in a fixed pattern.
    fn blobs(centres: &[(f32, f32, f32)], per: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for &(x, y, r) in centres {
            for i in 0..per {
                let a = i as f32 * 2.399; // golden angle: even spread
                let s = r * ((i + 1) as f32 / per as f32).sqrt();
                out.extend([x + s * a.cos(), y + s * a.sin()]);
            }
        }
        out
    }

    #[test]
    fn kmeans_recovers_separable_blobs() {
        let centres = [(0.0, 0.0, 0.5), (10.0, 0.0, 0.5), (0.0, 10.0, 0.5)];
        let points = blobs(&centres, 30);
        for seed in 0..4 {
            let km = kmeans::<B>(&points, 2, 3, 50, seed, &Default::default());
            // Each blob is one cluster, and the three clusters differ.
            let label: Vec<usize> = (0..3).map(|b| km.assignment[b * 30]).collect();
            for (b, &l) in label.iter().enumerate() {
                assert!(km.assignment[b * 30..(b + 1) * 30].iter().all(|&c| c == l));
            }
            assert!(label[0] != label[1] && label[1] != label[2] && label[0] != label[2]);
            // Centroids are the blob means; distances are to them.
            for (b, &(cx, cy, _)) in centres.iter().enumerate() {
                let c = &km.centroids[label[b] * 2..label[b] * 2 + 2];
                assert!((c[0] - cx).abs() < 0.1 && (c[1] - cy).abs() < 0.1, "{c:?}");
            }
            assert!(km.distance.iter().all(|&d| d <= 0.6));
            assert_eq!(km.sizes(), vec![30, 30, 30]);
        }
        let a = kmeans::<B>(&points, 2, 3, 50, 9, &Default::default());
        let b = kmeans::<B>(&points, 2, 3, 50, 9, &Default::default());
        assert_eq!(a, b, "deterministic for a seed");
    }

    #[test]
    fn diversity_ranks_isolated_loose_clusters_highest() {
        // A tight blob next to a loose one, and a loose blob far away.
        let points = blobs(&[(0.0, 0.0, 0.1), (3.0, 0.0, 1.0), (40.0, 40.0, 1.0)], 25);
        let km = kmeans::<B>(&points, 2, 3, 50, 0, &Default::default());
        let d = km.diversity().unwrap();
        let (tight, loose, far) = (d[0], d[25], d[50]);
        assert_eq!(tight, 0.0, "{d:?}");
        assert_eq!(far, 1.0);
        assert!(tight < loose && loose < far);
        // Compactness and separation follow the definitions.
        let c = km.compactness();
        let label = km.assignment[0];
        let mean: f64 = km.distance[..25].iter().map(|&x| x as f64).sum::<f64>() / 25.0;
        assert!((c[label] - mean).abs() < 1e-9);
        let s = km.separation();
        assert!((s[label] - 3.0).abs() < 0.3, "{s:?}");
    }

    #[test]
    fn tfidf_rows_are_normalised_and_similar_documents_close() {
        let a: Vec<u32> = (0..50).map(|i| i % 7).collect();
        let b: Vec<u32> = (0..60).map(|i| i % 7).collect();
        let c: Vec<u32> = (100..150).collect();
        let dim = 1024;
        let e = hashed_tfidf(&[&a, &b, &c, &[]], dim);
        let row = |i: usize| &e[i * dim..(i + 1) * dim];
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
        for i in 0..3 {
            assert!((dot(row(i), row(i)) - 1.0).abs() < 1e-5);
        }
        assert!(row(3).iter().all(|&v| v == 0.0));
        assert!(dot(row(0), row(1)) > 0.95);
        assert!(dot(row(0), row(2)) < 0.1, "{}", dot(row(0), row(2)));
    }
}

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

/// Hashed unigram + bigram TF-IDF embeddings: `dim` buckets, with the inverse
/// document frequencies of a fitting set, so that a sample fixes the embedding and the
/// rest of a corpus is embedded chunk by chunk in the same space.
#[derive(Debug, Clone, PartialEq)]
pub struct TfIdf {
    pub dim: usize,
    /// `ln((1 + N) / (1 + df)) + 1` per bucket over the `N` fitting documents.
    pub idf: Vec<f32>,
}

/// The bucket of a unigram (`b = None`) or bigram.
fn bucket(a: u32, b: Option<u32>, dim: usize) -> usize {
    // SplitMix64 finaliser over the n-gram: cheap and well spread.
    let mut z = (a as u64) << 32 | b.map_or(0xFFFF_FFFF, |b| b as u64);
    z = z.wrapping_add(b.map_or(0x9E37_79B9_7F4A_7C15, |_| 0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % dim as u64) as usize
}

/// Term frequencies of a document's unigrams and bigrams, hashed into `row`.
fn term_frequencies(doc: &[u32], row: &mut [f32]) {
    let dim = row.len();
    for (i, &t) in doc.iter().enumerate() {
        row[bucket(t, None, dim)] += 1.0;
        if let Some(&next) = doc.get(i + 1) {
            row[bucket(t, Some(next), dim)] += 1.0;
        }
    }
}

impl TfIdf {
    /// Document frequencies over `documents`.
    pub fn fit(documents: &[&[u32]], dim: usize) -> Self {
        assert!(dim > 0, "embedding dimension must be > 0");
        let mut df = vec![0u32; dim];
        let mut row = vec![0f32; dim];
        for doc in documents {
            row.fill(0.0);
            term_frequencies(doc, &mut row);
            for (d, &v) in df.iter_mut().zip(&row) {
                *d += u32::from(v > 0.0);
            }
        }
        let n = documents.len() as f32;
        let idf = df
            .iter()
            .map(|&d| ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0)
            .collect();
        Self { dim, idf }
    }

    /// `[documents, dim]` row-major, each row L2-normalised (zero for an empty
    /// document).
    pub fn embed(&self, documents: &[&[u32]]) -> Vec<f32> {
        let mut out = vec![0f32; documents.len() * self.dim];
        for (row, doc) in out.chunks_exact_mut(self.dim).zip(documents) {
            term_frequencies(doc, row);
            row.iter_mut().zip(&self.idf).for_each(|(v, w)| *v *= w);
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
        out
    }
}

/// Model-free document embeddings of a whole set: [`TfIdf`] fitted on it and applied
/// to it.
pub fn hashed_tfidf(documents: &[&[u32]], dim: usize) -> Vec<f32> {
    TfIdf::fit(documents, dim).embed(documents)
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

/// The nearest of `centroids` (`[k, dim]`) to each of `points` (`[n, dim]`), and the
/// Euclidean distance to it: how a corpus too large to cluster at once is assigned,
/// chunk by chunk, to the clusters fitted on a sample.
pub fn assign<B: Backend>(
    points: &[f32],
    centroids: &[f32],
    dim: usize,
    device: &B::Device,
) -> (Vec<usize>, Vec<f32>) {
    let (n, k) = (points.len() / dim, centroids.len() / dim);
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let x: Tensor<B, 2> = Tensor::from_data(TensorData::new(points.to_vec(), [n, dim]), device);
    let c: Tensor<B, 2> = Tensor::from_data(TensorData::new(centroids.to_vec(), [k, dim]), device);
    let d2 = squared_distances(&x, &c);
    let (min, arg) = d2.min_dim_with_indices(1);
    let arg = arg
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("indices");
    (
        arg.into_iter().map(|i| i as usize).collect(),
        to_vec(min).into_iter().map(f32::sqrt).collect(),
    )
}

/// Per-cluster tallies of assigned points, accumulated in any number of pieces.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStats {
    pub sizes: Vec<usize>,
    distance_sums: Vec<f64>,
}

impl ClusterStats {
    pub fn new(k: usize) -> Self {
        Self {
            sizes: vec![0; k],
            distance_sums: vec![0.0; k],
        }
    }

    /// One point of `cluster` at `distance` from its centroid.
    pub fn add(&mut self, cluster: usize, distance: f32) {
        self.sizes[cluster] += 1;
        self.distance_sums[cluster] += distance as f64;
    }

    /// Mean distance of each cluster's members to its centroid (0 when empty).
    pub fn compactness(&self) -> Vec<f64> {
        self.distance_sums
            .iter()
            .zip(&self.sizes)
            .map(|(s, &n)| if n == 0 { 0.0 } else { s / n as f64 })
            .collect()
    }

    /// Distance from each centroid (`[k, dim]`) to the nearest other non-empty one
    /// (0 for a single cluster or an empty one).
    pub fn separation(&self, centroids: &[f32], dim: usize) -> Vec<f64> {
        let k = self.sizes.len();
        let c = |i: usize| &centroids[i * dim..(i + 1) * dim];
        (0..k)
            .map(|i| {
                if self.sizes[i] == 0 {
                    return 0.0;
                }
                (0..k)
                    .filter(|&j| j != i && self.sizes[j] > 0)
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

    /// Each cluster's diversity in `[0, 1]`: [`cluster_diversity`] (compactness x
    /// separation, min-max normalised).
    pub fn diversity(&self, centroids: &[f32], dim: usize) -> Result<Vec<f64>, SampleMixError> {
        cluster_diversity(&self.compactness(), &self.separation(centroids, dim))
    }
}

impl KMeans {
    /// The tallies of the clustered points.
    pub fn stats(&self) -> ClusterStats {
        let mut s = ClusterStats::new(self.k);
        for (&c, &d) in self.assignment.iter().zip(&self.distance) {
            s.add(c, d);
        }
        s
    }

    /// Members of each cluster.
    pub fn sizes(&self) -> Vec<usize> {
        self.stats().sizes
    }

    /// Mean distance of each cluster's members to its centroid (0 when empty).
    pub fn compactness(&self) -> Vec<f64> {
        self.stats().compactness()
    }

    /// Distance from each centroid to the nearest other one (0 for a single cluster
    /// or an empty one).
    pub fn separation(&self) -> Vec<f64> {
        self.stats().separation(&self.centroids, self.dim)
    }

    /// Each point's diversity in `[0, 1]`: its cluster's
    /// [`cluster_diversity`] (compactness x separation, min-max normalised).
    pub fn diversity(&self) -> Result<Vec<f64>, SampleMixError> {
        let per_cluster = self.stats().diversity(&self.centroids, self.dim)?;
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
    fn chunked_assignment_reproduces_the_fit_and_its_statistics() {
        let points = blobs(&[(0.0, 0.0, 0.5), (6.0, 1.0, 1.5), (-5.0, 8.0, 1.0)], 40);
        let km = kmeans::<B>(&points, 2, 3, 50, 3, &Default::default());
        // Assigning the same points in uneven chunks gives the fit's clusters and
        // distances, and the tallies give the same statistics.
        let mut stats = ClusterStats::new(3);
        let mut at = 0;
        for len in [1, 17, 50, 52] {
            let (a, d) = assign::<B>(
                &points[at * 2..(at + len) * 2],
                &km.centroids,
                2,
                &Default::default(),
            );
            assert_eq!(a, km.assignment[at..at + len]);
            for (i, (&c, &x)) in a.iter().zip(&d).enumerate() {
                assert!((x - km.distance[at + i]).abs() < 1e-4);
                stats.add(c, x);
            }
            at += len;
        }
        assert_eq!(at, 120);
        assert_eq!(stats.sizes, km.sizes());
        for (a, b) in stats.compactness().iter().zip(km.compactness()) {
            assert!((a - b).abs() < 1e-5);
        }
        assert_eq!(stats.separation(&km.centroids, 2), km.separation());
        // A new point goes to the centroid it is nearest to, at that distance.
        let (a, d) = assign::<B>(&[6.0, 4.0], &km.centroids, 2, &Default::default());
        let c = &km.centroids[a[0] * 2..a[0] * 2 + 2];
        assert!(
            (c[0] - 6.0).abs() < 0.5 && (c[1] - 1.0).abs() < 0.5,
            "{c:?}"
        );
        let want = ((c[0] - 6.0).powi(2) + (c[1] - 4.0).powi(2)).sqrt();
        assert!((d[0] - want).abs() < 1e-4);
    }

    #[test]
    fn tfidf_fitted_on_a_sample_embeds_other_documents_in_its_space() {
        let docs: Vec<Vec<u32>> = (0..20).map(|i| (i..i + 30).collect()).collect();
        let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let fitted = TfIdf::fit(&refs, 64);
        // idf by the formula: a bucket in no document gets ln(21) + 1.
        let unseen = fitted.idf.iter().fold(0f32, |m, &v| m.max(v));
        assert!((unseen - (21f32.ln() + 1.0)).abs() < 1e-6);
        // Embedding in pieces equals embedding at once.
        let all = fitted.embed(&refs);
        let parts = [fitted.embed(&refs[..7]), fitted.embed(&refs[7..])].concat();
        assert_eq!(all, parts);
        assert_eq!(hashed_tfidf(&refs, 64), all);
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

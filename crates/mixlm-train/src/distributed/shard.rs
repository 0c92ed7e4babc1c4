//! ZeRO-style sharding of the optimizer state (stage 1) and of the reduced gradients
//! (stage 2) over the data-parallel peers (`distributed.shard`).
//!
//! The parameters, flattened in module order, are cut into the same buckets the
//! gradient all-reduce uses ([`super::peer::buckets`]), and each bucket into `world`
//! equal consecutive slices: peer `r` owns the `r`-th slice of every bucket. It keeps
//! AdamW's moments for its slices only, updates only them, and the updated slices are
//! then gathered to every peer, bucket by bucket, so every message stays as large as
//! the all-reduce's. Splitting every bucket (rather than handing whole buckets to
//! owners, as DeepSpeed's stage 1 does with its flat buffer partitions) keeps each
//! peer's share within one element per bucket of `1/world`, even when one matrix,
//! such as a 50k-token embedding, is most of the model.
//!
//! burn-collective 0.21 has no reduce-scatter or all-gather, and its reduce and
//! broadcast are not implemented between nodes; both are built from its all-reduce:
//! - reduce-scatter: the bucket's all-reduce, of which a peer keeps its slice (the same
//!   sums, in the same order, as the unsharded run's all-reduce, so the gradients are
//!   equal to the bit);
//! - all-gather: an all-reduce sum of the bucket in which every peer filled in its own
//!   slice and left zeros elsewhere (exact: each element has one non-zero term).
//!
//! `benches/SCALING.md` gives what this costs on the wire against native collectives.

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
pub use mixlm_model::Shard;

use super::peer::buckets;
use super::Rank;

/// One parameter of the model, in module order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSlot {
    /// Module path (`blocks.0.attn.qkv.weight`): the optimizer's key.
    pub path: String,
    /// Elements.
    pub len: usize,
    /// Dimensions (decoupled weight decay applies to matrices only).
    pub rank: usize,
    /// Where it starts in its bucket.
    pub offset: usize,
    /// Its bucket.
    pub bucket: usize,
    /// The elements of it this peer owns (param-local; empty when none).
    pub owned: Range<usize>,
}

/// Which slice of every parameter and bucket this peer owns (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    pub rank: Rank,
    pub params: Vec<ParamSlot>,
    /// Per bucket: its parameters (indices into `params`) and its length.
    pub buckets: Vec<(Range<usize>, usize)>,
}

/// The slice of `len` elements that peer `rank` of `world` owns: `[len·r/w, len·(r+1)/w)`.
pub fn owned_range(len: usize, Rank { rank, world }: Rank) -> Range<usize> {
    (len * rank / world)..(len * (rank + 1) / world)
}

impl ShardLayout {
    /// The layout of parameters `(path, len, rank)` in module order, cut into buckets
    /// of up to `bucket_elements` elements (0: one bucket per parameter).
    pub fn new(params: &[(String, usize, usize)], bucket_elements: usize, rank: Rank) -> Self {
        let sizes: Vec<usize> = params.iter().map(|p| p.1).collect();
        let mut slots = Vec::with_capacity(params.len());
        let mut bucket_list = Vec::new();
        for (b, range) in buckets(&sizes, bucket_elements).into_iter().enumerate() {
            let len: usize = sizes[range.clone()].iter().sum();
            let own = owned_range(len, rank);
            let mut offset = 0;
            for (path, n, dims) in &params[range.clone()] {
                let start = own.start.clamp(offset, offset + n) - offset;
                let end = own.end.clamp(offset, offset + n) - offset;
                slots.push(ParamSlot {
                    path: path.clone(),
                    len: *n,
                    rank: *dims,
                    offset,
                    bucket: b,
                    owned: start..end,
                });
                offset += n;
            }
            bucket_list.push((range, len));
        }
        Self {
            rank,
            params: slots,
            buckets: bucket_list,
        }
    }

    /// The layout of `model`'s parameters.
    pub fn of<B: Backend, M: burn::module::Module<B>>(
        model: &M,
        bucket_elements: usize,
        rank: Rank,
    ) -> Self {
        Self::new(&param_shapes(model), bucket_elements, rank)
    }

    /// Elements this peer owns.
    pub fn owned_elements(&self) -> usize {
        self.params.iter().map(|p| p.owned.len()).sum()
    }

    /// The owned range of each parameter that has one, by path: the part of a
    /// checkpoint's moments this peer loads.
    pub fn owned_by_path(&self) -> HashMap<String, Range<usize>> {
        self.params
            .iter()
            .filter(|p| !p.owned.is_empty())
            .map(|p| (p.path.clone(), p.owned.clone()))
            .collect()
    }
}

/// `(path, elements, dimensions)` of every parameter of `model`, in module order.
pub fn param_shapes<B: Backend, M: burn::module::Module<B>>(
    model: &M,
) -> Vec<(String, usize, usize)> {
    struct Shapes {
        path: Vec<String>,
        out: Vec<(String, usize, usize)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.shape().num_elements();
            self.out.push((self.path.join("."), n, D));
        }
    }
    let mut v = Shapes {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(sizes: &[usize], capacity: usize, rank: usize, world: usize) -> ShardLayout {
        let params: Vec<(String, usize, usize)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("p{i}"), n, 2))
            .collect();
        ShardLayout::new(&params, capacity, Rank { rank, world })
    }

    /// Buckets [10, 6 | 20 | 3, 3] (capacity 16) split over 3 peers, by hand: bucket 0
    /// (16) gives 0..5, 5..10, 10..16; bucket 1 (20) 0..6, 6..13, 13..20; bucket 2 (6)
    /// 0..2, 2..4, 4..6.
    #[test]
    fn every_bucket_is_cut_into_equal_consecutive_slices() {
        let owned = |rank| -> Vec<Range<usize>> {
            layout(&[10, 6, 20, 3, 3], 16, rank, 3)
                .params
                .iter()
                .map(|p| p.owned.clone())
                .collect()
        };
        assert_eq!(owned(0), vec![0..5, 0..0, 0..6, 0..2, 0..0]);
        assert_eq!(owned(1), vec![5..10, 0..0, 6..13, 2..3, 0..1]);
        assert_eq!(owned(2), vec![10..10, 0..6, 13..20, 3..3, 1..3]);
        let l = layout(&[10, 6, 20, 3, 3], 16, 1, 3);
        assert_eq!(l.buckets, vec![(0..2, 16), (2..3, 20), (3..5, 6)]);
        assert_eq!(
            l.params.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![0, 10, 0, 0, 3]
        );
    }

    /// The peers' slices cover every element once, and each peer owns 1/world of
    /// the model within one element per bucket.
    #[test]
    fn slices_partition_the_model_evenly() {
        let sizes = [50_304 * 64, 64, 64, 192 * 64, 192, 64 * 64, 7, 256 * 64, 1];
        let total: usize = sizes.iter().sum();
        for world in 1..=5 {
            for capacity in [0, 1000, 1 << 20] {
                let mut covered = vec![0u8; total];
                for rank in 0..world {
                    let l = layout(&sizes, capacity, rank, world);
                    let mut start = 0;
                    for p in &l.params {
                        for i in p.owned.clone() {
                            covered[start + i] += 1;
                        }
                        start += p.len;
                    }
                    let share = l.owned_elements() as f64 - total as f64 / world as f64;
                    assert!(
                        share.abs() <= l.buckets.len() as f64,
                        "{world} {capacity} {share}"
                    );
                }
                assert!(
                    covered.iter().all(|&c| c == 1),
                    "world {world}, capacity {capacity}"
                );
            }
        }
    }
}

//! Tiled causal attention kernels for CubeCL backends (wgpu, CUDA), forward and backward.
//!
//! One cube serves one `(batch, head)` and a block of `block` rows. Each row belongs to
//! `lanes` consecutive units of a plane ([`row_lanes`]: on CUDA, parts of 16 to 31
//! elements; elsewhere one unit holds the whole row); a unit keeps its part of the row,
//! and of its accumulators, in registers (f32, whatever the storage precision), and
//! dot products are summed over the lanes by plane shuffles. The other operand streams
//! through shared memory one tile of `block` rows at a time, so memory stays
//! `O(seq · head_dim)`:
//!
//! - forward: a query row per lane group, online softmax over key tiles → output and
//!   log-sum-exp;
//! - backward, query side: a query row per group recomputes `P` from the log-sum-exp
//!   and accumulates `dQ`; it also writes `delta = rowsum(dO ∘ O)`;
//! - backward, key side: a key row per group walks the query tiles at and after its
//!   own and accumulates `dK` and `dV`. Splitting the backward this way needs no
//!   atomics.
//!
//! The causal mask skips whole tiles above the diagonal. These are CUDA-core kernels
//! (no tensor cores yet); `benches/RESULTS.md` has their registers, spills and
//! occupancy on the A100 and H100 (`scripts/cuda-kernels.sh`) and how fast they are.
//!
//! Every loop over a unit's part of a row is unrolled (its length is known when the
//! kernel is compiled). This keeps the part and its accumulators addressable as
//! registers. It also keeps each
//! invocation under llvmpipe's cap of 65,535 loop iterations (lavapipe, the Vulkan
//! driver CI tests on): rolled, the loops of a query row near position 470 already
//! made that many at head size 64. Past the cap, llvmpipe silently skips the remaining
//! iterations.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::prelude::*;

use super::ModelBackend;

/// Largest head dimension the kernels hold in registers.
pub const MAX_HEAD_DIM: usize = 256;

// One unit per row (every runtime but CUDA, and CUDA where a row is too short to
// split): the kernels as they have run on wgpu since the start, every loop over the
// row unrolled. Kept apart from the split kernels below because lavapipe, where CI runs
// them, compiled the split kernels' one-lane form about 5x slower (58 s against 283 s
// for the agreement test).

/// Loads row `row` of `a` and `b` (`[.., seq, d]`, contiguous, rows of this head start at
/// `base`) into tile slot `slot`, scaling `a` by `scale`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_rows<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    a_tile: &mut SharedMemory<f32>,
    b_tile: &mut SharedMemory<f32>,
    base: usize,
    row: usize,
    slot: usize,
    scale: f32,
    #[comptime] head_dim: u32,
) {
    let d = head_dim as usize;
    #[unroll]
    for c in 0..d {
        a_tile[slot * d + c] = f32::cast_from(a[base + row * d + c]) * scale;
        b_tile[slot * d + c] = f32::cast_from(b[base + row * d + c]);
    }
}

/// `Σ_c x[c] · tile[slot · d + c]`.
#[cube]
fn dot_tile(
    x: &Array<f32>,
    tile: &SharedMemory<f32>,
    slot: usize,
    #[comptime] head_dim: u32,
) -> f32 {
    let d = head_dim as usize;
    let mut sum = f32::new(0.0);
    #[unroll]
    for c in 0..d {
        sum += x[c] * tile[slot * d + c];
    }
    sum
}

/// This unit's own row into registers, times `scale`; zeros when the unit is past the
/// end of the sequence (`active` false), so the registers are always defined.
#[cube]
fn read_row<F: Float>(
    x: &Tensor<F>,
    offset: usize,
    scale: f32,
    active: bool,
    row: &mut Array<f32>,
    #[comptime] head_dim: u32,
) {
    let d = head_dim as usize;
    #[unroll]
    for c in 0..d {
        row[c] = 0.0;
        if active {
            row[c] = f32::cast_from(x[offset + c]) * scale;
        }
    }
}

#[cube]
fn zeros(row: &mut Array<f32>, #[comptime] head_dim: u32) {
    let d = head_dim as usize;
    #[unroll]
    for c in 0..d {
        row[c] = 0.0;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    seq: u32,
    scale: f32,
    #[comptime] block: u32,
    #[comptime] head_dim: u32,
    #[define(F)] _dtype: StorageType,
) {
    let bs = block as usize;
    let d = head_dim as usize;
    let t = seq as usize;
    let z = CUBE_POS_X as usize;
    let query_block = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let i = query_block * bs + u;
    let base = z * t * d;
    let active = i < t;

    let mut q_row = Array::<f32>::new(d);
    let mut acc = Array::<f32>::new(d);
    let mut scores = Array::<f32>::new(bs);
    let mut k_tile = SharedMemory::<f32>::new(bs * d);
    let mut v_tile = SharedMemory::<f32>::new(bs * d);
    read_row::<F>(q, base + i * d, scale, active, &mut q_row, head_dim);
    zeros(&mut acc, head_dim);
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);

    for kt in 0..query_block + 1 {
        let j = kt * bs + u;
        if j < t {
            load_rows::<F>(k, v, &mut k_tile, &mut v_tile, base, j, u, 1.0, head_dim);
        }
        sync_cube();
        if active {
            let mut tile_max = m;
            for jj in 0..bs {
                let mut s = f32::new(-1.0e30);
                if kt * bs + jj <= i {
                    s = dot_tile(&q_row, &k_tile, jj, head_dim);
                }
                scores[jj] = s;
                if s > tile_max {
                    tile_max = s;
                }
            }
            let correction = (m - tile_max).exp();
            l *= correction;
            #[unroll]
            for c in 0..d {
                acc[c] *= correction;
            }
            for jj in 0..bs {
                if kt * bs + jj <= i {
                    let p = (scores[jj] - tile_max).exp();
                    l += p;
                    #[unroll]
                    for c in 0..d {
                        acc[c] += p * v_tile[jj * d + c];
                    }
                }
            }
            m = tile_max;
        }
        sync_cube();
    }

    if active {
        #[unroll]
        for c in 0..d {
            out[base + i * d + c] = F::cast_from(acc[c] / l);
        }
        lse[z * t + i] = m + l.ln();
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_query_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    grad: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    seq: u32,
    scale: f32,
    #[comptime] block: u32,
    #[comptime] head_dim: u32,
    #[define(F)] _dtype: StorageType,
) {
    let bs = block as usize;
    let d = head_dim as usize;
    let t = seq as usize;
    let z = CUBE_POS_X as usize;
    let query_block = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let i = query_block * bs + u;
    let base = z * t * d;
    let active = i < t;

    let mut q_row = Array::<f32>::new(d);
    let mut grad_row = Array::<f32>::new(d);
    let mut acc = Array::<f32>::new(d);
    let mut k_tile = SharedMemory::<f32>::new(bs * d);
    let mut v_tile = SharedMemory::<f32>::new(bs * d);
    read_row::<F>(q, base + i * d, scale, active, &mut q_row, head_dim);
    read_row::<F>(grad, base + i * d, 1.0, active, &mut grad_row, head_dim);
    zeros(&mut acc, head_dim);
    let mut row_lse = f32::new(0.0);
    let mut row_delta = f32::new(0.0);
    if active {
        #[unroll]
        for c in 0..d {
            row_delta += grad_row[c] * f32::cast_from(out[base + i * d + c]);
        }
        row_lse = lse[z * t + i];
    }

    for kt in 0..query_block + 1 {
        let j = kt * bs + u;
        if j < t {
            load_rows::<F>(k, v, &mut k_tile, &mut v_tile, base, j, u, 1.0, head_dim);
        }
        sync_cube();
        if active {
            for jj in 0..bs {
                if kt * bs + jj <= i {
                    let p = (dot_tile(&q_row, &k_tile, jj, head_dim) - row_lse).exp();
                    let dp = dot_tile(&grad_row, &v_tile, jj, head_dim);
                    let ds = p * (dp - row_delta);
                    #[unroll]
                    for c in 0..d {
                        acc[c] += ds * k_tile[jj * d + c];
                    }
                }
            }
        }
        sync_cube();
    }

    if active {
        #[unroll]
        for c in 0..d {
            dq[base + i * d + c] = F::cast_from(acc[c] * scale);
        }
        delta[z * t + i] = row_delta;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_key_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    grad: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    seq: u32,
    scale: f32,
    #[comptime] block: u32,
    #[comptime] head_dim: u32,
    #[define(F)] _dtype: StorageType,
) {
    let bs = block as usize;
    let d = head_dim as usize;
    let t = seq as usize;
    let z = CUBE_POS_X as usize;
    let key_block = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let j = key_block * bs + u;
    let base = z * t * d;
    let active = j < t;
    // Spelled out: `div_ceil` is not a CubeCL intrinsic.
    #[allow(clippy::manual_div_ceil)]
    let tiles = (t + bs - 1) / bs;

    let mut k_row = Array::<f32>::new(d);
    let mut v_row = Array::<f32>::new(d);
    let mut dk_acc = Array::<f32>::new(d);
    let mut dv_acc = Array::<f32>::new(d);
    let mut q_tile = SharedMemory::<f32>::new(bs * d);
    let mut grad_tile = SharedMemory::<f32>::new(bs * d);
    let mut lse_tile = SharedMemory::<f32>::new(bs);
    let mut delta_tile = SharedMemory::<f32>::new(bs);
    read_row::<F>(k, base + j * d, 1.0, active, &mut k_row, head_dim);
    read_row::<F>(v, base + j * d, 1.0, active, &mut v_row, head_dim);
    zeros(&mut dk_acc, head_dim);
    zeros(&mut dv_acc, head_dim);

    for qt in key_block..tiles {
        let i = qt * bs + u;
        if i < t {
            // q is stored pre-scaled, so dK = Σ dS (scale · q) needs no final factor.
            load_rows::<F>(
                q,
                grad,
                &mut q_tile,
                &mut grad_tile,
                base,
                i,
                u,
                scale,
                head_dim,
            );
            lse_tile[u] = lse[z * t + i];
            delta_tile[u] = delta[z * t + i];
        }
        sync_cube();
        if active {
            for ii in 0..bs {
                let i = qt * bs + ii;
                if i >= j && i < t {
                    let p = (dot_tile(&k_row, &q_tile, ii, head_dim) - lse_tile[ii]).exp();
                    let dp = dot_tile(&v_row, &grad_tile, ii, head_dim);
                    let ds = p * (dp - delta_tile[ii]);
                    #[unroll]
                    for c in 0..d {
                        dv_acc[c] += p * grad_tile[ii * d + c];
                        dk_acc[c] += ds * q_tile[ii * d + c];
                    }
                }
            }
        }
        sync_cube();
    }

    if active {
        #[unroll]
        for c in 0..d {
            dk[base + j * d + c] = F::cast_from(dk_acc[c]);
            dv[base + j * d + c] = F::cast_from(dv_acc[c]);
        }
    }
}

// The split kernels (CUDA, [`row_lanes`] > 1) give `lanes` consecutive units of a
// plane to a row (a power of two): each holds `part = head_dim / lanes` of the row's
// elements and accumulators, from column `o = lane * part`, and dot products are
// summed over the lanes by plane shuffles ([`sum_lanes`]). Control flow stays uniform
// around the shuffles: rows past the sequence compute on zeros and write nothing.
// Every loop over a part (16 to 31 elements) is unrolled, so a part and its
// accumulators are registers.

/// Loads columns `o..o + part` of row `row` of `a` and `b` (`[.., seq, d]`,
/// contiguous, rows of this head start at `base`) into tile slot `slot`, scaling `a`
/// by `scale`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_part<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    a_tile: &mut SharedMemory<f32>,
    b_tile: &mut SharedMemory<f32>,
    base: usize,
    row: usize,
    slot: usize,
    o: usize,
    scale: f32,
    #[comptime] head_dim: u32,
    #[comptime] part: u32,
) {
    let d = head_dim as usize;
    let n = part as usize;
    #[unroll]
    for c in 0..n {
        a_tile[slot * d + o + c] = f32::cast_from(a[base + row * d + o + c]) * scale;
        b_tile[slot * d + o + c] = f32::cast_from(b[base + row * d + o + c]);
    }
}

/// `Σ_c x[c] · tile[slot · d + o + c]` over this unit's part of the row.
#[cube]
fn dot_part(
    x: &Array<f32>,
    tile: &SharedMemory<f32>,
    slot: usize,
    o: usize,
    #[comptime] head_dim: u32,
    #[comptime] part: u32,
) -> f32 {
    let d = head_dim as usize;
    let n = part as usize;
    let mut sum = f32::new(0.0);
    #[unroll]
    for c in 0..n {
        sum += x[c] * tile[slot * d + o + c];
    }
    sum
}

/// `x` summed over the `lanes` units that share a row (a butterfly of `log2(lanes)`
/// shuffles); each of them gets the same sum.
#[cube]
fn sum_lanes(x: f32, #[comptime] lanes: u32) -> f32 {
    let mut sum = x;
    let mut mask = 1u32;
    let steps = comptime!(lanes.trailing_zeros());
    #[unroll]
    for _ in 0..steps {
        sum += plane_shuffle_xor(sum, mask);
        mask *= 2;
    }
    sum
}

/// This unit's part of a row (`part` elements from `offset`) into registers, times
/// `scale`; zeros when the row is past the end of the sequence (`active` false).
#[cube]
fn read_part<F: Float>(
    x: &Tensor<F>,
    offset: usize,
    scale: f32,
    active: bool,
    row: &mut Array<f32>,
    #[comptime] part: u32,
) {
    let n = part as usize;
    #[unroll]
    for c in 0..n {
        row[c] = 0.0;
        if active {
            row[c] = f32::cast_from(x[offset + c]) * scale;
        }
    }
}

#[cube]
fn zero_part(row: &mut Array<f32>, #[comptime] part: u32) {
    let n = part as usize;
    #[unroll]
    for c in 0..n {
        row[c] = 0.0;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_split_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    seq: u32,
    scale: f32,
    #[comptime] block: u32,
    #[comptime] head_dim: u32,
    #[comptime] lanes: u32,
    #[define(F)] _dtype: StorageType,
) {
    let part = comptime!(head_dim / lanes);
    let (bs, d, nl, n) = (
        block as usize,
        head_dim as usize,
        lanes as usize,
        part as usize,
    );
    let t = seq as usize;
    let z = CUBE_POS_X as usize;
    let query_block = CUBE_POS_Y as usize;
    let r = UNIT_POS_X as usize / nl;
    let o = (UNIT_POS_X as usize % nl) * n;
    let i = query_block * bs + r;
    let base = z * t * d;
    let active = i < t;

    let mut q_part = Array::<f32>::new(n);
    let mut acc = Array::<f32>::new(n);
    let mut scores = Array::<f32>::new(bs);
    let mut k_tile = SharedMemory::<f32>::new(bs * d);
    let mut v_tile = SharedMemory::<f32>::new(bs * d);
    read_part::<F>(q, base + i * d + o, scale, active, &mut q_part, part);
    zero_part(&mut acc, part);
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);

    for kt in 0..query_block + 1 {
        let j = kt * bs + r;
        if j < t {
            load_part::<F>(
                k,
                v,
                &mut k_tile,
                &mut v_tile,
                base,
                j,
                r,
                o,
                1.0,
                head_dim,
                part,
            );
        }
        sync_cube();
        let mut tile_max = m;
        for jj in 0..bs {
            let dot = sum_lanes(dot_part(&q_part, &k_tile, jj, o, head_dim, part), lanes);
            let mut s = f32::new(-1.0e30);
            if kt * bs + jj <= i {
                s = dot;
            }
            scores[jj] = s;
            if s > tile_max {
                tile_max = s;
            }
        }
        let correction = (m - tile_max).exp();
        l *= correction;
        #[unroll]
        for c in 0..n {
            acc[c] *= correction;
        }
        for jj in 0..bs {
            if kt * bs + jj <= i {
                let p = (scores[jj] - tile_max).exp();
                l += p;
                #[unroll]
                for c in 0..n {
                    acc[c] += p * v_tile[jj * d + o + c];
                }
            }
        }
        m = tile_max;
        sync_cube();
    }

    if active {
        #[unroll]
        for c in 0..n {
            out[base + i * d + o + c] = F::cast_from(acc[c] / l);
        }
        if o == 0 {
            lse[z * t + i] = m + l.ln();
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_query_split_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    grad: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    seq: u32,
    scale: f32,
    #[comptime] block: u32,
    #[comptime] head_dim: u32,
    #[comptime] lanes: u32,
    #[define(F)] _dtype: StorageType,
) {
    let part = comptime!(head_dim / lanes);
    let (bs, d, nl, n) = (
        block as usize,
        head_dim as usize,
        lanes as usize,
        part as usize,
    );
    let t = seq as usize;
    let z = CUBE_POS_X as usize;
    let query_block = CUBE_POS_Y as usize;
    let r = UNIT_POS_X as usize / nl;
    let o = (UNIT_POS_X as usize % nl) * n;
    let i = query_block * bs + r;
    let base = z * t * d;
    let active = i < t;

    let mut q_part = Array::<f32>::new(n);
    let mut grad_part = Array::<f32>::new(n);
    let mut acc = Array::<f32>::new(n);
    let mut k_tile = SharedMemory::<f32>::new(bs * d);
    let mut v_tile = SharedMemory::<f32>::new(bs * d);
    read_part::<F>(q, base + i * d + o, scale, active, &mut q_part, part);
    read_part::<F>(grad, base + i * d + o, 1.0, active, &mut grad_part, part);
    zero_part(&mut acc, part);
    let mut row_lse = f32::new(0.0);
    let mut delta_part = f32::new(0.0);
    if active {
        #[unroll]
        for c in 0..n {
            delta_part += grad_part[c] * f32::cast_from(out[base + i * d + o + c]);
        }
        row_lse = lse[z * t + i];
    }
    let row_delta = sum_lanes(delta_part, lanes);

    for kt in 0..query_block + 1 {
        let j = kt * bs + r;
        if j < t {
            load_part::<F>(
                k,
                v,
                &mut k_tile,
                &mut v_tile,
                base,
                j,
                r,
                o,
                1.0,
                head_dim,
                part,
            );
        }
        sync_cube();
        for jj in 0..bs {
            let qk = sum_lanes(dot_part(&q_part, &k_tile, jj, o, head_dim, part), lanes);
            let dp = sum_lanes(dot_part(&grad_part, &v_tile, jj, o, head_dim, part), lanes);
            if kt * bs + jj <= i {
                let ds = (qk - row_lse).exp() * (dp - row_delta);
                #[unroll]
                for c in 0..n {
                    acc[c] += ds * k_tile[jj * d + o + c];
                }
            }
        }
        sync_cube();
    }

    if active {
        #[unroll]
        for c in 0..n {
            dq[base + i * d + o + c] = F::cast_from(acc[c] * scale);
        }
        if o == 0 {
            delta[z * t + i] = row_delta;
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_key_split_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    grad: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    seq: u32,
    scale: f32,
    #[comptime] block: u32,
    #[comptime] head_dim: u32,
    #[comptime] lanes: u32,
    #[define(F)] _dtype: StorageType,
) {
    let part = comptime!(head_dim / lanes);
    let (bs, d, nl, n) = (
        block as usize,
        head_dim as usize,
        lanes as usize,
        part as usize,
    );
    let t = seq as usize;
    let z = CUBE_POS_X as usize;
    let key_block = CUBE_POS_Y as usize;
    let r = UNIT_POS_X as usize / nl;
    let o = (UNIT_POS_X as usize % nl) * n;
    let j = key_block * bs + r;
    let base = z * t * d;
    let active = j < t;
    // Spelled out: `div_ceil` is not a CubeCL intrinsic.
    #[allow(clippy::manual_div_ceil)]
    let tiles = (t + bs - 1) / bs;

    let mut k_part = Array::<f32>::new(n);
    let mut v_part = Array::<f32>::new(n);
    let mut dk_acc = Array::<f32>::new(n);
    let mut dv_acc = Array::<f32>::new(n);
    let mut q_tile = SharedMemory::<f32>::new(bs * d);
    let mut grad_tile = SharedMemory::<f32>::new(bs * d);
    let mut lse_tile = SharedMemory::<f32>::new(bs);
    let mut delta_tile = SharedMemory::<f32>::new(bs);
    read_part::<F>(k, base + j * d + o, 1.0, active, &mut k_part, part);
    read_part::<F>(v, base + j * d + o, 1.0, active, &mut v_part, part);
    zero_part(&mut dk_acc, part);
    zero_part(&mut dv_acc, part);

    for qt in key_block..tiles {
        let i = qt * bs + r;
        if i < t {
            // q is stored pre-scaled, so dK = Σ dS (scale · q) needs no final factor.
            load_part::<F>(
                q,
                grad,
                &mut q_tile,
                &mut grad_tile,
                base,
                i,
                r,
                o,
                scale,
                head_dim,
                part,
            );
            if o == 0 {
                lse_tile[r] = lse[z * t + i];
                delta_tile[r] = delta[z * t + i];
            }
        }
        sync_cube();
        for ii in 0..bs {
            let i = qt * bs + ii;
            let qk = sum_lanes(dot_part(&k_part, &q_tile, ii, o, head_dim, part), lanes);
            let dp = sum_lanes(dot_part(&v_part, &grad_tile, ii, o, head_dim, part), lanes);
            if i >= j && i < t {
                let p = (qk - lse_tile[ii]).exp();
                let ds = p * (dp - delta_tile[ii]);
                #[unroll]
                for c in 0..n {
                    dv_acc[c] += p * grad_tile[ii * d + o + c];
                    dk_acc[c] += ds * q_tile[ii * d + o + c];
                }
            }
        }
        sync_cube();
    }

    if active {
        #[unroll]
        for c in 0..n {
            dk[base + j * d + o + c] = F::cast_from(dk_acc[c]);
            dv[base + j * d + o + c] = F::cast_from(dv_acc[c]);
        }
    }
}

/// The largest power-of-two row block (8..=64) whose two `[block, head_dim]` f32 tiles
/// and two `[block]` vectors fit the device's shared memory: the cube size of all three
/// kernels.
pub fn row_block(head_dim: usize, props: &cubecl::ir::HardwareProperties) -> usize {
    let fits = |block: usize| {
        (2 * block * head_dim + 2 * block) * 4 <= props.max_shared_memory_size
            && block as u32 <= props.max_units_per_cube
    };
    [64, 32, 16, 8]
        .into_iter()
        .find(|&bl| fits(bl))
        .unwrap_or(8)
}

/// Units that share a row: the largest power of two that leaves each at least 16 of
/// the row's elements, within a plane. On CUDA only: the lanes sum their parts by
/// plane shuffles, which cubecl-wgpu offers on GPUs but not on lavapipe, where CI tests
/// the kernels; elsewhere 1.
pub fn row_lanes<R: Runtime>(client: &ComputeClient<R>, head_dim: usize) -> usize {
    let props = client.properties();
    let planes = props
        .features
        .plane
        .contains(cubecl::ir::features::Plane::Ops);
    if R::name(client) != "cuda" || !planes {
        return 1;
    }
    let plane = props.hardware.plane_size_min as usize;
    let mut lanes = 1;
    while head_dim.is_multiple_of(2 * lanes) && head_dim / (2 * lanes) >= 16 && 2 * lanes <= plane {
        lanes *= 2;
    }
    lanes
}

/// Most units in one cube: 512 leave each up to 128 registers.
const MAX_UNITS: usize = 512;

/// Rows per cube and units per row for `head_dim` on `client`'s device: the row block
/// of [`row_block`], halved while its rows' lanes would exceed [`MAX_UNITS`].
pub fn geometry<R: Runtime>(client: &ComputeClient<R>, head_dim: usize) -> (usize, usize) {
    let props = client.properties();
    let lanes = row_lanes(client, head_dim);
    let max_units = MAX_UNITS.min(props.hardware.max_units_per_cube as usize);
    let mut block = row_block(head_dim, &props.hardware);
    while block > 8 && block * lanes > max_units {
        block /= 2;
    }
    (block, lanes)
}

/// One kernel of this module, as a runtime compiles it.
pub struct NamedKernel<C: cubecl::Compiler> {
    pub name: &'static str,
    /// Units per cube.
    pub units: u32,
    pub task: Box<dyn cubecl::CubeTask<C>>,
}

/// The three kernels exactly as [`forward`] and [`backward`] launch them for storage
/// type `dtype` and head size `head_dim` on `client`'s device: the same comptime
/// arguments, cube size and settings, as the macro-generated `launch` builds them. For
/// compiling them ahead of time without running them (`mixlm-kernel-check` compiles
/// them for CUDA on a machine without a GPU).
pub fn kernel_tasks<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    head_dim: usize,
) -> Vec<NamedKernel<R::Compiler>> {
    let (block, lanes) = geometry(client, head_dim);
    let (block, lanes, d) = (block as u32, lanes as u32, head_dim as u32);
    // What `#[cube(launch)]`'s `launch` passes: default settings, the cube size, u32
    // addresses; tensors not aliased (`inplace: None`), scalars without compile data.
    let settings = KernelSettings::default()
        .cube_dim(CubeDim::new_1d(block * lanes))
        .address_type(AddressType::U32);
    let t = || TensorCompilationArg { inplace: None };
    let c = client.clone();
    let boxed = |name, units, task: Box<dyn cubecl::CubeTask<R::Compiler>>| NamedKernel {
        name,
        units,
        task,
    };
    if lanes == 1 {
        let one = |name, task| boxed(name, block, task);
        return vec![
            one(
                "forward",
                Box::new(KernelTask::<R::Compiler, _>::new(
                    forward_kernel::ForwardKernel::<R>::new(
                        settings.clone(),
                        c.clone(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        (),
                        (),
                        block,
                        d,
                        dtype,
                    ),
                )),
            ),
            one(
                "backward_query",
                Box::new(KernelTask::<R::Compiler, _>::new(
                    backward_query_kernel::BackwardQueryKernel::<R>::new(
                        settings.clone(),
                        c.clone(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        (),
                        (),
                        block,
                        d,
                        dtype,
                    ),
                )),
            ),
            one(
                "backward_key",
                Box::new(KernelTask::<R::Compiler, _>::new(
                    backward_key_kernel::BackwardKeyKernel::<R>::new(
                        settings,
                        c,
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        t(),
                        (),
                        (),
                        block,
                        d,
                        dtype,
                    ),
                )),
            ),
        ];
    }
    vec![
        boxed(
            "forward",
            block * lanes,
            Box::new(KernelTask::<R::Compiler, _>::new(
                forward_split_kernel::ForwardSplitKernel::<R>::new(
                    settings.clone(),
                    c.clone(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    (),
                    (),
                    block,
                    d,
                    lanes,
                    dtype,
                ),
            )),
        ),
        boxed(
            "backward_query",
            block * lanes,
            Box::new(KernelTask::<R::Compiler, _>::new(
                backward_query_split_kernel::BackwardQuerySplitKernel::<R>::new(
                    settings.clone(),
                    c.clone(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    (),
                    (),
                    block,
                    d,
                    lanes,
                    dtype,
                ),
            )),
        ),
        boxed(
            "backward_key",
            block * lanes,
            Box::new(KernelTask::<R::Compiler, _>::new(
                backward_key_split_kernel::BackwardKeySplitKernel::<R>::new(
                    settings,
                    c,
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    t(),
                    (),
                    (),
                    block,
                    d,
                    lanes,
                    dtype,
                ),
            )),
        ),
    ]
}

/// Launch geometry shared by the three kernels.
struct Launch {
    batch_heads: usize,
    seq: usize,
    head_dim: usize,
    block: usize,
    /// Units per row.
    lanes: usize,
}

impl Launch {
    /// The largest power-of-two row block (8..=64) whose two `[block, head_dim]` f32 tiles
    /// and two `[block]` vectors fit the device's shared memory.
    fn new<R: CubeRuntime>(q: &CubeTensor<R>, others: &[&CubeTensor<R>]) -> Self {
        let shape = q.shape();
        let [b, h, t, d] = shape.dims::<4>();
        for other in others {
            assert_eq!(
                other.shape(),
                shape,
                "causal attention: q, k, v (and gradients) must share one shape"
            );
        }
        assert!(
            d <= MAX_HEAD_DIM,
            "causal attention kernels hold a head in registers: head_dim {d} > {MAX_HEAD_DIM}"
        );
        let (block, lanes) = geometry::<R>(&q.client, d);
        let props = &q.client.properties().hardware;
        let (max_x, max_y, _) = props.max_cube_count;
        assert!(
            (b * h) as u64 <= max_x as u64 && t.div_ceil(block) as u64 <= max_y as u64,
            "causal attention: batch x heads = {} (at most {max_x}) or {} row blocks of {block} \
             (at most {max_y}) exceed this device's grid; use a smaller micro-batch",
            b * h,
            t.div_ceil(block)
        );
        Self {
            batch_heads: b * h,
            seq: t,
            head_dim: d,
            block,
            lanes,
        }
    }

    fn count(&self) -> CubeCount {
        CubeCount::Static(
            self.batch_heads as u32,
            self.seq.div_ceil(self.block) as u32,
            1,
        )
    }

    fn dim(&self) -> CubeDim {
        CubeDim::new_1d((self.block * self.lanes) as u32)
    }

    fn empty<R: CubeRuntime>(
        &self,
        like: &CubeTensor<R>,
        shape: Shape,
        dtype: DType,
    ) -> CubeTensor<R> {
        empty_device_dtype::<R>(like.client.clone(), like.device.clone(), shape, dtype)
    }

    fn rows_shape<R: CubeRuntime>(like: &CubeTensor<R>) -> Shape {
        let [b, h, t, _] = like.shape().dims::<4>();
        Shape::new([b, h, t])
    }
}

fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    scale: f32,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let launch = Launch::new(&q, &[&k, &v]);
    let out = launch.empty(&q, q.shape(), q.dtype);
    let lse = launch.empty(&q, Launch::rows_shape(&q), DType::F32);
    let dtype = q.dtype;
    if launch.lanes == 1 {
        forward_kernel::launch::<R>(
            &q.client.clone(),
            launch.count(),
            launch.dim(),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            launch.seq as u32,
            scale,
            launch.block as u32,
            launch.head_dim as u32,
            dtype.into(),
        );
    } else {
        forward_split_kernel::launch::<R>(
            &q.client.clone(),
            launch.count(),
            launch.dim(),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            launch.seq as u32,
            scale,
            launch.block as u32,
            launch.head_dim as u32,
            launch.lanes as u32,
            dtype.into(),
        );
    }
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad: CubeTensor<R>,
    scale: f32,
) -> [CubeTensor<R>; 3] {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let (out, lse, grad) = (
        into_contiguous(out),
        into_contiguous(lse),
        into_contiguous(grad),
    );
    let launch = Launch::new(&q, &[&k, &v, &out, &grad]);
    let dtype = q.dtype;
    let client = q.client.clone();
    let dq = launch.empty(&q, q.shape(), dtype);
    let dk = launch.empty(&q, q.shape(), dtype);
    let dv = launch.empty(&q, q.shape(), dtype);
    let delta = launch.empty(&q, Launch::rows_shape(&q), DType::F32);
    if launch.lanes == 1 {
        backward_query_kernel::launch::<R>(
            &client,
            launch.count(),
            launch.dim(),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            launch.seq as u32,
            scale,
            launch.block as u32,
            launch.head_dim as u32,
            dtype.into(),
        );
    } else {
        backward_query_split_kernel::launch::<R>(
            &client,
            launch.count(),
            launch.dim(),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            launch.seq as u32,
            scale,
            launch.block as u32,
            launch.head_dim as u32,
            launch.lanes as u32,
            dtype.into(),
        );
    }
    if launch.lanes == 1 {
        backward_key_kernel::launch::<R>(
            &client,
            launch.count(),
            launch.dim(),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            grad.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            launch.seq as u32,
            scale,
            launch.block as u32,
            launch.head_dim as u32,
            dtype.into(),
        );
    } else {
        backward_key_split_kernel::launch::<R>(
            &client,
            launch.count(),
            launch.dim(),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            grad.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            launch.seq as u32,
            scale,
            launch.block as u32,
            launch.head_dim as u32,
            launch.lanes as u32,
            dtype.into(),
        );
    }
    [dq, dk, dv]
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> ModelBackend
    for CubeBackend<R, F, I, BT>
{
    fn causal_attention_forward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        scale: f32,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        forward(q, k, v, scale)
    }

    fn causal_attention_backward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        out: CubeTensor<R>,
        lse: CubeTensor<R>,
        grad: CubeTensor<R>,
        scale: f32,
    ) -> [CubeTensor<R>; 3] {
        backward(q, k, v, out, lse, grad, scale)
    }
}

/// The fusion backend records the kernels as custom operations of its stream; they run
/// on the inner backend when the stream is flushed.
#[derive(Debug)]
struct FusedOp<B> {
    desc: CustomOpIr,
    scale: f32,
    backward: bool,
    _backend: std::marker::PhantomData<B>,
}

impl<B: FusionBackend + ModelBackend> Operation<B::FusionRuntime> for FusedOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let mut get = |ir: &TensorIr| handles.get_float_tensor::<B>(ir);
        if self.backward {
            let ([q, k, v, out, lse, grad], outputs) = self.desc.as_fixed::<6, 3>();
            let inputs = [q, k, v, out, lse, grad].map(&mut get);
            let [q, k, v, out, lse, grad] = inputs;
            let grads = B::causal_attention_backward(q, k, v, out, lse, grad, self.scale);
            for (ir, g) in outputs.iter().zip(grads) {
                handles.register_float_tensor::<B>(&ir.id, g);
            }
        } else {
            let ([q, k, v], [out_ir, lse_ir]) = self.desc.as_fixed::<3, 2>();
            let [q, k, v] = [q, k, v].map(&mut get);
            let (out, lse) = B::causal_attention_forward(q, k, v, self.scale);
            handles.register_float_tensor::<B>(&out_ir.id, out);
            handles.register_float_tensor::<B>(&lse_ir.id, lse);
        }
    }
}

/// Registers a [`FusedOp`] reading `inputs` and producing tensors of `outputs` (shape,
/// dtype); returns the outputs in order.
fn register_fused<B: FusionBackend + ModelBackend>(
    inputs: Vec<burn_fusion::FusionTensor<B::FusionRuntime>>,
    outputs: Vec<(Shape, DType)>,
    scale: f32,
    backward: bool,
) -> Vec<burn_fusion::FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs: Vec<TensorIr> = outputs
        .into_iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let name = if backward { "backward" } else { "forward" };
    let desc = CustomOpIr {
        // The scale is part of the id so that two calls differing only in it never
        // share a cached stream plan.
        id: format!("mixlm_causal_attention_{name}(scale={scale:e})"),
        inputs: inputs.into_iter().map(|t| t.into_ir()).collect(),
        outputs,
    };
    let op = FusedOp::<B> {
        desc: desc.clone(),
        scale,
        backward,
        _backend: std::marker::PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

impl<B: FusionBackend + ModelBackend> ModelBackend for Fusion<B> {
    fn causal_attention_forward(
        q: burn::tensor::ops::FloatTensor<Self>,
        k: burn::tensor::ops::FloatTensor<Self>,
        v: burn::tensor::ops::FloatTensor<Self>,
        scale: f32,
    ) -> (
        burn::tensor::ops::FloatTensor<Self>,
        burn::tensor::ops::FloatTensor<Self>,
    ) {
        let [b, h, t, _] = q.shape.dims::<4>();
        let outputs = vec![
            (q.shape.clone(), q.dtype),
            (Shape::new([b, h, t]), DType::F32),
        ];
        let mut out = register_fused::<B>(vec![q, k, v], outputs, scale, false).into_iter();
        (out.next().unwrap(), out.next().unwrap())
    }

    fn causal_attention_backward(
        q: burn::tensor::ops::FloatTensor<Self>,
        k: burn::tensor::ops::FloatTensor<Self>,
        v: burn::tensor::ops::FloatTensor<Self>,
        out: burn::tensor::ops::FloatTensor<Self>,
        lse: burn::tensor::ops::FloatTensor<Self>,
        grad: burn::tensor::ops::FloatTensor<Self>,
        scale: f32,
    ) -> [burn::tensor::ops::FloatTensor<Self>; 3] {
        let like = (q.shape.clone(), q.dtype);
        let outputs = vec![like.clone(), like.clone(), like];
        let grads = register_fused::<B>(vec![q, k, v, out, lse, grad], outputs, scale, true);
        grads.try_into().expect("three gradients")
    }
}

//! The CUDA occupancy rule: how many blocks of a kernel an SM holds at once, given its
//! block size, registers per thread and shared memory per block, and so what fraction
//! of the SM's warp slots are filled. The limits are NVIDIA's (CUDA C Programming Guide,
//! "Technical Specifications per Compute Capability"); the rule is the one
//! `cuda_occupancy.h` of the CUDA toolkit implements (registers allocated per warp in
//! units of 256, warps spread over the SM's four sub-partitions, 1 KiB of shared memory
//! reserved per block, shared memory allocated in units of 128 bytes).

use crate::target::Arch;

/// One SM's capacity (CUDA C Programming Guide, "Technical Specifications per Compute
/// Capability"; the per-block shared memory with the opt-in carve-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sm {
    pub name: &'static str,
    pub max_warps: u32,
    pub max_blocks: u32,
    pub registers: u32,
    pub max_registers_per_thread: u32,
    pub shared_memory: u32,
    pub max_shared_memory_per_block: u32,
}

impl Sm {
    /// H100 (compute capability 9.0; the H200 has the same SM).
    pub const H100: Sm = Sm {
        name: "H100",
        max_warps: 64,
        max_blocks: 32,
        registers: 65_536,
        max_registers_per_thread: 255,
        shared_memory: 233_472,
        max_shared_memory_per_block: 232_448,
    };
    /// A100 (compute capability 8.0).
    pub const A100: Sm = Sm {
        name: "A100",
        max_warps: 64,
        max_blocks: 32,
        registers: 65_536,
        max_registers_per_thread: 255,
        shared_memory: 167_936,
        max_shared_memory_per_block: 166_912,
    };

    pub fn of(arch: Arch) -> Sm {
        match arch.version {
            80 => Sm::A100,
            _ => Sm::H100,
        }
    }
}

const WARP: u32 = 32;
const REGISTER_UNIT: u32 = 256;
const SUB_PARTITIONS: u32 = 4;
const RESERVED_SHARED_PER_BLOCK: u32 = 1024;
const SHARED_UNIT: u32 = 128;

/// Resident blocks per SM and the limit that binds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occupancy {
    pub blocks: u32,
    /// Resident warps over the SM's warp slots, 0..=1.
    pub fraction: f64,
    /// "registers", "shared memory", "warps" or "blocks".
    pub limited_by: &'static str,
}

/// The occupancy of a kernel of `threads` per block using `registers` per thread and
/// `shared` bytes of shared memory per block (static and dynamic) on `sm`.
pub fn occupancy(sm: Sm, threads: u32, registers: u32, shared: u32) -> Occupancy {
    let round_up = |x: u32, unit: u32| x.div_ceil(unit) * unit;
    let warps = threads.div_ceil(WARP);
    let by_registers = if registers == 0 {
        u32::MAX
    } else {
        let per_warp = round_up(registers * WARP, REGISTER_UNIT);
        let fits = registers <= sm.max_registers_per_thread
            && per_warp * round_up(warps, SUB_PARTITIONS) <= sm.registers;
        match fits {
            true => (sm.registers / SUB_PARTITIONS / per_warp) * SUB_PARTITIONS / warps,
            false => 0,
        }
    };
    let by_shared = if shared > sm.max_shared_memory_per_block {
        0
    } else {
        sm.shared_memory / round_up(shared + RESERVED_SHARED_PER_BLOCK, SHARED_UNIT)
    };
    let limits = [
        (by_registers, "registers"),
        (by_shared, "shared memory"),
        (sm.max_warps / warps, "warps"),
        (sm.max_blocks, "blocks"),
    ];
    let (blocks, limited_by) = limits
        .into_iter()
        .min_by_key(|&(b, _)| b)
        .expect("four limits");
    Occupancy {
        blocks,
        fraction: (blocks * warps) as f64 / sm.max_warps as f64,
        limited_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worked by hand from the H100's limits.
    #[test]
    fn h100_occupancy_by_hand() {
        // 255 registers: 255 x 32 = 8,160 -> 8,192 per warp; 16,384 per sub-partition
        // hold 2 warps, 8 per SM; blocks of 64 threads (2 warps): 4 blocks, 8 of 64
        // warps. Shared: 33,280 + 1,024 = 34,304 -> 6 blocks; not the limit.
        let o = occupancy(Sm::H100, 64, 255, 33_280);
        assert_eq!((o.blocks, o.limited_by), (4, "registers"));
        assert_eq!(o.fraction, 0.125);
        // 32 registers: 1,024 per warp, 16 per sub-partition, 64 warps: 32 blocks of 2
        // warps by registers, but 65,536 + 1,024 bytes of shared memory per block leave
        // 233,472 / 66,560 = 3 blocks: 6 of 64 warps.
        let o = occupancy(Sm::H100, 64, 32, 65_536);
        assert_eq!((o.blocks, o.limited_by), (3, "shared memory"));
        assert_eq!(o.fraction, 6.0 / 64.0);
        // 256 threads x 32 registers, no shared memory: 8 blocks of 8 warps fill all 64.
        let o = occupancy(Sm::H100, 256, 32, 0);
        assert_eq!((o.blocks, o.fraction), (8, 1.0));
        // More shared memory than a block may have: nothing runs.
        assert_eq!(occupancy(Sm::H100, 64, 32, 240_000).blocks, 0);
        // 168 registers: 5,376 per warp; 16,384 / 5,376 = 3 warps per sub-partition,
        // 12 per SM: 6 blocks of 2 warps, 12/64.
        let o = occupancy(Sm::H100, 64, 168, 33_280);
        assert_eq!((o.blocks, o.fraction), (6, 12.0 / 64.0));
    }
}

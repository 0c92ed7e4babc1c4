//! glibc's allocator set up for tensor work on the CPU.
//!
//! A training step on the CPU allocates and frees buffers of hundreds of megabytes
//! (with a 50k vocabulary the logits of one batch and their gradient are 200 MB
//! each). glibc serves each of them with a fresh `mmap`, or from a per-thread arena
//! that hands its pages back on free, so every step faults every page in again and
//! the kernel zeroes it: measured on the 2-core machine at the tiny preset with the
//! GPT-NeoX vocabulary, 17.8 M page faults in 20 steps and 31 s of system time
//! against 19 s of user time (benches/RESULTS.md, "The CPU path"). Kept in one arena
//! that never returns memory to the system, the same buffers are reused: 0.24 M faults,
//! 1 s of system time, 3x the tokens/s. The price is that a process keeps its
//! peak heap until it exits, which a trainer does anyway.

/// Makes glibc keep freed memory for reuse: one arena for every thread, no `mmap`
/// for large blocks, no trimming of the heap below 2 GB free, 256 MB of head room per
/// heap growth. Call first thing in `main`, before any thread starts. Returns whether
/// glibc took every setting (elsewhere than Linux with glibc, does nothing and
/// returns true).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let settings = [
            (libc::M_ARENA_MAX, 1),
            (libc::M_MMAP_MAX, 0),
            (libc::M_TRIM_THRESHOLD, i32::MAX),
            (libc::M_TOP_PAD, 256 << 20),
        ];
        // SAFETY: mallopt only changes malloc's parameters; it is called before other
        // threads exist, and glibc takes its own lock for it anyway.
        settings
            .iter()
            .all(|&(param, value)| unsafe { libc::mallopt(param, value) } == 1)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_every_setting() {
        assert!(super::keep_freed_memory());
    }
}

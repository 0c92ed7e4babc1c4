//! The CPU backend's matmuls split over rayon's pool only, not also over
//! matrixmultiply's own threads.
//!
//! burn-ndarray runs the batches of a batched matmul in parallel on rayon's pool (the
//! model's matmuls all have a batch: `[batch, seq, d] x [d, out]`, and attention's
//! `[batch x heads]`), and multiplies each batch with matrixmultiply, whose
//! `threading` feature (on in burn-ndarray) splits the product again over a pool of
//! its own (thread-tree). There the calling thread, its half done, waits for the
//! other half in a `sched_yield` loop, while rayon's idle workers spin in theirs:
//! more runnable threads than cores, and kernel time that does no work. With
//! matrixmultiply on one thread per product, measured side by side on the 2-core
//! machine, the 50k-vocabulary shapes train 1.12x to 1.23x as fast per round
//! (benches/RESULTS.md, "The CPU path against PyTorch").

/// Variable matrixmultiply reads, once, at its first product.
const VAR: &str = "MATMUL_NUM_THREADS";

/// Sets `MATMUL_NUM_THREADS=1` unless the user set it. Call first thing in `main`,
/// before any thread starts and before any matmul (matrixmultiply reads it once).
/// Returns the value in force.
pub fn matmul_on_rayon_only() -> String {
    match std::env::var(VAR) {
        Ok(v) if !v.is_empty() => v,
        _ => {
            std::env::set_var(VAR, "1");
            "1".into()
        }
    }
}

#[cfg(test)]
mod tests {
    /// Unset, it becomes 1; a value the user gave is kept. (One test: the environment
    /// is the process's.)
    #[test]
    fn sets_one_thread_unless_the_user_chose() {
        std::env::remove_var(super::VAR);
        assert_eq!(super::matmul_on_rayon_only(), "1");
        assert_eq!(std::env::var(super::VAR).unwrap(), "1");
        std::env::set_var(super::VAR, "4");
        assert_eq!(super::matmul_on_rayon_only(), "4");
        assert_eq!(std::env::var(super::VAR).unwrap(), "4");
    }
}

//! The commands that read what training made, without training: per-domain
//! perplexity and downstream tasks of a checkpoint (`mixlm eval`), the health of a
//! run folder or a prepared dataset (`mixlm doctor`), and whether a device computes
//! what the CPU does (`mixlm check-backend`).

pub mod check;
pub mod doctor;
pub mod evaluate;

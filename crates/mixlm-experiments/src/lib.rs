//! What mixlm builds out of training runs: comparisons of mixing methods on the same
//! data (`mixlm compare`, with its report and figures), searches for a static mixture
//! over several runs (`mixlm mix-search`: grid, mixing-law fits, DoReMi, DoGE,
//! Skill-It), and SampleMix's scoring and resampling pipeline. Every run goes through
//! `mixlm_train`; an interrupted pipeline continues its runs when it is run again
//! ([`continuation`]).

pub mod compare;
pub mod continuation;
pub mod figures;
pub mod samplemix;
pub mod search;

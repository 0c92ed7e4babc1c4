//! Token data for mixlm: the [`TokenSource`] seam, the synthetic multi-domain
//! corpus with known per-domain loss floors, the mixture batch sampler, and real
//! corpora: [`prepare()`] turns SlimPajama-style `.jsonl(.zst)` into per-domain token
//! shards, which [`ShardSource`] memory-maps as a [`TokenSource`].
//!
//! The trainer's data path per step is:
//! 1. `picks = sampler.next_batch(&proportions, batch_size)` — which domain and which
//!    window each sequence comes from ([`MixtureSampler`]);
//! 2. `tokens = fetch_batch(source, Split::Train, &picks, seq_len)` — a row-major
//!    `[batch, seq_len + 1]` buffer (inputs `[..seq_len]`, targets `[1..]`);
//! 3. checkpoint [`MixtureSampler::state`] so a resumed run sees the same batches.
//!
//! The trainer runs steps 1-2 on a background thread through a [`Prefetcher`], which
//! hands each batch over with the sampler state to checkpoint after it.
//!
//! Validation uses [`validation_picks`] with [`Split::Validation`]: a fixed set of
//! windows per domain, disjoint from training.
//!
//! Everything random is keyed by explicit integers through [`seeding`], so the data
//! is identical on every machine and independent of call order or threading.

pub mod lock;
pub mod open;
pub mod prefetch;
pub mod prepare;
pub mod quality;
pub mod resampled;
pub mod sampler;
pub mod seeding;
pub mod shards;
pub mod source;
pub mod synthetic;

pub use lock::{FolderLock, LockError};
pub use open::{open_source, OpenError, SourceSpec};
pub use prefetch::{Prefetched, Prefetcher};
pub use prepare::{prepare, PrepareConfig, PrepareError, PrepareSummary};
pub use resampled::{PlanError, ResampledSource};
pub use sampler::{fetch_batch, validation_picks, MixtureSampler, SamplerError, SamplerState};
pub use shards::{ShardError, ShardSource, WindowPermutation};
pub use source::{check_split_ids, check_token_ids, document_at, Split, TokenSource};
pub use synthetic::{
    DomainStats, ExplicitChain, SharedComponent, SyntheticConfig, SyntheticCorpus, SyntheticDomain,
    SyntheticError,
};

pub use mixlm_mixing::{Composition, DomainId, Proportions};

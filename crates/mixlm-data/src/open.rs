//! The one place a run's data description becomes a [`TokenSource`]: the synthetic
//! corpus, or prepared shards (optionally resampled by a SampleMix plan), checked
//! against the run's window length so that a short domain fails here, not mid-run.

use std::path::Path;

use crate::shards::windows_in;
use crate::{
    PlanError, ResampledSource, ShardError, ShardSource, Split, SyntheticConfig, SyntheticCorpus,
    SyntheticError, TokenSource,
};

/// What a run reads: its `[data]` section and the run's seed and window length.
#[derive(Debug, Clone, Copy)]
pub enum SourceSpec<'a> {
    /// The built-in synthetic corpus.
    Synthetic(&'a SyntheticConfig),
    /// Shards `mixlm prepare` wrote to `dir`, shuffled by `seed`; every domain's
    /// train and validation split must hold a window of `seq_len + 1` tokens. With
    /// `plan`, the documents are resampled by the SampleMix plan in that folder.
    Shards {
        dir: &'a Path,
        seed: u64,
        seq_len: usize,
        plan: Option<&'a Path>,
    },
}

/// Why a source cannot be opened; each variant is one input to fix, so the caller
/// can name the config key it came from.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Synthetic(#[from] SyntheticError),
    /// The shard folder is missing or damaged.
    #[error(transparent)]
    Shards(#[from] ShardError),
    /// A domain's split is shorter than one window of `seq_len + 1` tokens.
    #[error("{0}")]
    SeqLen(ShardError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The plan keeps some tokens of a domain, but fewer than one window.
    #[error(
        "mixing.plan keeps {kept} tokens of {domain}: fewer than one window of \
         run.seq_len + 1 = {window} tokens; raise the budget"
    )]
    PlanTooSmall {
        domain: String,
        kept: u64,
        window: usize,
    },
}

/// Builds the source `spec` describes.
pub fn open_source(spec: SourceSpec<'_>) -> Result<Box<dyn TokenSource>, OpenError> {
    let (dir, seed, seq_len, plan) = match spec {
        SourceSpec::Synthetic(config) => return Ok(Box::new(SyntheticCorpus::new(config)?)),
        SourceSpec::Shards {
            dir,
            seed,
            seq_len,
            plan,
        } => (dir, seed, seq_len, plan),
    };
    let shards = ShardSource::open(dir, seed)?;
    shards
        .check_seq_len(seq_len, &[Split::Train, Split::Validation])
        .map_err(OpenError::SeqLen)?;
    let Some(plan) = plan else {
        return Ok(Box::new(shards));
    };
    let source = ResampledSource::open(shards, plan, seed)?;
    for (domain, kept) in source.domain_names().into_iter().zip(source.kept_tokens()) {
        if kept > 0 && windows_in(kept, seq_len) == 0 {
            return Err(OpenError::PlanTooSmall {
                domain,
                kept,
                window: seq_len + 1,
            });
        }
    }
    Ok(Box::new(source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_input_fails_as_its_own_variant() {
        let synthetic = open_source(SourceSpec::Synthetic(&SyntheticConfig::default())).unwrap();
        assert!(!synthetic.domain_names().is_empty());
        let missing = Path::new("/nonexistent/shards");
        let spec = |plan| SourceSpec::Shards {
            dir: missing,
            seed: 0,
            seq_len: 8,
            plan,
        };
        for plan in [None, Some(missing)] {
            let e = open_source(spec(plan)).err().unwrap();
            assert!(matches!(e, OpenError::Shards(_)), "{e}");
            assert!(e.to_string().contains("/nonexistent/shards"), "{e}");
        }
    }
}

//! The run config: one typed struct per TOML section, validated before any work.
//!
//! Every section denies unknown keys, so a typo (`[optimizer] lr_max = ...`) is an
//! error naming the key instead of a silently ignored setting. `--set section.key=value`
//! overrides go through the same TOML path as the file ([`RunConfig::from_toml`]).

use std::path::{Path, PathBuf};

use mixlm_data::synthetic::SyntheticConfig;
use mixlm_data::{Composition, OpenError, PrepareConfig, SourceSpec, TokenSource};
use mixlm_mixing::MixingConfig;

pub use crate::distributed::shard::Shard;
use mixlm_model::{AttentionKernel, Compute, ModelConfig, Precision};
use serde::{Deserialize, Serialize};

/// The config compiled into the binary: what plain `mixlm train` runs.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/demo.toml");

/// `s` as a TOML string literal (for `--set` overrides built from paths and flags).
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A whole run, section by section as in the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub mixing: MixingConfig,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub faults: crate::faults::FaultsSection,
    #[serde(default)]
    pub distributed: DistributedSection,
}

/// `[run]`: what to train for how long, and where results go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Results go to `<out_dir>/<name>/`.
    pub name: String,
    pub out_dir: String,
    /// Seeds model init, data sampling and everything random.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Tokens per training sequence (the model predicts `seq_len` targets per sequence).
    pub seq_len: usize,
    /// `cpu`, `wgpu` or `cuda`; `--backend` overrides.
    pub backend: String,
    /// Print a progress line every N steps when the progress bar is hidden (0 = never).
    pub log_every: u64,
    /// Write TensorBoard event files (`<run>/tensorboard/`) next to `metrics.jsonl`.
    pub tensorboard: bool,
    /// Recompute activations in the backward pass instead of keeping them (trades
    /// compute for memory, so larger models or sequences fit).
    pub activation_checkpointing: ActivationCheckpointing,
    /// `f32` or `bf16`: the precision matmuls and attention compute in; parameters and
    /// optimizer state stay f32 (see [`Precision`]).
    pub precision: Precision,
    /// `fused` (the default: no `[seq, seq]` matrices kept for the backward) or `burn`
    /// (Burn's attention op; for comparison).
    pub attention: AttentionKernel,
}

/// `[run] activation_checkpointing`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationCheckpointing {
    /// Keep every activation the backward pass needs.
    #[default]
    None,
    /// Burn's balanced strategy: the outputs of memory-bound operations (elementwise
    /// ops, activations, norms' pieces) are recomputed from their checkpointed inputs
    /// in the backward pass; compute-bound ones (matmuls) are kept.
    Balanced,
}

impl RunSection {
    /// How the model computes in this run.
    pub fn compute(&self) -> Compute {
        Compute {
            precision: self.precision,
            attention: self.attention,
        }
    }

    /// Training tokens of one optimizer step.
    /// Tokens of one peer's share of a step (see [`RunConfig::tokens_per_step`]).
    pub fn tokens_per_step(&self) -> u64 {
        (self.batch_size * self.grad_accum * self.seq_len) as u64
    }
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            name: "demo".into(),
            out_dir: "runs".into(),
            seed: 0,
            steps: 100,
            batch_size: 8,
            grad_accum: 1,
            seq_len: 64,
            backend: "cpu".into(),
            log_every: 0,
            tensorboard: true,
            activation_checkpointing: ActivationCheckpointing::None,
            precision: Precision::F32,
            attention: AttentionKernel::Fused,
        }
    }
}

/// `[model]`: a preset, optionally with single fields overridden.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: String,
    pub d_model: Option<usize>,
    pub n_layers: Option<usize>,
    pub n_heads: Option<usize>,
    pub n_kv_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub d_ff: Option<usize>,
    pub vocab_size: Option<usize>,
    pub tie_embeddings: Option<bool>,
    pub parallel_residual: Option<bool>,
    pub rotary_pct: Option<f64>,
    pub init_std: Option<f64>,
    /// Start from these weights instead of a random initialisation (continued
    /// pretraining): a checkpoint folder, a run folder (its latest checkpoint), or a
    /// Hugging Face folder (`config.json` + `model.safetensors`, or the shards of a
    /// `model.safetensors.index.json`) whose model has the shape this section resolves
    /// to. A resumed run continues from its checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

impl ModelSection {
    /// The preset with this section's overrides applied.
    pub fn resolve(&self) -> Result<ModelConfig, String> {
        let mut c = ModelConfig::preset(&self.preset).ok_or_else(|| {
            format!(
                "model.preset = \"{}\" is not a preset; choose one of: {}",
                self.preset,
                mixlm_model::PRESETS.join(", ")
            )
        })?;
        // A head size d_model / n_heads that is not whole would leave dimensions unused.
        let (d_model, heads) = (
            self.d_model.unwrap_or(c.d_model),
            self.n_heads.unwrap_or(c.n_heads),
        );
        if (self.d_model.is_some() || self.n_heads.is_some())
            && self.head_dim.is_none()
            && (heads == 0 || d_model % heads != 0)
        {
            return Err(format!(
                "model.n_heads = {heads} does not divide model.d_model = {d_model}: choose a \
                 head count that does (each head gets d_model / n_heads dimensions), or give \
                 model.head_dim"
            ));
        }
        if let Some(d) = self.d_model {
            c.d_model = d;
            c.head_dim = d / self.n_heads.unwrap_or(c.n_heads).max(1);
        }
        if let Some(h) = self.n_heads {
            c.n_heads = h;
            c.head_dim = c.d_model / h.max(1);
            if self.n_kv_heads.is_none() && c.family == mixlm_model::Family::Neox {
                c.n_kv_heads = h;
            }
        }
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            n_layers,
            n_kv_heads,
            head_dim,
            d_ff,
            vocab_size,
            tie_embeddings,
            parallel_residual,
            rotary_pct,
            init_std
        );
        c.validate()?;
        Ok(c)
    }
}

/// Where the training tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// The built-in synthetic multi-domain corpus (`[data.synthetic]`).
    Synthetic,
    /// Token shards written by `mixlm prepare` (`data.path`, or `[data.prepare] output`).
    Shards,
}

/// `[data]`: the token source and how batches are composed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub source: DataSource,
    /// `sample`: each sequence's domain drawn from the proportions; `fixed`: per-batch
    /// counts apportioned exactly from the proportions; `single`: one domain per
    /// micro-batch, drawn from the proportions. A mixing method may override it for
    /// some steps (Aioli's LearnParams use `fixed`).
    #[serde(default = "default_composition")]
    pub composition: Composition,
    #[serde(default)]
    pub synthetic: SyntheticConfig,
    /// Folder of prepared shards (`source = "shards"`); defaults to `prepare.output`.
    pub path: Option<PathBuf>,
    /// How `mixlm prepare --config` builds the shards from raw jsonl / jsonl.zst.
    pub prepare: Option<PrepareConfig>,
}

impl DataSection {
    /// The shard folder a `source = "shards"` run reads.
    pub fn shard_dir(&self) -> Option<PathBuf> {
        self.path
            .clone()
            .or_else(|| self.prepare.as_ref().map(|p| p.output.clone()))
            .filter(|p| !p.as_os_str().is_empty())
    }
}

fn default_composition() -> Composition {
    Composition::Sample
}

/// `[optimizer]`: AdamW with decoupled weight decay and global-norm clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// Peak learning rate (reached at the end of warmup).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices and embeddings (not biases or norms).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub grad_clip: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            lr: 6e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// `[schedule]`: linear warmup, then cosine decay to `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    pub warmup_steps: u64,
    /// Learning rate at the end of the cosine (Pythia: 10% of the peak).
    pub min_lr: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            warmup_steps: 10,
            min_lr: 6e-5,
        }
    }
}

/// `[eval]`: periodic per-domain validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every N steps (0 = only before training and at the end).
    pub every: u64,
    /// Validation sequences per domain.
    pub sequences: usize,
    /// Sequences per evaluation forward pass.
    pub batch_size: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 0,
            sequences: 64,
            batch_size: 16,
        }
    }
}

/// `[checkpoint]`: when model and optimizer state are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Write a checkpoint every N steps (0 = only at the end).
    pub every: u64,
    /// How many of the newest checkpoints to keep on disk (0 = all).
    pub keep: usize,
    /// Write the final checkpoint at all.
    pub save_final: bool,
    /// Split the model's weights into files of at most this many MB (10^6 bytes), with
    /// `model.safetensors.index.json`, as transformers' `save_pretrained` shards large
    /// models (its default is 5 GB); 0 = always one `model.safetensors`.
    pub shard_mb: f64,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 0,
            keep: 3,
            save_final: true,
            shard_mb: 5_000.0,
        }
    }
}

/// `[distributed]`: data-parallel training over several devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedSection {
    /// Peers on this machine, one per device of `run.backend` (with `cpu`, that many
    /// ndarray replicas). Each draws its own share of every step's batch: the global
    /// batch is `devices x run.batch_size x run.grad_accum` sequences.
    pub devices: usize,
    /// Machines taking part, each running `mixlm train` with the same config and
    /// `devices`; the run has `nodes x devices` peers.
    pub nodes: usize,
    /// This machine's index, `0..nodes`; node 0's first peer writes the run's files.
    pub node_rank: usize,
    /// `HOST:PORT` of the orchestrator (`mixlm orchestrator --port PORT`) through which
    /// the nodes meet (needed with `nodes > 1`).
    pub orchestrator: String,
    /// `HOST:PORT` at which the other nodes reach this one; its collective data
    /// service listens on PORT (needed with `nodes > 1`).
    pub node_address: String,
    /// How the nodes combine their gradients (within a node, peers use a tree).
    pub all_reduce: NodeAllReduce,
    /// Seconds a peer may wait for the others in one collective operation before the
    /// run stops, naming the peer that did not arrive (checkpoints and evaluation on
    /// peer 0 happen while the others wait: keep it above their duration).
    pub timeout_s: u64,
    /// Gradients are all-reduced in buckets of about this many MiB of consecutive
    /// parameters (PyTorch DDP's default, 25): fewer, larger messages. 0: one
    /// all-reduce per parameter. The results are the same either way.
    pub bucket_mb: usize,
    /// Runs a one-device run through the data-parallel machinery anyway (gradient
    /// all-reduce, gathered losses, agreement checks), to measure what that machinery
    /// costs against the plain path; no effect with several peers.
    pub always_collective: bool,
    /// What the peers split between them (ZeRO): `none`; `optimizer` (stage 1: each
    /// keeps and updates AdamW's moments of 1/N of the parameters, and the updated
    /// parameters are gathered); `gradients` (stage 2: also only its 1/N of the
    /// averaged gradient, through a reduce-scatter). Checkpoints hold the whole
    /// state either way, so a run may change it, or its peer count, on resume.
    pub shard: Shard,
    /// How a node's peers average their gradients: `collective` (burn-collective, any
    /// backend, after the backward pass, in buckets) or `nccl` (Burn's `distributed`
    /// engine: each gradient all-reduced through NCCL as soon as the backward pass has
    /// it, overlapping communication with the rest of the backward; `run.backend =
    /// "cuda"`, one node, and a mixlm built with `--features nccl`).
    pub communication: Communication,
}

/// `distributed.communication`: who all-reduces the gradients within a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Communication {
    /// burn-collective, after the backward pass (any backend, several nodes).
    #[default]
    Collective,
    /// NCCL during the backward pass, through Burn's `distributed` feature (CUDA).
    Nccl,
}

/// `distributed.all_reduce`: burn-collective's strategies between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAllReduce {
    /// Each node sends and receives `2 (M - 1) / M` of the tensor: bandwidth-optimal
    /// for large gradients.
    Ring,
    /// A binary tree: `log2 M` hops, better for small tensors and many nodes.
    Tree,
    /// Node 0 sums everyone's and sends the result back: simplest, for 2-3 nodes.
    Centralized,
}

impl NodeAllReduce {
    pub fn strategy(self) -> burn_collective::AllReduceStrategy {
        match self {
            Self::Ring => burn_collective::AllReduceStrategy::Ring,
            Self::Tree => burn_collective::AllReduceStrategy::Tree(2),
            Self::Centralized => burn_collective::AllReduceStrategy::Centralized,
        }
    }
}

impl DistributedSection {
    /// Peers of the whole run.
    pub fn world_size(&self) -> usize {
        self.devices * self.nodes
    }

    /// Whether the peers talk through burn-collective (always, with several; with
    /// `nccl`, for everything but the gradients).
    pub fn collective(&self) -> bool {
        self.world_size() > 1 || self.always_collective || self.nccl()
    }

    /// Whether gradients are all-reduced through NCCL during the backward pass.
    pub fn nccl(&self) -> bool {
        self.communication == Communication::Nccl
    }

    /// Checks the multi-node keys (the counts are checked with the other sizes).
    pub fn validate(&self) -> Result<(), String> {
        if self.node_rank >= self.nodes {
            return Err(format!(
                "distributed.node_rank = {} must be below distributed.nodes = {}",
                self.node_rank, self.nodes
            ));
        }
        if self.nodes > 1 && self.nccl() {
            return Err(format!(
                "distributed.communication = \"nccl\" works within one node (Burn 0.21's \
                 NCCL engine is per process), but distributed.nodes = {}; use \
                 communication = \"collective\" across nodes",
                self.nodes
            ));
        }
        if self.nodes > 1 {
            for (key, value) in [
                ("orchestrator", &self.orchestrator),
                ("node_address", &self.node_address),
            ] {
                if port_of(value).is_none() {
                    return Err(format!(
                        "distributed.{key} = {value:?}: with distributed.nodes = {} it must be \
                         HOST:PORT (--{})",
                        self.nodes,
                        key.replace('_', "-")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The port of a `HOST:PORT` address.
pub fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':')?.1.parse().ok()
}

impl Default for DistributedSection {
    fn default() -> Self {
        Self {
            devices: 1,
            nodes: 1,
            node_rank: 0,
            orchestrator: String::new(),
            node_address: String::new(),
            all_reduce: NodeAllReduce::Ring,
            timeout_s: 1800,
            bucket_mb: 25,
            always_collective: false,
            shard: Shard::None,
            communication: Communication::Collective,
        }
    }
}

/// A config problem: which file or override, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("--set {0}: expected section.key=value (e.g. --set run.steps=200)")]
    BadOverride(String),
    #[error("{0}")]
    Invalid(String),
}

impl RunConfig {
    /// Tokens of one optimizer step over all peers: the global batch, in which the
    /// learning-rate schedule and token counts are expressed.
    pub fn tokens_per_step(&self) -> u64 {
        self.run.tokens_per_step() * self.distributed.world_size() as u64
    }

    /// Sequences of one optimizer step over all peers (the global batch).
    pub fn sequences_per_step(&self) -> usize {
        self.run.batch_size * self.run.grad_accum * self.distributed.world_size()
    }

    /// Parses TOML text, applies `section.key=value` overrides, and validates.
    /// `origin` names the file in error messages. Relative paths resolve against the
    /// current folder (see [`RunConfig::load`]).
    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::from_toml_in(text, origin, None, overrides)
    }

    /// [`RunConfig::from_toml`] with the text's relative [`PATH_KEYS`] resolved against
    /// `base` (the folder of the file it was read from); the overrides' and
    /// `run.out_dir` against the current folder. Every path comes out absolute, so the
    /// config a run saves works from any folder.
    fn from_toml_in(
        text: &str,
        origin: &str,
        base: Option<&Path>,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_string(),
            message: one_line(&e.to_string()),
        };
        let mut value: toml::Table = toml::from_str(text).map_err(parse_err)?;
        if let Some(base) = base {
            resolve_paths(&mut value, &PATH_KEYS, base);
        }
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cwd = std::path::absolute(".").unwrap_or_default();
        resolve_paths(&mut value, &PATH_KEYS, &cwd);
        resolve_paths(&mut value, &["run.out_dir"], &cwd);
        let config: RunConfig =
            value
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: if overrides.is_empty() {
                        origin.to_string()
                    } else {
                        format!("{origin} (with --set overrides)")
                    },
                    message: one_line(&e.to_string()),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a config file. Its relative input paths ([`PATH_KEYS`]:
    /// data, tokenizer, `model.init_from`, ...) resolve against the file's folder, so
    /// it means the same from any folder; `run.out_dir` and `--set` values resolve
    /// against the current folder (where the command writes).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = Self::read(path)?;
        let base = std::path::absolute(path.parent().unwrap_or(Path::new(""))).unwrap_or_default();
        Self::from_toml_in(&text, &path.display().to_string(), Some(&base), overrides)
    }

    /// Reads a config a run saved (`config.toml`, a checkpoint's `run.toml`): its
    /// paths are absolute since runs save them so; those of runs from before that
    /// were relative to the folder the run started in, taken to be the current one.
    pub fn load_saved(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::from_toml(&Self::read(path)?, &path.display().to_string(), overrides)
    }

    fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })
    }

    /// Replaces the `[mixing]` section with the one in `path` (a mixture a run learned,
    /// `learned_mixture.toml`, or any TOML file with a `[mixing]` section).
    pub fn with_mixing_file(mut self, path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        let parse = |message: String| ConfigError::Parse {
            origin: origin.clone(),
            message,
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| parse(one_line(&e.to_string())))?;
        let base = std::path::absolute(path.parent().unwrap_or(Path::new(""))).unwrap_or_default();
        resolve_paths(&mut table, &PATH_KEYS, &base);
        let mixing = table
            .remove("mixing")
            .ok_or_else(|| parse("has no [mixing] section".into()))?;
        self.mixing = mixing.try_into().map_err(|e: toml::de::Error| {
            parse(format!("[mixing]: {}", one_line(&e.to_string())))
        })?;
        self.validate()?;
        Ok(self)
    }

    /// The embedded default (`configs/demo.toml`).
    pub fn embedded(overrides: &[String]) -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_CONFIG, "embedded default config", overrides)
    }

    /// The tokenizer the prepared data was made with, as its manifest records it;
    /// `None` for the synthetic corpus (or data without a readable manifest).
    pub fn data_tokenizer(&self) -> Option<mixlm_data::prepare::TokenizerRecord> {
        if self.data.source != DataSource::Shards {
            return None;
        }
        let dir = self.data.shard_dir()?;
        let manifest = mixlm_data::prepare::Manifest::read(&dir).ok().flatten()?;
        Some(manifest.tokenizer)
    }

    /// Opens the token source `[data]` names (built by [`mixlm_data::open_source`]),
    /// checked to hold windows of `run.seq_len`.
    pub fn open_source(&self) -> Result<Box<dyn TokenSource>, ConfigError> {
        let invalid = ConfigError::Invalid;
        let spec = match self.data.source {
            DataSource::Synthetic => SourceSpec::Synthetic(&self.data.synthetic),
            DataSource::Shards => SourceSpec::Shards {
                dir: &self.required_shard_dir()?,
                seed: self.run.seed,
                seq_len: self.run.seq_len,
                plan: match &self.mixing {
                    MixingConfig::SampleMix(c) => Some(&c.plan),
                    _ => None,
                },
            },
        };
        mixlm_data::open_source(spec).map_err(|e| {
            invalid(match e {
                OpenError::Synthetic(e) => format!("data.synthetic: {e}"),
                OpenError::Shards(e) => format!("data.path: {e}"),
                OpenError::SeqLen(e) => format!("run.seq_len = {}: {e}", self.run.seq_len),
                OpenError::Plan(e) => format!("mixing.plan: {e}"),
                e @ OpenError::PlanTooSmall { .. } => e.to_string(),
            })
        })
    }

    /// The prepared folder of `data.source = "shards"`, which needs `data.path`.
    fn required_shard_dir(&self) -> Result<PathBuf, ConfigError> {
        self.data.shard_dir().ok_or_else(|| {
            ConfigError::Invalid(
                "data.source = \"shards\" needs data.path (the folder `mixlm prepare` wrote)"
                    .into(),
            )
        })
    }

    /// The data for evaluation: prepared shards open with the domains of any split,
    /// so a folder with validation and test splits but no train split (a held-out
    /// corpus) is evaluated too; a synthetic source as for training.
    pub fn open_eval_source(&self) -> Result<Box<dyn TokenSource>, ConfigError> {
        if self.data.source != DataSource::Shards {
            return self.open_source();
        }
        let source = mixlm_data::ShardSource::open_for_eval(self.required_shard_dir()?)
            .map_err(|e| ConfigError::Invalid(format!("data.path: {e}")))?;
        Ok(Box::new(source))
    }

    /// [`RunConfig::open_source`], and the config checked against the data: the
    /// model's vocabulary and the mixing method's domains. The checks that need the
    /// data, which [`RunConfig::validate`] (no I/O) leaves out; what a run does before
    /// anything is written.
    pub fn open_checked_source(&self) -> Result<Box<dyn TokenSource>, ConfigError> {
        let invalid = ConfigError::Invalid;
        let source = self.open_source()?;
        let model = self.model.resolve().map_err(invalid)?;
        let vocab = source.vocab_size();
        if vocab > model.vocab_size {
            return Err(invalid(format!(
                "the data's vocabulary ({vocab} ids) exceeds model vocab_size {}; set model.vocab_size (Pythia pads 50,277 to 50,304)",
                model.vocab_size
            )));
        }
        self.mixing
            .validate(&source.domain_names())
            .map_err(|e| invalid(e.to_string()))?;
        Ok(source)
    }

    /// Checks the values serde cannot: ranges and cross-field consistency. Pure (no
    /// I/O): what needs the data is checked by [`RunConfig::open_checked_source`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let r = &self.run;
        if r.name.is_empty() || r.name.contains(['/', '\\']) || r.name == ".." {
            return bad(format!(
                "run.name = {:?} must be a plain folder name",
                r.name
            ));
        }
        for (key, v) in [
            ("run.steps", r.steps as usize),
            ("run.batch_size", r.batch_size),
            ("run.grad_accum", r.grad_accum),
            ("run.seq_len", r.seq_len),
            ("eval.sequences", self.eval.sequences),
            ("eval.batch_size", self.eval.batch_size),
            ("distributed.devices", self.distributed.devices),
            ("distributed.nodes", self.distributed.nodes),
            ("distributed.timeout_s", self.distributed.timeout_s as usize),
        ] {
            if v == 0 {
                return bad(format!("{key} must be > 0"));
            }
        }
        self.distributed.validate().map_err(ConfigError::Invalid)?;
        let backend = r
            .backend
            .parse::<BackendKind>()
            .map_err(|e| ConfigError::Invalid(format!("run.backend: {e}")))?;
        if self.distributed.shard == Shard::Gradients {
            if matches!(self.mixing, MixingConfig::Doge(_)) {
                return bad(
                    "distributed.shard = \"gradients\" cannot run DoGE: DoGE aligns each \
                     domain's whole gradient with the others' (a Gram matrix over every \
                     parameter) before the step's gradient exists, so no peer may hold only \
                     its slice; use shard = \"optimizer\", which keeps the gradients whole"
                        .into(),
                );
            }
            if self.distributed.nccl() {
                return bad("distributed.shard = \"gradients\" needs communication = \
                     \"collective\": the nccl engine all-reduces whole gradients during the \
                     backward pass, where the reduce-scatter would have to happen; use \
                     shard = \"optimizer\" with nccl"
                    .into());
            }
        }
        if self.distributed.nccl() && backend != BackendKind::Cuda {
            return bad(format!(
                "distributed.communication = \"nccl\" needs run.backend = \"cuda\" (it is \"{}\"); \
                 use communication = \"collective\" on other backends",
                r.backend
            ));
        }
        if r.precision == Precision::F16 {
            return bad(
                "run.precision = \"f16\" would need loss scaling, which mixlm does not do; \
                 use \"bf16\" (or \"f32\")"
                    .into(),
            );
        }
        let model = self.model.resolve().map_err(ConfigError::Invalid)?;
        if r.seq_len > model.max_seq_len {
            return bad(format!(
                "run.seq_len = {} exceeds the model's max_seq_len {} (preset {})",
                r.seq_len, model.max_seq_len, self.model.preset
            ));
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return bad(format!("optimizer.lr = {} must be > 0", o.lr));
        }
        for (key, v) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{key} = {v} must be within [0, 1)"));
            }
        }
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !(non_negative(o.eps)
            && o.eps > 0.0
            && non_negative(o.weight_decay)
            && non_negative(o.grad_clip))
        {
            return bad("optimizer.eps must be > 0, weight_decay and grad_clip >= 0".into());
        }
        let shard_mb = self.checkpoint.shard_mb;
        if !non_negative(shard_mb) {
            return bad(format!(
                "checkpoint.shard_mb = {shard_mb} must be a size in MB >= 0 (0: one model.safetensors)"
            ));
        }
        let s = &self.schedule;
        if !(s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            return bad(format!(
                "schedule.min_lr = {} must be within [0, optimizer.lr = {}]",
                s.min_lr, o.lr
            ));
        }
        if s.warmup_steps > r.steps {
            return bad(format!(
                "schedule.warmup_steps = {} exceeds run.steps = {}",
                s.warmup_steps, r.steps
            ));
        }
        self.faults.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

/// The `[data.prepare]` section of a run config, with `key=value` overrides of it.
pub fn load_prepare_section(
    path: &Path,
    overrides: &[String],
) -> Result<PrepareConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let origin = path.display().to_string();
    let mut root: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        origin: origin.clone(),
        message: one_line(&e.to_string()),
    })?;
    let base = std::path::absolute(path.parent().unwrap_or(Path::new(""))).unwrap_or_default();
    resolve_paths(&mut root, &PATH_KEYS, &base);
    let section = root
        .remove("data")
        .and_then(|d| d.as_table().and_then(|t| t.get("prepare").cloned()))
        .and_then(|p| p.as_table().cloned())
        .ok_or_else(|| ConfigError::Invalid(format!("{origin} has no [data.prepare] section")))?;
    prepare_with_overrides(section, &origin, overrides)
}

/// A `[data.prepare]` built from defaults and `key=value` overrides alone.
pub fn prepare_from_overrides(overrides: &[String]) -> Result<PrepareConfig, ConfigError> {
    prepare_with_overrides(toml::Table::new(), "command line", overrides)
}

fn prepare_with_overrides(
    mut section: toml::Table,
    origin: &str,
    overrides: &[String],
) -> Result<PrepareConfig, ConfigError> {
    for o in overrides {
        apply_override(&mut section, &format!("prepare.{o}"))?;
        if let Some(toml::Value::Table(p)) = section.remove("prepare") {
            section.extend(p);
        }
    }
    section
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: format!("{origin} [data.prepare]"),
            message: one_line(&e.to_string()),
        })
}

/// serde/toml errors span several lines with a source excerpt; keep the gist on one.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // toml's format: "TOML parse error at line L, column C", excerpt lines, then the message.
    let location = lines.first().copied().unwrap_or_default();
    let what = lines.last().copied().unwrap_or_default();
    if lines.len() > 1 && location.starts_with("TOML parse error") {
        format!(
            "{what} ({})",
            location
                .trim_start_matches("TOML parse error ")
                .trim_end_matches(':')
        )
    } else {
        lines.join(" ")
    }
}

/// The keys of a run config that name inputs by path: relative values in a config
/// file resolve against the file's folder ([`RunConfig::load`]).
pub const PATH_KEYS: [&str; 7] = [
    "model.init_from",
    "data.path",
    "data.prepare.inputs",
    "data.prepare.tokenizer",
    "data.prepare.output",
    "mixing.reference",
    "mixing.plan",
];

/// Makes the relative paths under `keys` (dotted; a string or an array of strings,
/// globs included) absolute against `base`.
pub fn resolve_paths(root: &mut toml::Table, keys: &[&str], base: &Path) {
    let resolve = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v {
            if !s.is_empty() && Path::new(s.as_str()).is_relative() {
                *s = base.join(s.as_str()).display().to_string();
            }
        }
    };
    for key in keys {
        let parts: Vec<&str> = key.split('.').collect();
        match lookup(root, &parts) {
            Some(toml::Value::Array(items)) => items.iter_mut().for_each(resolve),
            Some(v) => resolve(v),
            None => {}
        }
    }
}

fn lookup<'a>(table: &'a mut toml::Table, parts: &[&str]) -> Option<&'a mut toml::Value> {
    let (first, rest) = parts.split_first()?;
    let value = table.get_mut(*first)?;
    match rest.is_empty() {
        true => Some(value),
        false => lookup(value.as_table_mut()?, rest),
    }
}

/// A `section.key=value` override written in a file in `base` (a comparison's
/// `set`): a relative path of a [`PATH_KEYS`] key made absolute against `base`.
pub fn resolve_override(spec: &str, base: &Path) -> String {
    let Some((key, _)) = spec.split_once('=') else {
        return spec.to_string();
    };
    let key = key.trim();
    if !PATH_KEYS.contains(&key) {
        return spec.to_string();
    }
    let mut table = toml::Table::new();
    if apply_override(&mut table, spec).is_err() {
        return spec.to_string();
    }
    resolve_paths(&mut table, &[key], base);
    let mut value = &toml::Value::Table(table);
    for part in key.split('.') {
        value = &value[part];
    }
    format!("{key}={value}")
}

/// Applies `section.key=value` (value parsed as TOML, else taken as a string).
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let (path, raw) = spec
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride(spec.to_string()))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        return Err(ConfigError::BadOverride(spec.to_string()));
    }
    let value: toml::Value = format!("v = {}", raw.trim())
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let mut table = root;
    for key in &keys[..keys.len() - 1] {
        table = table
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| ConfigError::BadOverride(format!("{spec} ({key} is not a section)")))?;
    }
    table.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// A `[mixing]` section on its own, as `mixlm train --mixing FILE` reads it.
pub fn mixing_toml(mixing: &MixingConfig) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct File<'a> {
        mixing: &'a MixingConfig,
    }
    Ok(toml::to_string_pretty(&File { mixing })?)
}

/// A compute backend mixlm can train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Burn's ndarray backend: CPU, deterministic; for tests and small runs.
    Cpu,
    /// WebGPU through wgpu (Vulkan, Metal, DX12; Mesa's lavapipe on CPU-only machines).
    Wgpu,
    /// NVIDIA CUDA through CubeCL.
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "cpu" | "ndarray" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => anyhow::bail!("unknown backend `{other}`: choose cpu, wgpu or cuda"),
        }
    }
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn compiled(self) -> bool {
        match self {
            // Burn's `distributed` feature leaves ndarray without autodiff.
            Self::Cpu => cfg!(not(feature = "nccl")),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The one-line error for a backend this binary lacks.
    pub fn check_compiled(self) -> anyhow::Result<()> {
        if self == Self::Cpu && !self.compiled() {
            anyhow::bail!(
                "backend `cpu` is not in this mixlm binary: it was built with `--features nccl`, \
                 whose Burn `distributed` feature gives ndarray no autodiff; use a build without \
                 `nccl` for the CPU"
            );
        }
        if !self.compiled() {
            anyhow::bail!(
                "backend `{0}` is not compiled into this mixlm binary; rebuild with `cargo build --release --features {0}`",
                self.name()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = RunConfig::embedded(&[]).unwrap();
        assert_eq!(c.model.preset, "tiny");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = DEFAULT_CONFIG.replace("[optimizer]", "[optimizer]\nlr_max = 1.0");
        let e = RunConfig::from_toml(&text, "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml: unknown field `lr_max`"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        let e = RunConfig::from_toml(DEFAULT_CONFIG, "x.toml", &["optimizer.lr_max=1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `lr_max`") && e.contains("--set"),
            "{e}"
        );
    }

    #[test]
    fn a_head_count_that_does_not_divide_d_model_is_refused_unless_head_dim_is_given() {
        let e = RunConfig::embedded(&["model.n_heads=6".into(), "model.d_model=64".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.n_heads = 6 does not divide model.d_model = 64")
                && e.contains("model.head_dim"),
            "{e}"
        );
        // The preset's head count (tiny: 4) against another width.
        let e = RunConfig::embedded(&["model.d_model=66".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("n_heads = 4 does not divide model.d_model = 66"),
            "{e}"
        );
        let c = RunConfig::embedded(&[
            "model.n_heads=6".into(),
            "model.d_model=64".into(),
            "model.head_dim=8".into(),
        ])
        .unwrap();
        let m = c.model.resolve().unwrap();
        assert_eq!((m.n_heads, m.head_dim, m.d_model), (6, 8, 64));
        let m = RunConfig::embedded(&["model.n_heads=8".into(), "model.d_model=64".into()])
            .unwrap()
            .model
            .resolve()
            .unwrap();
        assert_eq!((m.n_heads, m.head_dim), (8, 8));
    }

    #[test]
    fn unknown_section_is_named() {
        let text = format!("{DEFAULT_CONFIG}\n[optimiser]\nlr = 1.0\n");
        let e = RunConfig::from_toml(&text, "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `optimiser`"), "{e}");
    }

    #[test]
    fn overrides_replace_values() {
        let c = RunConfig::embedded(&["run.steps=70".into(), "run.name=other".into()]).unwrap();
        assert_eq!(c.run.steps, 70);
        assert_eq!(c.run.name, "other");
        let e = RunConfig::embedded(&["run.steps".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--set run.steps: expected section.key=value (e.g. --set run.steps=200)"
        );
    }

    #[test]
    fn out_of_range_values_are_rejected_with_their_key() {
        let cases = [
            ("optimizer.lr=-1.0", "optimizer.lr = -1 must be > 0"),
            (
                "optimizer.beta2=1.5",
                "optimizer.beta2 = 1.5 must be within [0, 1)",
            ),
            ("run.batch_size=0", "run.batch_size must be > 0"),
            (
                "model.preset=\"pythia-7b\"",
                "model.preset = \"pythia-7b\" is not a preset",
            ),
            (
                "run.seq_len=100000",
                "run.seq_len = 100000 exceeds the model's max_seq_len",
            ),
        ];
        for (o, expected) in cases {
            let e = RunConfig::embedded(&[o.into()]).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{o}: {e}");
        }
    }

    #[test]
    fn nccl_communication_needs_cuda_and_one_node() {
        let nccl = "distributed.communication=\"nccl\"".to_string();
        let e = RunConfig::embedded(std::slice::from_ref(&nccl))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "distributed.communication = \"nccl\" needs run.backend = \"cuda\" (it is \"cpu\")"
            ),
            "{e}"
        );
        let cuda = "run.backend=\"cuda\"".to_string();
        let c = RunConfig::embedded(&[nccl.clone(), cuda.clone()]).unwrap();
        assert!(c.distributed.nccl() && c.distributed.collective());
        let e = RunConfig::embedded(&[
            nccl,
            cuda,
            "distributed.nodes=2".into(),
            "distributed.orchestrator=\"h:1\"".into(),
            "distributed.node_address=\"h:2\"".into(),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("distributed.communication = \"nccl\" works within one node")
                && e.ends_with("use communication = \"collective\" across nodes"),
            "{e}"
        );
        let e = RunConfig::embedded(&["distributed.communication=\"gloo\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `gloo`") && e.contains("collective") && e.contains("nccl"),
            "{e}"
        );
    }

    #[test]
    fn shard_source_needs_a_prepared_folder() {
        // Validation reads nothing; opening the source checks the data.
        let missing = [
            "data.source=\"shards\"".to_string(),
            "data.path=\"/nonexistent/shards\"".into(),
        ];
        RunConfig::embedded(&missing).unwrap();
        let e = RunConfig::embedded(&["data.source=\"shards\"".into()])
            .and_then(|c| c.open_checked_source())
            .map(drop)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("data.source = \"shards\" needs data.path"),
            "{e}"
        );
        let e = RunConfig::embedded(&[
            "data.source=\"shards\"".into(),
            "data.path=\"/nonexistent/shards\"".into(),
        ])
        .and_then(|c| c.open_checked_source())
        .map(drop)
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("data.path: ") && e.contains("/nonexistent/shards"),
            "{e}"
        );
    }

    /// ZeRO-2 is refused, with the reason, where the gradients must stay whole.
    #[test]
    fn gradient_sharding_is_refused_with_doge_and_nccl() {
        let refuse = |extra: &str| {
            RunConfig::embedded(&["distributed.shard=\"gradients\"".into(), extra.into()])
                .unwrap_err()
                .to_string()
        };
        let e = refuse("mixing.method=\"doge\"");
        assert!(
            e.contains("cannot run DoGE") && e.contains("shard = \"optimizer\""),
            "{e}"
        );
        let e = refuse("distributed.communication=\"nccl\"");
        assert!(e.contains("needs communication = \"collective\""), "{e}");
        for ok in ["mixing.method=\"odm\"", "distributed.shard=\"optimizer\""] {
            RunConfig::embedded(&["distributed.shard=\"gradients\"".into(), ok.into()]).unwrap();
        }
        RunConfig::embedded(&[
            "distributed.shard=\"optimizer\"".into(),
            "mixing.method=\"doge\"".into(),
        ])
        .unwrap();
    }

    #[test]
    fn mixing_method_is_checked() {
        let e = RunConfig::embedded(&["mixing.method=\"odmx\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("odmx"), "{e}");
    }
}

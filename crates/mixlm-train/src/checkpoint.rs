//! Checkpoints: `runs/<name>/checkpoints/step-NNNNNNNN/` with
//! - `model.safetensors` + `config.json`: Hugging Face names and config, so the folder
//!   opens with `AutoModelForCausalLM.from_pretrained`;
//! - `optimizer.safetensors`: AdamW moments by parameter path (`<path>.m`, `<path>.v`);
//! - `state.json`: step and token counters, sampler cursors, scheduler state;
//! - `run.toml`: the mixlm config the run was started with;
//! - `manifest.json`: the size and SHA-256 of every file above, written last.
//!
//! A checkpoint is written into a `.tmp` folder, every file fsynced, then renamed into
//! place, and only then is `checkpoints/latest` (the name of the newest folder)
//! replaced atomically: a crash leaves either the old or the new checkpoint, never a
//! half-written one that looks complete. Loading checks the manifest, so a checkpoint
//! truncated or corrupted later (a bad disk, a partial copy) is named and skipped:
//! [`find_resumable`] falls back to the newest one that verifies.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use mixlm_data::SamplerState;
use mixlm_mixing::Scheduler;
pub use mixlm_model::hf::SHARD_INDEX;
use mixlm_model::hf::{config_from_hf, hf_config, load_safetensor_shards, to_safetensor_files};
use mixlm_model::{ModelConfig, Transformer};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::optim::{AdamW, HostMoments, Moments};

/// The files of a checkpoint folder besides the model's weights (`model.safetensors`,
/// or its shards and their index: [`to_safetensor_files`]), in the order they are
/// written after them.
pub const CHECKPOINT_FILES: [&str; 4] = [
    "config.json",
    "optimizer.safetensors",
    "state.json",
    "run.toml",
];

/// Bytes of weights per `model.safetensors` file: `checkpoint.shard_mb` MB, or no limit
/// when it is 0.
pub fn max_shard_bytes(shard_mb: f64) -> u64 {
    if shard_mb > 0.0 {
        (shard_mb * 1e6) as u64
    } else {
        u64::MAX
    }
}

/// Counters and states that are not tensors: with the weights and AdamW moments,
/// everything the next step depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens: u64,
    /// AdamW's bias-correction `t`.
    pub optimizer_steps: u64,
    /// The data sampler after the last batch consumed (cursors and RNG position).
    pub sampler: SamplerState,
    pub scheduler_name: String,
    /// [`Scheduler::state`]: everything the mixing method has learned so far.
    pub scheduler: serde_json::Value,
    /// Per-domain validation loss before training, for the final report of a resumed run.
    #[serde(default)]
    pub initial_val: Vec<Option<f64>>,
    /// Mean training loss of the last step.
    #[serde(default)]
    pub last_loss: Option<f64>,
    /// Wall-clock seconds of training so far, so a resumed run's elapsed time continues.
    #[serde(default)]
    pub elapsed_s: f64,
    /// Learning-rate factor from `faults.on_nan = "rollback"`.
    #[serde(default = "one")]
    pub lr_scale: f64,
    /// Steps whose update was skipped (`faults.on_nan = "skip"`).
    #[serde(default)]
    pub skipped_steps: u64,
    /// The loss-spike detector's window.
    #[serde(default)]
    pub spikes: Option<crate::faults::SpikeDetector>,
    /// Data-parallel peers of the run (1 on one device); a resume must use as many.
    #[serde(default = "one_peer")]
    pub world_size: usize,
    /// The tokenizer the training data was made with (prepared shards; `None` for the
    /// synthetic corpus): an evaluation on tokens of another is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<mixlm_data::prepare::TokenizerRecord>,
}

fn one_peer() -> usize {
    1
}

fn one() -> f64 {
    1.0
}

impl TrainState {
    pub fn new<B: Backend>(
        step: u64,
        tokens: u64,
        optimizer: &AdamW<B>,
        sampler: &mixlm_data::SamplerState,
        scheduler: &dyn Scheduler,
    ) -> Self {
        Self {
            step,
            tokens,
            optimizer_steps: optimizer.steps,
            sampler: sampler.clone(),
            scheduler_name: scheduler.name().to_string(),
            scheduler: scheduler.state(),
            initial_val: Vec::new(),
            last_loss: None,
            elapsed_s: 0.0,
            lr_scale: 1.0,
            skipped_steps: 0,
            spikes: None,
            world_size: 1,
            tokenizer: None,
        }
    }
}

/// `manifest.json`: what a complete checkpoint folder holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version of the checkpoint folder.
    pub format: u32,
    pub step: u64,
    pub files: BTreeMap<String, FileDigest>,
}

/// Size and SHA-256 (hex) of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

impl FileDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.len() as u64,
            sha256: mixlm_data::prepare::tokenize::sha256_hex(bytes),
        }
    }
}

/// The current checkpoint layout.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!("{file_name}.tmp"));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        bail!(
            "cannot write {}: {e}; the previous version (if any) is untouched",
            path.display()
        );
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {} (disk full?)", path.display()))
}

/// Serialises AdamW's whole moments (`<path>.m`, `<path>.v`) as f32 safetensors.
fn optimizer_safetensors(moments: &HostMoments) -> Result<Vec<u8>> {
    let mut buffers: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (key, m, v) in moments {
        for (suffix, values) in [("m", m), ("v", v)] {
            let n = values.len();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            buffers.push((format!("{key}.{suffix}"), bytes, n));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(name, b, n)| Ok((name.clone(), TensorView::new(Dtype::F32, vec![*n], b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Draws `config`'s initial weights on the CPU backend from `seed` and writes them as a
/// model folder ([`write_model_folder`]): the same weights for a run on any backend
/// (`model.init_from`), where each backend would draw other numbers from one seed.
/// Not generic, so the crates that call it do not compile the model's initialisation
/// again (see [`crate::engine`]).
pub fn write_cpu_initial_weights(dir: &Path, config: &ModelConfig, seed: u64) -> Result<()> {
    use burn::backend::NdArray;
    let device = Default::default();
    NdArray::<f32>::seed(&device, seed);
    write_model_folder(dir, &config.init::<NdArray<f32>>(&device), config, 0.0)
}

/// Writes `model.safetensors` + `config.json` (each atomically) into `dir`: a folder
/// `model.init_from`, `mixlm eval` and transformers' `from_pretrained` read.
pub fn write_model_folder<B: Backend>(
    dir: &Path,
    model: &Transformer<B>,
    config: &ModelConfig,
    shard_mb: f64,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in to_safetensor_files(model, config, max_shard_bytes(shard_mb))? {
        write_atomic(&dir.join(name), &bytes)?;
    }
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&hf_config(config))?.as_bytes(),
    )
}

/// Writes a complete checkpoint for `state.step` and points `latest` at it.
pub fn write_checkpoint<B: burn::tensor::backend::AutodiffBackend>(
    run_dir: &Path,
    model: &Transformer<B>,
    model_config: &ModelConfig,
    moments: &HostMoments,
    state: &TrainState,
    run_config: &RunConfig,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = checkpoint_dir(run_dir, state.step);
    let name = final_dir
        .file_name()
        .expect("a step folder")
        .to_string_lossy()
        .into_owned();
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let write_all = || -> Result<()> {
        let shard = max_shard_bytes(run_config.checkpoint.shard_mb);
        let mut files = to_safetensor_files(model, model_config, shard)?;
        let others: [Vec<u8>; 4] = [
            serde_json::to_string_pretty(&hf_config(model_config))?.into_bytes(),
            optimizer_safetensors(moments)?,
            serde_json::to_string_pretty(state)?.into_bytes(),
            toml::to_string_pretty(run_config)?.into_bytes(),
        ];
        files.extend(CHECKPOINT_FILES.iter().map(|f| f.to_string()).zip(others));
        let mut manifest = Manifest {
            format: CHECKPOINT_FORMAT,
            step: state.step,
            files: BTreeMap::new(),
        };
        for (file, bytes) in &files {
            if file == "optimizer.safetensors" {
                crate::chaos::pause_at("checkpoint-files");
            }
            write_file(&tmp.join(file), bytes)?;
            manifest.files.insert(file.clone(), FileDigest::of(bytes));
        }
        write_file(
            &tmp.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )
    };
    if let Err(e) = write_all() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "checkpoint at step {} not written; the earlier checkpoints in {} are intact",
            state.step,
            root.display()
        )));
    }
    sync_dir(&tmp);
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir)?;
    }
    fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    sync_dir(&root);
    crate::chaos::pause_at("checkpoint-renamed");
    write_atomic(&root.join("latest"), name.as_bytes())?;
    crate::chaos::pause_at("checkpoint-latest");
    if run_config.checkpoint.keep > 0 {
        prune(&root, run_config.checkpoint.keep)?;
    }
    Ok(final_dir)
}

/// Makes a rename inside `dir` durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The `step-NNNNNNNN` folders under `checkpoints/`, newest first.
pub fn checkpoint_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => bail!("cannot list {}: {e}", root.display()),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", root.display()))?;
        let Some(step) = checkpoint_step(&entry.path()) else {
            continue; // `latest`, `*.tmp` leftovers of a crash
        };
        if entry.path().is_dir() {
            found.push((step, entry.path()));
        }
    }
    found.sort_by_key(|d| std::cmp::Reverse(d.0));
    Ok(found)
}

/// The folder of `run_dir`'s checkpoint at `step`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// The step a checkpoint folder (`step-NNNNNNNN`) was written at.
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

/// Deletes all but the newest `keep` checkpoints, and leftovers of interrupted writes.
fn prune(root: &Path, keep: usize) -> Result<()> {
    for (_, dir) in checkpoint_dirs(root)?.into_iter().skip(keep) {
        fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot delete old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Checks a checkpoint folder against its manifest: every file present, of the
/// recorded size and SHA-256. The error names the first file that is not.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = fs::read(&path).with_context(|| {
        format!(
            "{} is missing: the checkpoint was not completely written",
            path.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a valid manifest", path.display()))?;
    if manifest.format != CHECKPOINT_FORMAT {
        bail!(
            "{}: checkpoint format {} (this mixlm reads {CHECKPOINT_FORMAT})",
            path.display(),
            manifest.format
        );
    }
    let weights = ["model.safetensors", SHARD_INDEX];
    if !weights.iter().any(|w| manifest.files.contains_key(*w)) {
        bail!(
            "{} lists no model weights ({})",
            path.display(),
            weights.join(" or ")
        );
    }
    for file in CHECKPOINT_FILES {
        if !manifest.files.contains_key(file) {
            bail!("{} does not list {file}", path.display());
        }
    }
    for (file, want) in &manifest.files {
        let file_path = dir.join(file);
        let size = fs::metadata(&file_path)
            .with_context(|| format!("cannot read {}", file_path.display()))?
            .len();
        if size != want.bytes {
            bail!(
                "{} has {size} bytes, the manifest says {} (truncated?)",
                file_path.display(),
                want.bytes
            );
        }
        let (_, sha256) = mixlm_data::prepare::tokenize::sha256_file(&file_path)
            .with_context(|| format!("cannot read {}", file_path.display()))?;
        if sha256 != want.sha256 {
            bail!(
                "{} does not match its SHA-256 in the manifest (corrupted)",
                file_path.display()
            );
        }
    }
    Ok(manifest)
}

/// The checkpoint a run resumes from: the one `latest` names if it verifies, else the
/// newest one that does. Each checkpoint skipped is reported in the returned notes.
pub fn find_resumable(run_dir: &Path) -> Result<(PathBuf, Vec<String>)> {
    let root = run_dir.join("checkpoints");
    let mut candidates = checkpoint_dirs(&root)?;
    if candidates.is_empty() {
        bail!(
            "{} has no checkpoint to resume or evaluate (set [checkpoint] every = N to write \
             them during a run)",
            run_dir.display()
        );
    }
    if let Ok(name) = fs::read_to_string(root.join("latest")) {
        if let Some(i) = candidates
            .iter()
            .position(|(_, d)| d.ends_with(name.trim()))
        {
            let named = candidates.remove(i);
            candidates.insert(0, named);
        }
    }
    let mut notes = Vec::new();
    for (_, dir) in &candidates {
        match verify(dir) {
            Ok(_) => return Ok((dir.clone(), notes)),
            Err(e) => notes.push(format!("skipping checkpoint {}: {e:#}", dir.display())),
        }
    }
    bail!(
        "no valid checkpoint in {}:\n  {}",
        root.display(),
        notes.join("\n  ")
    )
}

/// A checkpoint read back for resuming, on the training backend.
pub struct Restored<B: burn::tensor::backend::AutodiffBackend> {
    pub dir: PathBuf,
    pub model: Transformer<B>,
    pub model_config: ModelConfig,
    /// AdamW's moments by parameter path: whole, or the slices a sharded peer owns
    /// ([`load_verified_sliced`]).
    pub moments: HashMap<String, Moments<B::InnerBackend>>,
    pub state: TrainState,
    pub run_config: RunConfig,
}

/// Verifies a checkpoint folder against its manifest, then loads it: weights, AdamW
/// moments, counters and config.
pub fn load_checkpoint<B: burn::tensor::backend::AutodiffBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<Restored<B>> {
    verify(dir)?;
    load_verified(dir, device)
}

/// [`load_checkpoint`] of a folder already verified (by [`latest_checkpoint`]).
pub fn load_verified<B: burn::tensor::backend::AutodiffBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<Restored<B>> {
    load_verified_sliced(dir, device, |_| None)
}

/// The part of each parameter's moments to load, by path (a sharded peer's slices);
/// `None`: all of them.
pub type MomentSlices = Option<HashMap<String, std::ops::Range<usize>>>;

/// [`load_verified`] keeping only the moments `slices` names for the loaded model:
/// the file is memory-mapped and only those bytes are read, so a sharded peer never
/// holds the whole optimizer state, whatever the peer count that wrote it.
pub fn load_verified_sliced<B: burn::tensor::backend::AutodiffBackend>(
    dir: &Path,
    device: &B::Device,
    slices: impl FnOnce(&Transformer<B>) -> MomentSlices,
) -> Result<Restored<B>> {
    let (model, model_config) = load_model::<B>(dir, device)?;
    let slices = slices(&model);
    let path = dir.join("optimizer.safetensors");
    let file = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
    // SAFETY: a verified checkpoint folder is written once and never modified in place.
    let bytes = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot read {}", path.display()))?;
    let moments = optimizer_from_safetensors::<B::InnerBackend>(&bytes, device, slices.as_ref())
        .with_context(|| format!("cannot load {}", path.display()))?;
    let path = dir.join("state.json");
    let state: TrainState = serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a valid training state", path.display()))?;
    let path = dir.join("run.toml");
    let run_config = RunConfig::load_saved(&path, &[])?;
    Ok(Restored {
        dir: dir.to_path_buf(),
        model,
        model_config,
        moments,
        state,
        run_config,
    })
}

/// Reads the moments [`optimizer_safetensors`] wrote (`<path>.m`, `<path>.v`): all,
/// or only the `slices` of the parameters they name.
fn optimizer_from_safetensors<B: Backend>(
    bytes: &[u8],
    device: &B::Device,
    slices: Option<&HashMap<String, std::ops::Range<usize>>>,
) -> Result<HashMap<String, Moments<B>>> {
    let st = SafeTensors::deserialize(bytes)?;
    let read = |name: &str, range: Option<&std::ops::Range<usize>>| -> Result<Tensor<B, 1>> {
        let view = st.tensor(name)?;
        if view.dtype() != Dtype::F32 || view.shape().len() != 1 {
            bail!("{name}: expected a 1-d f32 tensor");
        }
        let n = view.shape()[0];
        let range = range.cloned().unwrap_or(0..n);
        if range.end > n {
            bail!(
                "{name}: {n} values, but this peer's slice is {range:?}: the checkpoint's \
                 optimizer state does not match its model"
            );
        }
        let values: Vec<f32> = view.data()[range.start * 4..range.end * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n = values.len();
        Ok(Tensor::from_data(TensorData::new(values, [n]), device))
    };
    let mut moments = HashMap::new();
    for name in st.names() {
        let Some(key) = name.strip_suffix(".m") else {
            continue;
        };
        let range = match slices {
            None => None,
            Some(slices) => match slices.get(key) {
                Some(range) => Some(range),
                None => continue,
            },
        };
        let m = read(name, range)?;
        let v = read(&format!("{key}.v"), range)?;
        if m.dims() != v.dims() {
            bail!("{key}: first and second moments differ in size");
        }
        moments.insert(key.to_string(), Moments { m, v });
    }
    Ok(moments)
}

/// The newest valid checkpoint of a run (what evaluation and DoReMi's reference load):
/// the one `checkpoints/latest` names if it verifies, else the newest one that does,
/// with a warning for each one skipped.
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf> {
    let (dir, notes) = find_resumable(run_dir)?;
    for note in notes {
        eprintln!("warning: {note}");
    }
    Ok(dir)
}

/// Loads the model of a checkpoint folder (or any folder with HF `config.json` and
/// `model.safetensors`).
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Transformer<B>, ModelConfig)> {
    let config_path = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let config =
        config_from_hf(&config).with_context(|| format!("in {}", config_path.display()))?;
    let files = weight_files(dir)?;
    let maps = files
        .iter()
        .map(|path| {
            let file =
                fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
            // Read-only and private: the file is not changed while the model loads.
            unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot read {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes: Vec<&[u8]> = maps.iter().map(|m| &m[..]).collect();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let model = load_safetensor_shards(&bytes, &config, device)
        .with_context(|| format!("cannot load {}", names.join(", ")))?;
    Ok((model, config))
}

/// The weight files of a model folder: `model.safetensors`, or the shards its
/// `model.safetensors.index.json` maps tensors to (as transformers' `save_pretrained`
/// writes models above its shard size).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(SHARD_INDEX);
    if !index.is_file() {
        return Ok(vec![dir.join("model.safetensors")]);
    }
    let text =
        fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let Some(map) = parsed.get("weight_map").and_then(|m| m.as_object()) else {
        bail!(
            "{} has no `weight_map` object (tensor name -> shard file)",
            index.display()
        );
    };
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut files = Vec::new();
    for shard in shards {
        let path = dir.join(shard);
        if Path::new(shard).components().count() != 1 || !path.is_file() {
            bail!(
                "{} maps tensors to `{shard}`, which is not a file in {}",
                index.display(),
                dir.display()
            );
        }
        files.push(path);
    }
    Ok(files)
}

/// Whether `dir` holds a model's weights (one file or an index of shards).
pub fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join(SHARD_INDEX).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latest");
        write_atomic(&p, b"step-00000001").unwrap();
        write_atomic(&p, b"step-2").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "step-2");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn failed_write_keeps_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latest");
        write_atomic(&p, b"good").unwrap();
        // A directory where the temp file must go makes the write fail.
        fs::create_dir(dir.path().join("latest.tmp")).unwrap();
        let e = write_atomic(&p, b"bad").unwrap_err().to_string();
        assert!(
            e.contains("the previous version (if any) is untouched"),
            "{e}"
        );
        assert_eq!(fs::read_to_string(&p).unwrap(), "good");
    }
}

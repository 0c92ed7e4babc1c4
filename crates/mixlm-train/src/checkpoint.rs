//! Checkpoints: `runs/<name>/checkpoints/step-NNNNNNNN/` with
//! - `model.safetensors` + `config.json`: Hugging Face names and config, so the folder
//!   opens with `AutoModelForCausalLM.from_pretrained`;
//! - `optimizer.safetensors`: AdamW moments by parameter path (`<path>.m`, `<path>.v`);
//! - `state.json`: step and token counters, sampler cursors, scheduler state;
//! - `run.toml`: the mixlm config the run was started with.
//!
//! A checkpoint is written into a `.tmp` folder, every file fsynced, then renamed into
//! place, and only then is `checkpoints/latest` (the name of the newest folder)
//! replaced atomically: a crash leaves either the old or the new checkpoint, never a
//! half-written one that looks complete.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use mixlm_data::SamplerState;
use mixlm_mixing::Scheduler;
use mixlm_model::hf::{config_from_hf, hf_config, load_safetensors, to_safetensors};
use mixlm_model::{ModelConfig, Transformer};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::optim::AdamW;

/// Counters and states that are not tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub tokens: u64,
    pub optimizer_steps: u64,
    pub sampler: SamplerState,
    pub scheduler_name: String,
    pub scheduler: serde_json::Value,
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
        }
    }
}

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

/// Serialises AdamW moments as f32 safetensors.
fn optimizer_safetensors<B: Backend>(optimizer: &AdamW<B>) -> Result<Vec<u8>> {
    let mut buffers: Vec<(String, Vec<u8>, usize)> = Vec::new();
    let mut keys: Vec<&String> = optimizer.moments.keys().collect();
    keys.sort();
    for key in keys {
        let moments = &optimizer.moments[key];
        for (suffix, t) in [("m", &moments.m), ("v", &moments.v)] {
            let values: Vec<f32> = t
                .clone()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32");
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

/// Writes a complete checkpoint for `state.step` and points `latest` at it.
pub fn write_checkpoint<B: burn::tensor::backend::AutodiffBackend>(
    run_dir: &Path,
    model: &Transformer<B>,
    model_config: &ModelConfig,
    optimizer: &AdamW<B::InnerBackend>,
    state: &TrainState,
    run_config: &RunConfig,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = format!("step-{:08}", state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let model_bytes = to_safetensors(model, model_config)?;
    write_file(&tmp.join("model.safetensors"), &model_bytes)?;
    write_file(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&hf_config(model_config))?.as_bytes(),
    )?;
    write_file(
        &tmp.join("optimizer.safetensors"),
        &optimizer_safetensors(optimizer)?,
    )?;
    write_file(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    write_file(
        &tmp.join("run.toml"),
        toml::to_string_pretty(run_config)?.as_bytes(),
    )?;
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir)?;
    }
    fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(final_dir)
}

/// The checkpoint folder `checkpoints/latest` points at.
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    let latest = root.join("latest");
    let name = fs::read_to_string(&latest).with_context(|| {
        format!(
            "no checkpoint in {} (missing {})",
            run_dir.display(),
            latest.display()
        )
    })?;
    Ok(root.join(name.trim()))
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
    let weights_path = dir.join("model.safetensors");
    let bytes = fs::read(&weights_path)
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    let model = load_safetensors(&bytes, &config, device)
        .with_context(|| format!("cannot load {}", weights_path.display()))?;
    Ok((model, config))
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

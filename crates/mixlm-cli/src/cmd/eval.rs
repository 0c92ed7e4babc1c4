//! `mixlm eval`: per-domain perplexity of a checkpoint on its splits, held-out sets
//! and downstream tasks.

use std::path::PathBuf;

use anyhow::Result;
use mixlm_train::config::toml_string;
use mixlm_train::RunConfig;

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint folder, a run folder (its latest checkpoint), or a folder with
    /// Hugging Face config.json + model.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Run config naming the data (default: the run.toml saved with the
    /// checkpoint, else the embedded demo config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// A folder of prepared shards to evaluate on (instead of the config's data).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Splits to evaluate, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "validation,test")]
    pub splits: Vec<String>,
    /// Inputs per window (default: the config's run.seq_len).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Tokens between window starts; smaller than --seq-len gives sliding-window
    /// perplexity (default: --seq-len, disjoint windows).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Compute precision: f32, or bf16 on a GPU that has it (the weights stay
    /// as stored; f32 whatever the run trained in, unless given).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Windows per forward pass (default: the config's eval.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Only the first N tokens of each domain's split (default: all of a prepared
    /// split; eval.sequences windows of a synthetic one).
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Where eval.json and eval.md go (default: the checkpoint folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A downstream task file (jsonl: context/choices/gold, PIQA, HellaSwag, ARC,
    /// OpenBookQA, WinoGrande or LAMBADA layouts); repeatable.
    #[arg(long = "task", value_name = "FILE")]
    pub tasks: Vec<PathBuf>,
    /// A held-out set: jsonl / jsonl.zst / parquet file, folder or glob, scored per
    /// domain (records without the domain key count as one domain named after the
    /// file); tokenized once into <out>/heldout/<name>/. Repeatable.
    #[arg(long = "heldout", value_name = "PATH")]
    pub heldout: Vec<String>,
    /// tokenizer.json for task texts and held-out sets (default: the prepared data's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Score data or texts tokenized with another tokenizer than the model was
    /// trained on (refused otherwise: the same ids are other words).
    #[arg(long)]
    pub allow_tokenizer_mismatch: bool,
    /// cpu, wgpu or cuda (overrides run.backend).
    #[arg(long)]
    pub backend: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        checkpoint,
        config,
        mut overrides,
        data,
        splits,
        seq_len,
        stride,
        batch_size,
        max_tokens,
        out,
        tasks,
        heldout,
        tokenizer,
        allow_tokenizer_mismatch,
        backend,
        precision,
    } = args;
    use mixlm_inspect::evaluate::{
        checkpoint_run_config, default_max_tokens, evaluate_on, resolve_checkpoint, EvalOptions,
    };
    if let Some(b) = backend {
        overrides.push(format!("run.backend={}", toml_string(&b)));
    }
    // Before the --set overrides, which win.
    overrides.insert(0, format!("run.precision={}", toml_string(&precision)));
    if let Some(dir) = data {
        overrides.push("data.source=\"shards\"".into());
        overrides.push(format!(
            "data.path={}",
            toml_string(&dir.display().to_string())
        ));
    }
    let checkpoint = resolve_checkpoint(&checkpoint)?;
    let config = match &config {
        Some(path) => RunConfig::load(path, &overrides)?,
        None => match checkpoint_run_config(&checkpoint, &overrides)? {
            Some(c) => c,
            None => RunConfig::embedded(&overrides)?,
        },
    };
    let kind = crate::backend(&config.run.backend)?;
    let splits = splits
        .iter()
        .map(|s| s.parse::<mixlm_data::Split>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let seq_len = seq_len.unwrap_or(config.run.seq_len);
    let stride = stride.unwrap_or(seq_len);
    if stride == 0 || stride > seq_len {
        anyhow::bail!("--stride must be in 1..={seq_len} (--seq-len)");
    }
    let max_tokens = max_tokens.or_else(|| default_max_tokens(&config, seq_len));
    let options = EvalOptions {
        out: out.unwrap_or_else(|| checkpoint.clone()),
        checkpoint,
        splits,
        tasks,
        heldout,
        tokenizer,
        allow_tokenizer_mismatch,
        perplexity: mixlm_eval::perplexity::PerplexityOptions {
            seq_len,
            stride,
            batch_size: batch_size.unwrap_or(config.eval.batch_size),
            max_tokens,
        },
    };
    let report = evaluate_on(kind, &config, &options)?;
    println!(
        "{}{}{}",
        report.table(false),
        report.heldout_table(false),
        report.tasks_table(false)
    );
    println!(
        "written: {} and eval.md",
        options.out.join("eval.json").display()
    );
    Ok(())
}

//! `mixlm score`: SampleMix steps 1 and 2, quality and diversity per document.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
/// Options shared by the scoring commands.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The prepared corpus (the folder `mixlm prepare` wrote).
    #[arg(long)]
    data: PathBuf,
    /// The plan folder (default: <data>/samplemix).
    #[arg(long)]
    plan: Option<PathBuf>,
    /// A mixlm checkpoint (or run folder) for model-based scoring.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Tokens of each document a model or embedding looks at (its first ones).
    #[arg(long, default_value_t = 2048)]
    max_doc_tokens: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
pub enum ScoreCommand {
    /// Quality on 0..10 per document: Gopher/C4 text rules (`heuristic`, model-free),
    /// a reference model's NLL percentile (`model`, needs --checkpoint), or scores the
    /// records carry (`field`: captured by [data.prepare] quality_keys).
    Quality {
        #[command(flatten)]
        args: ScoreArgs,
        #[arg(long, default_value = "heuristic")]
        scorer: String,
    },
    /// Diversity on 0..1 per document from k-means clusters of embeddings: hashed
    /// n-gram TF-IDF (`tfidf`, model-free) or mean-pooled hidden states (`model`).
    Diversity {
        #[command(flatten)]
        args: ScoreArgs,
        #[arg(long, default_value = "tfidf")]
        embed: String,
        /// TF-IDF dimensions.
        #[arg(long, default_value_t = 1024)]
        dim: usize,
        /// Clusters.
        #[arg(long, default_value_t = 64)]
        k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Documents k-means is fitted on (a seeded sample); the rest are assigned to
        /// its centroids in chunks, so memory stays flat on large corpora.
        #[arg(long, default_value_t = 200_000)]
        fit_documents: usize,
    },
}

impl ScoreArgs {
    fn options(&self) -> Result<mixlm_experiments::samplemix::ScoreOptions> {
        Ok(mixlm_experiments::samplemix::ScoreOptions {
            plan: self
                .plan
                .clone()
                .unwrap_or_else(|| mixlm_experiments::samplemix::default_plan(&self.data)),
            data: self.data.clone(),
            max_doc_tokens: self.max_doc_tokens,
            batch_size: self.batch_size,
            backend: self.backend.parse()?,
            quiet: self.quiet,
        })
    }

    fn checkpoint(&self, what: &str) -> Result<PathBuf> {
        let path = self.checkpoint.as_ref().ok_or_else(|| {
            anyhow::anyhow!("{what} needs --checkpoint (a mixlm checkpoint or run folder)")
        })?;
        mixlm_inspect::evaluate::resolve_checkpoint(path)
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: ScoreCommand,
}

pub fn run(args: Args) -> Result<()> {
    let Args { what } = args;
    use mixlm_experiments::samplemix::{
        score_diversity, score_quality, DiversityOptions, Embedder, QualityScorer,
    };
    match what {
        ScoreCommand::Quality { args, scorer } => {
            let scorer = match scorer.as_str() {
                "field" => QualityScorer::Field,
                "heuristic" => QualityScorer::Heuristic,
                "model" => QualityScorer::Model {
                    checkpoint: args.checkpoint("--scorer model")?,
                },
                other => anyhow::bail!("--scorer {other}: use heuristic, model or field"),
            };
            let options = args.options()?;
            let means = score_quality(&options, &scorer)?;
            println!("mean quality (0..10) per domain:");
            for (d, m) in &means {
                println!("  {d:<24} {m:.2}");
            }
            println!("written: {}", options.plan.join("quality").display());
        }
        ScoreCommand::Diversity {
            args,
            embed,
            dim,
            k,
            seed,
            fit_documents,
        } => {
            let embedder = match embed.as_str() {
                "tfidf" => Embedder::TfIdf { dim },
                "model" => Embedder::Model {
                    checkpoint: args.checkpoint("--embed model")?,
                },
                other => anyhow::bail!("--embed {other}: use tfidf or model"),
            };
            let options = args.options()?;
            let diversity = DiversityOptions {
                embedder,
                k,
                seed,
                fit_documents,
            };
            let report = score_diversity(&options, &diversity)?;
            println!(
                "{} clusters fitted on {} documents in {} iterations; sizes {:?}\n",
                report.k, report.fit_documents, report.iterations, report.sizes
            );
            println!(
                "{}",
                mixlm_experiments::samplemix::overlap_markdown(&report)
            );
            println!("written: {}", options.plan.join("diversity").display());
        }
    }
    Ok(())
}

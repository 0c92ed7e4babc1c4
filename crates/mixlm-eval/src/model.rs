//! A language model behind non-generic methods: what evaluation, downstream tasks and
//! SampleMix ask of a model, on plain token ids and plain `f32`s.
//!
//! The code that evaluates or scores takes a `&dyn LanguageModel`, so it is not generic
//! over Burn's backend. [`BurnModel`] is the one generic implementation, and the crate
//! that picks the backend (`mixlm_train::engine`) instantiates it once per backend.
//! A release build does not share generic instances between crates, so before this
//! every crate that evaluated compiled Burn's model and tensor code again for every
//! backend: most of the first build's time (benches/RESULTS.md, "The first build").

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use mixlm_model::{ModelBackend, ModelConfig, Transformer};

use crate::inputs_and_targets;

/// A trained model on a device. The methods take and return host data; each call is
/// one or a few batches on the device.
pub trait LanguageModel {
    /// The model's shape (context length, vocabulary, width).
    fn config(&self) -> &ModelConfig;

    /// The NLL of every target of a batch of windows: `[batch, len + 1]` tokens in,
    /// `[batch, len]` NLLs out, row-major. Computed a few windows at a time
    /// ([`Transformer::token_losses_chunked`]), so a long context never holds a whole
    /// batch's logits.
    fn nll(&self, windows: &[u32], batch: usize, len: usize) -> Vec<f32>;

    /// For each sequence (at least 2 tokens, at most `config().max_seq_len + 1`), the
    /// log-probability of each of its tokens after the first, and whether it is the
    /// model's greedy choice. Sequences are right-padded into one batch: attention is
    /// causal, so padding after a sequence cannot change its scores.
    fn score(&self, seqs: &[Vec<u32>]) -> Vec<(Vec<f64>, Vec<bool>)>;

    /// Each text's mean last-layer hidden state (`[texts, d_model]`, row-major), over
    /// its first `max` tokens, `batch_size` texts at a time, shorter ones right-padded
    /// with `pad` and masked out of the mean.
    fn embed(&self, texts: &[Vec<u32>], max: usize, pad: u32, batch_size: usize) -> Vec<f32>;
}

/// A [`Transformer`] on backend `B`'s `device`, as a [`LanguageModel`].
pub struct BurnModel<B: ModelBackend> {
    pub model: Transformer<B>,
    pub config: ModelConfig,
    pub device: B::Device,
}

fn host_f32<B: ModelBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

impl<B: ModelBackend> LanguageModel for BurnModel<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn nll(&self, windows: &[u32], batch: usize, len: usize) -> Vec<f32> {
        let (inputs, targets) = inputs_and_targets::<B>(windows, batch, len, &self.device);
        host_f32(
            self.model
                .token_losses_chunked(inputs, targets, mixlm_model::EVAL_CHUNK_VALUES),
        )
    }

    fn score(&self, seqs: &[Vec<u32>]) -> Vec<(Vec<f64>, Vec<bool>)> {
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len() - 1).max().unwrap_or(1).max(1);
        let mut inputs = vec![0i64; b * t];
        let mut targets = vec![0i64; b * t];
        for (i, s) in seqs.iter().enumerate() {
            for j in 0..s.len() - 1 {
                inputs[i * t + j] = s[j] as i64;
                targets[i * t + j] = s[j + 1] as i64;
            }
        }
        let device = &self.device;
        let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs, [b, t]), device);
        let targets_t =
            Tensor::<B, 3, Int>::from_data(TensorData::new(targets.clone(), [b, t, 1]), device);
        let logits = self.model.forward(inputs);
        let greedy: Vec<i64> = logits
            .clone()
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("argmax ids");
        let logp = host_f32(log_softmax(logits, 2).gather(2, targets_t));
        seqs.iter()
            .enumerate()
            .map(|(i, s)| {
                let r = i * t..i * t + s.len() - 1;
                (
                    logp[r.clone()].iter().map(|&x| x as f64).collect(),
                    r.map(|k| greedy[k] == targets[k]).collect(),
                )
            })
            .collect()
    }

    fn embed(&self, texts: &[Vec<u32>], max: usize, pad: u32, batch_size: usize) -> Vec<f32> {
        let d_model = self.config.d_model;
        let mut out = Vec::with_capacity(texts.len() * d_model);
        for chunk in texts.chunks(batch_size.max(1)) {
            let len = chunk
                .iter()
                .map(|t| t.len().min(max))
                .max()
                .unwrap_or(1)
                .max(1);
            let mut ids = Vec::with_capacity(chunk.len() * len);
            let mut mask = Vec::with_capacity(chunk.len() * len);
            for t in chunk {
                let t = &t[..t.len().min(max)];
                ids.extend(t.iter().map(|&x| x as i64));
                ids.extend(std::iter::repeat_n(pad as i64, len - t.len()));
                mask.extend(std::iter::repeat_n(1f32, t.len()));
                mask.extend(std::iter::repeat_n(0f32, len - t.len()));
            }
            let b = chunk.len();
            let device = &self.device;
            let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, len]), device);
            let mask = Tensor::<B, 3>::from_data(TensorData::new(mask, [b, len, 1]), device);
            // Causal: padding after a document does not change its states.
            let h = self.model.hidden(tokens) * mask.clone();
            let pooled =
                h.sum_dim(1).reshape([b, d_model]) / mask.sum_dim(1).reshape([b, 1]).clamp_min(1.0);
            out.extend(host_f32(pooled));
        }
        out
    }
}

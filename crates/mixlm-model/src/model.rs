//! The decoder-only transformer, in the order data flows through it:
//! embedding -> blocks (attention, MLP) -> final norm -> output projection.

use burn::module::Module;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    RmsNorm, RmsNormConfig,
};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

use crate::attention::{burn_attention, causal_attention, ModelBackend};
use crate::config::{AttentionKernel, Compute, Family, ModelConfig, Precision};
use crate::gelu::gelu;
use crate::loss::token_nll;
use crate::norm::layer_norm;

/// Normalisation layer: LayerNorm (NeoX) or RMSNorm (Llama).
#[derive(Module, Debug)]
pub enum Norm<B: Backend> {
    Layer(LayerNorm<B>),
    Rms(RmsNorm<B>),
}

impl<B: Backend> Norm<B> {
    fn new(config: &ModelConfig, device: &B::Device) -> Self {
        match config.family {
            Family::Neox => Norm::Layer(
                LayerNormConfig::new(config.d_model)
                    .with_epsilon(config.norm_eps)
                    .init(device),
            ),
            Family::Llama => Norm::Rms(
                RmsNormConfig::new(config.d_model)
                    .with_epsilon(config.norm_eps)
                    .init(device),
            ),
        }
    }
}

impl<B: ModelBackend> Norm<B> {
    /// `eps` is the model's `norm_eps` (Burn's `LayerNorm` keeps its own private).
    pub fn forward(&self, x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
        match self {
            Norm::Layer(LayerNorm {
                gamma,
                beta: Some(beta),
                ..
            }) => layer_norm(x, gamma.val(), beta.val(), eps),
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

fn linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// `linear(x)` in `precision`: input, weight and bias are cast to the compute dtype
/// (autodiff casts the gradients back to the f32 parameters; casting to the dtype a
/// tensor already has is a no-op, so f32 is `Linear::forward`).
fn project<B: Backend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
    precision: Precision,
) -> Tensor<B, D> {
    let dtype = precision.dtype();
    burn::tensor::module::linear(
        x.cast(dtype),
        layer.weight.val().cast(dtype),
        layer.bias.as_ref().map(|b| b.val().cast(dtype)),
    )
}

/// Back to the f32 residual stream.
fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.cast(FloatDType::F32)
}

/// Causal self-attention with a fused QKV projection laid out as `[Q; K; V]`
/// (`n_heads`, `n_kv_heads`, `n_kv_heads` heads of `head_dim`), rotary embedding on
/// the first `rotary_dims` of each head, and grouped-query sharing of K/V heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub qkv: Linear<B>,
    pub out: Linear<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    fn new(c: &ModelConfig, device: &B::Device) -> Self {
        let bias = c.family == Family::Neox;
        Self {
            qkv: linear(c.d_model, c.qkv_dim(), bias, c.init_std, device),
            out: linear(c.n_heads * c.head_dim, c.d_model, bias, c.init_std, device),
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }
}

impl<B: ModelBackend> Attention<B> {
    /// `x` in f32; the result is f32, computed as `compute` says.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &Rope<B>, compute: Compute) -> Tensor<B, 3> {
        let precision = compute.precision;
        let [b, t, _] = x.dims();
        let (h, g, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = project(&self.qkv, x, precision);
        let heads = |from: usize, n: usize| {
            qkv.clone()
                .narrow(2, from * hd, n * hd)
                .reshape([b, t, n, hd])
                .swap_dims(1, 2)
        };
        let q = rope.apply(heads(0, h));
        let k = rope.apply(heads(h, g));
        let v = heads(h + g, g);
        let (k, v) = (repeat_kv(k, h / g), repeat_kv(v, h / g));
        let y = match compute.attention {
            AttentionKernel::Fused => causal_attention(q, k, v),
            AttentionKernel::Burn => burn_attention(q, k, v),
        };
        to_f32(project(
            &self.out,
            y.swap_dims(1, 2).reshape([b, t, h * hd]),
            precision,
        ))
    }
}

/// Each K/V head serves `n_rep` consecutive query heads (as HF's `repeat_kv`).
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, g, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, g, n_rep, t, hd])
        .reshape([b, g * n_rep, t, hd])
}

/// Rotary position embedding tables for one forward pass (GPT-NeoX "rotate half"
/// convention: the rotary part of a head is split into two halves, not interleaved).
pub struct Rope<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    dims: usize,
}

impl<B: Backend> Rope<B> {
    pub fn new(dims: usize, theta: f64, seq_len: usize, device: &B::Device) -> Self {
        let half = dims / 2;
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for j in 0..half {
                // inv_freq_j = theta^(-2j/dims), computed in f32 as HF does.
                let inv_freq = 1.0f32 / (theta as f32).powf((2 * j) as f32 / dims as f32);
                let angle = pos as f32 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, 1, seq_len, half]), device)
        };
        Self {
            cos: table(cos),
            sin: table(sin),
            dims,
        }
    }

    /// Rotates the first `dims` features of each head of `x: [batch, heads, seq, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.dims == 0 {
            return x;
        }
        let [_, _, _, hd] = x.dims();
        let half = self.dims / 2;
        // The f32 tables in the compute dtype (a no-op in f32).
        let (cos, sin) = (
            self.cos.clone().cast(x.dtype()),
            self.sin.clone().cast(x.dtype()),
        );
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
        let r2 = x2 * cos + x1 * sin;
        if self.dims == hd {
            Tensor::cat(vec![r1, r2], 3)
        } else {
            let pass = x.narrow(3, self.dims, hd - self.dims);
            Tensor::cat(vec![r1, r2, pass], 3)
        }
    }
}

/// Feed-forward network: `down(gelu(up(x)))` (NeoX) or, when `gate` is present,
/// SwiGLU `down(silu(gate(x)) * up(x))` (Llama).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub gate: Option<Linear<B>>,
}

impl<B: Backend> Mlp<B> {
    fn new(c: &ModelConfig, device: &B::Device) -> Self {
        let (s, bias) = (c.init_std, c.family == Family::Neox);
        Self {
            up: linear(c.d_model, c.d_ff, bias, s, device),
            down: linear(c.d_ff, c.d_model, bias, s, device),
            gate: (c.family == Family::Llama).then(|| linear(c.d_model, c.d_ff, false, s, device)),
        }
    }
}

impl<B: ModelBackend> Mlp<B> {
    /// `x` in f32; the result is f32, computed in `precision`.
    pub fn forward(&self, x: Tensor<B, 3>, precision: Precision) -> Tensor<B, 3> {
        let p = precision;
        let hidden = match &self.gate {
            None => gelu(project(&self.up, x, p)),
            Some(gate) => silu(project(gate, x.clone(), p)) * project(&self.up, x, p),
        };
        to_f32(project(&self.down, hidden, p))
    }
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attn_norm: Norm<B>,
    pub attn: Attention<B>,
    pub mlp_norm: Norm<B>,
    pub mlp: Mlp<B>,
    pub parallel_residual: bool,
    pub norm_eps: f64,
}

impl<B: Backend> Block<B> {
    fn new(c: &ModelConfig, device: &B::Device) -> Self {
        Self {
            attn_norm: Norm::new(c, device),
            attn: Attention::new(c, device),
            mlp_norm: Norm::new(c, device),
            mlp: Mlp::new(c, device),
            parallel_residual: c.parallel_residual,
            norm_eps: c.norm_eps,
        }
    }
}

impl<B: ModelBackend> Block<B> {
    pub fn forward(&self, x: Tensor<B, 3>, rope: &Rope<B>, compute: Compute) -> Tensor<B, 3> {
        let (c, p, eps) = (compute, compute.precision, self.norm_eps);
        if self.parallel_residual {
            // GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            let a = self
                .attn
                .forward(self.attn_norm.forward(x.clone(), eps), rope, c);
            let m = self.mlp.forward(self.mlp_norm.forward(x.clone(), eps), p);
            x + a + m
        } else {
            let x = x.clone() + self.attn.forward(self.attn_norm.forward(x, eps), rope, c);
            x.clone() + self.mlp.forward(self.mlp_norm.forward(x, eps), p)
        }
    }
}

/// Decoder-only language model.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    pub embed: Embedding<B>,
    pub blocks: Vec<Block<B>>,
    pub final_norm: Norm<B>,
    /// `None` when the output projection is tied to `embed`.
    pub lm_head: Option<Linear<B>>,
    pub rotary_dims: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    /// How forward passes compute (a run setting, not saved with the weights).
    #[module(skip)]
    pub compute: Compute,
}

impl ModelConfig {
    /// Builds a freshly initialised model (seed the backend first for reproducibility).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Transformer<B> {
        let embed = EmbeddingConfig::new(self.vocab_size, self.d_model)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: self.init_std,
            })
            .init(device);
        Transformer {
            embed,
            blocks: (0..self.n_layers)
                .map(|_| Block::new(self, device))
                .collect(),
            final_norm: Norm::new(self, device),
            lm_head: (!self.tie_embeddings)
                .then(|| linear(self.d_model, self.vocab_size, false, self.init_std, device)),
            rotary_dims: self.rotary_dims(),
            rope_theta: self.rope_theta,
            norm_eps: self.norm_eps,
            compute: Compute::default(),
        }
    }
}

impl<B: ModelBackend> Transformer<B> {
    /// Hidden states after the final norm: `[batch, seq, d_model]`.
    pub fn hidden(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, t] = tokens.dims();
        let rope = Rope::new(self.rotary_dims, self.rope_theta, t, &tokens.device());
        let mut x = self.embed.forward(tokens);
        for block in &self.blocks {
            x = block.forward(x, &rope, self.compute);
        }
        self.final_norm.forward(x, self.norm_eps)
    }

    /// The same model computing in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.compute.precision = precision;
        self
    }

    /// The same model computing as `compute` says.
    pub fn with_compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
    }

    /// Next-token logits: `[batch, seq, vocab]`, f32 (the output projection runs in
    /// the model's precision).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let h = self.hidden(tokens);
        let p = self.compute.precision;
        to_f32(match &self.lm_head {
            Some(head) => project(head, h, p),
            None => {
                let [b, t, d] = h.dims();
                let w = self.embed.weight.val().cast(p.dtype()); // [vocab, d]
                let h = h.cast(p.dtype());
                let v = w.dims()[0];
                h.reshape([b * t, d])
                    .matmul(w.transpose())
                    .reshape([b, t, v])
            }
        })
    }

    /// Cross-entropy of every target token, `[batch, seq]` in nats: the quantity both
    /// the training objective and the per-domain bookkeeping are built from.
    pub fn token_losses(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        token_nll(self.forward(inputs), targets)
    }

    /// [`Self::token_losses`] for evaluation, a few windows at a time: as many as keep
    /// the largest per-window tensors, the logits (`seq × vocab`) and on the CPU the
    /// attention scores (`heads × seq × seq`), under `max_values` in all (one window
    /// at least). Scoring 32 windows of 2,048 tokens at a 50k vocabulary at once would
    /// hold 13 GB of f32 logits. Every window's losses are the same to the bit. Not for
    /// training: under autodiff the weight gradients would be summed over the windows
    /// in another order.
    pub fn token_losses_chunked(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        max_values: usize,
    ) -> Tensor<B, 2> {
        let [b, t] = inputs.dims();
        let [vocab, _] = self.embed.weight.dims();
        let heads = self.blocks.first().map_or(1, |block| block.attn.n_heads);
        let per_window = (t * vocab).max(heads * t * t).max(1);
        let windows = (max_values / per_window).clamp(1, b.max(1));
        if windows >= b {
            return self.token_losses(inputs, targets);
        }
        let losses = (0..b)
            .step_by(windows)
            .map(|s| {
                let rows = s..(s + windows).min(b);
                self.token_losses(
                    inputs.clone().slice([rows.clone(), 0..t]),
                    targets.clone().slice([rows, 0..t]),
                )
            })
            .collect();
        Tensor::cat(losses, 0)
    }
}

/// How many values of its largest tensors evaluation holds at once
/// ([`Transformer::token_losses_chunked`]): 256 MB in f32.
pub const EVAL_CHUNK_VALUES: usize = 1 << 26;

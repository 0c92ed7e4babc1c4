//! Hugging Face interoperability: safetensors with `GPTNeoXForCausalLM` /
//! `LlamaForCausalLM` tensor names, and their `config.json`.
//!
//! A mixlm checkpoint folder therefore opens in transformers with
//! `AutoModelForCausalLM.from_pretrained(dir)`, and Pythia or Llama weights from the
//! Hub load here. Linear weights are stored as HF does (`[out, in]`); Burn keeps
//! `[in, out]`, so they are transposed on the way in and out.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::{LayerNorm, Linear, RmsNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};

use crate::config::{Family, ModelConfig};
use crate::model::{Norm, Transformer};

/// Errors reading or writing HF-format weights and configs.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("safetensors: {0}")]
    Format(String),
    #[error("tensor `{0}` is missing from the checkpoint")]
    Missing(String),
    #[error("tensor `{name}` has shape {found:?}, the config needs {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 weights are supported")]
    Dtype { name: String, dtype: String },
    #[error("config.json: {0}")]
    Config(String),
}

/// Host copy of one tensor: row-major f32 values and shape.
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data");
    HostTensor { shape, values }
}

/// HF tensor name prefix of layer `i` and the names of the non-layer tensors.
struct Names {
    family: Family,
}

impl Names {
    fn layer(&self, i: usize, suffix: &str) -> String {
        match self.family {
            Family::Neox => format!("gpt_neox.layers.{i}.{suffix}"),
            Family::Llama => format!("model.layers.{i}.{suffix}"),
        }
    }
    fn embed(&self) -> &'static str {
        match self.family {
            Family::Neox => "gpt_neox.embed_in.weight",
            Family::Llama => "model.embed_tokens.weight",
        }
    }
    fn final_norm(&self) -> &'static str {
        match self.family {
            Family::Neox => "gpt_neox.final_layer_norm",
            Family::Llama => "model.norm",
        }
    }
    fn lm_head(&self) -> &'static str {
        match self.family {
            Family::Neox => "embed_out.weight",
            Family::Llama => "lm_head.weight",
        }
    }
    fn norms(&self) -> (&'static str, &'static str) {
        ("input_layernorm", "post_attention_layernorm")
    }
}

/// Row permutation between GPT-NeoX's fused QKV (per head `[q_h; k_h; v_h]`) and
/// ours (`[Q; K; V]`, heads consecutive in each): `ours[perm[r]] = hf[r]`.
fn neox_qkv_perm(n_heads: usize, head_dim: usize) -> Vec<usize> {
    (0..3 * n_heads * head_dim)
        .map(|r| {
            let head = r / (3 * head_dim);
            let part = (r % (3 * head_dim)) / head_dim;
            let i = r % head_dim;
            part * n_heads * head_dim + head * head_dim + i
        })
        .collect()
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Collects every parameter of `model` under its HF name, in HF layout.
pub fn export_tensors<B: Backend>(
    model: &Transformer<B>,
    config: &ModelConfig,
) -> BTreeMap<String, HostTensor> {
    let names = Names {
        family: config.family,
    };
    let mut out = BTreeMap::new();
    // Burn Linear weight [in, out] -> HF [out, in].
    let put_linear = |out: &mut BTreeMap<String, HostTensor>, name: String, l: &Linear<B>| {
        let w = host(l.weight.val());
        let (din, dout) = (w.shape[0], w.shape[1]);
        out.insert(
            format!("{name}.weight"),
            HostTensor {
                shape: vec![dout, din],
                values: transpose(&w.values, din, dout),
            },
        );
        if let Some(b) = &l.bias {
            out.insert(format!("{name}.bias"), host(b.val()));
        }
    };
    let put_norm = |out: &mut BTreeMap<String, HostTensor>, name: String, n: &Norm<B>| match n {
        Norm::Layer(ln) => {
            out.insert(format!("{name}.weight"), host(ln.gamma.val()));
            if let Some(b) = &ln.beta {
                out.insert(format!("{name}.bias"), host(b.val()));
            }
        }
        Norm::Rms(rms) => {
            out.insert(format!("{name}.weight"), host(rms.gamma.val()));
        }
    };

    out.insert(names.embed().to_string(), host(model.embed.weight.val()));
    let (n1, n2) = names.norms();
    for (i, block) in model.blocks.iter().enumerate() {
        put_norm(&mut out, names.layer(i, n1), &block.attn_norm);
        put_norm(&mut out, names.layer(i, n2), &block.mlp_norm);
        match config.family {
            Family::Neox => {
                put_linear(
                    &mut out,
                    names.layer(i, "attention.query_key_value"),
                    &block.attn.qkv,
                );
                // Reorder rows from [Q; K; V] to per-head [q_h; k_h; v_h].
                let perm = neox_qkv_perm(config.n_heads, config.head_dim);
                for suffix in ["weight", "bias"] {
                    let key = names.layer(i, &format!("attention.query_key_value.{suffix}"));
                    let t = out.get_mut(&key).expect("qkv exported");
                    let row = t.values.len() / perm.len();
                    let mut v = vec![0.0; t.values.len()];
                    for (r, &ours) in perm.iter().enumerate() {
                        v[r * row..(r + 1) * row]
                            .copy_from_slice(&t.values[ours * row..(ours + 1) * row]);
                    }
                    t.values = v;
                }
                put_linear(&mut out, names.layer(i, "attention.dense"), &block.attn.out);
            }
            Family::Llama => {
                let qkv = host(block.attn.qkv.weight.val()); // [d, (h+2g)hd]
                let (d, width) = (qkv.shape[0], qkv.shape[1]);
                let t = transpose(&qkv.values, d, width); // [(h+2g)hd, d]
                let q_rows = config.n_heads * config.head_dim;
                let kv_rows = config.n_kv_heads * config.head_dim;
                for (proj, from, rows) in [
                    ("q_proj", 0, q_rows),
                    ("k_proj", q_rows, kv_rows),
                    ("v_proj", q_rows + kv_rows, kv_rows),
                ] {
                    out.insert(
                        names.layer(i, &format!("self_attn.{proj}.weight")),
                        HostTensor {
                            shape: vec![rows, d],
                            values: t[from * d..(from + rows) * d].to_vec(),
                        },
                    );
                }
                put_linear(
                    &mut out,
                    names.layer(i, "self_attn.o_proj"),
                    &block.attn.out,
                );
            }
        }
        let mlp = &block.mlp;
        match &mlp.gate {
            None => {
                put_linear(&mut out, names.layer(i, "mlp.dense_h_to_4h"), &mlp.up);
                put_linear(&mut out, names.layer(i, "mlp.dense_4h_to_h"), &mlp.down);
            }
            Some(gate) => {
                put_linear(&mut out, names.layer(i, "mlp.gate_proj"), gate);
                put_linear(&mut out, names.layer(i, "mlp.up_proj"), &mlp.up);
                put_linear(&mut out, names.layer(i, "mlp.down_proj"), &mlp.down);
            }
        }
    }
    put_norm(&mut out, names.final_norm().to_string(), &model.final_norm);
    if let Some(head) = &model.lm_head {
        let name = names.lm_head().trim_end_matches(".weight").to_string();
        put_linear(&mut out, name, head);
    }
    out
}

/// Serialises the model as HF-named f32 safetensors.
pub fn to_safetensors<B: Backend>(
    model: &Transformer<B>,
    config: &ModelConfig,
) -> Result<Vec<u8>, HfError> {
    serialize(&tensor_bytes(export_tensors(model, config)))
}

/// The index of a sharded checkpoint, as transformers names it.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The model's weight files, `(file name, bytes)`: `model.safetensors` when the
/// weights take at most `max_shard_bytes`, else shards of at most that size (a larger
/// tensor gets one of its own) named `model-0000N-of-0000M.safetensors`, in tensor-name
/// order, and their index [`SHARD_INDEX`] (`metadata.total_size`, `weight_map`), the
/// layout transformers' `save_pretrained(max_shard_size=...)` writes and
/// `from_pretrained` reads.
pub fn to_safetensor_files<B: Backend>(
    model: &Transformer<B>,
    config: &ModelConfig,
    max_shard_bytes: u64,
) -> Result<Vec<(String, Vec<u8>)>, HfError> {
    let tensors = tensor_bytes(export_tensors(model, config));
    let total: u64 = tensors.iter().map(|t| t.1.len() as u64).sum();
    if total <= max_shard_bytes {
        return Ok(vec![("model.safetensors".into(), serialize(&tensors)?)]);
    }
    let mut groups: Vec<Vec<&NamedBytes>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &tensors {
        let n = t.1.len() as u64;
        if size > 0 && size + n > max_shard_bytes {
            groups.push(Vec::new());
            size = 0;
        }
        groups.last_mut().expect("one group").push(t);
        size += n;
    }
    let count = groups.len();
    let mut files = Vec::with_capacity(count + 1);
    let mut weight_map = serde_json::Map::new();
    for (i, group) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for t in &group {
            weight_map.insert(t.0.clone(), Value::String(name.clone()));
        }
        let owned: Vec<NamedBytes> = group.into_iter().cloned().collect();
        files.push((name, serialize(&owned)?));
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let index = serde_json::to_vec_pretty(&index).map_err(|e| HfError::Format(e.to_string()))?;
    files.push((SHARD_INDEX.into(), index));
    Ok(files)
}

/// A tensor's name, little-endian f32 bytes and shape.
type NamedBytes = (String, Vec<u8>, Vec<usize>);

/// Each tensor's name, little-endian f32 bytes and shape.
fn tensor_bytes(tensors: BTreeMap<String, HostTensor>) -> Vec<NamedBytes> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            let b: Vec<u8> = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, b, t.shape)
        })
        .collect()
}

/// One safetensors file of `tensors`, with the `format: pt` metadata transformers
/// writes.
fn serialize(tensors: &[NamedBytes]) -> Result<Vec<u8>, HfError> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| HfError::Format(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize(views, metadata).map_err(|e| HfError::Format(e.to_string()))
}

/// The safetensors files of one model: one `model.safetensors`, or the shards of a
/// `model.safetensors.index.json` (a tensor is looked up in each).
struct Files<'a>(Vec<SafeTensors<'a>>);

impl Files<'_> {
    fn tensor(&self, name: &str) -> Option<safetensors::tensor::TensorView<'_>> {
        self.0.iter().find_map(|st| st.tensor(name).ok())
    }
}

/// Reads one tensor as f32 (F16/BF16 are widened), checking its shape.
fn read(st: &Files<'_>, name: &str, expected: &[usize]) -> Result<Vec<f32>, HfError> {
    let view = st
        .tensor(name)
        .ok_or_else(|| HfError::Missing(name.to_string()))?;
    if view.shape() != expected {
        return Err(HfError::Shape {
            name: name.to_string(),
            found: view.shape().to_vec(),
            expected: expected.to_vec(),
        });
    }
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(HfError::Dtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

fn param<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// Loads HF-named safetensors into a model of `config`; every tensor the config
/// needs must be present with the right shape. Extra tensors (rotary caches,
/// attention-mask buffers of old checkpoints) are ignored.
pub fn load_safetensors<B: Backend>(
    bytes: &[u8],
    config: &ModelConfig,
    device: &B::Device,
) -> Result<Transformer<B>, HfError> {
    load_safetensor_shards(&[bytes], config, device)
}

/// [`load_safetensors`] from several files: the shards a sharded checkpoint
/// (`model.safetensors.index.json`, as `save_pretrained` writes large models) lists.
pub fn load_safetensor_shards<B: Backend>(
    shards: &[&[u8]],
    config: &ModelConfig,
    device: &B::Device,
) -> Result<Transformer<B>, HfError> {
    let st = Files(
        shards
            .iter()
            .map(|bytes| SafeTensors::deserialize(bytes))
            .collect::<Result<_, _>>()
            .map_err(|e| HfError::Format(e.to_string()))?,
    );
    let names = Names {
        family: config.family,
    };
    let c = config;
    let (d, v, f) = (c.d_model, c.vocab_size, c.d_ff);
    let mut model: Transformer<B> = config.init(device);

    let load_linear =
        |l: &mut Linear<B>, name: &str, dout: usize, din: usize| -> Result<(), HfError> {
            let w = read(&st, &format!("{name}.weight"), &[dout, din])?;
            l.weight = param(transpose(&w, dout, din), [din, dout], device);
            if l.bias.is_some() {
                l.bias = Some(param(
                    read(&st, &format!("{name}.bias"), &[dout])?,
                    [dout],
                    device,
                ));
            }
            Ok(())
        };
    let load_norm = |n: &mut Norm<B>, name: &str| -> Result<(), HfError> {
        match n {
            Norm::Layer(LayerNorm { gamma, beta, .. }) => {
                *gamma = param(read(&st, &format!("{name}.weight"), &[d])?, [d], device);
                if beta.is_some() {
                    *beta = Some(param(
                        read(&st, &format!("{name}.bias"), &[d])?,
                        [d],
                        device,
                    ));
                }
            }
            Norm::Rms(RmsNorm { gamma, .. }) => {
                *gamma = param(read(&st, &format!("{name}.weight"), &[d])?, [d], device);
            }
        }
        Ok(())
    };

    model.embed.weight = param(read(&st, names.embed(), &[v, d])?, [v, d], device);
    let (n1, n2) = names.norms();
    let attn_width = c.n_heads * c.head_dim;
    for (i, block) in model.blocks.iter_mut().enumerate() {
        load_norm(&mut block.attn_norm, &names.layer(i, n1))?;
        load_norm(&mut block.mlp_norm, &names.layer(i, n2))?;
        let qkv = c.qkv_dim();
        match c.family {
            Family::Neox => {
                let name = names.layer(i, "attention.query_key_value");
                let w = read(&st, &format!("{name}.weight"), &[qkv, d])?;
                let b = read(&st, &format!("{name}.bias"), &[qkv])?;
                let perm = neox_qkv_perm(c.n_heads, c.head_dim);
                let (mut w2, mut b2) = (vec![0.0; w.len()], vec![0.0; b.len()]);
                for (r, &ours) in perm.iter().enumerate() {
                    w2[ours * d..(ours + 1) * d].copy_from_slice(&w[r * d..(r + 1) * d]);
                    b2[ours] = b[r];
                }
                block.attn.qkv.weight = param(transpose(&w2, qkv, d), [d, qkv], device);
                block.attn.qkv.bias = Some(param(b2, [qkv], device));
                load_linear(
                    &mut block.attn.out,
                    &names.layer(i, "attention.dense"),
                    d,
                    attn_width,
                )?;
            }
            Family::Llama => {
                let kv = c.n_kv_heads * c.head_dim;
                let mut w = read(
                    &st,
                    &names.layer(i, "self_attn.q_proj.weight"),
                    &[attn_width, d],
                )?;
                w.extend(read(
                    &st,
                    &names.layer(i, "self_attn.k_proj.weight"),
                    &[kv, d],
                )?);
                w.extend(read(
                    &st,
                    &names.layer(i, "self_attn.v_proj.weight"),
                    &[kv, d],
                )?);
                block.attn.qkv.weight = param(transpose(&w, qkv, d), [d, qkv], device);
                load_linear(
                    &mut block.attn.out,
                    &names.layer(i, "self_attn.o_proj"),
                    d,
                    attn_width,
                )?;
            }
        }
        let mlp = &mut block.mlp;
        match &mut mlp.gate {
            None => {
                load_linear(&mut mlp.up, &names.layer(i, "mlp.dense_h_to_4h"), f, d)?;
                load_linear(&mut mlp.down, &names.layer(i, "mlp.dense_4h_to_h"), d, f)?;
            }
            Some(gate) => {
                load_linear(gate, &names.layer(i, "mlp.gate_proj"), f, d)?;
                load_linear(&mut mlp.up, &names.layer(i, "mlp.up_proj"), f, d)?;
                load_linear(&mut mlp.down, &names.layer(i, "mlp.down_proj"), d, f)?;
            }
        }
    }
    load_norm(&mut model.final_norm, names.final_norm())?;
    if let Some(head) = &mut model.lm_head {
        load_linear(head, names.lm_head().trim_end_matches(".weight"), v, d)?;
    }
    Ok(model)
}

/// The HF `config.json` of this model, so a checkpoint folder loads in transformers.
pub fn hf_config(c: &ModelConfig) -> Value {
    match c.family {
        Family::Neox => json!({
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "intermediate_size": c.d_ff,
            "rotary_pct": c.rotary_pct,
            "rotary_emb_base": c.rope_theta,
            "max_position_embeddings": c.max_seq_len,
            "layer_norm_eps": c.norm_eps,
            "use_parallel_residual": c.parallel_residual,
            "hidden_act": "gelu",
            "tie_word_embeddings": c.tie_embeddings,
            "initializer_range": c.init_std,
            "attention_bias": true,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "float32",
        }),
        Family::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "intermediate_size": c.d_ff,
            "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": c.tie_embeddings,
            "initializer_range": c.init_std,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        }),
    }
}

/// Reads an HF `config.json` of a GPT-NeoX or Llama model.
pub fn config_from_hf(v: &Value) -> Result<ModelConfig, HfError> {
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let num = |k: &str| -> Result<usize, HfError> {
        get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| HfError::Config(format!("missing or non-integer `{k}`")))
    };
    // transformers >= 5 nests rotary settings under `rope_parameters`; older configs
    // (and Pythia's on the Hub) keep them flat. The nested value wins when present.
    let rope = |k: &str| {
        v.get("rope_parameters")
            .and_then(|r| r.get(k))
            .and_then(Value::as_f64)
    };
    let float = |k: &str, default: f64| get(k).and_then(Value::as_f64).unwrap_or(default);
    let flag = |k: &str, default: bool| get(k).and_then(Value::as_bool).unwrap_or(default);
    let model_type = get("model_type").and_then(Value::as_str).unwrap_or("");
    let family = match model_type {
        "gpt_neox" => Family::Neox,
        "llama" => Family::Llama,
        other => {
            let found = match other {
                "" => "no `model_type`".to_string(),
                other => format!("model_type `{other}`"),
            };
            return Err(HfError::Config(format!(
                "{found}: mixlm loads GPT-NeoX/Pythia (`gpt_neox`) and Llama (`llama`) \
                 checkpoints only"
            )));
        }
    };
    // Biases the model does not have would be dropped without a word, and the
    // perplexity would be wrong: refused, naming the key.
    let unsupported_flag = |key: &str, value: bool, why: &str| -> Result<(), HfError> {
        match get(key).and_then(Value::as_bool) {
            Some(v) if v == value => Err(HfError::Config(format!(
                "`{key} = {value}` is not supported for {model_type}: {why}"
            ))),
            _ => Ok(()),
        }
    };
    match family {
        Family::Neox => unsupported_flag(
            "attention_bias",
            false,
            "mixlm's GPT-NeoX has biases on `query_key_value` and `dense`, as Pythia does",
        )?,
        Family::Llama => {
            let why = "mixlm's Llama has no biases on these projections (their tensors \
                       would be dropped)";
            unsupported_flag("attention_bias", true, why)?;
            unsupported_flag("mlp_bias", true, why)?;
        }
    }
    let (d, heads) = (num("hidden_size")?, num("num_attention_heads")?);
    if let Some(act) = get("hidden_act").and_then(Value::as_str) {
        let expected = match family {
            Family::Neox => "gelu",
            Family::Llama => "silu",
        };
        if act != expected {
            return Err(HfError::Config(format!(
                "hidden_act `{act}` is not supported for {model_type} (expected `{expected}`)"
            )));
        }
    }
    let config = match family {
        Family::Neox => ModelConfig {
            family: Family::Neox,
            vocab_size: num("vocab_size")?,
            d_model: d,
            n_layers: num("num_hidden_layers")?,
            n_heads: heads,
            n_kv_heads: heads,
            head_dim: d / heads,
            d_ff: num("intermediate_size")?,
            rotary_pct: rope("partial_rotary_factor").unwrap_or(float("rotary_pct", 0.25)),
            rope_theta: rope("rope_theta").unwrap_or(float("rotary_emb_base", 10_000.0)),
            norm_eps: float("layer_norm_eps", 1e-5),
            parallel_residual: flag("use_parallel_residual", true),
            tie_embeddings: flag("tie_word_embeddings", false),
            max_seq_len: num("max_position_embeddings")?,
            init_std: float("initializer_range", 0.02),
        },
        Family::Llama => ModelConfig {
            family: Family::Llama,
            vocab_size: num("vocab_size")?,
            d_model: d,
            n_layers: num("num_hidden_layers")?,
            n_heads: heads,
            n_kv_heads: get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(heads),
            head_dim: get("head_dim")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(d / heads),
            d_ff: num("intermediate_size")?,
            rotary_pct: 1.0,
            rope_theta: rope("rope_theta").unwrap_or(float("rope_theta", 10_000.0)),
            norm_eps: float("rms_norm_eps", 1e-6),
            parallel_residual: false,
            tie_embeddings: flag("tie_word_embeddings", false),
            max_seq_len: num("max_position_embeddings")?,
            init_std: float("initializer_range", 0.02),
        },
    };
    let rope_type = v
        .get("rope_parameters")
        .or_else(|| get("rope_scaling"))
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        return Err(HfError::Config(format!(
            "rope_type `{rope_type}` (RoPE scaling) is not supported yet; only `default`"
        )));
    }
    config.validate().map_err(HfError::Config)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qkv_permutation_maps_heads_to_blocks() {
        // 2 heads of dim 1: HF rows [q0 k0 v0 q1 k1 v1] -> ours [q0 q1 k0 k1 v0 v1].
        assert_eq!(neox_qkv_perm(2, 1), vec![0, 2, 4, 1, 3, 5]);
    }

    #[test]
    fn hf_config_round_trips() {
        for name in crate::PRESETS {
            let c = ModelConfig::preset(name).unwrap();
            let back = config_from_hf(&hf_config(&c)).unwrap();
            assert_eq!(back, c, "{name}");
        }
    }
}

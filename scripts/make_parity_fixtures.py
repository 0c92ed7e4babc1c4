#!/usr/bin/env python3
"""Generate the Hugging Face parity fixtures under tests/fixtures/parity/.

What it makes
-------------
Four tiny, randomly initialised float32 causal LMs built with Hugging Face
`transformers` on CPU, one folder each:

  tests/fixtures/parity/neox/        GPTNeoXForCausalLM, parallel residual, rotary_pct=0.25
  tests/fixtures/parity/neox_seq/    GPTNeoXForCausalLM, sequential residual, rotary_pct=0.5
  tests/fixtures/parity/llama/       LlamaForCausalLM, GQA (4 q heads / 2 kv heads), untied head
  tests/fixtures/parity/llama_tied/  same as llama/ but tie_word_embeddings=True

Each folder holds
  config.json        the HF config (`model.config.to_json_file`), plus a few
                     legacy flat keys (see LEGACY_KEYS) so readers that only know
                     the pre-v5 layout (e.g. Pythia's `rotary_pct`) also work;
  model.safetensors  the weights exactly as `model.save_pretrained` writes them
                     (HF tensor names, contiguous float32, no non-persistent buffers);
  io.safetensors     `input_ids` int64 [2, 11], `logits` float32 [2, 11, 96] from
                     `model(input_ids).logits` (eval mode, no_grad), and `hidden`
                     float32 [2, 11, 32] = `output_hidden_states=True` last entry,
                     which in transformers is the final hidden state AFTER the
                     final norm (i.e. exactly the LM-head input).

Two more kinds of folder, for the loader's other paths:

  tests/fixtures/parity/llama_sharded/  the llama/ model saved by `save_pretrained`
                     with a small `max_shard_size`: model.safetensors.index.json and
                     model-0000N-of-0000M.safetensors (as large checkpoints are
                     published); its logits are llama/io.safetensors';
  tests/fixtures/parity/neox_vocab300/  a GPT-NeoX with 300 token ids (more than the
                     embedded demo config's 128), config.json + model.safetensors only,
                     for `mixlm eval --checkpoint` of a folder whose own config must win;
  tests/fixtures/parity/unsupported/<name>/  config.json + model.safetensors of models
                     mixlm refuses, each for a reason its error must name: gpt2
                     (model_type), neox_no_attention_bias (GPT-NeoX with
                     attention_bias=False), llama_attention_bias, llama_mlp_bias.

All parameters are re-initialised with larger random values than HF's default
(std 0.02 gives near-zero logits, which would make the comparison insensitive):
matrices/embeddings ~ N(0, 0.15), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.1).

Everything is deterministic (fixed seeds, CPU, float32, eager attention).
After writing, each model is reloaded with `from_pretrained` and its logits are
checked to be bit-identical to io.safetensors.

How to rerun
------------
    python3 scripts/make_parity_fixtures.py

(from the repository root; requires `pip install torch transformers safetensors`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "parity")

VOCAB = 96
BATCH = 2
SEQ = 11

MATRIX_STD = 0.15
NORM_STD = 0.1
BIAS_STD = 0.1

# Per model class: in-memory HF parameter name -> name on disk written by
# save_pretrained (transformers >= 5 reverses its load-time renamings on save).
DISK_RENAMES = {
    "GPTNeoXForCausalLM": {"lm_head.weight": "embed_out.weight"}
    if int(transformers.__version__.split(".")[0]) >= 5 else {},
}


def neox_config(parallel: bool, rotary_pct: float) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        rotary_pct=rotary_pct,
        rotary_emb_base=10000,
        max_position_embeddings=64,
        layer_norm_eps=1e-5,
        use_parallel_residual=parallel,
        hidden_act="gelu",
        tie_word_embeddings=False,
        attention_bias=True,
        attn_implementation="eager",
    )


def llama_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=64,
        hidden_act="silu",
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )


# name -> (model class, config factory, seed, legacy flat keys added to config.json)
FIXTURES = {
    "neox": (GPTNeoXForCausalLM, lambda: neox_config(True, 0.25), 1001,
             {"rotary_pct": 0.25, "rotary_emb_base": 10000}),
    "neox_seq": (GPTNeoXForCausalLM, lambda: neox_config(False, 0.5), 1002,
                 {"rotary_pct": 0.5, "rotary_emb_base": 10000}),
    "llama": (LlamaForCausalLM, lambda: llama_config(False), 2001,
              {"rope_theta": 10000.0}),
    "llama_tied": (LlamaForCausalLM, lambda: llama_config(True), 2002,
                   {"rope_theta": 10000.0}),
}


@torch.no_grad()
def reinit_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-initialise every parameter with larger random values.

    `named_parameters()` de-duplicates shared tensors, so a tied lm_head /
    embedding pair is drawn once and stays tied.
    """
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith(".bias"):
            p.copy_(noise * BIAS_STD)
        elif p.dim() == 1:  # LayerNorm / RMSNorm weight
            p.copy_(1.0 + noise * NORM_STD)
        else:  # Linear weights and embeddings
            p.copy_(noise * MATRIX_STD)


def build(name: str):
    cls, make_cfg, seed, legacy = FIXTURES[name]
    torch.manual_seed(seed)
    model = cls(make_cfg()).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    reinit_(model, gen)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    return model, input_ids, legacy


def run(model, input_ids):
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    logits = out.logits.to(torch.float32).contiguous()
    hidden = out.hidden_states[-1].to(torch.float32).contiguous()
    return logits, hidden


def write_fixture(name: str) -> None:
    model, input_ids, legacy = build(name)
    logits, hidden = run(model, input_ids)

    # Sanity: the last hidden state is the LM-head input (post final norm).
    head = model.get_output_embeddings().weight
    assert torch.allclose(hidden @ head.T, logits, atol=1e-5, rtol=1e-5), name
    assert logits.shape == (BATCH, SEQ, VOCAB) and hidden.shape == (BATCH, SEQ, 32)

    folder = os.path.join(OUT_DIR, name)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shutil.copyfile(os.path.join(tmp, "model.safetensors"),
                        os.path.join(folder, "model.safetensors"))

    cfg_path = os.path.join(folder, "config.json")
    model.config.to_json_file(cfg_path)
    with open(cfg_path) as f:
        cfg = json.load(f)
    for k, v in legacy.items():
        cfg.setdefault(k, v)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "logits": logits,
            "hidden": hidden,
        },
        os.path.join(folder, "io.safetensors"),
    )

    # Check the saved weights: float32, contiguous, and exactly the persistent state.
    saved = load_file(os.path.join(folder, "model.safetensors"))
    for k, t in saved.items():
        assert t.dtype == torch.float32, (name, k, t.dtype)
        assert "inv_freq" not in k and "masked_bias" not in k, (name, k)
    # transformers >= 5 saves GPTNeoX's `lm_head.weight` under its original
    # checkpoint name `embed_out.weight` (as in the Pythia hub checkpoints; see
    # transformers/conversion_mapping.py), and drops `lm_head.weight` entirely
    # when the embeddings are tied.
    renames = DISK_RENAMES.get(type(model).__name__, {})
    sd = {renames.get(k, k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
        sd.pop("lm_head.weight")
    assert set(sd) == set(saved), (name, set(sd) ^ set(saved))
    for k, t in saved.items():
        assert torch.equal(t, sd[k]), (name, k)


def self_check(name: str) -> None:
    cls = FIXTURES[name][0]
    folder = os.path.join(OUT_DIR, name)
    model = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    io = load_file(os.path.join(folder, "io.safetensors"))
    logits, hidden = run(model, io["input_ids"])
    assert torch.equal(logits, io["logits"]), f"{name}: reloaded logits differ"
    assert torch.equal(hidden, io["hidden"]), f"{name}: reloaded hidden differs"
    # And determinism: building again from scratch gives the same numbers.
    model2, ids2, _ = build(name)
    logits2, _ = run(model2, ids2)
    assert torch.equal(ids2, io["input_ids"]) and torch.equal(logits2, io["logits"]), name
    print(f"  {name}: reload + rebuild OK, max|logit|={io['logits'].abs().max():.3f}, "
          f"logit std={io['logits'].std():.3f}")


def write_sharded() -> None:
    """llama/'s model in shards of at most 20 kB, as `save_pretrained` shards."""
    model, _, _ = build("llama")
    folder = os.path.join(OUT_DIR, "llama_sharded")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    model.save_pretrained(folder, max_shard_size="20kB")
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(folder, extra)):
            os.remove(os.path.join(folder, extra))
    files = sorted(os.listdir(folder))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files, files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3, shards
    reloaded = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                dtype=torch.float32).eval()
    io = load_file(os.path.join(OUT_DIR, "llama", "io.safetensors"))
    logits, _ = run(reloaded, io["input_ids"])
    assert torch.equal(logits, io["logits"]), "sharded llama: logits differ"
    print(f"wrote {os.path.relpath(folder, ROOT)} ({len(shards)} shards)")


# name -> (model class, config): models mixlm refuses, each for the reason named.
UNSUPPORTED = {
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "neox_no_attention_bias": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(
        **{**neox_config(True, 0.25).to_dict(), "attention_bias": False})),
    "llama_attention_bias": (LlamaForCausalLM, lambda: LlamaConfig(
        **{**llama_config(False).to_dict(), "attention_bias": True})),
    "llama_mlp_bias": (LlamaForCausalLM, lambda: LlamaConfig(
        **{**llama_config(False).to_dict(), "mlp_bias": True})),
}


def write_vocab300() -> None:
    torch.manual_seed(3002)
    cfg = GPTNeoXConfig(**{**neox_config(True, 0.25).to_dict(), "vocab_size": 300})
    model = GPTNeoXForCausalLM(cfg).to(torch.float32).eval()
    reinit_(model, torch.Generator().manual_seed(3002))
    folder = os.path.join(OUT_DIR, "neox_vocab300")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    if os.path.exists(os.path.join(folder, "generation_config.json")):
        os.remove(os.path.join(folder, "generation_config.json"))
    print(f"wrote {os.path.relpath(folder, ROOT)}")


def write_unsupported() -> None:
    for name, (cls, make_cfg) in UNSUPPORTED.items():
        torch.manual_seed(3001)
        model = cls(make_cfg()).to(torch.float32).eval()
        folder = os.path.join(OUT_DIR, "unsupported", name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(folder, extra)):
                os.remove(os.path.join(folder, extra))
        print(f"wrote {os.path.relpath(folder, ROOT)}")


def main() -> int:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(OUT_DIR, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name in FIXTURES:
        write_fixture(name)
        print(f"wrote {os.path.relpath(os.path.join(OUT_DIR, name), ROOT)}")
    print("self-check:")
    for name in FIXTURES:
        self_check(name)
    write_sharded()
    write_vocab300()
    write_unsupported()
    return 0


if __name__ == "__main__":
    sys.exit(main())

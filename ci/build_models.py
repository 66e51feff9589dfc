"""Build the tiny test models under tests/golden/models/ deterministically.

Run:  python ci/build_models.py [--out tests/golden/models] [--stats]

Weights come from a seeded torch.Generator (not from a transformers initializer, whose
behaviour changes between versions), and config.json is written by hand, so the same
script gives byte-identical files with any torch/transformers version we support.

Scales were tuned (see README "Tiny models") so that
  * next-token distributions are peaky: top-k / top-p / min-p really remove tokens;
  * bf16 stays well conditioned: residual branches are small next to the embedding, so
    bf16 rounding does not blow up through the layers (the REFERENCE warns that a plain
    std=0.3 init gives vLLM-bf16 vs HF-fp32 logit gaps of ~1.4).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 32: a head size the CPU attention kernels support
INTERMEDIATE = 256
VOCAB = 1024
MAX_POS = 512

# name -> (architecture, dtype, tied, seed, base model for an updated weight set)
MODELS = {
    "llama-fp32": ("llama", torch.float32, False, 1, None),
    "llama-bf16": ("llama", torch.bfloat16, False, 2, None),
    "qwen2-tied-bf16": ("qwen2", torch.bfloat16, True, 3, None),
    # Second weight sets for the in-flight update scenarios ("what the trainer pushes").
    "llama-fp32-update": ("llama", torch.float32, False, 11, "llama-fp32"),
    "qwen2-tied-bf16-update": ("qwen2", torch.bfloat16, True, 13, "qwen2-tied-bf16"),
    # Another architecture whose checkpoint already stores fused tensors (qkv_proj,
    # gate_up_proj), with a word-level tokenizer (V0 needs one for logit_bias /
    # allowed_token_ids): the wide scenario list (vllm_compat/golden/scenarios.py WIDE).
    "phi3-fp32": ("phi3", torch.float32, False, 4, None),
}
# Models that get a hand-written word-level tokenizer.json (token i is "<unk>", "<s>",
# "</s>" for i < 3, else "w<i>"; whitespace-split; no merges, so decoding is a join).
TOKENIZER_MODELS = {"phi3-fp32"}

# Per-tensor init std. Embedding rows have norm ~sqrt(HIDDEN); the head scale sets how
# peaky the logits are (logit std ~ sqrt(HIDDEN) * HEAD_STD after the final RMSNorm).
EMBED_STD = 1.0
QK_STD = 0.12
VO_STD = 0.06
MLP_IN_STD = 0.09
MLP_OUT_STD = 0.04
HEAD_STD = 0.40
TIED_EMBED_STD = 0.40  # tied models: the embedding is also the head
# Tied models predict their own input token unless the layers outweigh the embedding
# in the residual stream (the head is the embedding): scale the branch outputs up.
TIED_BRANCH_GAIN = 4.0
UPDATE_SCALE = 0.5  # update = base + UPDATE_SCALE * fresh draw (a large "training step")


def _config(arch: str, dtype: torch.dtype, tied: bool) -> dict:
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    cfg = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": dtype_name,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama",
                   attention_bias=False, mlp_bias=False)
    elif arch == "phi3":
        cfg.update(architectures=["Phi3ForCausalLM"], model_type="phi3", attention_dropout=0.0,
                   embd_pdrop=0.0, resid_pdrop=0.0, original_max_position_embeddings=MAX_POS,
                   partial_rotary_factor=1.0, rope_scaling=None, sliding_window=None, pad_token_id=0)
    else:
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                   use_sliding_window=False, sliding_window=None, max_window_layers=LAYERS)
    return dict(sorted(cfg.items()))


def _weights(arch: str, tied: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    gain = TIED_BRANCH_GAIN if tied else 1.0
    w: dict[str, torch.Tensor] = {}
    w["model.embed_tokens.weight"] = randn(VOCAB, HIDDEN, std=TIED_EMBED_STD if tied else EMBED_STD)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        if arch == "phi3":  # same draws as Llama's, stored fused (q|k|v and gate|up rows)
            q = randn(HEADS * HEAD_DIM, HIDDEN, std=QK_STD)
            k = randn(KV_HEADS * HEAD_DIM, HIDDEN, std=QK_STD)
            v = randn(KV_HEADS * HEAD_DIM, HIDDEN, std=VO_STD)
            w[p + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
            w[p + "self_attn.o_proj.weight"] = randn(HIDDEN, HEADS * HEAD_DIM, std=VO_STD)
            gate = randn(INTERMEDIATE, HIDDEN, std=MLP_IN_STD)
            up = randn(INTERMEDIATE, HIDDEN, std=MLP_IN_STD)
            w[p + "mlp.gate_up_proj.weight"] = torch.cat([gate, up])
            w[p + "mlp.down_proj.weight"] = randn(HIDDEN, INTERMEDIATE, std=MLP_OUT_STD)
            w[p + "input_layernorm.weight"] = 1.0 + randn(HIDDEN, std=0.05)
            w[p + "post_attention_layernorm.weight"] = 1.0 + randn(HIDDEN, std=0.05)
            continue
        w[p + "self_attn.q_proj.weight"] = randn(HEADS * HEAD_DIM, HIDDEN, std=QK_STD)
        w[p + "self_attn.k_proj.weight"] = randn(KV_HEADS * HEAD_DIM, HIDDEN, std=QK_STD)
        w[p + "self_attn.v_proj.weight"] = randn(KV_HEADS * HEAD_DIM, HIDDEN, std=VO_STD)
        w[p + "self_attn.o_proj.weight"] = randn(HIDDEN, HEADS * HEAD_DIM, std=VO_STD * gain)
        if arch == "qwen2":  # Qwen2 has q/k/v biases
            w[p + "self_attn.q_proj.bias"] = randn(HEADS * HEAD_DIM, std=0.1)
            w[p + "self_attn.k_proj.bias"] = randn(KV_HEADS * HEAD_DIM, std=0.1)
            w[p + "self_attn.v_proj.bias"] = randn(KV_HEADS * HEAD_DIM, std=0.1)
        w[p + "mlp.gate_proj.weight"] = randn(INTERMEDIATE, HIDDEN, std=MLP_IN_STD)
        w[p + "mlp.up_proj.weight"] = randn(INTERMEDIATE, HIDDEN, std=MLP_IN_STD)
        w[p + "mlp.down_proj.weight"] = randn(HIDDEN, INTERMEDIATE, std=MLP_OUT_STD * gain)
        w[p + "input_layernorm.weight"] = 1.0 + randn(HIDDEN, std=0.05)
        w[p + "post_attention_layernorm.weight"] = 1.0 + randn(HIDDEN, std=0.05)
    w["model.norm.weight"] = 1.0 + randn(HIDDEN, std=0.05)
    if not tied:
        w["lm_head.weight"] = randn(VOCAB, HIDDEN, std=HEAD_STD)
    return w


def build(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    arch, dtype, tied, seed, base = MODELS[name]
    weights = _weights(arch, tied, seed)
    if base is not None:
        # An update keeps the base model's character: base + a scaled fresh draw
        # (norm weights stay near 1 because the fresh draw's norms are 1 + noise).
        b_arch, _, _, b_seed, _ = MODELS[base]
        base_w = _weights(b_arch, tied, b_seed)
        weights = {k: base_w[k] + UPDATE_SCALE * (v - (1.0 if "norm" in k else 0.0))
                   for k, v in weights.items()}
    weights = {k: v.to(dtype).contiguous() for k, v in sorted(weights.items())}
    return _config(arch, dtype, tied), weights


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (config: bos 1, eos 2, pad 0)


def tokenizer_files() -> dict[str, dict]:
    """A word-level tokenizer.json (the `tokenizers` JSON format, written by hand so the file
    is byte-identical with any version) and its tokenizer_config.json."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB)})
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, tok in enumerate(SPECIAL_TOKENS)]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
                 "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<unk>", "model_max_length": MAX_POS,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def write(name: str, out: Path) -> None:
    cfg, weights = build(name)
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    if name in TOKENIZER_MODELS:
        for fname, content in tokenizer_files().items():
            # tokenizer.json keeps the vocab in id order (readable); the config is sorted.
            (d / fname).write_text(json.dumps(content, indent=1, sort_keys=fname != "tokenizer.json") + "\n")
    print(f"{name}: {sum(v.numel() for v in weights.values())} params -> {d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/golden/models"))
    ap.add_argument("models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    for name in args.models:
        write(name, Path(args.out))


if __name__ == "__main__":
    main()

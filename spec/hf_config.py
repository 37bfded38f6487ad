"""Loading a Hugging Face `config.json` (Llama and GPT-2 families) into a ModelSpec."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import SpecError, SpecIssue
from .model import ModelSpec


def model_from_hf_config(config: dict | str | Path, seq_len: int | None = None) -> ModelSpec:
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    mtype = config.get("model_type", "")
    if mtype in ("llama", "mistral", "qwen2"):
        return ModelSpec(
            name=config.get("_name_or_path") or mtype,
            layers=config["num_hidden_layers"], hidden=config["hidden_size"],
            heads=config["num_attention_heads"], kv_heads=config.get("num_key_value_heads"),
            ffn_hidden=config["intermediate_size"], vocab=config["vocab_size"],
            seq_len=seq_len or config.get("max_position_embeddings", 4096),
            head_dim=config.get("head_dim"), activation="swiglu", norm="rmsnorm", position="rope",
            bias=bool(config.get("attention_bias", False)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_theta=float(config.get("rope_theta", 10000.0)), norm_eps=float(config.get("rms_norm_eps", 1e-5)))
    if mtype == "gpt2":
        hidden = config["n_embd"]
        return ModelSpec(
            name=config.get("_name_or_path") or "gpt2", layers=config["n_layer"], hidden=hidden,
            heads=config["n_head"], ffn_hidden=config.get("n_inner") or 4 * hidden, vocab=config["vocab_size"],
            seq_len=seq_len or config.get("n_positions", 1024), activation="gelu", norm="layernorm",
            position="learned", bias=True, tied_embeddings=True,
            norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))
    raise SpecError([SpecIssue("model_type", mtype, "only Llama-family and GPT-2 configs are understood.",
                               "write the [model] table by hand.")])

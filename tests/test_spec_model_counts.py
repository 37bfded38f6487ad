"""Parameter and FLOP counts of ModelSpec against published totals and independent derivations."""
from __future__ import annotations

import pytest

from loom.spec import PRESETS, ModelSpec, model_from_hf_config


def preset(name: str, **over) -> ModelSpec:
    return ModelSpec(name=name, **{**PRESETS[name], **over})


# Published totals: Llama 3 (Meta 2024; HF model cards: 8.03B, 70.6B, 405.9B... the safetensors totals quoted
# below are the exact parameter counts of meta-llama/Meta-Llama-3-8B, -70B and Llama-3.1-405B), GPT-3 175B
# (Brown et al. 2020 Table 2.1, with embeddings and positions 174.6B), GPT-2 small (HF gpt2: 124,439,808).
@pytest.mark.parametrize("name, published, rel", [
    ("llama3-8b", 8_030_261_248, 0),
    ("llama3-70b", 70_553_706_496, 0),
    ("llama3-405b", 405_853_388_800, 0),
    ("gpt2-124m", 124_439_808, 0),
    ("gpt3-175b", 174.6e9, 5e-4),
])
def test_param_count_matches_published_totals(name, published, rel):
    n = preset(name).param_count()
    if rel == 0:
        assert n == published
    else:
        assert n == pytest.approx(published, rel=rel)


def test_gpt3_175b_closed_form():
    """Independent closed form (Narayanan et al. 2021 eq. 2 with biases, learned positions and tied
    embeddings): P = 12·l·h² + 13·l·h + (V + s)·h + 2h (final LayerNorm)."""
    m = preset("gpt3-175b")
    l, h, v, s = m.layers, m.hidden, m.vocab, m.seq_len
    assert m.param_count() == 12 * l * h * h + 13 * l * h + (v + s) * h + 2 * h


def test_llama_closed_form_with_gqa():
    """Llama: per layer 2·h·q + 2·h·kv (attention) + 3·h·f (SwiGLU) + 2h (two RMSNorms); embedding and head
    untied; one final norm."""
    m = preset("llama3-8b")
    h, f, kv = m.hidden, m.ffn_hidden, m.n_kv_heads * (m.hidden // m.heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    assert m.param_count() == m.layers * layer + 2 * m.vocab * h + h


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b", "gpt3-175b", "gpt2-124m"])
def test_model_flops_per_token_is_6n_plus_attention(name):
    """PaLM/Kaplan rule of thumb, derived here from the shapes: 6·N_matmul + 12·L·d_attn·s, where N_matmul
    counts the weight matrices the tokens multiply (all layer weights and the LM head), 6 = 2 (multiply-add)
    × 3 (forward + backward, Kaplan et al. 2020 §2.1: C ≈ 6N)."""
    m = preset(name)
    h, f, l, s = m.hidden, m.ffn_hidden, m.layers, m.seq_len
    q = m.heads * (h // m.heads)
    kv = m.n_kv_heads * (h // m.heads)
    mlp = (3 if m.activation == "swiglu" else 2) * h * f
    n_matmul = l * (2 * h * q + 2 * h * kv + mlp) + m.vocab * h
    assert m.model_flops_per_token() == pytest.approx(6 * n_matmul + 12 * l * q * s, rel=1e-12)


def test_kaplan_6n_is_close_for_a_large_model():
    """For GPT-3 175B at s = 2048 the attention term is small: model FLOPs/token within 3 % of 6·N."""
    m = preset("gpt3-175b")
    assert m.model_flops_per_token() == pytest.approx(6 * m.param_count(), rel=0.03)


def test_train_flops_recompute_adds_a_forward():
    m = preset("llama3-8b")
    none, full = m.train_flops_per_token("none"), m.train_flops_per_token("full")
    assert none == pytest.approx(3 * m.forward_flops_per_token())
    # full recompute reruns every layer's forward, not the LM head: + (forward − 2·V·h)
    assert full - none == pytest.approx(m.forward_flops_per_token() - 2 * m.vocab * m.hidden)


def test_hf_llama_config_loads():
    cfg = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
           "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 1000,
           "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False}
    m = model_from_hf_config(cfg)
    assert (m.layers, m.hidden, m.heads, m.n_kv_heads, m.ffn_hidden, m.vocab, m.seq_len) == \
        (4, 256, 8, 2, 688, 1000, 2048)
    assert m.activation == "swiglu" and m.norm == "rmsnorm" and not m.tied_embeddings
    kv = 2 * 32
    assert m.param_count() == 4 * (2 * 256 * 256 + 2 * 256 * kv + 3 * 256 * 688 + 2 * 256) + 2 * 1000 * 256 + 256


def test_hf_gpt2_config_loads_to_the_124m_count():
    cfg = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
           "n_positions": 1024, "layer_norm_epsilon": 1e-5}
    m = model_from_hf_config(cfg)
    assert m.param_count() == 124_439_808
    assert m.tied_embeddings and m.position == "learned" and m.bias and m.activation == "gelu"

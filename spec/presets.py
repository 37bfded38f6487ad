"""Model presets with exact public dimensions.

Sources: GPT-2 (Radford et al. 2019; HF openai-community/gpt2 config), GPT-3 (Brown et al. 2020, Table 2.1),
Llama 3 / 3.1 (Meta, "The Llama 3 Herd of Models" 2024, Table 3; HF meta-llama configs), Llama 3.2 1B/3B
(HF meta-llama/Llama-3.2-1B config: tied embeddings, rope_theta 500000).
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(layers=12, hidden=768, heads=12, ffn_hidden=3072, vocab=50257, seq_len=1024,
                      activation="gelu", norm="layernorm", position="learned", bias=True, tied_embeddings=True),
    "gpt2-350m": dict(layers=24, hidden=1024, heads=16, ffn_hidden=4096, vocab=50257, seq_len=1024,
                      activation="gelu", norm="layernorm", position="learned", bias=True, tied_embeddings=True),
    "gpt3-175b": dict(layers=96, hidden=12288, heads=96, ffn_hidden=49152, vocab=50257, seq_len=2048,
                      activation="gelu", norm="layernorm", position="learned", bias=True, tied_embeddings=True),
    "llama3.2-1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab=128256,
                        seq_len=8192, tied_embeddings=True),
    "llama3.2-3b": dict(layers=28, hidden=3072, heads=24, kv_heads=8, ffn_hidden=8192, vocab=128256,
                        seq_len=8192, tied_embeddings=True),
    "llama3-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256, seq_len=8192),
    "llama3-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=128256, seq_len=8192),
    "llama3-405b": dict(layers=126, hidden=16384, heads=128, kv_heads=8, ffn_hidden=53248, vocab=128256,
                        seq_len=8192),
}

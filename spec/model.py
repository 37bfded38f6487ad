"""The model a user trains: a Llama- or GPT-style decoder-only transformer, and what follows from its shape.

Parameter counts are exact (checked against the published totals in tests). FLOPs follow the usual matmul
accounting (Kaplan et al. 2020 §2.1; Narayanan et al. 2021 §5.1): a matmul of an (m×k) by a (k×n) matrix is
2·m·k·n FLOPs, the backward pass is twice the forward. Norms, activations and softmax are not counted in FLOPs
(they are memory-bound; the simulator costs them by bytes).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt | None = None          # GQA; None means = heads (MHA)
    ffn_hidden: PositiveInt
    vocab: PositiveInt
    seq_len: PositiveInt
    head_dim: PositiveInt | None = None          # None means hidden // heads
    activation: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    position: Literal["rope", "learned"] = "rope"
    bias: bool = False                           # linear biases (GPT-2/3 have them, Llama does not)
    tied_embeddings: bool = False
    rope_theta: float = Field(default=500000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)

    @model_validator(mode="after")
    def _shape(self) -> "ModelSpec":
        if self.heads % self.n_kv_heads:
            raise ValueError(f"kv_heads={self.n_kv_heads} must divide heads={self.heads} (each KV head serves "
                             f"a whole group of query heads); use one of {[d for d in range(1, self.heads + 1) if self.heads % d == 0]}")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}; set head_dim "
                             f"explicitly or pick heads dividing {self.hidden}")
        return self

    # ---- shape -------------------------------------------------------------------------------------------
    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.d_head

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    # ---- parameters --------------------------------------------------------------------------------------
    def attention_params(self) -> int:
        h = self.hidden
        weights = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h   # Wq, Wk, Wv, Wo
        biases = (self.q_dim + 2 * self.kv_dim + h) if self.bias else 0
        return weights + biases

    def mlp_params(self) -> int:
        h, f = self.hidden, self.ffn_hidden
        n_in = 2 if self.gated else 1                                     # SwiGLU has gate and up projections
        weights = (n_in + 1) * h * f
        biases = (n_in * f + h) if self.bias else 0
        return weights + biases

    def norm_params(self) -> int:
        """One norm's parameters: RMSNorm has a scale, LayerNorm a scale and a shift."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def layer_params(self) -> int:
        return self.attention_params() + self.mlp_params() + 2 * self.norm_params()

    def layer_matmul_params(self) -> int:
        """Weights that take part in matmuls (no biases, no norms): what FLOPs are counted on."""
        h, f = self.hidden, self.ffn_hidden
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + (3 if self.gated else 2) * h * f

    def layer_matmuls(self) -> list[tuple[int, int]]:
        """(in, out) widths of one layer's matmuls in the order its forward runs them: Q, K, V, output projection,
        then gate, up, down (SwiGLU; torchtitan's w1, w3, w2) or up, down (GELU). Per-op recompute ("op") saves
        the outputs of the 1st, 3rd, 5th, ... of these and recomputes the others."""
        h, f, q, kv = self.hidden, self.ffn_hidden, self.q_dim, self.kv_dim
        mlp = [(h, f), (h, f), (f, h)] if self.gated else [(h, f), (f, h)]
        return [(h, q), (h, kv), (h, kv), (q, h)] + mlp

    def embedding_params(self) -> int:
        """Input token embedding plus learned position embedding (if any)."""
        return self.vocab * self.hidden + (self.seq_len * self.hidden if self.position == "learned" else 0)

    def head_params(self) -> int:
        """The LM head's own parameters (zero when tied to the input embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def param_count(self) -> int:
        return (self.embedding_params() + self.layers * self.layer_params() + self.norm_params()
                + self.head_params())

    def non_embedding_params(self) -> int:
        return self.param_count() - self.embedding_params()

    # ---- FLOPs per token ---------------------------------------------------------------------------------
    def attention_core_flops_per_token(self, causal: bool = True) -> float:
        """Forward FLOPs of QK^T and PV for one token in one layer.

        Non-causal: each token scores seq_len keys: 2·s·q_dim for QK^T plus 2·s·q_dim for PV = 4·s·q_dim.
        Causal (the convention Loom uses for *work done*): a token attends on average to s/2 keys, so half of
        that, 2·s·q_dim (FlashAttention-2 paper §4.1 counts causal attention this way)."""
        full = 4.0 * self.seq_len * self.q_dim
        return full / 2 if causal else full

    def forward_flops_per_token(self, causal: bool = True) -> float:
        """All matmul FLOPs of one forward pass per token: layers, attention core and the LM head."""
        matmul = 2.0 * (self.layers * self.layer_matmul_params() + self.vocab * self.hidden)
        return matmul + self.layers * self.attention_core_flops_per_token(causal)

    def train_flops_per_token(self, recompute: str = "none", causal: bool = True) -> float:
        """Forward + backward (2x forward) + what recompute runs again.

        Full recompute reruns each layer's forward (not the head); selective reruns the attention core only
        (Korthikanti et al. 2022 §4.2); per-op ("op") reruns the matmuls whose outputs it does not save (every
        second one: K, output projection, up or down) and not the attention core, whose outputs it saves
        (torchtitan/models/llama3/infra/parallelize.py _save_list, the "every second mm" rule)."""
        fwd = self.forward_flops_per_token(causal)
        extra = 0.0
        if recompute == "full":
            extra = fwd - 2.0 * self.vocab * self.hidden
        elif recompute == "selective":
            extra = self.layers * self.attention_core_flops_per_token(causal)
        elif recompute == "op":
            extra = self.layers * self.op_recompute_flops_per_token()
        return 3.0 * fwd + extra

    def op_recompute_flops_per_token(self) -> float:
        """Matmul FLOPs per token one layer reruns under per-op recompute: the 2nd, 4th, ... matmuls."""
        return sum(2.0 * i * o for i, o in self.layer_matmuls()[1::2])

    def model_flops_per_token(self) -> float:
        """FLOPs per token for MFU, in the PaLM convention (Chowdhery et al. 2022, App. B): 6·N + 12·L·q_dim·s,
        with N the matmul weights (layers and LM head, no embedding lookup) and attention counted non-causal.
        For an untied Llama this is exactly 6·N_non-embedding + 12·L·d·s, the formula of torchtitan and of the
        H200 baseline in shared/reference. No recompute."""
        n = self.layers * self.layer_matmul_params() + self.vocab * self.hidden
        return 6.0 * n + 12.0 * self.layers * self.q_dim * self.seq_len

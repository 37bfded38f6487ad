"""Compute-optimal model sizing from the Chinchilla scaling law, and two things that follow from it.

- Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), §3.3 eq. (2): the parametric loss
  L(N, D) = E + A/N^α + B/D^β fitted by approach 3, published constants E=1.69, A=406.4, B=410.7, α=0.34,
  β=0.28; training compute C ≈ 6·N·D (§3, from Kaplan et al. 2020 §2.1). Its optimum under C = 6·N·D is
  eq. (4): N_opt = G·(C/6)^a, D_opt = G⁻¹·(C/6)^b with G = (αA/(βB))^(1/(α+β)), a = β/(α+β), b = α/(α+β).
  N counts all parameters (the paper includes embeddings, unlike Kaplan et al.).
  Note: with these rounded constants approach 3 puts the Gopher-budget optimum (5.76e23 FLOPs) near 33B
  parameters and ~2.9T tokens, not at Chinchilla's 70B/1.4T (which approaches 1 and 2 give, Table 3); the
  paper's Figure 1 shows ~40B for approach 3, and Besiroglu et al. 2024 ("Chinchilla Scaling: A replication
  attempt") trace the gap to the fit. The 20-tokens-per-parameter rule (≈ approaches 1/2) is what hits 70B/1.4T.
- Sardana et al. 2023 ("Beyond Chinchilla-Optimal: Accounting for Inference in Language Model Scaling Laws"),
  §2: at a fixed target loss ℓ, choose N (and the D_tr that reaches ℓ) minimizing total FLOPs
  6·N·D_tr + 2·N·D_inf, where D_inf is the number of tokens served at inference.
- de Vries 2023 ("Go smol or go home", blog post): from the same fit, the extra training compute needed to reach
  the compute-optimal loss with a model k times the optimal size ("Harm's law"), and the critical size where the
  overhead diverges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChinchillaFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params: float, tokens: float) -> float:
        """Hoffmann et al. 2022 eq. (2)."""
        return self.E + self.A / n_params ** self.alpha + self.B / tokens ** self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing loss at C = 6·N·D: Hoffmann et al. 2022 eq. (4)."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        n = g * (flops / 6) ** (self.beta / s)
        return n, flops / (6 * n)

    def min_params_for_loss(self, loss: float) -> float:
        """Smallest N that can reach `loss` with unlimited data (the B/D^β term → 0)."""
        gap = loss - self.E
        if gap <= 0:
            return math.inf
        return (self.A / gap) ** (1 / self.alpha)

    def tokens_for_loss(self, n_params: float, loss: float) -> float:
        """D with L(N, D) = loss, inverted from eq. (2); inf when N is too small to ever reach it."""
        gap = loss - self.E - self.A / n_params ** self.alpha
        if gap <= 0:
            return math.inf
        return (self.B / gap) ** (1 / self.beta)


# Hoffmann et al. 2022 §3.3 (approach 3), the published constants.
CHINCHILLA = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
TOKENS_PER_PARAM = 20.0   # Hoffmann et al. 2022 Table 3 (approach 1): ~20 tokens per parameter at every scale


def twenty_tokens_rule(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with D = 20·N and 6·N·D = C, i.e. N = sqrt(C / (6·20))."""
    n = math.sqrt(flops / (6 * tokens_per_param))
    return n, tokens_per_param * n


def _golden_min(f, lo: float, hi: float, iters: int = 200) -> float:
    """Minimum of a unimodal f on [lo, hi] by golden-section search (no scipy in the simulator's deps)."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
        if b - a < 1e-12 * max(1.0, abs(a)):
            break
    return (a + b) / 2


@dataclass(frozen=True)
class InferenceOptimal:
    """Sardana et al. 2023 §2: the model that reaches `loss` at least total cost given `inference_tokens`."""
    loss: float
    inference_tokens: float
    n_params: float
    train_tokens: float
    train_flops: float
    inference_flops: float

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops

    @property
    def tokens_per_param(self) -> float:
        return self.train_tokens / self.n_params


def inference_optimal(loss: float, inference_tokens: float, fit: ChinchillaFit = CHINCHILLA) -> InferenceOptimal:
    """Minimize 6·N·D_tr(N) + 2·N·D_inf over N, with D_tr(N) the tokens that reach `loss` (Sardana et al. §2).

    The objective is unimodal in log N: it diverges as N falls to the smallest size that can reach `loss` (D_tr
    → ∞) and grows linearly for large N. Searched in log N between just above that size and 10^4 times it."""
    n_min = fit.min_params_for_loss(loss)
    if not math.isfinite(n_min):
        raise ValueError(f"loss {loss} is at or below the irreducible loss E = {fit.E}: no model reaches it")

    def total(log_n: float) -> float:
        n = math.exp(log_n)
        return 6 * n * fit.tokens_for_loss(n, loss) + 2 * n * inference_tokens

    log_n = _golden_min(total, math.log(n_min) + 1e-9, math.log(n_min) + math.log(1e4))
    n = math.exp(log_n)
    d = fit.tokens_for_loss(n, loss)
    return InferenceOptimal(loss, inference_tokens, n, d, 6 * n * d, 2 * n * inference_tokens)


def harms_overhead(k: float, flops: float, fit: ChinchillaFit = CHINCHILLA) -> float:
    """Extra training compute (fraction of C) to reach the compute-optimal loss at budget C with a model of
    k·N_opt parameters (de Vries 2023). Solved numerically from eq. (2); inf below the critical size."""
    n_opt, d_opt = fit.optimal(flops)
    target = fit.loss(n_opt, d_opt)
    d = fit.tokens_for_loss(k * n_opt, target)
    return 6 * k * n_opt * d / flops - 1 if math.isfinite(d) else math.inf


def harms_overhead_closed_form(k: float, fit: ChinchillaFit = CHINCHILLA) -> float:
    """The same overhead in closed form, independent of C, A, B and E (derived for the test, and as de Vries
    notes): at the optimum the first-order condition gives A/N^α = X·β/(α+β) and B/D^β = X·α/(α+β) with
    X = L_opt − E; keeping the loss with N' = k·N gives D'/D = (α / (α + β − β·k^(−α)))^(1/β), and the
    overhead is k·D'/D − 1."""
    a, b = fit.alpha, fit.beta
    denom = a + b - b * k ** (-a)
    return k * (a / denom) ** (1 / b) - 1 if denom > 0 else math.inf


def critical_model_fraction(fit: ChinchillaFit = CHINCHILLA) -> float:
    """k below which no amount of data reaches the compute-optimal loss: α + β = β·k^(−α) (de Vries 2023)."""
    return (fit.beta / (fit.alpha + fit.beta)) ** (1 / fit.alpha)


def fraction_at_overhead(overhead: float, fit: ChinchillaFit = CHINCHILLA) -> float:
    """The model fraction k whose compute overhead equals `overhead` (e.g. 1.0 = twice the compute), by
    bisection on the closed form (monotone decreasing in k on (k_crit, 1])."""
    lo, hi = critical_model_fraction(fit) * (1 + 1e-12), 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if harms_overhead_closed_form(mid, fit) > overhead:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Overtrained:
    """A model trained past its compute-optimal point (e.g. Llama 3 8B on 15T tokens) against the
    compute-optimal model (approach-3 fit) that reaches the same predicted loss."""
    n_params: float
    tokens: float
    loss: float
    optimal_params: float
    optimal_tokens: float
    extra_train_flops: float          # 6·N·D − 6·N*·D*
    breakeven_inference_tokens: float  # where 2·(N* − N)·D_inf repays the extra training (Sardana et al. §2)

    @property
    def train_flops(self) -> float:
        return 6 * self.n_params * self.tokens

    @property
    def optimal_flops(self) -> float:
        return 6 * self.optimal_params * self.optimal_tokens


def overtrained(n_params: float, tokens: float, fit: ChinchillaFit = CHINCHILLA) -> Overtrained:
    loss = fit.loss(n_params, tokens)
    opt = inference_optimal(loss, 0.0, fit)
    extra = 6 * n_params * tokens - opt.train_flops
    saved_per_token = 2 * (opt.n_params - n_params)
    breakeven = extra / saved_per_token if saved_per_token > 0 else math.inf
    return Overtrained(n_params, tokens, loss, opt.n_params, opt.train_tokens, extra, max(breakeven, 0.0))

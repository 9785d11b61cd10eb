"""Key channel weights for cold keys (`qk` in a cold spec): finer cold steps where the queries look.

An attention logit's error from a key error e is q·e; with independent channel errors its mean square is
sum_c E[q_c^2] E[e_c^2]. The cold key grid (`kvstore.quant.cold.grid_quantize`) gives every channel of a
head one step s. With `qk` the keys are first multiplied by a weight w_c per (layer, kv head, channel), so
channel c gets the step s / w_c: the channels queries weigh most get the finest steps, at about the same
entropy-coded rate. Weights are powers of two, so the multiplication and its inverse are exact, and each
cold block stores them (int8 exponents, `kc_wexp`): decoding never needs the model.

Weights (`key_exponents`): w_c = (E[q_c^2] summed over the kv head's query heads, averaged over the RoPE pair
(c, c + D/2), which RoPE mixes) ^ (ALPHA / 2), divided by its geometric mean over the head's channels,
rounded to a power of two in [2^-MAX_EXP, 2^MAX_EXP]. ALPHA = 1 minimizes the logit error at a given rate
under the independence assumption; measured on SmolLM2 (cold spec C1 of docs/BENCHMARKS.md, three windows),
ALPHA 0.5 / 0.75 / 1 gave KL 0.0211 / 0.0242 / 0.0316 at -2.5% / -7.3% / -11.5% cold key-and-value bits
(1 with unrounded weights from text) against 0.0238 without weights; 0.75 buys the most bits per unit of KL.

Calibration (`query_energy`): the model's queries (its q projections' outputs) over CALIBRATION_TOKENS
pseudo-random token ids (a fixed seed): kvstash ships no text, and which channels are wide comes from the
weights and RoPE more than from the text. Measured (C1, three windows of WikiText-2): power-of-two weights
from these ids at ALPHA 0.5 gave KL 0.0211 at -2.5% bits; unrounded weights from 2,048 tokens of another
text (debian-faq) 0.0220 at -3.2%: real text buys nothing measurable.

Invariant: `key_weights(model, kv_heads, head_dim)` is a function of the model's weights and this module (same build,
same bits); a changed calibration changes the blocks written later, never how stored ones decode.
"""

from __future__ import annotations

import torch

ALPHA = 0.75  # exponent on the query RMS (above)
MAX_EXP = 8  # weights in [2^-8, 2^8]
CALIBRATION_TOKENS = 512
CALIBRATION_SEED = 0


class KeyWeightsUnavailable(ValueError):
    """The model's attention has no q projection this module can observe."""


def _decoder_layers(model) -> list:
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(getattr(lay, "self_attn", None), "q_proj") for lay in layers):
        raise KeyWeightsUnavailable(f"{type(model).__name__} has no decoder layers with self_attn.q_proj: "
                                    "qk does not apply")
    return list(layers)


@torch.no_grad()
def query_energy(model, head_dim: int, tokens: int = CALIBRATION_TOKENS,
                 seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """E[q^2] per (layer, query head, channel) [L, Hq, D] float64, over `tokens` pseudo-random ids."""
    layers = _decoder_layers(model)
    text = model.config.get_text_config(decoder=True)
    ids = torch.randint(0, text.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    sums: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(_mod, _inp, out):
            q = out.detach().double().reshape(-1, out.shape[-1] // head_dim, head_dim)
            sums[i] = q.pow(2).sum(0)
        return record

    handles = [lay.self_attn.q_proj.register_forward_hook(hook(i)) for i, lay in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([sums[i] for i in range(len(layers))]) / tokens


def key_exponents(energy: torch.Tensor, kv_heads: int, alpha: float = ALPHA) -> torch.Tensor:
    """int8 exponents [L, kv_heads, D] of the weights (module docstring) from query energy [L, Hq, D]."""
    layers, hq, d = energy.shape
    if hq % kv_heads or d % 2:
        raise KeyWeightsUnavailable(f"{hq} query heads over {kv_heads} kv heads, head_dim {d}: no weights")
    e = energy.double().reshape(layers, kv_heads, hq // kv_heads, d).sum(2)
    e = (e + e.roll(d // 2, -1)) / 2  # RoPE rotates channel c with c + D/2: a pair shares its energy
    logw = 0.5 * alpha * torch.log2(e.clamp_min(1e-30))
    logw = logw - logw.mean(-1, keepdim=True)  # geometric mean 1 per head
    return torch.round(logw).clamp(-MAX_EXP, MAX_EXP).to(torch.int8)


def key_weights(model, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The model's cold key weight exponents [L, kv_heads, head_dim] int8 (what `qk` uses)."""
    return key_exponents(query_energy(model, head_dim), kv_heads)


def pow2(exps: torch.Tensor) -> torch.Tensor:
    """2^exps as float32, built from the exponent bits (exact; |exps| <= 126)."""
    return ((exps.to(torch.int32) + 127) << 23).view(torch.float32)

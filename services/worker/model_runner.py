"""`ModelRunner`: a transformers causal LM, its tokenizer, and one forward pass at a time.

Invariants:
- `forward(cache, ids)` appends exactly `len(ids)` positions to `cache` and returns the float32 logits
  of the last position. Given the same cache state and ids it returns bit-identical logits (no
  dropout, fixed thread count), which is what makes offload/resume and schedule replay exact.
- `fingerprint` changes whenever weights, config, dtype, the linear layers' kernel (`linears`:
  services/worker/prepacked_linear.py) or kvstash's pass numerics (`attention.NUMERICS`) change; KV stored under one fingerprint is never loaded into a model with another (it is rebuilt from
  the session's history).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from kvstore.config import QuantConfig
from kvstore.device import (
    KVState,
    ModelShape,
    QuantizedKVCache,
    attention,
    check_model_supported,
    check_spec_supported,
    forward_rows,
    forward_segments,
    rope_for,
)
from kvstore.schedule import Pass
from services.config import MODEL_DTYPES, ModelConfig
from services.errors import FailedPrecondition, InvalidArgument
from services.worker import prepacked_linear

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Sampling:
    """Per-request sampling; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 0.0
    seed: int | None = None

    def generator(self, device) -> torch.Generator | None:
        if self.temperature <= 0:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.dtype` on `device`: "auto" is bfloat16 where products run natively in it (a CPU with AVX512-BF16 or
    AMX, then on prepacked weights; a CUDA device that supports it), else float32. docs/BENCHMARKS.md, "Default
    dtype", measures what bf16 costs (PPL) and gains (tokens/s, TTFT) on this machine."""
    if name not in MODEL_DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {', '.join(MODEL_DTYPES)}")
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and prepacked_linear.native_bf16_cpu() else torch.float32


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.name = cfg.name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.num_layers = check_model_supported(self.model.config)
        attention.install(self.model)  # SDPA that also serves caches handing it rotated K/V
        self._rope_obj = None
        self._key_exps = None
        prepack = cfg.prepack_weights and prepacked_linear.can_prepack(self.model)
        self.linears = prepacked_linear.KERNEL if prepack else "torch"
        self.fingerprint = self._fingerprint()  # from the plain weights, before any prepacking
        if prepack:
            prepacked_linear.prepack_linears(self.model)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        text = self.model.config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        self.shape = ModelShape(layers=self.num_layers, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                                head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                                dtype=str(self.dtype))
        log.info("loaded %s on %s (%s, linears: %s, %d torch threads), fingerprint %s", cfg.name, self.device,
                 str(self.dtype).removeprefix("torch."), self.linears, torch.get_num_threads(), self.fingerprint[:12])

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelRunner:
        """Resolve `cfg.name` (built-in, folder or hub id) through the model store and load it."""
        from services.worker.model_store import store_for

        return cls(cfg, store_for(cfg.cache_dir).resolve(cfg.name))

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=32, person=b"kvstash-model")
        h.update(self.model.config.to_json_string(use_diff=False).encode())
        h.update(str(self.dtype).encode())
        h.update(f"numerics {attention.NUMERICS}".encode())  # how kvstash computes a pass (kvstore/quant/attention.py)
        if self.linears != "torch":  # the linear layers' kernel (services/worker/prepacked_linear.py)
            h.update(f"linears {self.linears}".encode())
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ---- the forward pass ------------------------------------------------------------------------
    def new_cache(self, quant: QuantConfig) -> QuantizedKVCache:
        """An empty cache; raises UnsupportedModelError when `quant` cannot serve this model."""
        check_spec_supported(self.model.config, quant)
        return QuantizedKVCache(quant, self.num_layers, self._rope(quant))

    def restore_cache(self, state: KVState) -> QuantizedKVCache:
        """The cache `state` was exported from, bit for bit, on this runner's device."""
        return QuantizedKVCache.from_state(state, self.device, self._rope(QuantConfig.parse(state.quant_spec)))

    def clone_cache(self, cache: QuantizedKVCache) -> QuantizedKVCache:
        """A copy of `cache`, bit for bit, sharing no tensor with it (a fork's own cache)."""
        return self.restore_cache(cache.export_state())

    def _rope(self, quant: QuantConfig):
        """The model's RoPE (built once) when `quant` stores keys before RoPE, else None."""
        if not quant.pre_rope:
            return None
        if self._rope_obj is None:
            self._rope_obj = rope_for(self.model, quant)
        return self._rope_obj

    def key_exps(self):
        """The model's cold key weight exponents [layers, kv heads, head_dim] int8 numpy (cold specs with qk;
        `kvstore.quant.key_weights`), computed once (a pass over 512 calibration ids). Raises
        KeyWeightsUnavailable (a ValueError) for a model without q projections."""
        if self._key_exps is None:
            from kvstore.device import key_weights

            self._key_exps = key_weights(self.model, self.shape.kv_heads, self.shape.head_dim).numpy()
        return self._key_exps

    @torch.inference_mode()
    def forward(self, cache: QuantizedKVCache, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the model on top of `cache`; return last-position logits [vocab] float32."""
        return self.logits(cache, ids, keep=1)[-1]

    @torch.inference_mode()
    def logits(self, cache: QuantizedKVCache, ids: list[int], keep: int = 0) -> torch.Tensor:
        """Run `ids` on top of `cache`; float32 logits [len(ids) or keep, vocab] (keep=0: every position)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with attention.active(cache):
            out = self.model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0].float()

    def run_pass(self, cache: QuantizedKVCache, ids: list[int], p: Pass) -> None:
        """Feed `ids` (p.tokens of them) on top of `cache` in the pass shape `p` records (kvstore/schedule.py):
        a pass of its own, or rows of a batched pass of p.rows rows. What replay runs for a schedule entry."""
        if p.packed:
            self.forward_segments([(cache, ids)], p.rows)
        elif p.batched:
            self.forward_rows([(cache, t) for t in ids], p.rows)
        else:
            self.forward(cache, ids)

    def forward_rows(self, rows: list[tuple[QuantizedKVCache | None, int]], size: int) -> torch.Tensor:
        """One batched pass of shape [size, 1]: row i feeds token `rows[i][1]` at the next position of cache
        `rows[i][0]` (None: padding); float32 logits [len(rows), vocab] (kvstore.quant.rows.forward_rows)."""
        return forward_rows(self.model, rows, size)

    def forward_segments(self, segments: list[tuple[QuantizedKVCache, list[int]]], size: int) -> torch.Tensor:
        """One packed prefill pass of shape [1, size]: segment i feeds `segments[i][1]` on top of cache
        `segments[i][0]`; float32 logits [len(segments), vocab] of each segment's last position
        (kvstore.quant.segments.forward_segments)."""
        return forward_segments(self.model, segments, size)

    @staticmethod
    def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
        if s.temperature <= 0 or gen is None:
            if logits.device.type == "cpu":  # numpy's argmax: the same index (the first maximum; a NaN wins as
                return int(logits.numpy().argmax())  # in torch), ~20x faster than torch's on a vocabulary row
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if 0 < s.top_p < 1:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < s.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    # ---- tokenization -----------------------------------------------------------------------------
    def encode_text(self, text: str, first: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=first)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]], first: bool, history: list[int]) -> list[int]:
        """Render chat turns with the model's template.

        For a continued session only the new turns are rendered, such that history + new tokens equal
        what the template gives for the whole conversation: the previous assistant turn is closed as the
        template closes it (the generated end-of-turn token counts; a cut-off turn gets the full closer).
        """
        tok = self.tokenizer
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise InvalidArgument(f"chat role {m['role']!r} must be system, user or assistant")
        if not tok.chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode_text(text, first)
        if first:
            return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
        # Render an anchor conversation ending in an assistant turn, with and without the new turns;
        # the difference is the new turns, and what follows the anchor's reply is the turn closer.
        anchor = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"},
                  {"role": "assistant", "content": "z"}]
        base = tok.apply_chat_template(anchor, tokenize=False)
        full = tok.apply_chat_template(anchor + messages, add_generation_prompt=True, tokenize=False)
        if not full.startswith(base) or "z" not in base:
            raise InvalidArgument("this model's chat template cannot continue a conversation incrementally")
        closer = base[base.rindex("z") + 1:]
        if history and history[-1] in self.eos_ids:
            eos_text = tok.decode([history[-1]])
            closer = closer[len(eos_text):] if closer.startswith(eos_text) else closer
        return self.encode_text(closer + full[len(base):], first=False)

    def encode_extension(self, messages: list[dict[str, str]], history: list[int]) -> list[int]:
        """The tokens a whole conversation `messages` adds to a session's `history`: its rendering must begin
        with every token of the history (generated ones included) and go beyond it, else FailedPrecondition
        (the client's resent text re-tokenizes differently, or the history was edited)."""
        full = self.encode_chat(messages, True, [])
        n = len(history)
        if len(full) <= n or full[:n] != history:
            same = next((i for i, (a, b) in enumerate(zip(full, history, strict=False)) if a != b), min(n, len(full)))
            raise FailedPrecondition(f"the conversation does not extend the session: its rendering differs from "
                                     f"the session's {n} tokens at token {same}")
        return full[n:]

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The opening turns of a conversation as the template renders them (no generation prompt): the
        prefix every conversation that starts with these turns shares."""
        tok = self.tokenizer
        if not tok.chat_template:
            return self.encode_text("".join(f"{m['role']}: {m['content']}\n" for m in messages), True)
        return list(tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                            return_dict=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """Incremental detokenization: emits only complete characters (holds back a partial UTF-8 tail)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.runner.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta

"""`kvstash bench codec`: lossless coding of a real session's quantized KV, every predictor x coder.

    kvstash bench codec [--model M] [--tokens 2048] [--kv int4:g32:gv32:r128] [--json]

A session of `--tokens` tokens of text is prefilled with the KV spec, its state exported, and the sealed
part (codes, fp16 scales and zeros, outlier tables) coded losslessly in every way below; bits are per
sealed K/V element. Floors: the order-0 entropy of the codes (and of each predictor's residuals, mod
2^bits), with scales and zeros at their raw 16 bits. Predictors (integer domain, mod 2^bits): none;
previous token, same channel; cross-layer (layer l minus layer l-1); per-channel linear (a * previous +
b, fitted per layer and channel, coefficients counted). Coders: zstd levels 3/9/19 (and long mode), on
the packed bundle as is (`zstd`) and on the stream-transformed bundle (`streams`: channel-major key
codes, byte planes), which is the service's codec. The full-precision window is reported as bytes per
session. Throughput is MB/s of fp16-equivalent KV, one core.
"""

from __future__ import annotations

import json
import time

import numpy as np


def add_codec_parser(kinds, text_default: str) -> None:
    p = kinds.add_parser("codec", help="lossless codec: bits per element for every predictor x coder")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--text", default=text_default)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--kv", default="int4:g32:gv32:r128")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=run_codec)


def entropy(a: np.ndarray) -> float:
    _, cnt = np.unique(a, return_counts=True)
    p = cnt / cnt.sum()
    return float(-(p * np.log2(p)).sum())


def _codes(state, quant, layers: int, side: str) -> list[np.ndarray]:
    import torch

    from kvstore.quant.pack import unpack

    t = state.tensor_dict()
    d = t["0.k_scale"].shape[-1]
    return [unpack(torch.from_numpy(t[f"{l}.{side}_codes"]), quant.bits_for(l)[side == "v"], d).numpy()[0]
            for l in range(layers)]  # [H, T, D] per layer


def predictor_floors(state, quant, layers: int) -> dict[str, float]:
    """Order-0 entropy of codes and of each predictor's residuals (bits per code)."""
    out = {}
    for side in "kv":
        cs = _codes(state, quant, layers, side)
        m = 1 << quant.bits_for(0)[side == "v"]
        n = sum(c.size for c in cs)
        out[f"{side}:none"] = sum(entropy(c) * c.size for c in cs) / n
        out[f"{side}:prev_token"] = sum(entropy((c[:, 1:].astype(np.int16) - c[:, :-1]) % m) * c[:, 1:].size
                                        for c in cs) / sum(c[:, 1:].size for c in cs)
        out[f"{side}:cross_layer"] = sum(entropy((b.astype(np.int16) - a) % m) * b.size
                                         for a, b in zip(cs, cs[1:])) / sum(c.size for c in cs[1:])
        bits = coef = 0.0
        for c in cs:
            x, y = c[:, :-1].astype(np.float64), c[:, 1:].astype(np.float64)  # [H, T-1, D]
            xm, ym = x.mean(1, keepdims=True), y.mean(1, keepdims=True)
            a = ((x - xm) * (y - ym)).sum(1, keepdims=True) / np.maximum(((x - xm) ** 2).sum(1, keepdims=True), 1e-9)
            pred = np.rint(a * x + (ym - a * xm)).astype(np.int16)
            bits += entropy((y.astype(np.int16) - pred) % m) * y.size
            coef += a.size * 2 * 16  # two fp16 coefficients per (head, channel)
        out[f"{side}:linear"] = (bits + coef) / sum(c[:, 1:].size for c in cs)
    return out


def coder_table(state, fingerprint: str, n_sealed_elems: int) -> list[dict]:
    from kvstore.codec.container import Codec
    from kvstore.codec.kv import decode_kv, encode_kv

    rows = []
    fp16_bytes = n_sealed_elems * 2
    for codec in (Codec.ZSTD, Codec.ZSTD_STREAMS):
        for level in (3, 9, 19):
            t0 = time.perf_counter()
            blob = encode_kv(state, model_fingerprint=fingerprint, level=level, codec=codec)
            t1 = time.perf_counter()
            back = decode_kv(blob, model_fingerprint=fingerprint)
            t2 = time.perf_counter()
            assert back.equals(state), "lossless codec round trip failed"
            rows.append({"coder": f"{'streams' if codec == Codec.ZSTD_STREAMS else 'zstd'}-{level}",
                         "bits_per_element": len(blob) * 8 / n_sealed_elems,
                         "ratio_vs_fp16": fp16_bytes / len(blob),
                         "encode_mb_s": fp16_bytes / 1e6 / (t1 - t0), "decode_mb_s": fp16_bytes / 1e6 / (t2 - t1)})
    return rows


def run_codec(args) -> int:
    import torch

    from kvstore.config import QuantConfig
    from kvstore.quant.state import KVState
    from services.cli.eval import load_ids
    from services.config import ModelConfig
    from services.worker.model_runner import ModelRunner

    torch.set_num_threads(1)
    quant = QuantConfig.load(args.kv)
    runner = ModelRunner.load(ModelConfig(name=args.model))
    ids = load_ids(runner, args.text, args.tokens)
    cache = runner.new_cache(quant)
    for s in range(0, len(ids), 256):
        runner.logits(cache, ids[s:s + 256], keep=1)
    state = cache.export_state()
    sealed = KVState(state.num_tokens, state.quant_spec, state.meta,
                     [(n, a) for n, a in state.tensors if n.split(".", 1)[1] not in ("k_win", "v_win", "k_sink", "v_sink")])
    window = KVState(state.num_tokens, state.quant_spec, state.meta,
                     [(n, a) for n, a in state.tensors if n.split(".", 1)[1] in ("k_win", "v_win", "k_sink", "v_sink")])
    layers = runner.num_layers
    win = state.tensor_dict()
    n_sealed = sum(2 * int(np.prod(win[f"{l}.k_win"].shape[:2])) * cache.layers[l].n_sealed * win[f"{l}.k_win"].shape[-1]
                   for l in range(layers))
    meta_raw = sum(a.nbytes for n, a in sealed.tensors if n.endswith(("_scale", "_zero"))) * 8 / n_sealed
    res = {"spec": quant.spec(), "tokens": len(ids), "sealed_elements": n_sealed,
           "packed_bits_per_element": sealed.nbytes * 8 / n_sealed, "metadata_raw_bits_per_element": meta_raw,
           "floors": predictor_floors(sealed, quant, layers), "coders": coder_table(sealed, runner.fingerprint, n_sealed)}
    from kvstore.codec.kv import encode_kv

    res["window_bytes_per_session"] = len(encode_kv(window, model_fingerprint=runner.fingerprint, level=9))
    best = min(res["coders"], key=lambda r: r["bits_per_element"])
    res.update(bits_per_element=best["bits_per_element"], ratio_vs_fp16=best["ratio_vs_fp16"],
               decode_mb_s=best["decode_mb_s"], best_coder=best["coder"])
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['spec']}, {res['tokens']} tokens, {n_sealed} sealed K/V elements; packed "
          f"{res['packed_bits_per_element']:.3f} bits/elem (metadata {meta_raw:.3f})")
    print("| coder | bits/elem | × vs fp16 | encode MB/s | decode MB/s |\n| --- | ---: | ---: | ---: | ---: |")
    for r in res["coders"]:
        print(f"| {r['coder']} | {r['bits_per_element']:.3f} | {r['ratio_vs_fp16']:.2f} | {r['encode_mb_s']:.0f} "
              f"| {r['decode_mb_s']:.0f} |")
    print("| predictor (order-0 entropy of residuals, bits/code) | value |\n| --- | ---: |")
    for k, v in res["floors"].items():
        print(f"| {k} | {v:.3f} |")
    print(f"full-precision window: {res['window_bytes_per_session']} bytes per session (zstd-9, streams)")
    return 0

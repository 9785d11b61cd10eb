"""`kvstash bench codec` on a real SmolLM2 session: the block codec is lossless (the bench asserts it) and
within the stated bound of 4.45 bits per sealed element at INT4 g32 with the service's block size."""

import argparse
import json

from services.bench.codec import run_codec
from services.eval.corpus import DEFAULT_TEXT


def test_block_codec_on_real_kv_is_within_the_bound(capsys):
    args = argparse.Namespace(model="smollm2-135m-instruct", text=str(DEFAULT_TEXT), tokens=128 + 512,
                              kv="int4:g32:gv32:r128", blocks="64", json=True)
    assert run_codec(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["block_tokens"] == 64 and res["blocks"][0]["blocks"] == 8
    assert res["bits_per_element"] < 4.45  # measured 4.43 here, 4.426 on 2,048 tokens of 128-token blocks (BENCHMARKS)
    coders = res["blocks"][0]["coders"]
    assert coders["rans-ctx"] < min(v for k, v in coders.items() if k != "rans-ctx")  # beats every zstd variant
    ses = res["session"]  # whole session: device bytes of every tensor, stored blocks + tail
    assert ses["stored_bytes"] < ses["device"]["bytes"] and 0 < ses["device"]["fraction_of_16bit"] < 1
    assert ses["device"]["tokens"] == 128 + 512 and ses["device"]["window"] > 0
    floors = res["floors"]
    assert floors["k:context_prev_code"] < floors["k:none"] and floors["v:context_prev_code"] < floors["v:none"]

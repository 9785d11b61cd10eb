"""Benchmarks: speed and memory, each against a baseline run the same way (`kvstash bench ...`).

    common   what several benchmarks share: the model cache, a worker's KVStore, its canonical prefill,
             percentiles
    resume   `bench resume`: device and Redis bytes, restore against re-prefill
    batch    `bench batch`: decode throughput and latency in process, against transformers' continuous batching
    codec    `bench codec`: the lossless block codec against every predictor x coder
    dedup    `bench dedup`: Redis bytes of sessions sharing a prompt prefix
    load     `bench load`: tokens/s and time to first token against concurrent sessions (real gRPC)
    soak     `bench soak`: load with injected faults, then sessions lost (must be none)
    timing   `bench timing`: does time to first token reveal another tenant's cached prefix?

Benchmarks import `common` and services/eval/corpus.py (the text they read), never one another, and
nothing imports services/cli; the CLI (services/cli/bench.py) builds the argparse tree and calls each
module's `run_*(args)`.
"""

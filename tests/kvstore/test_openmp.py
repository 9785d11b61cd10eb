"""`serial_torch` (kvstore/openmp.py): a helper thread's torch ops open no OpenMP team, and no other thread's
count changes; the block codec's pool threads are such helpers."""

import threading

import torch

from kvstore.config import QuantConfig
from kvstore.openmp import serial_torch
from kvstore.prefix.blocks import ModelShape
from kvstore.tiers.coding import BlockCoder
from kvstore.tiers.store_types import ModelIdentity, StoreSettings


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_a_serial_thread_runs_on_one_thread_and_leaves_the_others_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _in_thread(lambda: (serial_torch(), torch.get_num_threads())) == (True, 1)
        assert torch.get_num_threads() == 2  # this thread's count is as it was
        assert _in_thread(torch.get_num_threads) == 2  # a thread started afterwards takes the process's count
    finally:
        torch.set_num_threads(before)


def test_the_block_codec_pool_threads_are_serial():
    shape = ModelShape(layers=2, kv_heads=2, head_dim=16, dtype="torch.float32")
    coder = BlockCoder(ModelIdentity("f" * 64, shape, QuantConfig.parse("int4:g32:r128"), "cpu"), StoreSettings(block_tokens=64, prefill_chunk=64))
    try:
        counts = {coder.pool.submit(torch.get_num_threads).result() for _ in range(8)}
        assert counts == {1}
    finally:
        coder.close()

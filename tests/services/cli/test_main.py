"""The CLI only wires commands: every bench and eval command reaches its tool's `run_*`, and building the
argparse tree imports no tool module (they load when their command runs)."""

import argparse
import importlib
import subprocess
import sys

from services.cli.main import build_parser
from tests.services.stack import REPO

COMMANDS = {
    ("bench", "resume"): "services.bench.resume.run_resume",
    ("bench", "batch"): "services.bench.batch.run_batch",
    ("bench", "bound"): "services.bench.bound.run_bound",
    ("bench", "chat"): "services.bench.chat.run_chat",
    ("bench", "decode"): "services.bench.decode.run_decode",
    ("bench", "codec"): "services.bench.codec.run_codec",
    ("bench", "dedup"): "services.bench.dedup.run_dedup",
    ("bench", "gateway"): "services.bench.gateway.run_gateway",
    ("bench", "http"): "services.bench.http.run_http",
    ("bench", "load"): "services.bench.load.run_load",
    ("bench", "soak"): "services.bench.soak.run_soak",
    ("bench", "timing"): "services.bench.timing.run_timing",
    ("eval", "ppl"): "services.eval.ppl.run_ppl",
    ("eval", "alloc"): "services.eval.alloc.run_alloc",
    ("eval", "cold"): "services.eval.cold.run_cold",
    ("eval", "plot"): "services.eval.plot.run_plot",
    ("eval", "plot-frontier"): "services.eval.frontier.run_plot_frontier",
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_tool_command_is_wired_to_its_run_function():
    top = _subcommands(build_parser())
    found = {(group, name): sub for group in ("bench", "eval") for name, sub in _subcommands(top[group]).items()}
    assert set(found) == set(COMMANDS)
    for path, target in COMMANDS.items():
        fn = found[path].get_default("fn")
        assert fn.__qualname__ == target, path
        module, name = target.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name)), target


def test_building_the_tree_imports_no_tool_module():
    code = ("import sys; from services.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('services.bench', 'services.eval'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['services.eval', 'services.eval.corpus']"  # the default text's path only

"""How the CLI calls into a tool: a command's `fn` imports the tool's module only when that command runs."""

from __future__ import annotations

import importlib


def runs(module: str, function: str):
    """The `fn` of a command that calls `module.function(args)`; building the parser imports neither."""

    def fn(args) -> int:
        return getattr(importlib.import_module(module), function)(args)

    fn.__qualname__ = f"{module}.{function}"
    return fn

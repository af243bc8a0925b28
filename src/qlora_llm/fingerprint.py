"""Fingerprints: short digests of files, models and settings, so work already done can be recognised.

`qlora-llm run` skips a stage whose inputs and settings have the same fingerprint as when its output
was written, and `evaluate` reuses the base model's results for the same model, data and settings.

    key = digest({"model": model_fingerprint(cfg.model), "data": file_digest(path), "eval": {...}})
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def digest(value: Any) -> str:
    """SHA-256 of a JSON-able value in canonical form (sorted keys), as 16 hex digits."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (weights can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes; computed once per (path, size, mtime) in a process."""
    stat = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def folder_fingerprint(folder: Path) -> str:
    """A model folder: its small files by content, its weight files by name, size and mtime.

    Hashing multi-GB weights on every run would cost more than the work it saves; a weight file that
    changes gets a new size or mtime.
    """
    parts = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        if path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            parts[path.name] = [stat.st_size, stat.st_mtime_ns]
        else:
            parts[path.name] = file_digest(path)
    return digest(parts)


def model_fingerprint(mcfg: Any) -> str | None:
    """What a base model's weights are: a built-in's source file, a folder's files, a Hub commit.

    None when it cannot be pinned down (a Hub id that is neither cached nor at a fixed revision).
    """
    from huggingface_hub import try_to_load_from_cache

    from qlora_llm.model import BUILTIN_MODELS, builtin_folder

    name = mcfg.name
    if name in BUILTIN_MODELS:
        folder = builtin_folder(name, mcfg.cache_dir)
        return f"builtin:{name}:{folder_fingerprint(folder)}" if folder.is_dir() else None
    path = Path(name).expanduser()
    if path.is_dir():
        return f"folder:{folder_fingerprint(path)}"
    found = try_to_load_from_cache(name, "config.json", revision=mcfg.revision)
    if isinstance(found, str):  # .../snapshots/<commit>/config.json
        return f"hub:{name}@{Path(found).parent.name}"
    return None


def base_model_identity(mcfg: Any) -> dict[str, Any]:
    """The base model as a run's manifest and the self-replay cache record it: its name (a folder's full
    path), a built-in's Hub id, and `model_fingerprint`, the one rule for what a base model's weights are."""
    from qlora_llm.model import BUILTIN_MODELS

    name, path = mcfg.name, Path(mcfg.name).expanduser()
    if name in BUILTIN_MODELS:
        return {"id": name, "hub_id": BUILTIN_MODELS[name].hub_id, "fingerprint": model_fingerprint(mcfg)}
    return {"id": str(path.resolve()) if path.is_dir() else name, "fingerprint": model_fingerprint(mcfg)}


def library_versions() -> dict[str, str]:
    """Python's and the stack's versions, recorded beside every run and evaluation."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "qlora-llm",
        "torch",
        "transformers",
        "trl",
        "peft",
        "bitsandbytes",
        "accelerate",
        "datasets",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out

"""Fingerprints (src/qlora_llm/fingerprint.py): the same inputs give the same digest, a changed one another."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from qlora_llm.config import ModelConfig
from qlora_llm.fingerprint import base_model_identity, digest, file_digest, model_fingerprint, sha256_file


def test_digest_ignores_key_order_and_follows_every_value():
    a = digest({"model": "m", "eval": {"limit": 6, "tokens": 4}})
    assert a == digest({"eval": {"tokens": 4, "limit": 6}, "model": "m"})
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != digest({"model": "m", "eval": {"limit": 6, "tokens": 5}})
    assert a != digest({"model": "m2", "eval": {"limit": 6, "tokens": 4}})


def test_file_digest_is_the_sha256_of_the_bytes_and_follows_a_rewrite(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    first = file_digest(path)
    assert first == sha256_file(path) == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert file_digest(path) == first  # unchanged file: same digest (from the cache)
    path.write_bytes(b'{"a": 12}\n')  # new bytes (and size): not the cached digest
    assert file_digest(path) == hashlib.sha256(b'{"a": 12}\n').hexdigest() != first
    assert file_digest(tmp_path / "." / "train.jsonl") == file_digest(path)  # one file, however named


def test_a_model_folder_is_known_by_its_files_not_its_path(tiny_mistral, tmp_path):
    """A copy (same bytes, same mtimes) has the same fingerprint; changing a small file or touching the
    weights gives another; the identity names the folder's full path beside the fingerprint."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_mistral, copy)  # copy2: the weights keep their size and mtime
    original = model_fingerprint(ModelConfig(name=str(tiny_mistral)))
    assert original.startswith("folder:")
    assert model_fingerprint(ModelConfig(name=str(tiny_mistral))) == original
    assert model_fingerprint(ModelConfig(name=str(copy))) == original
    assert base_model_identity(ModelConfig(name=str(copy))) == {
        "id": str(copy.resolve()),
        "fingerprint": original,
    }

    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"rope_theta": 1.0}))
    changed = model_fingerprint(ModelConfig(name=str(copy)))
    assert changed != original

    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten weights get a new mtime
    assert model_fingerprint(ModelConfig(name=str(copy))) not in (original, changed)

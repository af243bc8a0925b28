"""Files that lie: damaged safetensors, pickle weights, an adapter that does not fit, remote code."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from qlora_llm.cli import main
from qlora_llm.config import load_config
from qlora_llm.integrity import DamagedFileError, check_weights
from qlora_llm.model import ModelNotFoundError, load_target


def _adapter_copy(tiny_run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_run / "final_adapter", folder)
    return folder


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "header not JSON":
        file.write_bytes(struct.pack("<Q", 16) + b"\xff" * 16 + data[8 + 16 :])
    elif how == "header past the end":
        file.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    elif how == "tensor past the end":  # a header that parses, offsets beyond the data
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 10**6
        raw = json.dumps(header).encode()
        file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize(
    "how", ["truncated", "header not JSON", "header past the end", "tensor past the end"]
)
def test_a_damaged_adapter_file_is_refused_by_name_before_loading(tiny_run, tmp_path, how, capsys):
    folder = _adapter_copy(tiny_run, tmp_path)
    weights = folder / "adapter_model.safetensors"
    _damage(weights, how)
    with pytest.raises(DamagedFileError, match=f"^{weights}: not a valid safetensors file"):
        check_weights(folder)
    assert main(["generate", str(folder), "hi", "--max-new-tokens", "2", "model.device=cpu"]) == 1
    err = capsys.readouterr().err
    assert f"error: {weights}: not a valid safetensors file" in err and "Traceback" not in err


def test_a_damaged_adapter_is_reported_by_the_server_not_served(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from qlora_llm.server.app import create_app

    folder = _adapter_copy(tiny_run, tmp_path)
    _damage(folder / "adapter_model.safetensors", "truncated")
    with TestClient(create_app(load_config(None, ["model.device=cpu"]), folder)) as c:
        for _ in range(600):
            r = c.get("/health")
            if r.json()["status"] != "loading":
                break
        assert r.status_code == 503 and r.json()["status"] == "error"
        assert "not a valid safetensors file" in r.json()["error"]
        assert c.post("/generate", json={"prompt": "hi"}).status_code == 503


def _pickle_only(tiny_mistral: Path, tmp_path: Path) -> Path:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_mistral, folder)
    (safetensors,) = folder.glob("*.safetensors")
    torch.save(load_file(str(safetensors)), folder / "pytorch_model.bin")
    safetensors.unlink()
    return folder


def test_pickle_only_weights_are_refused_unless_allowed(tiny_mistral, tmp_path):
    folder = _pickle_only(tiny_mistral, tmp_path)
    with pytest.raises(DamagedFileError) as err:
        load_target(folder, device="cpu")
    assert str(err.value) == (
        f"{folder}: its weights are pickle files (pytorch_model.bin), and unpickling runs any code the file's "
        "author put in it. Convert them to safetensors, or, if you trust their source, set "
        "model.allow_pickle=true."
    )
    allowed = load_config(None, ["model.allow_pickle=true"]).model
    assert load_target(folder, model_cfg=allowed, device="cpu").model.config.model_type == "mistral"


def test_an_adapter_of_another_rank_is_refused_with_what_does_not_fit(tiny_run, tmp_path):
    folder = _adapter_copy(tiny_run, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"r": config["r"] // 2}))
    with pytest.raises(ModelNotFoundError, match="its LoRA weights do not fit .*size mismatch"):
        load_target(folder, device="cpu")


def test_a_config_with_auto_map_runs_no_remote_code(tiny_mistral, tmp_path):
    folder = tmp_path / "auto-map"
    shutil.copytree(tiny_mistral, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('remote code ran')\n")
    loaded = load_target(folder, device="cpu")
    assert type(loaded.model).__module__.startswith("transformers.")
    assert not (tmp_path / "RAN").exists()


def test_an_adapter_for_another_base_architecture_is_refused(tiny_run, tiny_odd, tmp_path):
    folder = _adapter_copy(tiny_run, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": str(tiny_odd)})
    )
    (folder / "config.yaml").unlink()  # a bare PEFT folder: its adapter_config.json names the base
    with pytest.raises(ModelNotFoundError, match="its LoRA weights do not fit .*size mismatch"):
        load_target(folder, device="cpu")


def test_a_tokenizer_folder_without_a_model_is_refused_by_name(tiny_mistral, tmp_path):
    folder = tmp_path / "tokenizer-only"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_mistral / name, folder / name)
    with pytest.raises(
        ModelNotFoundError, match=r"holds neither final_adapter/, adapter_config.json nor config"
    ):
        load_target(folder, device="cpu")


def test_a_model_folder_without_weights_is_refused_by_name(tiny_mistral, tmp_path):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_mistral, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises((ModelNotFoundError, DamagedFileError)) as err:
        load_target(folder, device="cpu")
    assert str(folder) in str(err.value) and "weights" in str(err.value), str(err.value)


def test_a_second_served_adapter_gets_the_same_checks(tiny_run, tmp_path):
    """serve --adapter NAME=PATH attaches through the same function as load_target: damaged or of another
    rank, it is refused in one line, never served."""
    from fastapi.testclient import TestClient

    from qlora_llm.server.app import create_app

    damaged = _adapter_copy(tiny_run, tmp_path / "damaged")
    _damage(damaged / "adapter_model.safetensors", "truncated")
    other_rank = _adapter_copy(tiny_run, tmp_path / "rank")
    config = json.loads((other_rank / "adapter_config.json").read_text())
    (other_rank / "adapter_config.json").write_text(json.dumps(config | {"r": config["r"] // 2}))
    cfg = load_config(None, ["model.device=cpu"])
    for extra, said in (
        (damaged, "not a valid safetensors file"),
        (other_rank, "its LoRA weights do not fit"),
    ):
        with TestClient(create_app(cfg, tiny_run, adapters={"second": extra})) as c:
            for _ in range(600):
                r = c.get("/health")
                if r.json()["status"] != "loading":
                    break
            assert r.status_code == 503 and said in r.json()["error"], r.json()


def test_training_from_a_damaged_adapter_is_refused_by_name(tiny_run, tmp_path):
    from qlora_llm.train import train

    folder = _adapter_copy(tiny_run, tmp_path)
    _damage(folder / "adapter_model.safetensors", "truncated")
    cfg = load_config(
        tiny_run / "config.yaml", [f"model.adapter={folder}", f"train.output_dir={tmp_path / 'run'}"]
    )
    with pytest.raises(DamagedFileError, match="not a valid safetensors file"):
        train(cfg)

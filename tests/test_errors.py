"""One base exception: every refusal of the library is a QloraError, printed by the CLI as one line.
One rule for where a run's adapter is: every entry point resolves it the same way, with one message."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import qlora_llm
from qlora_llm.errors import QloraError
from qlora_llm.model import ModelNotFoundError, adapter_folder, find_target


def _exception_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(qlora_llm.__path__, "qlora_llm."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.append(obj)
    return found


def test_every_exception_of_the_package_is_a_qlora_error():
    classes = _exception_classes()
    names = {c.__name__ for c in classes}
    assert {"ConfigError", "TrainError", "EvalError", "MergeError", "ExportError", "PrepareError"} <= names
    assert [c.__name__ for c in classes if not issubclass(c, QloraError)] == []


def test_the_old_builtin_bases_still_catch_them():
    from qlora_llm.config import ConfigError
    from qlora_llm.errors import TrainError

    assert issubclass(ConfigError, ValueError) and issubclass(TrainError, RuntimeError)


@pytest.fixture
def broken_run(tmp_path):
    """A run folder whose final_adapter/ lost its adapter_config.json."""
    run = tmp_path / "run"
    (run / "final_adapter").mkdir(parents=True)
    (run / "final_adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run


def test_one_rule_and_one_message_for_a_run_without_an_adapter(broken_run, tiny_mistral, tmp_path):
    from qlora_llm.config import load_config
    from qlora_llm.server.app import create_app
    from qlora_llm.train import train

    message = (
        r"run: not a LoRA adapter: neither a PEFT adapter folder \(adapter_config.json\) nor a run folder"
    )
    with pytest.raises(ModelNotFoundError, match=message):
        adapter_folder(broken_run)
    with pytest.raises(ModelNotFoundError, match=message):
        find_target(broken_run)
    with pytest.raises(ModelNotFoundError, match="--adapter x=.*" + message):
        create_app(load_config(None, ["model.device=cpu"]), tiny_mistral, adapters={"x": str(broken_run)})
    cfg = load_config(None, [f"model.name={tiny_mistral}", f"model.adapter={broken_run}", "model.device=cpu"])
    cfg.train.output_dir = tmp_path / "out"
    with pytest.raises(ModelNotFoundError, match="model.adapter=.*" + message):
        train(cfg)


def test_a_run_folder_and_its_adapter_resolve_to_the_same_folder(tiny_run):
    assert (
        adapter_folder(tiny_run) == adapter_folder(tiny_run / "final_adapter") == tiny_run / "final_adapter"
    )
    assert find_target(tiny_run).adapter_dir == tiny_run / "final_adapter"
    assert find_target(tiny_run / "final_adapter").kind == "adapter"


def test_the_cli_prints_a_bad_adapter_as_one_line(broken_run, tiny_mistral, capsys):
    from qlora_llm.cli import main

    code = main(["serve", str(tiny_mistral), "--adapter", f"x={broken_run}", "model.device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith(f"error: --adapter x={broken_run}: not a LoRA adapter")
    assert not any("Traceback" in line for line in err)

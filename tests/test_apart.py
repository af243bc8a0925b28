"""apart.call: a library call in a process of its own answers as the call would here."""

from __future__ import annotations

import pytest

from qlora_llm.apart import ApartError, call
from qlora_llm.config import load_config
from qlora_llm.errors import QloraError
from qlora_llm.pipeline import train_in_child


def test_the_childs_result_and_its_refusal_come_back_as_if_called_here(tmp_path):
    assert call("json:dumps", {"a": [1, 2]}, what="test") == '{"a": [1, 2]}'
    missing = tmp_path / "nowhere.jsonl"
    cfg = load_config(None, [f"data.train_file={missing}", f"train.output_dir={tmp_path / 'run'}"])
    request = {"config": cfg.model_dump(mode="json"), "force": False}
    with pytest.raises(QloraError) as here:
        train_in_child(request)
    with pytest.raises(QloraError) as apart:
        call("qlora_llm.pipeline:train_in_child", request, what="training")
    assert type(apart.value) is type(here.value) and str(apart.value) == str(here.value)
    assert str(missing) in str(apart.value)


def test_a_child_that_dies_without_answering_is_named_with_what_to_do(capfd):
    with pytest.raises(ApartError) as err:
        call("math:sqrt", {}, what="test", again="Run it again.")  # TypeError: no answer, exit 1
    assert str(err.value) == "the test process exited with 1; its own messages are above. Run it again."
    assert "TypeError" in capfd.readouterr().err  # the child's traceback reached the terminal

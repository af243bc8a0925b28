"""Atomic writes: a folder replaced in one step, and a set of files that lands whole or not at all."""

from __future__ import annotations

import os

import pytest

from qlora_llm.atomic import atomic_dir, atomic_file_set


def test_replacing_a_folder_swaps_it_in_one_step(tmp_path, monkeypatch):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "weights").write_text("old")

    def no_two_step_rename(*args):
        raise AssertionError("replaced by two renames: a moment with no folder under the real name")

    monkeypatch.setattr(os, "rename", no_two_step_rename)
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "weights").write_text("new")
        assert (target / "weights").read_text() == "old"  # untouched while the new one is written
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the old one is gone, nothing hidden left


def test_a_file_set_lands_whole_or_not_at_all(tmp_path):
    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    (tmp_path / "mine").write_text("untouched")
    with pytest.raises(RuntimeError), atomic_file_set(tmp_path) as files:
        with files.open("a") as f:
            f.write("new a")
        files.remove("b")
        raise RuntimeError("stopped before the set was complete")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "a": "old a",
        "b": "old b",
        "mine": "untouched",
    }
    with atomic_file_set(tmp_path) as files:
        with files.open("a") as f:
            f.write("new a")
        files.remove("b")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a": "new a", "mine": "untouched"}

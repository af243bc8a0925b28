"""The package's shape: functions a reader can hold in mind, and one home for each shared concept."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qlora_llm"
LONGEST = 120  # lines per function (issue #21); a longer one is a step that wants its own name


def _code(path: Path) -> str:
    """The file without comments and docstrings: only code can be a second implementation."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0].value.value = ""
    return re.sub(r"#.*", "", ast.unparse(tree))


def test_no_function_is_longer_than_a_screenful_or_two():
    long = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST
    ]
    assert not long, long


def test_each_shared_concept_has_one_home():
    homes = {
        # attaching an adapter (integrity and shape checks): model.attach_adapter
        r"PeftModel\.from_pretrained|\.load_adapter\(": "model.py",
        # a process's peak / the machine's memory: memory.py
        r"VmHWM|virtual_memory\(|SC_PHYS_PAGES|MemAvailable": "memory.py",
        # CUDA or CPU: model.pick_device
        r"'cuda' if torch\.cuda\.is_available\(\)": "model.py",
        # the pad-token fallback: model.ensure_pad_token
        r"\.pad_token = ": "model.py",
        # decoding greedy answers for reports: generate.generate_greedy
        r"def generate_greedy": "generate.py",
    }
    files = {path: _code(path) for path in SRC.rglob("*.py")}
    for pattern, home in homes.items():
        found = sorted(str(p.relative_to(SRC)) for p, code in files.items() if re.search(pattern, code))
        assert found == [home], (pattern, found)

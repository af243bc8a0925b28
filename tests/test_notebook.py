"""notebooks/quickstart.ipynb runs top to bottom on the built-in model (its code cells, in order)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def code_cells(parameters: str) -> str:
    """The notebook's code, with `parameters` injected after the cell tagged `parameters` (papermill's rule)."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    parts = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        parts.append("".join(cell["source"]))
        if "parameters" in cell["metadata"].get("tags", []):
            parts.append(parameters)
    return "\n\n".join(parts)


def test_the_notebook_is_clean_and_has_a_parameters_cell():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)  # committed unexecuted
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1


@pytest.mark.slow
def test_quickstart_notebook_runs_on_the_builtin_model(smollm2_cache, tmp_path):
    out = tmp_path / "quickstart"
    parameters = f"OUT = {str(out)!r}\nCACHE = {str(smollm2_cache)!r}\nSTEPS = 2\nEXAMPLES = 2\nGENERAL = 4\n"
    done = subprocess.run(
        [sys.executable, "-c", code_cells(parameters)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "final_adapter" / "adapter_config.json").is_file()
    assert (out / "eval" / "report.html").is_file()
    assert '"steps": 2' in done.stdout and "perplexity (answers)" in done.stdout
    answer = done.stdout.rstrip().splitlines()[-1]
    assert len(answer.split()) >= 3  # a real answer, not an empty string

"""What every studio page shares: the page frame, escaping, the refusal error, confined paths.

The route modules (app.py, evaluation.py, stages.py, clone.py) take a `Studio` (the folders, the job
store, the worker, the CSRF token) instead of reaching into one another's closures.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import HTMLResponse

from qlora_llm.errors import QloraError
from qlora_llm.studio.jobs import JobStore, Worker

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Refused(QloraError):
    """A request the studio refuses; the message is shown as is (so it never holds a server path)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Studio:
    runs: Path
    data: Path
    store: JobStore
    worker: Worker
    csrf: str

    def csrf_field(self) -> str:
        return f"<input type='hidden' name='csrf' value='{self.csrf}'>"

    def hide_paths(self, text: str) -> str:
        return hide_paths(text, self.runs, self.data)


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)} · qlora-llm studio</title>"
        "<link rel='stylesheet' href='/static/studio.css'></head><body>"
        "<nav><a href='/'>Runs</a> · <a href='/new'>New run</a></nav>"
        f"<h1>{e(title)}</h1>{body}</body></html>",
        status_code=status,
    )


def confined(root: Path, name: str) -> Path:
    """`name` inside `root`, or Refused: no `..`, no absolute paths outside, no symlink escapes."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise Refused(403, "path outside the studio's folders")
    return path


def run_folder(runs: Path, name: str) -> Path:
    if not RUN_NAME.match(name):
        raise Refused(404, "no such run")
    path = confined(runs, name)
    if not path.is_dir():
        raise Refused(404, "no such run")
    return path


def loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


# An absolute path of two or more parts, not inside a URL (after "//" or "host:port").
_SERVER_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"<>:]+/)+([^\s/'\"<>:]+)")


def hide_paths(text: str, runs: Path, data: Path) -> str:
    """Pages show paths relative to the studio's folders, never where those folders are on the server;
    any other absolute path (a local model folder, a temporary file) as its last part: .../name."""
    for root, label in ((runs.resolve(), "runs"), (data.resolve(), "data")):
        text = text.replace(str(root), label)
    return _SERVER_PATH.sub(lambda m: f".../{m[1]}", text)


def log_lines(path: str | Path, limit: int) -> list[str]:
    """The last `limit` bytes of a job's log as lines. Progress bars redraw with \\r: each redraw is a
    line of its own."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", errors="replace").replace("\r", "\n").splitlines()

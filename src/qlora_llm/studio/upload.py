"""Data upload on the new-run form: the file is written inside the data folder under a safe name, then
`qlora-llm prepare` reads it, and its report and the first example rendered as the model will see it are
shown above the new-run form, prefilled with the prepared train.jsonl and eval.jsonl.

    POST /new/upload   multipart: csrf, file, model, max_seq_length (prepare's --model, --max-seq-length)

`prepare` runs as the CLI subprocess a user would run (`qlora-llm prepare FILE --output-dir DIR --model M
--max-seq-length N --eval-fraction F`), so the studio never loads a tokenizer. The upload lands in
`<data>/.uploads/<name>/source/<name>.<ext>` and prepare's files beside `source/` (a dot folder: when the
data folder is the runs folder, the runs page does not list it as a run). Bodies over MAX_BYTES are refused
before they are read (413); a file prepare refuses is shown with prepare's own error and removed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.datastructures import UploadFile

from qlora_llm.config import Config
from qlora_llm.studio.form import new_form
from qlora_llm.studio.web import Refused, Studio, e, page

MAX_BYTES = 64 * 2**20  # the largest upload; a bigger file can be named by its path in the form instead
SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}  # what `prepare` reads from a file
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> tuple[str, str]:
    """(stem, suffix) of an uploaded file's name: no folders, only [A-Za-z0-9._-], a suffix prepare reads."""
    name = re.split(r"[\\/]", filename)[-1]
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise Refused(400, f"upload a {', '.join(sorted(SUFFIXES))} file")
    stem = UNSAFE.sub("-", Path(name).stem).strip(".-_")[:60] or "upload"
    return stem, suffix


def upload_folder(data: Path, stem: str) -> Path:
    """A new folder for this upload under <data>/.uploads: the stem, or stem-2, stem-3, ... if taken."""
    root = data / ".uploads"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise Refused(409, "too many uploads of that name")


async def save_upload(file: UploadFile, target: Path) -> int:
    """Copy the upload to `target`, refusing it (and removing what was written) past MAX_BYTES.

    Written under a `.part` name and renamed when whole: an interrupted upload never sits under the real name.
    """
    size = 0
    partial = target.with_name(target.name + ".part")
    with open(partial, "wb") as out:
        while chunk := await file.read(2**20):
            size += len(chunk)
            if size > MAX_BYTES:
                break
            out.write(chunk)
    if size > MAX_BYTES:
        partial.unlink()
        raise Refused(413, f"the file is larger than {MAX_BYTES // 2**20} MiB: name it by its path instead")
    partial.replace(target)
    return size


def run_prepare(
    source: Path, folder: Path, model: str, max_seq_length: str, eval_fraction: float
) -> tuple[int, str]:
    """`qlora-llm prepare` on the upload, as the CLI runs it: (exit code, what it printed)."""
    done = subprocess.run(
        [sys.executable, "-m", "qlora_llm.cli", "prepare", str(source), "--output-dir", str(folder)]
        + ["--model", model, "--max-seq-length", max_seq_length, "--eval-fraction", str(eval_fraction)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    # The CLI's own lines; the log lines (INFO ...) are the studio's business, not the page's.
    lines = [x for x in (done.stdout + done.stderr).splitlines() if not x.startswith(("INFO ", "WARNING "))]
    return done.returncode, "\n".join(lines)


def prepared_section(studio: Studio, folder: Path, printed: str) -> str:
    """prepare's report as the CLI prints it, and the first example as the model will see it."""
    report = json.loads((folder / "prepare_report.json").read_text(encoding="utf-8"))
    example = report.get("example") or {}
    return (
        f"<h2>Uploaded data</h2><pre id='prepare-report'>{e(studio.hide_paths(printed))}</pre>"
        f"<h3>The first example as the model will see it (template {e(report.get('template', ''))})</h3>"
        "<p class='help'>The prompt (with the BOS text the tokenizer adds), then the completion: training "
        "learns only the completion.</p>"
        f"<pre id='example-prompt'>{e(example.get('bos', '') + example.get('prompt', ''))}</pre>"
        f"<pre id='example-completion'>{e(example.get('completion', ''))}</pre>"
    )


def add_routes(app: FastAPI, studio: Studio) -> None:
    @app.post("/new/upload", response_class=HTMLResponse)
    async def upload(request: Request) -> HTMLResponse:
        form = await request.form()
        file = form.get("file")
        if not isinstance(file, UploadFile) or not file.filename:
            raise Refused(400, "choose a file to upload")
        defaults = Config()
        model = str(form.get("model") or "").strip() or defaults.model.name
        max_len = str(form.get("max_seq_length") or "").strip() or str(defaults.data.max_seq_length)
        if not max_len.isdigit() or int(max_len) <= 0:
            raise Refused(400, "the max sequence length must be a positive whole number")
        stem, suffix = safe_name(file.filename)
        folder = upload_folder(studio.data, stem)
        (folder / "source").mkdir()
        source = folder / "source" / f"{stem}{suffix}"
        try:
            await save_upload(file, source)
        except Refused:
            shutil.rmtree(folder)
            raise
        code, printed = await asyncio.to_thread(
            run_prepare, source, folder, model, max_len, defaults.data.eval_fraction
        )
        values = {"model.name": model, "data.max_seq_length": max_len}
        if code != 0 or not (folder / "train.jsonl").is_file():
            shutil.rmtree(folder)  # nothing usable: leave no half-prepared folder behind
            body = (
                f"<h2>Uploaded data</h2><p class='error'>prepare refused the file:</p>"
                f"<pre id='prepare-report'>{e(studio.hide_paths(printed))}</pre>"
            )
            return page("New run", body + new_form(studio, values, {}), 422)
        values["data.train_file"] = studio.hide_paths(str(folder / "train.jsonl"))
        if (folder / "eval.jsonl").is_file():
            values["data.eval_file"] = studio.hide_paths(str(folder / "eval.jsonl"))
        return page("New run", prepared_section(studio, folder, printed) + new_form(studio, values, {}))


def upload_form(studio: Studio) -> str:
    """The upload form shown above the new-run form."""
    defaults = Config()
    return (
        "<form method='post' action='/new/upload' enctype='multipart/form-data' id='upload'>"
        f"{studio.csrf_field()}<p><b>Upload data</b> ({', '.join(sorted(SUFFIXES))}, at most "
        f"{MAX_BYTES // 2**20} MiB): <input type='file' name='file'> "
        f"<label>--model <input type='text' name='model' value='{e(defaults.model.name)}'></label> "
        f"<label>--max-seq-length <input type='text' name='max_seq_length' "
        f"value='{defaults.data.max_seq_length}' style='width:5em'></label> "
        "<button>Upload and prepare</button></p>"
        "<p class='help'>Runs <code>qlora-llm prepare</code> on it and shows its report and the first "
        "example before anything is launched.</p></form>"
    )

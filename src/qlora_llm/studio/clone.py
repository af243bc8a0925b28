"""Clone with changes: the new-run form prefilled from a run's config.yaml, launched as a new run.

Submitting goes through the same form validation as a blank new run (form.py), so the clone's config is
the run's config with the edited fields, in a new output folder. The command shown starts from the source
run's config.yaml and lists only the edits, which is what a user would type:

    qlora-llm train runs/SRC/config.yaml lora.r=16 train.output_dir=runs/NEW
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from qlora_llm.studio.form import config_values, new_form
from qlora_llm.studio.gpus import gpus_wanted
from qlora_llm.studio.web import RUN_NAME, Refused, Studio, e, page, run_folder


def source_config(studio: Studio, name: str) -> tuple[dict, Path]:
    """The run's resolved config and its file: the run's config.yaml, else (a studio run still waiting,
    which has not written one yet) its training job's config; Refused when there is neither."""
    path = run_folder(studio.runs, name) / "config.yaml"
    job = studio.store.latest(name, "train")
    if not path.is_file() and job is not None:
        path = studio.store.home / "configs" / f"{job.id}.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        raise Refused(404, "this run has no readable config.yaml to clone")
    return config, path


def free_name(runs: Path, name: str) -> str:
    """`name-2`, `name-3`, ...: the first that is not a run yet (kept within the run-name limit)."""
    stem, n = name[:90], 2
    while (runs / f"{stem}-{n}").exists():
        n += 1
    return f"{stem}-{n}"


def clone_command(studio: Studio, source: str, fields: dict[str, str], overrides: list[str]) -> str | None:
    """The CLI command of a clone: the source run's config.yaml and the fields that differ from it."""
    if not RUN_NAME.match(source):
        return None
    try:
        config, path = source_config(studio, source)
    except Refused:
        return None
    before = config_values(config, studio)
    edited = [f"{k}={v.strip()}" for k, v in fields.items() if k in before and v.strip() != before[k]]
    edited += [o for o in overrides if o.startswith("train.output_dir=")]
    command = ["qlora-llm", "train", str(path), *edited]
    return studio.hide_paths(shlex.join(command))


def add_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/runs/{name}/clone", response_class=HTMLResponse)
    def clone_page(name: str) -> HTMLResponse:
        values = config_values(source_config(studio, name)[0], studio)
        values["run_name"] = free_name(studio.runs, name)
        job = studio.store.latest(name, "train")
        values["nproc"] = str(gpus_wanted(job.command) if job else 1)  # as many GPUs as the source's
        intro = (
            f"<p>The settings of run <a href='/runs/{e(name)}'>{e(name)}</a>: edit what should differ and launch; "
            "the new run gets its own folder.</p>"
        )
        return page(f"Clone {name}", intro + new_form(studio, values, {}, clone_of=name))

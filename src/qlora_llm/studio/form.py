"""The new-run form, which is the config: one field per key of `qlora-llm config --keys`, validated by it.

A blank form starts from the defaults; "clone with changes" starts from a run's own config.yaml (clone.py).
Either way the job's config is the defaults plus the fields that differ from them, validated by the same
pydantic model the CLI uses, with each error shown beside its field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_llm.config import Config, ConfigError, describe_keys, load_config
from qlora_llm.studio.gpus import too_many
from qlora_llm.studio.web import RUN_NAME, Studio, e

# Keys the form does not offer: the studio sets the output folder from the run name.
FIXED_KEYS = {"train.output_dir"}
# Keys that name files the training reads: they must lie inside the runs or data folders.
PATH_KEYS = {"data.train_file", "data.eval_file"}


def form_value(value: Any) -> str:
    """How a config value is written in the form (and read back as YAML, as a CLI override is)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def config_values(config: dict, studio: Studio) -> dict[str, str]:
    """A resolved config as the form's fields; data paths as the pages write them (`data/...`, `runs/...`)."""
    values = {}
    for key, _, _ in describe_keys():
        section, field = key.split(".")
        if key in FIXED_KEYS or field not in (config.get(section) or {}):
            continue
        values[key] = form_value(config[section][field])
        if key in PATH_KEYS:
            values[key] = studio.hide_paths(values[key])
    return values


def data_path(text: str, runs: Path, data: Path) -> Path | None:
    """A data file the form names, resolved: `data/x` and `runs/x` (as pages show paths) or a path
    relative to the data folder; None when it lies outside both folders."""
    path = Path(text)
    for label, root in (("data", data), ("runs", runs)):
        if not path.is_absolute() and path.parts[:1] == (label,):
            path = root.joinpath(*path.parts[1:])
            break
    path = path if path.is_absolute() else data / path
    resolved = path.resolve()
    inside = any(resolved.is_relative_to(root.resolve()) for root in (runs, data))
    return resolved if inside else None


def validate_form(
    fields: dict[str, str], runs: Path, data: Path
) -> tuple[Config | None, dict[str, str], list[str]]:
    """The form's values -> (config, per-field errors, the overrides that differ from the defaults)."""
    errors: dict[str, str] = {}
    name = fields.get("run_name", "").strip()
    if not RUN_NAME.match(name):
        errors["run_name"] = "letters, digits, '.', '_' or '-', starting with a letter or digit"
    elif (runs / name).exists():
        errors["run_name"] = "a run of that name exists; choose another"
    defaults = Config().model_dump(mode="json")
    overrides = []
    for key, _, _ in describe_keys():
        if key in FIXED_KEYS or key not in fields:
            continue
        section, field = key.split(".")
        text = fields[key].strip()
        # A data file is always resolved, the default's relative `data/train.jsonl` too: the job gets the
        # absolute path inside the studio's folders, never one relative to wherever the studio started.
        if key in PATH_KEYS and text not in ("", "null"):
            path = data_path(text, runs, data)
            if path is None:
                errors[key] = "must be a file inside the studio's data or runs folder"
                overrides.append(f"{key}={text}")
                continue
            text = str(path)
        elif text == form_value(defaults[section][field]):
            continue
        override = f"{key}={text}"
        overrides.append(override)  # invalid ones too: the command shown is what the user typed
        try:
            load_config(None, [override])
        except ConfigError as err:
            # The message names the override; the form shows it beside the field instead.
            errors[key] = str(err).split(": ", 2)[-1]
    if errors:
        return None, errors, overrides
    overrides.append(f"train.output_dir={runs / name}")  # not shown as typed: the run name sets it
    try:
        return load_config(None, overrides), {}, overrides
    except ConfigError as err:
        return None, {"": str(err)}, overrides


def nproc_field(text: str, gpus: list[str]) -> tuple[int, str]:
    """The form's GPU count (`train --nproc K`, one process per GPU): (K, "") or (1, the error shown beside
    the field). Refused here, before anything is queued, when the studio has fewer GPUs."""
    text = text.strip() or "1"
    if not (text.isdigit() and int(text) > 0):
        return 1, "a whole number of GPUs, 1 or more"
    return int(text), too_many(int(text), gpus) or ""


def new_form(
    studio: Studio,
    values: dict[str, str],
    errors: dict[str, str],
    command: str = "",
    clone_of: str = "",
    plan: str = "",
) -> str:
    """The form: run name, then one fieldset per config section; `values` prefill it (else the defaults).
    `plan`: the memory plan of these values, shown above the form with its verdict first."""
    defaults = Config().model_dump(mode="json")
    rows = [
        f"<p><label>run name <input type='text' name='run_name' value='{e(values.get('run_name', ''))}'></label>"
        f" <span class='error' id='error-run_name'>{e(errors.get('run_name', ''))}</span></p>"
    ]
    if clone_of:
        rows.append(f"<input type='hidden' name='clone_of' value='{e(clone_of)}'>")
    gpus = studio.worker.gpus
    if gpus:  # a CPU studio runs one job at a time: no GPU count to ask for
        rows.append(
            f"<p><label>GPUs <input type='text' name='nproc' value='{e(values.get('nproc', '1'))}'></label>"
            f" <span class='error' id='error-nproc'>{e(errors.get('nproc', ''))}</span><br><span class='help'>"
            f"train --nproc K: K processes, one per GPU; this studio has {len(gpus)} ({e(', '.join(gpus))})"
            "</span></p>"
        )
    section = None
    for key, _, help_text in describe_keys():
        if key in FIXED_KEYS:
            continue
        head, field = key.split(".")
        if head != section:
            rows.append(f"{'</fieldset>' if section else ''}<fieldset><legend>{e(head)}</legend>")
            section = head
        value = values.get(key, form_value(defaults[head][field]))
        rows.append(
            f"<p><label>{e(key)} <input type='text' name='{e(key)}' value='{e(value)}'></label> "
            f"<span class='error' id='error-{e(key)}'>{e(errors.get(key, ''))}</span><br>"
            f"<span class='help'>{e(help_text)}</span></p>"
        )
    rows.append("</fieldset>")
    top = f"<p class='error'>{e(errors[''])}</p>" if "" in errors else ""
    shown = f"<h2>Equivalent command</h2><pre id='command'>{e(command)}</pre>" if command else ""
    if plan:
        verdict = next((line for line in plan.splitlines() if line.startswith("verdict:")), plan.strip())
        shown += f"<h2>Memory plan</h2><p id='verdict'>{e(verdict)}</p><pre id='plan'>{e(plan)}</pre>"
    buttons = (
        "<button name='action' value='launch'>Launch</button> "
        "<button name='action' value='plan'>Check memory first</button>"
    )
    return (
        f"{top}{shown}<form method='post' action='/new' id='new-run'>{studio.csrf_field()}"
        f"{buttons}{''.join(rows)}{buttons}</form>"
    )

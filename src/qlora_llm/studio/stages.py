"""Evaluate, merge and export a run from its page: each a queued job running the CLI command a user would.

    qlora-llm evaluate runs/NAME [eval.max_examples=N] [eval.general_tasks=[] eval.general_generative=[]]
    qlora-llm merge runs/NAME [--force]
    qlora-llm export runs/NAME --format gguf|ollama|vllm [--quant f16|q8_0|q4_k_m] [--no-verify] [--force]

The form's choices are the CLI's own; the command is shown beside each button and on the job once queued.
An export job's progress (its step, and a percentage where the step measures one) is read from its own
log lines as they arrive (`export_progress`), on the run page and pushed with its live events.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from qlora_llm.config import ConfigError, load_config
from qlora_llm.studio.jobs import Job
from qlora_llm.studio.web import Refused, Studio, e, log_lines, run_folder

FORMATS = ("gguf", "ollama", "vllm")
QUANTS = ("f16", "q8_0", "q4_k_m")
STAGES = ("evaluate", "merge", "export")
PROGRESS_TAIL_BYTES = 64 * 1024  # the step is the last one logged: the log's end has it

# An export's steps as its own log lines say them (logger, message pattern, the step shown, its percent):
# export.py, merge.py (the merge an export makes first when the run has no checked one) and llamacpp.py
# (fetched and built once per machine). Only the build measures itself; the other steps show no percent
# until the export ends. The messages are the format strings of those files (test_studio checks each).
EXPORT_STEPS = (
    (
        "export",
        r"no verified merge of this adapter beside .* yet: merging it first",
        "merging the adapter",
        None,
    ),
    ("merge", r"merged .* into .* in \d+ s", "merged and checked", None),
    ("llamacpp", r"fetching llama\.cpp \(vendored", "fetching llama.cpp", None),
    (
        "export",
        r"converting .* to GGUF (?P<quant>\S+) with llama\.cpp's converter",
        "converting to GGUF {quant}",
        None,
    ),
    ("llamacpp", r"building llama\.cpp's .* from source", "building llama.cpp", 0),
    ("llamacpp", r"building llama\.cpp: (?P<percent>\d+)%(?P<eta>.*)", "building llama.cpp{eta}", None),
    ("llamacpp", r"built llama\.cpp's tools in", "built llama.cpp", None),
    ("export", r"quantizing to (?P<quant>\S+) with llama-quantize", "quantizing to {quant}", None),
    ("export", r"verifying the (?P<kind>\S+) GGUF in llama\.cpp", "verifying in llama.cpp", None),
    ("export", r"exported .* as (?P<format>\S+) to ", "exported", 100),
)
STEP_LINES = [
    (re.compile(rf"\bqlora_llm\.{logger}: {pattern}"), label, percent)
    for logger, pattern, label, percent in EXPORT_STEPS
]


def export_progress(lines: Iterable[str]) -> tuple[str, int | None] | None:
    """An export's step and its percent (None where the step measures none) from its log lines, as
    (`building llama.cpp, about 3 min left`, 40); the last step logged wins; None before the first."""
    found = None
    for line in lines:
        for pattern, label, percent in STEP_LINES:
            match = pattern.search(line)
            if match:
                groups = match.groupdict()
                step = label.format(**{k: v.strip() for k, v in groups.items()})
                found = (step, int(groups["percent"]) if groups.get("percent") else percent)
                break
    return found


def job_progress(job: Job) -> tuple[str, int | None] | None:
    """An export job's progress from its log; None for other stages."""
    return export_progress(log_lines(job.log, PROGRESS_TAIL_BYTES)) if job.stage == "export" else None


def progress_cell(job: Job) -> str:
    """An export job's step and percent on the run page: a <progress> bar (with no value, it shows the
    step is under way without a measure). chart.js updates it from the run's `progress` events."""
    progress = job_progress(job)
    if progress is None and not (job.stage == "export" and job.state == "running"):
        return ""
    step, percent = progress or ("", None)
    value = "" if percent is None else f" value='{percent}'"
    shown = step if percent is None else f"{step} · {percent}%"
    return (
        f"<progress id='progress-{job.id}' max='100'{value}></progress> "
        f"<span class='step' id='step-{job.id}'>{e(shown)}</span>"
    )


def stage_args(stage: str, run_dir: Path, fields: dict[str, str]) -> list[str]:
    """The CLI command (after `qlora-llm`) for a stage form, or Refused naming the bad field."""
    if stage == "evaluate":
        overrides = []
        limit = fields.get("max_examples", "").strip()
        if limit:
            # The config allows 0 (then evaluate fails on no examples): the form asks for a count.
            if not (limit.isdigit() and int(limit) > 0):
                raise Refused(422, "evaluate: examples must be a whole number above 0 (blank: all)")
            overrides.append(f"eval.max_examples={limit}")
        if fields.get("skip_general"):
            overrides += ["eval.general_tasks=[]", "eval.general_generative=[]"]
        try:
            load_config(None, overrides)
        except ConfigError as err:
            raise Refused(422, f"evaluate: {str(err).split(': ', 2)[-1]}") from None
        return ["evaluate", str(run_dir), *overrides]
    if stage == "merge":
        return ["merge", str(run_dir), *(["--force"] if fields.get("force") else [])]
    fmt, quant = fields.get("format", "gguf"), fields.get("quant", "")
    if fmt not in FORMATS:
        raise Refused(422, f"export: format must be one of {', '.join(FORMATS)}")
    if quant and quant not in QUANTS:
        raise Refused(422, f"export: quant must be one of {', '.join(QUANTS)}")
    if fmt == "vllm" and quant:
        # export's own rule, checked here so the form says it before a job is queued.
        raise Refused(
            422, "export: the quant is for gguf and ollama; vLLM serves the adapter on the 16-bit base"
        )
    args = ["export", str(run_dir), "--format", fmt]
    args += ["--quant", quant] if quant else []
    args += ["--no-verify"] if fields.get("no_verify") else []
    args += ["--force"] if fields.get("force") else []
    return args


def stage_forms(name: str, studio: Studio) -> str:
    """The run page's Evaluate, Merge and Export forms, each with its CLI command."""
    run = f"runs/{name}"

    def form(stage: str, inputs: str, command: str) -> str:
        return (
            f"<form method='post' action='/runs/{e(name)}/{stage}' id='{stage}-form' class='stage'>"
            f"{studio.csrf_field()}{inputs} <button id='{stage}'>{stage.capitalize()}</button> "
            f"<code>{e(command)}</code></form>"
        )

    formats = "".join(f"<option>{f}</option>" for f in FORMATS)
    quants = "<option value=''>default (f16)</option>" + "".join(f"<option>{q}</option>" for q in QUANTS)
    return "<h2>Evaluate, merge, export</h2>" + "".join(
        (
            form(
                "evaluate",
                "<label>examples <input type='text' name='max_examples' size='5' placeholder='all'></label> "
                "<label><input type='checkbox' name='skip_general' value='1'> skip general benchmarks</label>",
                shlex.join(["qlora-llm", "evaluate", run]),
            ),
            form(
                "merge",
                "<label><input type='checkbox' name='force' value='1'> replace an existing merge</label>",
                shlex.join(["qlora-llm", "merge", run]),
            ),
            form(
                "export",
                f"<label>format <select name='format'>{formats}</select></label> "
                f"<label>quant <select name='quant'>{quants}</select></label> "
                "<label><input type='checkbox' name='no_verify' value='1'> skip the llama.cpp check</label> "
                "<label><input type='checkbox' name='force' value='1'> replace</label>",
                shlex.join(["qlora-llm", "export", run, "--format", "gguf"]),
            ),
        )
    )


def add_routes(app: FastAPI, studio: Studio) -> None:
    def queue_route(stage: str):
        async def queue(name: str, request: Request) -> Response:
            run_dir = run_folder(studio.runs, name)
            fields = {k: str(v) for k, v in (await request.form()).items() if k != "csrf"}
            studio.store.add_stage(name, stage_args(stage, run_dir, fields))
            return RedirectResponse(f"/runs/{name}", status_code=303)

        return queue

    for stage in STAGES:  # one URL per stage, so each says what it does
        app.post(f"/runs/{{name}}/{stage}", name=stage)(queue_route(stage))

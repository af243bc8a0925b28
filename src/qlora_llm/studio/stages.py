"""Evaluate, merge and export a run from its page: each a queued job running the CLI command a user would.

    qlora-llm evaluate runs/NAME [eval.max_examples=N] [eval.general_tasks=[] eval.general_generative=[]]
    qlora-llm merge runs/NAME [--force]
    qlora-llm export runs/NAME --format gguf|ollama|vllm [--quant f16|q8_0|q4_k_m] [--no-verify] [--force]

The form's choices are the CLI's own; the command is shown beside each button and on the job once queued.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from qlora_llm.config import ConfigError, load_config
from qlora_llm.studio.web import Refused, Studio, e, run_folder

FORMATS = ("gguf", "ollama", "vllm")
QUANTS = ("f16", "q8_0", "q4_k_m")
STAGES = ("evaluate", "merge", "export")


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

"""The chat playground: a run beside its base (or beside another run of the same base), streamed, multi-turn.

The studio loads no model: it starts `qlora-llm serve RUN` (the same server a user would run, which serves
the run's adapter under the run's name and the bare base under the base model's name; with
`--adapter OTHER=runs/OTHER/final_adapter` another run's adapter under its name too) on a free loopback
port with a random key, and relays the page's requests to that server's OpenAI-compatible
`/v1/chat/completions`. Each column's conversation lives in the page, which sends its whole message list
every turn. One playground server at a time; starting another (another run's, or another comparison) stops
the first, and it stops with the studio. It is not a queued job: it serves until stopped, beside whatever
job is running.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from qlora_llm.studio.web import RUN_NAME, Refused, Studio, confined, e, page, run_folder

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 2000
# The sampling settings the page may send, each passed on as is: the server validates them.
SAMPLING = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}
ROLES = ("system", "user", "assistant")
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Playground:
    """The one `qlora-llm serve` subprocess behind the chat page."""

    def __init__(self, home: Path):
        self.log_path = home / "logs" / "chat.log"
        self.key = secrets.token_urlsafe(24)  # the server's API key: only the studio talks to it
        self.process: subprocess.Popen | None = None
        self.run: str | None = None
        self.other: str | None = None  # the run in the second column; None: the base model
        self.port = 0

    def command(self, run_dir: Path, port: int, adapters: dict[str, Path]) -> list[str]:
        """`qlora-llm serve RUN --host 127.0.0.1 [--adapter NAME=PATH ...] --port P` (the port last)."""
        command = [sys.executable, "-m", "qlora_llm.cli", "serve", str(run_dir), "--host", "127.0.0.1"]
        for adapter, path in adapters.items():
            command += ["--adapter", f"{adapter}={path}"]
        return command + ["--port", str(port)]

    def start(self, name: str, run_dir: Path, beside: dict[str, Path]) -> None:
        """Serve NAME's run, and beside it {OTHER: its adapter} when given, else its base (always served)."""
        self.stop()
        with socket.socket() as s:  # a free port, chosen now; the server binds it a moment later
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONUNBUFFERED="1", QLORA_LLM_API_KEY=self.key)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command(run_dir, self.port, beside),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.run, self.other = name, next(iter(beside), None)
        log.info(
            "chat playground for %s beside %s: pid %d on port %d",
            name,
            self.other or "its base",
            self.process.pid,
            self.port,
        )

    def stop(self) -> None:
        """SIGTERM: the server finishes in-flight answers (serve.shutdown_timeout_s) and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process, self.run, self.other = None, None, None

    def status(self, name: str) -> dict[str, Any]:
        """stopped (not serving this run), loading, ready (the models served; `other`: the run beside it, or
        None for its base) or failed (log tail)."""
        if self.process is None or self.run != name:
            return {"state": "stopped"}
        if self.process.poll() is not None:
            return {"state": "failed", "log": self._log_tail()}
        try:
            code, body = self._request("GET", "/health", None, timeout=2)
        except OSError:
            return {"state": "loading"}  # not listening yet
        health = json.loads(body or b"{}")
        if code == 200:
            return {
                "state": "ready",
                "tuned": health["model"],
                "models": health["models"],
                "other": self.other,
            }
        if health.get("status") == "error":
            return {"state": "failed", "log": health.get("error", "")}
        return {"state": "loading"}

    def complete(self, payload: dict[str, Any]) -> tuple[int, Iterator[bytes] | bytes]:
        """POST the request to the server's /v1/chat/completions: (status, the SSE lines or the error body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(payload), self._headers())
        response = conn.getresponse()
        if response.status != 200:
            body = response.read()
            conn.close()
            return response.status, body

        def lines() -> Iterator[bytes]:
            try:
                yield from response
            finally:
                conn.close()  # a reader gone: the server sees the closed stream and cancels the answer

        return 200, lines()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body, self._headers())
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _log_tail(self) -> str:
        if not self.log_path.is_file():
            return ""
        return self.log_path.read_bytes()[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")


def chat_request(fields: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """The page's JSON (model, the column's messages, sampling) as an OpenAI chat request, or Refused naming
    the field. The messages are the column's whole conversation, ending with the new user turn."""
    if fields.get("model") not in models:
        raise Refused(422, f"model: one of {', '.join(models)}")
    messages = fields.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise Refused(422, "messages: a list of {role: user, assistant or system; content: text}")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise Refused(422, "prompt: write a message first")
    payload: dict[str, Any] = {
        "model": fields["model"],
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "stream": True,
    }
    for key, kind in SAMPLING.items():
        value = fields.get(key)
        if value in (None, ""):
            continue
        try:
            payload[key] = kind(value)
        except (TypeError, ValueError):
            raise Refused(422, f"{key}: a number") from None
    return payload


def base_model(run_dir: Path) -> str | None:
    """The `model.name` a run was trained from (its config.yaml), or None when it has none."""
    try:
        config = yaml.load((run_dir / "config.yaml").read_text(encoding="utf-8"), Loader=SAFE_LOADER) or {}
    except (OSError, yaml.YAMLError):
        return None
    model = config.get("model") if isinstance(config, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return str(name) if name else None


def other_adapter(runs: Path, name: str, other: str) -> Path:
    """OTHER's final adapter, to serve beside NAME's run: a finished run of the same base model inside the
    runs folder, else Refused in one line (the one rule both the page's choices and Start go by)."""
    other_dir = run_folder(runs, other)  # a name, confined to the runs folder: no path comes from the page
    if other == name:
        raise Refused(409, f"{other}: this run itself; choose its base or another run")
    adapter = confined(runs, f"{other}/final_adapter")  # a symlink out of the runs folder is refused
    if not (adapter / "adapter_config.json").is_file():
        raise Refused(409, f"{other}: no final adapter yet (final_adapter/): let its training finish first")
    base = base_model(run_folder(runs, name))
    if base is None or base_model(other_dir) != base:
        raise Refused(
            409, f"{other}: trained from another base model than {name}; only runs of the same base compare"
        )
    if other in (base, Path(base).name):  # the server would serve the run under the base's own name
        raise Refused(409, f"{other}: named like the base model; clone it under another name to compare")
    return adapter


def comparable_runs(runs: Path, name: str) -> dict[str, Path]:
    """The runs the second column may be: every other finished run of NAME's base model -> its adapter."""
    found = {}
    for folder in sorted(runs.iterdir()):
        if folder.name == name or not RUN_NAME.match(folder.name) or not folder.is_dir():
            continue
        try:
            found[folder.name] = other_adapter(runs, name, folder.name)
        except Refused:
            continue
    return found


def chat_body(studio: Studio, playground: Playground, name: str, run_dir: Path) -> str:
    others = comparable_runs(studio.runs, name)
    current = playground.other if playground.run == name and playground.other in others else None

    def shown(adapters: dict[str, Path]) -> str:  # the command a user would type, ours without --port P
        serve = playground.command(run_dir, 0, adapters)[3:-2]
        return studio.hide_paths(shlex.join(["qlora-llm", *serve]))

    options = "".join(
        f"<option value='{e(other)}' data-command='{e(shown({other: path}))}'"
        f"{' selected' if other == current else ''}>the run {e(other)}</option>"
        for other, path in others.items()
    )
    command = shown({current: others[current]} if current else {})
    column = (
        "<div class='answer-col'><h2 id='{side}-model'>{label}</h2><div id='{side}-history' class='history'></div>"
        "<pre id='{side}-answer' class='answer'></pre><p class='help' id='{side}-finish'></p></div>"
    )
    return (
        f"<p>The run's adapter and its base model (or another run of the same base) answer the same prompt, "
        f"streamed, through the server a user would run: <code id='serve-command'>{e(command)}</code> (its "
        f"OpenAI-compatible <code>/v1/chat/completions</code>). Each column keeps its own conversation and "
        f"sends all of it every turn. Status: <b id='chat-state'>…</b></p>"
        f"<form method='post' action='/runs/{e(name)}/chat/start' style='display:inline'>{studio.csrf_field()}"
        "<label>beside it: <select name='second' id='chat-second'>"
        f"<option value='' data-command='{e(shown({}))}'>its base model</option>{options}</select></label> "
        "<button id='chat-start'>Start the model server</button></form> "
        f"<form method='post' action='/runs/{e(name)}/chat/stop' style='display:inline'>{studio.csrf_field()}"
        "<button id='chat-stop'>Stop it</button></form>"
        + (
            ""
            if others
            else "<p class='help'>No other run of this base model has a final adapter to compare with.</p>"
        )
        + f"<form id='chat' data-run='{e(name)}' data-csrf='{studio.csrf}'>"
        "<p><textarea name='prompt' id='prompt' rows='4' cols='90' placeholder='A message'></textarea></p>"
        "<p><label>temperature <input type='text' name='temperature' value='0'></label> "
        "<label>top_p <input type='text' name='top_p' value='0.9'></label> "
        "<label>max tokens <input type='text' name='max_tokens' value='64'></label> "
        "<label>seed <input type='text' name='seed' value=''></label> "
        "<button id='send' disabled>Send to both</button> "
        "<button type='button' id='new-conversation'>New conversation</button></p></form>"
        "<p class='error' id='chat-error'></p>"
        "<div class='answers'>"
        + column.format(side="base", label="base")
        + column.format(side="tuned", label="fine-tuned")
        + "</div><pre id='chat-log'></pre><script src='/static/chat.js'></script>"
    )


def add_routes(app: FastAPI, studio: Studio, playground: Playground) -> None:
    @app.get("/runs/{name}/chat", response_class=HTMLResponse)
    def chat_page(name: str) -> HTMLResponse:
        run_dir = run_folder(studio.runs, name)
        return page(f"Chat with {name}", chat_body(studio, playground, name, run_dir))

    @app.post("/runs/{name}/chat/start")
    async def chat_start(name: str, request: Request) -> Response:
        run_dir = run_folder(studio.runs, name)
        if not (run_dir / "config.yaml").is_file():  # the training writes it first thing
            raise Refused(409, "this run has not started training: nothing to chat with yet")
        second = str((await request.form()).get("second") or "")
        beside = {second: other_adapter(studio.runs, name, second)} if second else {}
        await asyncio.to_thread(playground.start, name, run_dir, beside)
        return RedirectResponse(f"/runs/{name}/chat", status_code=303)

    @app.post("/runs/{name}/chat/stop")
    def chat_stop(name: str) -> Response:
        run_folder(studio.runs, name)
        if playground.run == name:
            playground.stop()
        return RedirectResponse(f"/runs/{name}/chat", status_code=303)

    @app.get("/runs/{name}/chat/status")
    def chat_status(name: str) -> JSONResponse:
        run_folder(studio.runs, name)
        status = playground.status(name)
        if "log" in status:
            status["log"] = studio.hide_paths(status["log"])
        return JSONResponse(status)

    @app.post("/runs/{name}/chat/complete")
    async def chat_complete(name: str, request: Request) -> Response:
        run_folder(studio.runs, name)
        status = await asyncio.to_thread(playground.status, name)
        if status["state"] != "ready":
            raise Refused(409, "the model server is not ready: start it and wait for 'ready'")
        try:
            fields = json.loads(await request.body())
        except json.JSONDecodeError:
            raise Refused(422, "a JSON body: model, prompt and the sampling settings") from None
        if not isinstance(fields, dict):
            raise Refused(422, "a JSON body: model, prompt and the sampling settings")
        code, answer = await asyncio.to_thread(playground.complete, chat_request(fields, status["models"]))
        if code != 200:  # the server's own one-line error (e.g. max_tokens past the context)
            return Response(
                studio.hide_paths(answer.decode("utf-8", "replace")), code, media_type="application/json"
            )
        return StreamingResponse(
            answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

"""The studio's web app: runs list, run page (live chart over SSE), new-run form, login; see __init__.py.

Security model: loopback by default (cli.py refuses another address without a key); with a key, every
route but /login and /static needs the login cookie (or `Authorization: Bearer KEY`); every POST carries
the CSRF token of this studio process; run names and data paths resolve inside the runs and data folders;
errors render one line, never a stack trace or a server path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import shlex
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from qlora_llm.config import Config, ConfigError, describe_keys, load_config
from qlora_llm.errors import QloraError
from qlora_llm.studio.jobs import JobStore, Worker

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
COOKIE = "qlora_studio"
# Keys the form does not offer: the studio sets the output folder from the run name.
FIXED_KEYS = {"train.output_dir"}
# Keys that name files the training reads: they must lie inside the runs or data folders.
PATH_KEYS = {"data.train_file", "data.eval_file"}
LOG_TAIL_BYTES = 8000


class Refused(QloraError):
    """A request the studio refuses; the message is shown as is (so it never holds a server path)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def form_value(value: Any) -> str:
    """How a config value is written in the form (and read back as YAML, as a CLI override is)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


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


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
    return rows


def run_info(run_dir: Path, store: JobStore) -> dict:
    """What the runs page shows for one folder, whoever started it (CLI or studio)."""
    config: dict = {}
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            config = {}
    rows = read_metrics(run_dir)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    job = store.latest(run_dir.name)
    if job is not None:
        status = job.state
    elif (run_dir / "summary.json").is_file():
        status = "done"
    else:
        status = "started outside the studio" if rows else "empty"
    train = config.get("train", {})
    return {
        "name": run_dir.name,
        "status": status,
        "model": config.get("model", {}).get("name", ""),
        "data": Path(str(config.get("data", {}).get("train_file", "") or "")).name,
        "step": rows[-1]["step"] if rows else 0,
        "max_steps": train.get("max_steps", ""),
        "best_eval_loss": min(evals) if evals else None,
        "config": config,
        "checkpoints": sorted(
            (p.name for p in run_dir.glob("checkpoint-*") if p.is_dir()),
            key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1,
        ),
    }


def list_runs(runs: Path, store: JobStore) -> list[dict]:
    folders = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [run_info(p, store) for p in folders]


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
        if text == form_value(defaults[section][field]):
            continue
        override = f"{key}={text}"
        overrides.append(override)  # invalid ones too: the command shown is what the user typed
        try:
            load_config(None, [override])
        except ConfigError as err:
            # The message names the override; the form shows it beside the field instead.
            errors[key] = str(err).split(": ", 2)[-1]
            continue
        if key in PATH_KEYS and text not in ("", "null"):
            path = Path(text)
            inside = any(_inside(path, root) for root in (runs, data))
            if not inside:
                errors[key] = "must be a file inside the studio's data or runs folder"
                continue
    if errors:
        return None, errors, overrides
    overrides.append(f"train.output_dir={runs / name}")  # not shown as typed: the run name sets it
    try:
        return load_config(None, overrides), {}, overrides
    except ConfigError as err:
        return None, {"": str(err)}, overrides


def _inside(path: Path, root: Path) -> bool:
    candidate = path if path.is_absolute() else root / path
    return candidate.resolve().is_relative_to(root.resolve())


def create_app(
    runs: Path, data: Path | None = None, api_key: str | None = None, start_worker: bool = True
) -> FastAPI:
    """The studio for the run folders under `runs`; `api_key` None means no login (loopback only)."""
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    data = Path(data) if data is not None else runs
    store = JobStore(runs)
    store.mark_interrupted()
    worker = Worker(store)
    secret = secrets.token_bytes(32)
    csrf_token = hmac.new(secret, b"csrf", hashlib.sha256).hexdigest()
    session = hmac.new(secret, (api_key or "").encode(), hashlib.sha256).hexdigest()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if start_worker:
            worker.start()
        yield
        if start_worker:
            worker.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.worker = worker
    app.state.csrf = csrf_token
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def signed_in(request: Request) -> bool:
        if api_key is None:
            return True
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].encode(), api_key.encode()):
            return True
        return hmac.compare_digest(request.cookies.get(COOKIE, ""), session)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path not in ("/login",) and not path.startswith("/static/") and not signed_in(request):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return RedirectResponse("/login", status_code=303)
            return page(
                "Sign in required",
                "<p>Sign in with the studio's API key at <a href='/login'>/login</a>.</p>",
                401,
            )
        if request.method not in ("GET", "HEAD") and path != "/login":
            # The body, not request.form(): Starlette replays a read body to the route, not a parsed form.
            body = parse_qs((await request.body()).decode("utf-8", errors="replace"))
            token = (body.get("csrf") or [""])[0] or request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(token.encode(), csrf_token.encode()):
                return page(
                    "Refused",
                    "<p class='error'>Missing or wrong CSRF token: reload the page and retry.</p>",
                    403,
                )
        try:
            return await call_next(request)
        except Refused as err:
            return page("Refused", f"<p class='error'>{_e(err)}</p>", err.status)
        except Exception:  # never a stack trace or a server path in a page; the log has it
            log.exception("studio error on %s", path)
            return page(
                "Error", "<p class='error'>Internal error; the studio's log has the details.</p>", 500
            )

    def page(title: str, body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)} · qlora-llm studio</title>"
            "<link rel='stylesheet' href='/static/studio.css'></head><body>"
            "<nav><a href='/'>Runs</a> · <a href='/new'>New run</a></nav>"
            f"<h1>{_e(title)}</h1>{body}</body></html>",
            status_code=status,
        )

    def csrf_field() -> str:
        return f"<input type='hidden' name='csrf' value='{csrf_token}'>"

    @app.get("/login", response_class=HTMLResponse)
    def login_form() -> HTMLResponse:
        return page(
            "Sign in",
            "<form method='post' action='/login'><label>API key <input type='password' name='key'></label>"
            "<button>Sign in</button></form>",
        )

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        key = str(form.get("key", ""))
        if api_key is None or hmac.compare_digest(key.encode(), api_key.encode()):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, session, httponly=True, samesite="strict")
            return response
        return page("Sign in", "<p class='error'>Wrong key.</p>", 401)

    @app.get("/", response_class=HTMLResponse)
    def runs_page() -> HTMLResponse:
        rows = "".join(
            f"<tr><td><a href='/runs/{_e(r['name'])}'>{_e(r['name'])}</a></td><td class='status'>{_e(r['status'])}</td>"
            f"<td>{_e(r['model'])}</td><td>{_e(r['data'])}</td><td>{_e(r['step'])} / {_e(r['max_steps'])}</td>"
            f"<td>{_loss(r['best_eval_loss'])}</td>"
            f"<td><input type='checkbox' name='run' value='{_e(r['name'])}' form='compare'></td></tr>"
            for r in list_runs(runs, store)
        )
        queue = "".join(
            f"<li>job {j.id}: {_e(j.run)} <form method='post' action='/jobs/{j.id}/cancel' style='display:inline'>"
            f"{csrf_field()}<button>Cancel</button></form></li>"
            for j in store.queued()
        )
        return page(
            "Runs",
            "<table id='runs'><tr><th>Run</th><th>Status</th><th>Model</th><th>Data</th><th>Steps</th>"
            f"<th>Best eval loss</th><th>Compare</th></tr>{rows}</table>"
            "<form id='compare' method='get' action='/compare'><button>Compare 2-4 selected runs</button></form>"
            f"<h2>Waiting</h2><ul id='queue'>{queue}</ul>",
        )

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request) -> HTMLResponse:
        """2-4 runs: overlaid train and eval loss, best eval loss side by side, the config keys that differ."""
        names = request.query_params.getlist("run")
        if not 2 <= len(names) <= 4 or len(set(names)) != len(names):
            raise Refused(400, "choose 2 to 4 different runs to compare")
        infos = [run_info(run_folder(runs, n), store) for n in names]
        curves = {info["name"]: read_metrics(runs / info["name"]) for info in infos}
        flat = [_flatten(info["config"]) for info in infos]
        keys = sorted({k for f in flat for k in f if len({repr(g.get(k)) for g in flat}) > 1})
        keys = [k for k in keys if k != "train.output_dir"]  # always differs: one folder per run
        head = "".join(f"<th>{_e(n)}</th>" for n in names)
        diff = "".join(
            f"<tr><td>{_e(k)}</td>"
            + "".join(f"<td>{_e(_hide_paths(str(f.get(k, '')), runs, data))}</td>" for f in flat)
            + "</tr>"
            for k in keys
        )
        best = "".join(f"<td>{_loss(info['best_eval_loss'])}</td>" for info in infos)
        steps = "".join(f"<td>{_e(info['step'])}</td>" for info in infos)
        return page(
            "Compare runs",
            f"{_svg_chart(curves)}<table id='metrics'><tr><th></th>{head}</tr><tr><td>best eval loss</td>{best}</tr>"
            f"<tr><td>steps</td>{steps}</tr></table><h2>Config diff</h2>"
            f"<table id='diff'><tr><th>key</th>{head}</tr>{diff or '<tr><td>no differences</td></tr>'}</table>",
        )

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str) -> HTMLResponse:
        folder = run_folder(runs, name)
        info = run_info(folder, store)
        job = store.latest(name)
        tail = ""
        if job is not None and Path(job.log).is_file():
            with open(job.log, "rb") as f:
                f.seek(max(0, Path(job.log).stat().st_size - LOG_TAIL_BYTES))
                # Progress bars redraw with \r: each redraw is a line of its own, the last ones kept.
                text = f.read().decode("utf-8", errors="replace").replace("\r", "\n")
                tail = "\n".join(line for line in text.splitlines() if line.strip())
        actions = ""
        if job is not None and job.state == "running":
            actions += f"<form method='post' action='/runs/{_e(name)}/stop'>{csrf_field()}<button id='stop'>Stop</button></form>"
        elif info["status"] not in ("queued", "done"):
            actions += f"<form method='post' action='/runs/{_e(name)}/resume'>{csrf_field()}<button id='resume'>Resume</button></form>"
        checkpoints = "".join(f"<li>{_e(c)}</li>" for c in info["checkpoints"]) or "<li>none yet</li>"
        best = _loss(info["best_eval_loss"])
        body = (
            f"<p>Status: <b id='status'>{_e(info['status'])}</b> · step <span id='progress'>{_e(info['step'])} / "
            f"{_e(info['max_steps'])}</span> · best eval loss {best} · model {_e(info['model'])}</p>{actions}"
            f"<p><label><input type='checkbox' id='logscale'> log scale</label> · <span id='points'>0</span> points "
            "(<span style='color:#1f77b4'>train</span>, <span style='color:#d62728'>eval</span>)</p>"
            f"<canvas id='chart' width='800' height='320' data-events='/runs/{_e(name)}/events' "
            f"data-max-steps='{_e(info['max_steps'])}'></canvas>"
            f"<h2>Command</h2><pre id='command'>{_e(_hide_paths(shlex.join(['qlora-llm', *job.command[3:]]) if job else '', runs, data))}</pre>"
            f"<h2>Log</h2><pre id='log'>{_e(_hide_paths(tail, runs, data))}</pre>"
            f"<h2>Checkpoints</h2><ul id='checkpoints'>{checkpoints}</ul>"
            f"<h2>Config</h2><pre>{_e(_hide_paths(yaml.safe_dump(info['config'], sort_keys=False), runs, data))}</pre>"
            "<script src='/static/chart.js'></script>"
        )
        return page(f"Run {name}", body)

    @app.get("/runs/{name}/metrics")
    def run_metrics(name: str) -> JSONResponse:
        folder = run_folder(runs, name)
        info = run_info(folder, store)
        return JSONResponse(
            {"status": info["status"], "checkpoints": info["checkpoints"], "rows": read_metrics(folder)}
        )

    @app.get("/runs/{name}/events")
    async def run_events(name: str, request: Request) -> StreamingResponse:
        """Server-sent events: every metrics.jsonl row (all of them, then each new one), and the status."""
        folder = run_folder(runs, name)

        async def stream():
            sent, status = 0, None
            yield "event: reset\ndata: {}\n\n"
            while not await request.is_disconnected():
                rows = read_metrics(folder)
                if len(rows) < sent:  # a fresh run in the same folder started over
                    sent = 0
                    yield "event: reset\ndata: {}\n\n"
                for row in rows[sent:]:
                    yield f"data: {json.dumps(row)}\n\n"
                sent = len(rows)
                job = store.latest(name)
                now = job.state if job is not None else run_info(folder, store)["status"]
                if now != status:
                    status = now
                    yield f"event: status\ndata: {now}\n\n"
                await asyncio.sleep(0.5)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/runs/{name}/stop")
    def stop_run(name: str) -> Response:
        run_folder(runs, name)
        job = store.latest(name)
        if job is None or not worker.stop(job):
            raise Refused(409, "the run is not running")
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.post("/runs/{name}/resume")
    def resume_run(name: str) -> Response:
        run_folder(runs, name)
        job = store.latest(name)
        if job is None or job.state in ("queued", "running", "done"):
            raise Refused(409, "only a stopped, failed or interrupted studio run can be resumed")
        store.add(name, job.config, ["--resume", "auto"])
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: int) -> Response:
        if not store.cancel(job_id):
            raise Refused(409, "only a waiting job can be cancelled")
        return RedirectResponse("/", status_code=303)

    def new_form(values: dict[str, str], errors: dict[str, str], command: str = "") -> str:
        defaults = Config().model_dump(mode="json")
        rows = []
        name_error = errors.get("run_name", "")
        rows.append(
            f"<p><label>run name <input type='text' name='run_name' value='{_e(values.get('run_name', ''))}'></label>"
            f" <span class='error' id='error-run_name'>{_e(name_error)}</span></p>"
        )
        section = None
        for key, _, help_text in describe_keys():
            if key in FIXED_KEYS:
                continue
            head, field = key.split(".")
            if head != section:
                rows.append(f"{'</fieldset>' if section else ''}<fieldset><legend>{_e(head)}</legend>")
                section = head
            value = values.get(key, form_value(defaults[head][field]))
            error = errors.get(key, "")
            rows.append(
                f"<p><label>{_e(key)} <input type='text' name='{_e(key)}' value='{_e(value)}'></label> "
                f"<span class='error' id='error-{_e(key)}'>{_e(error)}</span><br><span class='help'>{_e(help_text)}</span></p>"
            )
        rows.append("</fieldset>")
        top = f"<p class='error'>{_e(errors[''])}</p>" if "" in errors else ""
        shown = f"<h2>Equivalent command</h2><pre id='command'>{_e(command)}</pre>" if command else ""
        return (
            f"{top}{shown}<form method='post' action='/new' id='new-run'>{csrf_field()}"
            f"<button>Launch</button>{''.join(rows)}<button>Launch</button></form>"
        )

    @app.get("/new", response_class=HTMLResponse)
    def new_page() -> HTMLResponse:
        return page("New run", new_form({}, {}))

    @app.post("/new")
    async def new_run(request: Request) -> Response:
        fields = {k: str(v) for k, v in (await request.form()).items() if k != "csrf"}
        cfg, errors, overrides = validate_form(fields, runs, data)
        output = f"train.output_dir={runs / fields.get('run_name', '').strip()}"
        typed = [o for o in overrides if not o.startswith("train.output_dir=")]
        # empty.yaml: an empty file, so every value not given is the default, as in the form.
        command = _hide_paths(shlex.join(["qlora-llm", "train", "empty.yaml", *typed, output]), runs, data)
        if cfg is None:
            return HTMLResponse(page("New run", new_form(fields, errors, command)).body, status_code=422)
        name = fields["run_name"].strip()
        (runs / name).mkdir(parents=True)
        store.add(name, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return RedirectResponse(f"/runs/{name}", status_code=303)

    return app


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def _flatten(config: dict) -> dict[str, object]:
    return {f"{s}.{k}": v for s, body in config.items() if isinstance(body, dict) for k, v in body.items()}


def _svg_chart(curves: dict[str, list[dict]], width: int = 800, height: int = 320, pad: int = 40) -> str:
    """Overlaid loss curves as inline SVG: one color per run, solid train loss, dashed eval loss."""
    points = [
        (r["step"], r[key])
        for rows in curves.values()
        for r in rows
        for key in ("loss", "eval_loss")
        if key in r
    ]
    if not points:
        return "<p>No logged steps yet.</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(step: float, value: float) -> str:
        x = pad + (step - x0) / (x1 - x0) * (width - 2 * pad)
        y = height - pad - (value - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    lines, legend = [], []
    for i, (name, rows) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        for key, dash in (("loss", ""), ("eval_loss", " stroke-dasharray='6 3'")):
            pts = " ".join(xy(r["step"], r[key]) for r in rows if key in r)
            if pts:
                lines.append(f"<polyline class='curve' fill='none' stroke='{color}'{dash} points='{pts}'/>")
        legend.append(f"<span style='color:{color}'>{_e(name)}</span>")
    return (
        f"<p>{' · '.join(legend)} (solid: train loss, dashed: eval loss; {y0:.4g} to {y1:.4g})</p>"
        f"<svg id='compare-chart' width='{width}' height='{height}'><rect x='{pad}' y='{pad}' "
        f"width='{width - 2 * pad}' height='{height - 2 * pad}' fill='none' stroke='#999'/>{''.join(lines)}</svg>"
    )


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _hide_paths(text: str, runs: Path, data: Path) -> str:
    """Pages show paths relative to the studio's folders, never where those folders are on the server."""
    for root, label in ((runs.resolve(), "runs"), (data.resolve(), "data")):
        text = text.replace(str(root), label)
    return text


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless the user says so explicitly."""
    from qlora_llm.errors import QloraError

    if is_loopback(host) or api_key:
        return
    if not insecure_no_auth:
        raise QloraError(
            f"refusing to bind the studio to {host} without a key: anyone who reaches it could launch jobs. "
            "Pass --api-key KEY (or --insecure-no-auth if this network is yours alone)."
        )
    log.warning(
        "THE STUDIO IS LISTENING ON %s WITH NO LOGIN (--insecure-no-auth): anyone can launch jobs", host
    )


def serve_studio(
    runs: Path,
    data: Path | None,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    insecure_no_auth: bool = False,
) -> None:
    """Run the studio until Ctrl-C; the running job is stopped cleanly (it checkpoints) on the way out."""
    import uvicorn

    check_bind(host, api_key, insecure_no_auth)
    app = create_app(runs, data, api_key=api_key)
    log.info("studio on http://%s:%d (runs: %s)", host, port, runs)
    uvicorn.run(app, host=host, port=port, log_level="warning")

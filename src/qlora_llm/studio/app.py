"""The studio's web app: login, runs list, run page (live chart over SSE), new-run form; see __init__.py.

The pages of their own live beside it: evaluation.py (a run's evaluation report), stages.py (evaluate,
merge and export jobs), clone.py (clone with changes), chat.py (the chat playground), upload.py (data
upload and prepare's preview), form.py (the config form), web.py (what they share).

Security model: loopback by default (cli.py refuses another address without a key); with a key, every
route but /login and /static needs the login cookie (or `Authorization: Bearer KEY`); every POST carries
the CSRF token of this studio process (an upload's multipart body too); bodies past the upload limit are
refused unread; run names and data paths resolve inside the runs and data folders; errors render one line,
never a stack trace or a server path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import shlex
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartException, MultiPartParser

from qlora_llm.config import Config
from qlora_llm.studio import chat, clone, evaluation, stages, upload
from qlora_llm.studio.form import new_form, nproc_field, validate_form
from qlora_llm.studio.gpus import gpus_wanted, too_many
from qlora_llm.studio.jobs import Job, JobStore, Worker
from qlora_llm.studio.web import Refused, Studio, e, hide_paths, log_lines, loss, page, run_folder

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "qlora_studio"
LOG_TAIL_BYTES = 8000
# libyaml's safe loader where PyYAML was built with it: the runs page reads every run's config.yaml, and
# the pure-Python loader spent ~10 ms on each (2 s of the page for 200 runs; bench/studio_runs.py).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line being written right now
    return row if isinstance(row, dict) else None


def metrics_summary(run_dir: Path) -> dict:
    """What a run's metrics.jsonl tells the runs page: whether anything was logged, the last step, the
    best eval loss, the latest tokens/s and peak memory. Only the lines that carry them are parsed: the
    runs page reads every run's file, and parsing every line made it 547 ms for 200 runs of 1,000 steps
    (198 ms now; bench/studio_runs.py)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []

    def rows_with(key: str, newest_first: bool = False):
        """Rows that have `key`; a line is parsed only when the key's quoted name is in it."""
        for line in reversed(lines) if newest_first else lines:
            if f'"{key}"' in line and (row := _row(line)) and key in row:
                yield row

    last = next(rows_with("step", newest_first=True), None)
    evals = [r["eval_loss"] for r in rows_with("eval_loss")]
    speed = next(rows_with("tokens_per_s", newest_first=True), None)
    memory = next(rows_with("memory_bytes", newest_first=True), None)
    return {
        "logged": last is not None,
        "step": last["step"] if last else 0,
        "best_eval_loss": min(evals) if evals else None,
        # The latest training log's throughput and the peak memory so far (monitor.py writes both).
        "tokens_per_s": speed["tokens_per_s"] if speed else None,
        "memory_bytes": memory["memory_bytes"] if memory else None,
    }


def _train_started(store: JobStore, name: str) -> str:
    """When the run's running training job started (Unix seconds), for the page's ETA; "" otherwise."""
    job = store.latest(name, "train")
    return str(job.started) if job is not None and job.state == "running" and job.started else ""


def _model_label(name: str) -> str:
    """A Hub id or a known name as it is; a local model folder by its name alone (no server paths)."""
    return Path(name).name if name.startswith("/") else name


def run_info(run_dir: Path, store: JobStore) -> dict:
    """What the runs page shows for one folder, whoever started it (CLI or studio)."""
    # evaluate/merge/export jobs do not change the training's status
    job = store.latest(run_dir.name, "train")
    # The run's resolved config once training has written it; before that (a job just started or still
    # queued) the config the studio launched it with, so the page knows max_steps from the start.
    saved = run_dir / "config.yaml"
    text = saved.read_text(encoding="utf-8") if saved.is_file() else job.config if job is not None else ""
    try:
        config = yaml.load(text, Loader=SAFE_LOADER) or {} if text else {}
    except yaml.YAMLError:
        config = {}
    metrics = metrics_summary(run_dir)
    if job is not None:
        status = job.state
    elif (run_dir / "summary.json").is_file():
        status = "done"
    else:
        status = "started outside the studio" if metrics["logged"] else "empty"
    train = config.get("train", {})
    return {
        "name": run_dir.name,
        "status": status,
        "model": _model_label(str(config.get("model", {}).get("name", "") or "")),
        "data": Path(str(config.get("data", {}).get("train_file", "") or "")).name,
        "step": metrics["step"],
        "max_steps": train.get("max_steps", ""),
        "best_eval_loss": metrics["best_eval_loss"],
        "tokens_per_s": metrics["tokens_per_s"],
        "memory_bytes": metrics["memory_bytes"],
        "evaluation": evaluation.eval_summary(run_dir),
        "config": config,
        "checkpoints": sorted(
            (p.name for p in run_dir.glob("checkpoint-*") if p.is_dir()),
            key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1,
        ),
    }


def list_runs(runs: Path, store: JobStore) -> list[dict]:
    folders = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [run_info(p, store) for p in folders]


def create_app(
    runs: Path,
    data: Path | None = None,
    api_key: str | None = None,
    start_worker: bool = True,
    gpus: list[str] | None = None,
) -> FastAPI:
    """The studio for the run folders under `runs`; `api_key` None means no login (loopback only);
    `gpus` the GPU ids its jobs may use (gpus.detect_gpus), None or [] on a CPU machine."""
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    data = Path(data) if data is not None else runs
    store = JobStore(runs)
    store.mark_interrupted()
    worker = Worker(store, gpus)
    secret = secrets.token_bytes(32)
    csrf_token = hmac.new(secret, b"csrf", hashlib.sha256).hexdigest()
    session = hmac.new(secret, (api_key or "").encode(), hashlib.sha256).hexdigest()
    studio = Studio(runs, data, store, worker, csrf_token)
    playground = chat.Playground(store.home)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if start_worker:
            worker.start()
        yield
        playground.stop()
        if start_worker:
            worker.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.worker = worker
    app.state.csrf = csrf_token
    app.state.playground = playground
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    _add_sign_in(app, api_key, session, csrf_token)
    _add_run_routes(app, studio)
    _add_queue_routes(app, studio)
    _add_new_run_routes(app, studio)
    evaluation.add_routes(app, studio)
    stages.add_routes(app, studio)
    clone.add_routes(app, studio)
    chat.add_routes(app, studio, playground)
    upload.add_routes(app, studio)
    return app


async def csrf_field(request: Request) -> str:
    """The form's csrf field, urlencoded or multipart (an upload). From the body, not request.form():
    Starlette replays a read body to the route, not a parsed form."""
    body = await request.body()
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return (parse_qs(body.decode("utf-8", errors="replace")).get("csrf") or [""])[0]

    async def chunks():
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_part_size=2**20).parse()
    except MultiPartException:
        return ""
    token = form.get("csrf")
    await form.close()
    return token if isinstance(token, str) else ""


def _add_sign_in(app: FastAPI, api_key: str | None, session: str, csrf_token: str) -> None:
    """The login (an API key, then a session cookie) and the CSRF check on every form post."""

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
            length = request.headers.get("content-length", "")
            multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
            if (length.isdigit() and int(length) > upload.MAX_BYTES + 2**20) or (multipart and not length):
                # Refused before the body is read: an upload is size-limited (and must say its size).
                return page(
                    "Refused",
                    f"<p class='error'>The request is larger than {upload.MAX_BYTES // 2**20} MiB, or an upload "
                    "that does not say its size.</p>",
                    413,
                )
            token = await csrf_field(request) or request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(token.encode(), csrf_token.encode()):
                return page(
                    "Refused",
                    "<p class='error'>Missing or wrong CSRF token: reload the page and retry.</p>",
                    403,
                )
        try:
            return await call_next(request)
        except Refused as err:
            return page("Refused", f"<p class='error'>{e(err)}</p>", err.status)
        except Exception:  # never a stack trace or a server path in a page; the log has it
            log.exception("studio error on %s", path)
            return page(
                "Error", "<p class='error'>Internal error; the studio's log has the details.</p>", 500
            )

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


def _add_run_routes(app: FastAPI, studio: Studio) -> None:
    """The runs list, a run's page, its metrics and live events, stop and resume; the comparison."""
    runs, store, worker = studio.runs, studio.store, studio.worker

    @app.get("/", response_class=HTMLResponse)
    def runs_page() -> HTMLResponse:
        return page("Runs", runs_body(studio))

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request) -> HTMLResponse:
        names = request.query_params.getlist("run")
        if not 2 <= len(names) <= 4 or len(set(names)) != len(names):
            raise Refused(400, "choose 2 to 4 different runs to compare")
        return page("Compare runs", compare_body(studio, names))

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str) -> HTMLResponse:
        return page(f"Run {name}", run_body(studio, name))

    @app.get("/runs/{name}/metrics")
    def run_metrics(name: str) -> JSONResponse:
        folder = run_folder(runs, name)
        info = run_info(folder, store)
        return JSONResponse(
            {"status": info["status"], "checkpoints": info["checkpoints"], "rows": read_metrics(folder)}
        )

    @app.get("/runs/{name}/events")
    async def run_events(name: str, request: Request) -> StreamingResponse:
        """Server-sent events: every metrics.jsonl row (all of them, then each new one), the training's
        status, the run's jobs (an evaluation finishing re-renders the page with its report), and its
        running exports' progress ({job id: [step, percent or null]}, read from their logs)."""
        folder = run_folder(runs, name)

        async def stream():
            sent, status, jobs, progress = 0, None, None, None
            yield "event: reset\ndata: {}\n\n"
            while not await request.is_disconnected():
                rows = read_metrics(folder)
                if len(rows) < sent:  # a fresh run in the same folder started over
                    sent = 0
                    yield "event: reset\ndata: {}\n\n"
                for row in rows[sent:]:
                    yield f"data: {json.dumps(row)}\n\n"
                sent = len(rows)
                now = run_info(folder, store)["status"]
                if now != status:
                    status = now
                    yield f"event: status\ndata: {now}\n\n"
                states = jobs_signature(store.for_run(name))
                if states != jobs:
                    jobs = states
                    yield f"event: jobs\ndata: {states}\n\n"
                running = [j for j in store.for_run(name) if j.state == "running" and j.stage == "export"]
                now = {str(j.id): step for j in running if (step := stages.job_progress(j))}
                if now and now != progress:
                    progress = now
                    yield f"event: progress\ndata: {json.dumps(now)}\n\n"
                await asyncio.sleep(0.5)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/runs/{name}/stop")
    def stop_run(name: str) -> Response:
        """Stop the run's running job, whichever stage it is (training checkpoints at its next step)."""
        run_folder(runs, name)
        running = [j for j in store.for_run(name) if j.state == "running"]
        if not running or not worker.stop(running[-1]):
            raise Refused(409, "the run is not running")
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.post("/runs/{name}/resume")
    def resume_run(name: str) -> Response:
        run_folder(runs, name)
        job = store.latest(name, "train")
        if job is None or job.state in ("queued", "running", "done"):
            raise Refused(409, "only a stopped, failed or interrupted studio run can be resumed")
        wanted = gpus_wanted(job.command)  # resumed on as many GPUs (processes) as it ran on
        if refused := too_many(wanted, worker.gpus):
            raise Refused(409, refused)
        store.add(name, job.config, ["--resume", "auto", *(["--nproc", str(wanted)] if wanted > 1 else [])])
        return RedirectResponse(f"/runs/{name}", status_code=303)


def _add_queue_routes(app: FastAPI, studio: Studio) -> None:
    """Waiting jobs: cancel, move up, move down."""
    store = studio.store

    @app.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: int) -> Response:
        if not store.cancel(job_id):
            raise Refused(409, "only a waiting job can be cancelled")
        return RedirectResponse("/", status_code=303)

    @app.post("/jobs/{job_id}/up")
    def move_up(job_id: int) -> Response:
        if not store.move(job_id, -1):
            raise Refused(409, "only a waiting job can be moved")
        return RedirectResponse("/", status_code=303)

    @app.post("/jobs/{job_id}/down")
    def move_down(job_id: int) -> Response:
        if not store.move(job_id, 1):
            raise Refused(409, "only a waiting job can be moved")
        return RedirectResponse("/", status_code=303)


def _add_new_run_routes(app: FastAPI, studio: Studio) -> None:
    """The new-run form (the config's own fields) and its launch, or a clone with changes."""
    runs, data, store = studio.runs, studio.data, studio.store

    @app.get("/new", response_class=HTMLResponse)
    def new_page() -> HTMLResponse:
        return page("New run", upload.upload_form(studio) + new_form(studio, {}, {}))

    @app.post("/new")
    async def new_run(request: Request) -> Response:
        fields = {k: str(v) for k, v in (await request.form()).items() if k != "csrf"}
        source, action = fields.pop("clone_of", ""), fields.pop("action", "launch")
        nproc, nproc_error = nproc_field(fields.get("nproc", ""), studio.worker.gpus)
        cfg, errors, overrides = validate_form(fields, runs, data)
        if nproc_error:
            cfg, errors = None, errors | {"nproc": nproc_error}
        name = fields.get("run_name", "").strip()
        output = f"train.output_dir={runs / name}"
        typed = [o for o in overrides if not o.startswith("train.output_dir=")]
        flags = ["--nproc", str(nproc)] if nproc > 1 else []
        # empty.yaml: an empty file, so every value not given is the default, as in the form.
        command = (source and clone.clone_command(studio, source, fields, [*typed, output])) or hide_paths(
            shlex.join(["qlora-llm", "train", "empty.yaml", *typed, output]), runs, data
        )
        command += " " + shlex.join(flags) if flags else ""
        if cfg is None:
            body = new_form(studio, fields, errors, command, clone_of=source)
            return page("New run", body, 422)
        if action == "plan":  # the memory plan's verdict before launch: nothing is created or queued
            verdict = await asyncio.to_thread(plan_text, cfg)
            body = new_form(studio, fields, {}, command, clone_of=source, plan=studio.hide_paths(verdict))
            return page("New run", body)
        (runs / name).mkdir(parents=True)
        store.add(name, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), flags)
        return RedirectResponse(f"/runs/{name}", status_code=303)


def plan_text(cfg: Config) -> str:
    """`qlora-llm plan` of the form's config, as the CLI prints it: in a subprocess, so the studio
    process never imports torch or reads a model (it stays small with no model loaded)."""
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        done = subprocess.run(
            [sys.executable, "-m", "qlora_llm.cli", "plan", str(config)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
    if done.returncode not in (0, 1):  # 1: planned, and it does not fit
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the plan could not be made: {last}"
    return done.stdout


def jobs_signature(jobs: list[Job]) -> str:
    """The run's jobs and their states in one line: when it changes, the run page renders again."""
    return " ".join(f"{j.id}:{j.state}" for j in jobs)


def runs_body(studio: Studio) -> str:
    """Every run folder, whoever started it, with its evaluation where it has one; the waiting jobs."""
    rows = "".join(
        f"<tr><td><a href='/runs/{e(r['name'])}'>{e(r['name'])}</a></td><td class='status'>{e(r['status'])}</td>"
        f"<td>{e(r['model'])}</td><td>{e(r['data'])}</td><td>{e(r['step'])} / {e(r['max_steps'])}</td>"
        f"<td>{loss(r['best_eval_loss'])}</td><td class='task'>{e(evaluation.task_cell(r['evaluation']))}</td>"
        f"<td class='general'>{e(evaluation.general_cell(r['evaluation']))}</td>"
        f"<td><input type='checkbox' name='run' value='{e(r['name'])}' form='compare'></td></tr>"
        for r in list_runs(studio.runs, studio.store)
    )

    def button(job: Job, action: str, label: str) -> str:
        return (
            f"<form method='post' action='/jobs/{job.id}/{action}' style='display:inline'>"
            f"{studio.csrf_field()}<button class='{action}'>{label}</button></form>"
        )

    gpus = studio.worker.gpus

    def asks(job: Job) -> str:
        wanted = gpus_wanted(job.command)
        return f", asks for {wanted} GPU{'s' if wanted > 1 else ''}" if gpus else ""

    queue = "".join(
        f"<li id='job-{j.id}'>job {j.id}: {e(j.run)} ({e(j.stage)}{asks(j)}) "
        + button(j, "up", "↑")
        + button(j, "down", "↓")
        + button(j, "cancel", "Cancel")
        + "</li>"
        for j in studio.store.queued()
    )
    running = "".join(
        f"<li id='running-{j.id}'>job {j.id}: <a href='/runs/{e(j.run)}'>{e(j.run)}</a> ({e(j.stage)})"
        f"{' on ' + e(on_gpus(j)) if gpus else ''}</li>"
        for j in studio.store.all()
        if j.state == "running"
    )
    rule = (
        f"GPUs {', '.join(gpus)}: up to {len(gpus)} jobs at once, each on its own GPUs"
        if gpus
        else "no GPU: one job at a time"
    )
    return (
        "<table id='runs'><tr><th>Run</th><th>Status</th><th>Model</th><th>Data</th><th>Steps</th>"
        "<th>Best eval loss</th><th>Task metric (base → tuned)</th><th>General ability</th><th>Compare</th></tr>"
        f"{rows}</table>"
        "<form id='compare' method='get' action='/compare'><button>Compare 2-4 selected runs</button></form>"
        f"<h2>Running</h2><p id='scheduling'>{e(rule)}; first in, first out.</p><ul id='running'>{running}</ul>"
        f"<h2>Waiting</h2><ol id='queue'>{queue}</ol>"
    )


def on_gpus(job: Job) -> str:
    """Where a job ran: `GPU 0`, `GPUs 0,1`, `no GPU`; empty before it started."""
    if job.gpus is None:
        return ""
    if not job.gpus:
        return "no GPU"
    return f"GPU{'s' if ',' in job.gpus else ''} {job.gpus}"


def run_body(studio: Studio, name: str) -> str:
    """One run: status and actions, the live chart, its jobs with their commands, the log's tail,
    checkpoints, the evaluation, the evaluate/merge/export forms and the resolved config."""
    folder = run_folder(studio.runs, name)
    info = run_info(folder, studio.store)
    jobs = studio.store.for_run(name)
    latest = jobs[-1] if jobs else None
    actions = ""
    if any(j.state == "running" for j in jobs):
        actions += f"<form method='post' action='/runs/{e(name)}/stop'>{studio.csrf_field()}<button id='stop'>Stop</button></form>"
    elif info["status"] not in ("queued", "done") and studio.store.latest(name, "train") is not None:
        actions += f"<form method='post' action='/runs/{e(name)}/resume'>{studio.csrf_field()}<button id='resume'>Resume</button></form>"
    if info["config"] or studio.store.latest(name, "train") is not None:
        actions += (
            f"<p><a id='clone' href='/runs/{e(name)}/clone'>Clone with changes</a> · "
            f"<a id='chat-link' href='/runs/{e(name)}/chat'>Chat: base vs fine-tuned</a></p>"
        )
    checkpoints = "".join(f"<li>{e(c)}</li>" for c in info["checkpoints"]) or "<li>none yet</li>"
    job_rows = "".join(
        f"<tr id='job-{j.id}'><td>{j.id}</td><td>{e(j.stage)}</td><td class='state'>{e(j.state)}</td>"
        f"<td class='gpus'>{e(on_gpus(j))}</td><td>{stages.progress_cell(j)}</td>"
        f"<td><code>{e(studio.hide_paths(shlex.join(['qlora-llm', *j.command[3:]])))}</code></td></tr>"
        for j in jobs
    )
    return (
        f"<p>Status: <b id='status'>{e(info['status'])}</b> · step <span id='progress'>{e(info['step'])} / "
        f"{e(info['max_steps'])}</span><span id='eta'></span> · best eval loss {loss(info['best_eval_loss'])} · model {e(info['model'])}</p>"
        f"{actions}"
        f"<p><label><input type='checkbox' id='logscale'> log scale</label> · <label>x: <select id='xaxis'>"
        "<option value='step'>step</option><option value='tokens'>tokens trained</option></select></label> · "
        "<span id='points'>0</span> points "
        "(<span style='color:#1f77b4'>train</span>, <span style='color:#d62728'>eval</span>)</p>"
        f"<canvas id='chart' width='800' height='320' data-events='/runs/{e(name)}/events' "
        f"data-max-steps='{e(info['max_steps'])}' data-jobs='{e(jobs_signature(jobs))}' "
        f"data-started='{e(_train_started(studio.store, name))}'></canvas>"
        f"<p><span style='color:#2ca02c'>throughput</span> <span id='speed'>{speed(info['tokens_per_s'])}</span> · "
        f"<span style='color:#9467bd'>peak memory</span> <span id='memory'>{memory(info['memory_bytes'])}</span></p>"
        "<canvas id='speed-chart' width='800' height='140'></canvas>"
        f"<h2>Command</h2><pre id='command'>{e(studio.hide_paths(shlex.join(['qlora-llm', *latest.command[3:]])) if latest else '')}</pre>"
        f"<h2>Log</h2><pre id='log'>{e(studio.hide_paths(log_tail(latest)))}</pre>"
        f"<h2>Jobs</h2><table id='jobs'><tr><th>job</th><th>stage</th><th>state</th><th>GPUs</th><th>progress</th><th>command</th></tr>{job_rows}</table>"
        f"<h2>Checkpoints</h2><ul id='checkpoints'>{checkpoints}</ul>"
        f"{evaluation.eval_section(name, info['evaluation'])}{stages.stage_forms(name, studio)}"
        f"<h2>Config</h2><pre>{e(studio.hide_paths(yaml.safe_dump(info['config'], sort_keys=False)))}</pre>"
        "<script src='/static/chart.js'></script>"
    )


def speed(tokens_per_s: float | None) -> str:
    """Tokens per second as the run page shows it (chart.js formats live values the same way)."""
    return "–" if tokens_per_s is None else f"{tokens_per_s:.1f} tokens/s"


def memory(memory_bytes: int | None) -> str:
    """Peak memory in GiB as the run page shows it (chart.js formats live values the same way)."""
    return "–" if memory_bytes is None else f"{memory_bytes / 2**30:.2f} GiB"


def log_tail(job: Job | None) -> str:
    if job is None:
        return ""
    return "\n".join(line for line in log_lines(job.log, LOG_TAIL_BYTES) if line.strip())


def compare_body(studio: Studio, names: list[str]) -> str:
    """2-4 runs: overlaid train and eval loss, their metrics side by side, the config keys that differ."""
    infos = [run_info(run_folder(studio.runs, n), studio.store) for n in names]
    curves = {info["name"]: read_metrics(studio.runs / info["name"]) for info in infos}
    flat = [_flatten(info["config"]) for info in infos]
    keys = sorted({k for f in flat for k in f if len({repr(g.get(k)) for g in flat}) > 1})
    keys = [k for k in keys if k != "train.output_dir"]  # always differs: one folder per run
    head = "".join(f"<th>{e(n)}</th>" for n in names)
    diff = "".join(
        f"<tr><td>{e(k)}</td>"
        + "".join(f"<td>{e(studio.hide_paths(str(f.get(k, ''))))}</td>" for f in flat)
        + "</tr>"
        for k in keys
    )

    def row(label: str, cells: list[str]) -> str:
        return f"<tr><td>{label}</td>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"

    metrics = (
        row("best eval loss", [loss(i["best_eval_loss"]) for i in infos])
        + row("steps", [str(i["step"]) for i in infos])
        + row("task metric", [evaluation.task_cell(i["evaluation"]) for i in infos])
        + row("general ability", [evaluation.general_cell(i["evaluation"]) for i in infos])
    )
    return (
        f"{_svg_chart(curves)}<table id='metrics'><tr><th></th>{head}</tr>{metrics}</table><h2>Config diff</h2>"
        f"<table id='diff'><tr><th>key</th>{head}</tr>{diff or '<tr><td>no differences</td></tr>'}</table>"
    )


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
        legend.append(f"<span style='color:{color}'>{e(name)}</span>")
    return (
        f"<p>{' · '.join(legend)} (solid: train loss, dashed: eval loss; {y0:.4g} to {y1:.4g})</p>"
        f"<svg id='compare-chart' width='{width}' height='{height}'><rect x='{pad}' y='{pad}' "
        f"width='{width - 2 * pad}' height='{height - 2 * pad}' fill='none' stroke='#999'/>{''.join(lines)}</svg>"
    )


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
    gpus: list[str] | None = None,
) -> None:
    """Run the studio until Ctrl-C; running jobs are stopped cleanly (they checkpoint) on the way out.
    `gpus`: the GPU ids jobs may use (gpus.detect_gpus); none, one job at a time."""
    import uvicorn

    check_bind(host, api_key, insecure_no_auth)
    app = create_app(runs, data, api_key=api_key, gpus=gpus)
    log.info(
        "studio on http://%s:%d (runs: %s; %s)",
        host,
        port,
        runs,
        f"GPUs {', '.join(gpus)}" if gpus else "no GPU: one job at a time",
    )
    # An open run page holds an event stream that never ends by itself: without a limit, uvicorn's graceful
    # shutdown waits for it, and the running jobs are told to checkpoint (the lifespan's end) only then.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)

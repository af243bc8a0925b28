"""The web studio over HTTP: sign-in, CSRF, path confinement, the config form, the queue, restarts."""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from qlora_llm.errors import QloraError
from qlora_llm.studio.app import check_bind, create_app
from qlora_llm.studio.jobs import JobStore

KEY = "s3cret-key"


def client(runs: Path, data: Path | None = None, api_key: str | None = None) -> TestClient:
    return TestClient(create_app(runs, data, api_key=api_key, start_worker=False), follow_redirects=False)


def csrf(c: TestClient) -> str:
    return c.app.state.csrf


def cli_run(runs: Path, name: str = "from-cli") -> Path:
    """A run folder as `qlora-llm train` leaves it, with no studio involved."""
    folder = runs / name
    folder.mkdir(parents=True)
    config = {
        "model": {"name": "tiny"},
        "data": {"train_file": "/somewhere/train.jsonl"},
        "train": {"max_steps": 4},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5, "eval_loss": 1.75},
        {"step": 4, "eval_loss": 1.25},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "checkpoint-2").mkdir()
    return folder


def test_every_route_refused_without_the_key_and_open_with_it(tmp_path):
    cli_run(tmp_path)
    c = client(tmp_path, api_key=KEY)
    gets = ["/", "/new", "/runs/from-cli", "/runs/from-cli/metrics", "/runs/from-cli/events"]
    posts = ["/new", "/new/upload", "/runs/from-cli/stop", "/runs/from-cli/resume", "/jobs/1/cancel"]
    for path in gets:
        assert c.get(path).status_code == 401, path
    for path in posts:
        assert c.post(path, data={"csrf": csrf(c)}).status_code == 401, path
    # A browser asking for a page is sent to the sign-in form instead.
    assert c.get("/", headers={"accept": "text/html"}).headers["location"] == "/login"
    assert c.post("/login", data={"key": "wrong"}).status_code == 401
    assert c.get("/").status_code == 401
    signed = c.post("/login", data={"key": KEY})
    assert signed.status_code == 303 and "httponly" in signed.headers["set-cookie"].lower()
    assert c.get("/").status_code == 200
    assert c.get("/runs/from-cli/metrics").json()["rows"][0]["loss"] == 2.0
    bearer = client(tmp_path, api_key=KEY)
    assert bearer.get("/", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_state_changing_requests_need_the_csrf_token(tmp_path):
    c = client(tmp_path)
    for token in (None, "forged"):
        data = {"run_name": "a"} | ({"csrf": token} if token else {})
        response = c.post("/new", data=data)
        assert response.status_code == 403 and "CSRF" in response.text
    assert not (tmp_path / "a").exists()
    assert c.post("/new", data={"run_name": "a", "csrf": csrf(c)}).status_code == 303
    assert (tmp_path / "a").is_dir()


@pytest.mark.parametrize("name", ["..", "%2e%2e", "..%2F..%2Fetc", ".studio", "a%2F..%2F..", "%2Fetc"])
def test_run_paths_cannot_leave_the_runs_folder(tmp_path, name):
    runs = tmp_path / "runs"
    cli_run(runs)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n')
    c = client(runs)
    for suffix in ("", "/metrics"):
        response = c.get(f"/runs/{name}{suffix}")
        # A bare `..` the client itself resolves (to / or /metrics); every other form reaches the route.
        reached = response.request.url.path.startswith("/runs/")
        assert response.status_code == 404 if reached else name == "..", (name, suffix)
        assert '"loss": 9' not in response.text and str(tmp_path) not in response.text


def test_form_data_files_must_lie_in_the_data_or_runs_folder(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    c = client(runs, data)
    for bad in ("/etc/passwd", "../../etc/passwd", str(tmp_path / "elsewhere.jsonl")):
        response = c.post("/new", data={"run_name": "r", "data.train_file": bad, "csrf": csrf(c)})
        assert response.status_code == 422
        assert "inside the studio" in _field_error(response.text, "data.train_file")
    ok = c.post("/new", data={"run_name": "r", "data.train_file": str(data / "train.jsonl"), "csrf": csrf(c)})
    assert ok.status_code == 303


def _field_error(page: str, key: str) -> str:
    match = re.search(rf"id='error-{re.escape(key)}'>([^<]*)<", page)
    assert match, key
    return match.group(1)


def test_form_is_the_config_and_shows_per_field_errors_and_the_command(tmp_path):
    c = client(tmp_path)
    page = c.get("/new").text
    # Every key of `qlora-llm config --keys` but the output folder (the run name sets it) is a field.
    from qlora_llm.config import describe_keys

    for key, _, _ in describe_keys():
        assert (f"name='{key}'" in page) == (key != "train.output_dir"), key
    response = c.post(
        "/new",
        data={"run_name": "bad name!", "lora.r": "0", "train.max_steps": "3", "csrf": csrf(c)},
    )
    assert response.status_code == 422
    assert _field_error(response.text, "lora.r") == "Input should be greater than 0 (got 0)"
    assert "letters, digits" in _field_error(response.text, "run_name")
    assert _field_error(response.text, "train.max_steps") == ""
    assert "lora.r=0" in response.text and "train.max_steps=3" in response.text  # the command shown
    assert "value='0'" in response.text  # what the user typed is kept
    assert JobStore(tmp_path).all() == []

    ok = c.post("/new", data={"run_name": "good", "train.max_steps": "3", "lora.r": "8", "csrf": csrf(c)})
    assert ok.status_code == 303 and ok.headers["location"] == "/runs/good"
    (job,) = JobStore(tmp_path).all()
    config = yaml.safe_load(job.config)
    assert (job.state, config["train"]["max_steps"], config["lora"]["r"]) == ("queued", 3, 8)
    assert Path(config["train"]["output_dir"]) == tmp_path / "good"
    assert (
        job.command[-3:-1] == ["qlora_llm.cli", "train"] and Path(job.command[-1]).read_text() == job.config
    )
    again = c.post("/new", data={"run_name": "good", "csrf": csrf(c)})
    assert "exists" in _field_error(again.text, "run_name")


def test_queue_keeps_order_and_cancels_waiting_jobs(tmp_path):
    c = client(tmp_path)
    for name in ("first", "second", "third"):
        assert c.post("/new", data={"run_name": name, "csrf": csrf(c)}).status_code == 303
    store = JobStore(tmp_path)
    assert [j.run for j in store.queued()] == ["first", "second", "third"]
    assert "job 2: second" in c.get("/").text
    assert c.post("/jobs/2/cancel", data={"csrf": csrf(c)}).status_code == 303
    assert [j.run for j in store.queued()] == ["first", "third"]
    assert store.get(2).state == "cancelled"
    store.set(1, state="running")
    assert c.post("/jobs/1/cancel", data={"csrf": csrf(c)}).status_code == 409  # running: stop it instead


def test_restart_marks_running_jobs_interrupted_and_offers_resume(tmp_path):
    c = client(tmp_path)
    c.post("/new", data={"run_name": "long", "csrf": csrf(c)})
    JobStore(tmp_path).set(1, state="running", pid=999999)
    restarted = client(tmp_path)  # a new studio process on the same runs folder
    store = JobStore(tmp_path)
    assert store.get(1).state == "interrupted"
    page = restarted.get("/runs/long").text
    assert "interrupted" in page and "id='resume'" in page
    assert restarted.post("/runs/long/resume", data={"csrf": csrf(restarted)}).status_code == 303
    resumed = store.get(2)
    assert (resumed.state, resumed.command[-2:], resumed.config) == (
        "queued",
        ["--resume", "auto"],
        store.get(1).config,
    )
    assert (
        restarted.post("/runs/long/resume", data={"csrf": csrf(restarted)}).status_code == 409
    )  # already queued


def test_runs_page_lists_cli_runs_without_server_paths(tmp_path):
    folder = cli_run(tmp_path)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "eval_lo')  # a row being written right now: not read yet
    c = client(tmp_path)
    row = re.search(r"<tr><td><a href='/runs/from-cli'>.*?</tr>", c.get("/").text).group(0)
    assert "tiny" in row and "train.jsonl" in row and "4 / 4" in row and "1.2500" in row
    assert "/somewhere" not in row
    page = c.get("/runs/from-cli").text
    assert "checkpoint-2" in page and str(folder) not in page
    assert c.get("/runs/from-cli/metrics").json()["checkpoints"] == ["checkpoint-2"]


def first_events(runs: Path, name: str, n: int, app=None) -> list[str]:
    """The first n server-sent events of a run's page (the route's own stream, no socket); `app`: a
    studio already open on `runs` (a new one would mark its running jobs interrupted)."""
    import asyncio

    app = app or create_app(runs, start_worker=False)
    route = next(r for r in app.routes if getattr(r, "path", "") == "/runs/{name}/events")

    class Request:
        async def is_disconnected(self):
            return False

    async def collect():
        response = await route.endpoint(name, Request())
        out = []
        async for chunk in response.body_iterator:
            out.append(chunk)
            if len(out) == n:
                return out

    return asyncio.run(asyncio.wait_for(collect(), 10))


def test_events_stream_every_logged_row(tmp_path):
    cli_run(tmp_path)
    events = first_events(tmp_path, "from-cli", 5)
    assert events[0].startswith("event: reset")
    assert [json.loads(e[len("data: ") :])["step"] for e in events[1:4]] == [1, 2, 4]
    assert events[4] == "event: status\ndata: started outside the studio\n\n"


def test_run_page_shows_tokens_per_second_and_memory_from_metrics(tmp_path):
    folder = cli_run(tmp_path)
    c = client(tmp_path)
    assert "<span id='speed'>–</span>" in c.get("/runs/from-cli").text  # nothing logged them yet
    rows = [  # as monitor.py logs them: throughput on training rows, the peak memory on every row
        {"step": 5, "loss": 1.0, "tokens_per_s": 1234.5, "memory_bytes": 3 * 2**30},
        {"step": 6, "eval_loss": 1.1, "memory_bytes": int(3.5 * 2**30)},
    ]
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    page = c.get("/runs/from-cli").text
    assert "<span id='speed'>1234.5 tokens/s</span>" in page
    assert "<span id='memory'>3.50 GiB</span>" in page
    assert "id='speed-chart'" in page
    # The live page gets them from the same events as the loss chart (chart.js draws and formats them).
    live = [json.loads(e[len("data: ") :]) for e in first_events(tmp_path, "from-cli", 6)[4:6]]
    assert [(r["tokens_per_s"], r["memory_bytes"]) for r in live[:1]] == [(1234.5, 3 * 2**30)]
    assert live[1]["memory_bytes"] == int(3.5 * 2**30)


def test_non_loopback_bind_needs_a_key():
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", KEY, False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(QloraError, match="--api-key"):
        check_bind("0.0.0.0", None, False)
    with pytest.raises(QloraError, match="without a key"):
        check_bind("192.168.1.5", "", False)


def test_errors_show_no_stack_trace(tmp_path):
    c = client(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("- a list\n- not sections\n")  # the page cannot read it
    response = c.get("/runs/broken")
    assert response.status_code == 500
    assert "Traceback" not in response.text and str(tmp_path) not in response.text


def test_compare_overlays_curves_and_shows_only_differing_config(tmp_path):
    cli_run(tmp_path, "a")
    b = cli_run(tmp_path, "b")
    config = yaml.safe_load((b / "config.yaml").read_text())
    config["train"]["max_steps"] = 8
    (b / "config.yaml").write_text(yaml.safe_dump(config))
    (b / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 8, "eval_loss": 0.5}\n')
    c = client(tmp_path)
    page = c.get("/compare?run=a&run=b").text
    assert page.count("class='curve'") == 4  # train and eval for each run
    diff = re.search(r"<table id='diff'>.*?</table>", page).group(0)
    assert "train.max_steps" in diff and "model.name" not in diff
    assert "0.5000" in page and "1.2500" in page
    for bad in ("/compare?run=a", "/compare?run=a&run=a", "/compare?run=a&run=..%2F..%2Fetc"):
        assert c.get(bad).status_code in (400, 404), bad


def evaluated(folder: Path, runs: Path) -> dict:
    """RUN/eval/ as `qlora-llm evaluate RUN` leaves it (metrics.json's shape, a report naming server paths)."""
    general = [
        {"task": "arc_easy_local", "kind": "likelihood", "metric": "acc", "n": 100, "base": 0.58}
        | {"tuned": 0.58, "diff": 0.0, "lo": -0.03, "hi": 0.03, "verdict": "no measurable loss"},
        {"task": "piqa_local", "kind": "likelihood", "metric": "acc", "n": 100, "base": 0.67}
        | {"tuned": 0.68, "diff": 0.01, "lo": 0.0, "hi": 0.03, "verdict": "no measurable loss"},
        {"task": "mean", "kind": "likelihood", "metric": "acc", "n": 200, "base": 0.625}
        | {"tuned": 0.63, "diff": 0.005, "lo": -0.01, "hi": 0.02, "verdict": "no measurable loss"},
    ]
    generative = [
        {"task": "basic_skills_common_knowledge", "kind": "generative", "metric": "acc", "n": 64}
        | {"base": 0.3, "tuned": 0.2, "diff": -0.1, "lo": -0.2, "hi": -0.05, "verdict": "measurable loss"}
    ]
    table = [
        {"metric": "perplexity_completion", "label": "perplexity (answers)", "better": "lower"}
        | {"base": 35.551, "tuned": 32.242, "change": -3.309, "relative": -0.093, "format": "{:.3f}"},
        {"metric": "rougeL", "label": "ROUGE-L F1", "better": "higher", "base": 0.1123, "tuned": 0.1543}
        | {"change": 0.042, "relative": 0.374, "format": "{:.4f}"},
    ]
    metrics = {
        "target": str(folder),
        "table": table,
        "general": {"likelihood": general, "generative": generative, "kl": {"kl": 0.0033, "prompts": 16}},
        "headline": "Fine-tuning helped: ROUGE-L F1 0.1123 → 0.1543.",
    }
    (folder / "eval").mkdir()
    (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (folder / "eval" / "report.html").write_text(
        f"<html><body><p>target {folder}</p><img src='metrics.png'><script>alert(1)</script></body></html>"
    )
    (folder / "eval" / "metrics.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "eval" / "examples.jsonl").write_text('{"answer": "private"}\n')
    (runs / "outside.html").write_text("not a report")
    return metrics


def test_run_page_shows_its_evaluation_and_serves_the_report_safely(tmp_path):
    runs = tmp_path / "runs"
    folder = cli_run(runs, "tuned")
    cli_run(runs, "plain")
    evaluated(folder, runs)
    c = client(runs, api_key=KEY)
    assert c.get("/runs/tuned/eval/report.html").status_code == 401
    c.post("/login", data={"key": KEY})

    page = c.get("/runs/tuned").text
    section = re.search(r"<div id='evaluation'>.*?</div>", page, re.S).group(0)
    # The task metric base vs tuned, the general-ability mean with its interval and verdict, each task, KL.
    assert re.search(r"ROUGE-L F1</td><td>0\.1123</td><td>0\.1543</td><td>\+0\.042", section)
    assert "perplexity (answers)</td><td>35.551</td><td>32.242</td><td>-3.309 (-9%)" in section
    assert re.search(
        r"mean acc</td><td>62%</td><td>63%</td><td>\+0\.5 points \(95% CI -1\.0 to \+2\.0\)", section
    )
    assert "basic_skills_common_knowledge acc</td><td>30%</td><td>20%</td><td>-10.0 points" in section
    assert "measurable loss" in section and "0.0033" in section and "Fine-tuning helped" in section
    assert "<iframe id='report' src='/runs/tuned/eval/report.html' sandbox=" in section
    assert "Not evaluated yet" in c.get("/runs/plain").text

    row = re.search(r"<tr><td><a href='/runs/tuned'>.*?</tr>", c.get("/").text).group(0)
    assert "ROUGE-L F1 0.1123 → 0.1543" in row and "+0.5 points: no measurable loss" in row
    plain = re.search(r"<tr><td><a href='/runs/plain'>.*?</tr>", c.get("/").text).group(0)
    assert "<td class='task'></td><td class='general'></td>" in plain
    compared = c.get("/compare?run=tuned&run=plain").text
    assert "ROUGE-L F1 0.1123 → 0.1543" in compared

    report = c.get("/runs/tuned/eval/report.html")
    assert (
        report.status_code == 200 and "target runs/tuned" in report.text and str(tmp_path) not in report.text
    )
    assert "script-src" not in report.headers["content-security-policy"]  # default-src 'none': no script runs
    assert "default-src 'none'" in report.headers["content-security-policy"]
    assert c.get("/runs/tuned/eval/metrics.png").headers["content-type"] == "image/png"
    assert str(tmp_path) not in c.get("/runs/tuned/eval/metrics.json").text
    # Only the report's files, only inside the run: not the per-example answers, no traversal, no symlink out.
    for bad in ("examples.jsonl", "..%2Fconfig.yaml", "..%2F..%2Foutside.html", "%2Fetc%2Fpasswd"):
        response = c.get(f"/runs/tuned/eval/{bad}")
        assert response.status_code == 404 and "private" not in response.text, bad
    assert c.get("/runs/..%2Ftuned/eval/report.html").status_code == 404
    (tmp_path / "outside.html").write_text("a file beyond the runs folder")
    (folder / "eval" / "report.html").unlink()
    (folder / "eval" / "report.html").symlink_to(tmp_path / "outside.html")
    assert c.get("/runs/tuned/eval/report.html").status_code == 404


def test_unreadable_evaluation_is_said_in_one_line(tmp_path):
    folder = cli_run(tmp_path, "odd")
    (folder / "eval").mkdir()
    (folder / "eval" / "metrics.json").write_text('{"table": "not rows"}')
    c = client(tmp_path)
    response = c.get("/runs/odd")
    assert response.status_code == 200 and "eval/metrics.json could not be read" in response.text
    assert c.get("/").status_code == 200


def test_evaluate_merge_export_queue_the_cli_commands(tmp_path):
    from qlora_llm.cli import build_parser

    cli_run(tmp_path, "a")
    c = client(tmp_path)
    page = c.get("/runs/a").text
    for stage in ("evaluate", "merge", "export"):
        assert f"action='/runs/a/{stage}'" in page
    assert "qlora-llm export runs/a --format gguf" in page  # the command is shown before anything runs

    posts = [
        ("evaluate", {"max_examples": "5", "skip_general": "1"}),
        ("merge", {"force": "1"}),
        ("export", {"format": "ollama", "quant": "q4_k_m"}),
        ("export", {"format": "vllm", "no_verify": "1"}),
    ]
    for stage, fields in posts:
        assert c.post(f"/runs/a/{stage}", data=fields | {"csrf": csrf(c)}).status_code == 303, stage
    jobs = JobStore(tmp_path).queued()
    run = str(tmp_path / "a")
    assert [j.command[3:] for j in jobs] == [
        ["evaluate", run, "eval.max_examples=5", "eval.general_tasks=[]", "eval.general_generative=[]"],
        ["merge", run, "--force"],
        ["export", run, "--format", "ollama", "--quant", "q4_k_m"],
        ["export", run, "--format", "vllm", "--no-verify"],
    ]
    assert [j.stage for j in jobs] == ["evaluate", "merge", "export", "export"]
    for job in jobs:  # each is a command the CLI itself accepts
        build_parser().parse_args(job.command[3:])
    page = c.get("/runs/a").text
    assert "qlora-llm export runs/a --format ollama --quant q4_k_m" in page and run not in page
    # Queued evaluate/merge/export jobs do not make the training look queued, nor can they be "resumed".
    assert "<b id='status'>started outside the studio</b>" in page and "id='resume'" not in page

    refused = [
        ("evaluate", {"max_examples": "0"}, "a whole number above 0"),
        ("evaluate", {"max_examples": "many"}, "a whole number above 0"),
        ("export", {"format": "safetensors"}, "format must be one of"),
        ("export", {"format": "gguf", "quant": "q2"}, "quant must be one of"),
        ("export", {"format": "vllm", "quant": "q8_0"}, "vLLM serves the adapter"),
    ]
    for stage, fields, message in refused:
        response = c.post(f"/runs/a/{stage}", data=fields | {"csrf": csrf(c)})
        assert response.status_code == 422 and message in response.text, (stage, fields)
    assert len(JobStore(tmp_path).all()) == 4
    assert c.post("/runs/a/evaluate", data={}).status_code == 403  # CSRF, as every POST
    assert c.post("/runs/..%2Fa/merge", data={"csrf": csrf(c)}).status_code == 404


def test_stop_reaches_a_running_evaluation(tmp_path, monkeypatch):
    cli_run(tmp_path, "a")
    c = client(tmp_path)
    c.post("/runs/a/evaluate", data={"csrf": csrf(c)})
    JobStore(tmp_path).set(1, state="running", pid=4242)
    signalled = []
    monkeypatch.setattr("os.kill", lambda pid, sig: signalled.append(pid))
    assert c.post("/runs/a/stop", data={"csrf": csrf(c)}).status_code == 303
    assert signalled == [4242] and JobStore(tmp_path).get(1).stop_requested


def test_clone_prefills_the_form_from_the_run_and_queues_a_new_run(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    c = client(runs, data)
    fields = {"run_name": "src", "data.train_file": str(data / "train.jsonl"), "train.max_steps": "7"}
    assert c.post("/new", data=fields | {"lora.r": "4", "csrf": csrf(c)}).status_code == 303
    # A waiting studio run has no config.yaml yet: the clone starts from its job's config.
    page = c.get("/runs/src/clone").text
    assert "name='run_name' value='src-2'" in page and "name='clone_of' value='src'" in page
    assert "name='train.max_steps' value='7'" in page and "name='lora.r' value='4'" in page
    assert "name='data.train_file' value='data/train.jsonl'" in page and str(tmp_path) not in page
    assert "id='clone' href='/runs/src/clone'" in c.get("/runs/src").text

    # Submit the prefilled form with two edits, as the browser would.
    form = dict(re.findall(r"<input[^>]* name='([^']+)' value='([^']*)'", page))  # what a browser sends
    form = {k: html.unescape(v) for k, v in form.items()}
    bad = form | {"lora.r": "0", "train.learning_rate": "0.001"}
    response = c.post("/new", data=bad)
    assert response.status_code == 422
    assert _field_error(response.text, "lora.r") == "Input should be greater than 0 (got 0)"
    command = re.search(r"<pre id='command'>([^<]*)</pre>", response.text).group(1)
    assert command == (
        "qlora-llm train runs/.studio/configs/1.yaml lora.r=0 train.learning_rate=0.001 "
        "train.output_dir=runs/src-2"
    )
    assert c.post("/new", data=form | {"lora.r": "16", "train.learning_rate": "0.001"}).status_code == 303
    source, cloned = JobStore(runs).all()
    before, after = yaml.safe_load(source.config), yaml.safe_load(cloned.config)
    assert (after["lora"]["r"], after["train"]["learning_rate"]) == (16, 0.001)
    assert Path(after["train"]["output_dir"]) == runs / "src-2" and (runs / "src-2").is_dir()
    for section in (before, after):  # everything else is the source run's
        section["lora"].pop("r"), section["train"].pop("learning_rate"), section["train"].pop("output_dir")
    assert before == after and after["data"]["train_file"] == str((data / "train.jsonl").resolve())

    # A run the CLI trained: its config.yaml is the source, and is what the command starts from.
    (runs / "src-2" / "config.yaml").write_text(cloned.config)
    page = c.get("/runs/src-2/clone").text
    assert "value='src-2-2'" in page and "name='lora.r' value='16'" in page
    assert c.get("/runs/nothing/clone").status_code == 404
    (runs / "empty").mkdir()
    assert c.get("/runs/empty/clone").status_code == 404


def test_waiting_jobs_can_be_reordered(tmp_path):
    c = client(tmp_path)
    for name in ("first", "second", "third"):
        c.post("/new", data={"run_name": name, "csrf": csrf(c)})
    store = JobStore(tmp_path)
    assert c.post("/jobs/3/up", data={"csrf": csrf(c)}).status_code == 303
    assert [j.run for j in store.queued()] == ["first", "third", "second"]
    assert c.post("/jobs/1/down", data={"csrf": csrf(c)}).status_code == 303
    assert c.post("/jobs/3/up", data={"csrf": csrf(c)}).status_code == 303  # already first: stays
    assert [j.run for j in store.queued()] == ["third", "first", "second"]
    queue = re.search(r"<ol id='queue'>.*?</ol>", c.get("/").text).group(0)
    assert re.findall(r"job \d: (\w+)", queue) == ["third", "first", "second"]
    c.post("/new", data={"run_name": "fourth", "csrf": csrf(c)})
    assert [j.run for j in store.queued()][-1] == "fourth"  # a new job waits behind the moved ones
    store.set(3, state="running")
    assert c.post("/jobs/3/down", data={"csrf": csrf(c)}).status_code == 409
    assert c.post("/jobs/99/up", data={"csrf": csrf(c)}).status_code == 409
    assert c.post("/jobs/1/up").status_code == 403


def test_a_jobs_db_from_before_reordering_still_opens(tmp_path):
    import sqlite3

    (tmp_path / ".studio").mkdir()
    with sqlite3.connect(tmp_path / ".studio" / "jobs.db") as db:
        db.execute(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, state TEXT NOT NULL, "
            "command TEXT NOT NULL, config TEXT NOT NULL, created REAL NOT NULL, started REAL, ended REAL, "
            "exit_code INTEGER, log TEXT NOT NULL, pid INTEGER, stop_requested INTEGER NOT NULL DEFAULT 0)"
        )
        db.execute(
            "INSERT INTO jobs (run, state, command, config, created, log) VALUES ('old', 'queued', '[]', '', 0, '')"
        )
    store = JobStore(tmp_path)
    store.add("new", "")
    assert [j.run for j in store.queued()] == ["old", "new"]
    assert store.move(2, -1) and [j.run for j in store.queued()] == ["new", "old"]


# `qlora-llm serve`'s arguments, served by a stand-in: "run" and "base", and each --adapter NAME=PATH's NAME.
# Each answer streams back the model, every message as role:content, and the temperature.
FAKE_SERVER = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

ADAPTERS = [sys.argv[i + 1].split("=")[0] for i, arg in enumerate(sys.argv) if arg == "--adapter"]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "model": "run", "models": ["run", "base", *ADAPTERS]}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.headers["authorization"] != "Bearer " + os.environ["QLORA_LLM_API_KEY"]:
            self.send_response(401); self.end_headers(); return
        if request["max_tokens"] > 100:
            self.send_response(422); self.end_headers()
            self.wfile.write(b'{"error": {"message": "max_tokens: must be between 1 and 100"}}'); return
        self.send_response(200); self.send_header("content-type", "text/event-stream"); self.end_headers()
        said = "/".join(m["role"] + ":" + m["content"] for m in request["messages"])
        for word in (request["model"], said, json.dumps(request["temperature"])):
            chunk = {"choices": [{"delta": {"content": word + " "}, "finish_reason": None}]}
            self.wfile.write(("data: " + json.dumps(chunk) + "\\n\\n").encode())
        self.wfile.write(b"data: [DONE]\\n\\n")

HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler).serve_forever()
"""


def fake_serve(monkeypatch, tmp_path: Path) -> list[list[str]]:
    """Launch FAKE_SERVER, given the same arguments, where the playground launches `qlora-llm serve`: no
    model to load. Returns the serve commands launched."""
    import subprocess

    server = tmp_path / "fake_server.py"
    server.write_text(FAKE_SERVER)
    real, seen = subprocess.Popen, []

    def popen(command, **kwargs):
        if command[1:4] != ["-m", "qlora_llm.cli", "serve"]:
            return real(command, **kwargs)
        seen.append(command)
        return real([sys.executable, str(server), *command[4:]], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    return seen


def ready(c: TestClient, name: str) -> dict:
    import time

    deadline = time.monotonic() + 30
    while (status := c.get(f"/runs/{name}/chat/status").json())["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return status


def streamed(answer) -> list[str]:
    return [
        json.loads(line[6:])["choices"][0]["delta"]["content"]
        for line in answer.text.splitlines()
        if line.startswith("data: {")
    ]


def test_chat_playground_relays_base_and_tuned_through_the_model_server(tmp_path, monkeypatch):
    cli_run(tmp_path, "a")
    (tmp_path / "fresh").mkdir()
    c = client(tmp_path, api_key=KEY)
    for path in ("/runs/a/chat", "/runs/a/chat/status"):
        assert c.get(path).status_code == 401
    assert c.post("/runs/a/chat/start", data={"csrf": csrf(c)}).status_code == 401
    c.post("/login", data={"key": KEY})
    page = c.get("/runs/a/chat").text
    assert "qlora-llm serve runs/a --host 127.0.0.1" in page and str(tmp_path) not in page
    # `qlora-llm serve RUN --host 127.0.0.1 --port P` replaced by a stand-in server: no model to load.
    seen = fake_serve(monkeypatch, tmp_path)
    assert c.get("/runs/a/chat/status").json() == {"state": "stopped"}
    hello = [{"role": "user", "content": "hello"}]
    ask = {"model": "run", "messages": hello, "temperature": "0.5", "max_tokens": "8"}
    assert c.post("/runs/a/chat/complete", json=ask, headers={"x-csrf-token": csrf(c)}).status_code == 409
    assert c.post("/runs/fresh/chat/start", data={"csrf": csrf(c)}).status_code == 409  # nothing trained yet

    assert c.post("/runs/a/chat/start", data={"csrf": csrf(c)}).status_code == 303
    try:
        assert "--adapter" not in seen[-1]  # the base beside it: nothing more served
        assert ready(c, "a") == {"state": "ready", "tuned": "run", "models": ["run", "base"], "other": None}
        for model in ("run", "base"):
            answer = c.post(
                "/runs/a/chat/complete", json=ask | {"model": model}, headers={"x-csrf-token": csrf(c)}
            )
            assert answer.status_code == 200
            assert streamed(answer) == [f"{model} ", "user:hello ", "0.5 "]  # sampling passed on
        refused = [
            (ask | {"model": "other"}, 422, "model: one of run, base"),
            (ask | {"messages": [{"role": "user", "content": " "}]}, 422, "write a message"),
            (ask | {"messages": hello + [{"role": "assistant", "content": "hi"}]}, 422, "write a message"),
            (ask | {"messages": [{"role": "tool", "content": "x"}]}, 422, "messages: a list"),
            (ask | {"messages": "hello"}, 422, "messages: a list"),
            (ask | {"temperature": "warm"}, 422, "temperature: a number"),
            (ask | {"max_tokens": "500"}, 422, "between 1 and 100"),  # the server's own error, passed on
        ]
        for body, code, message in refused:
            response = c.post("/runs/a/chat/complete", json=body, headers={"x-csrf-token": csrf(c)})
            assert response.status_code == code and message in response.text, body
        assert c.post("/runs/a/chat/complete", json=ask).status_code == 403  # CSRF
        assert c.get("/runs/fresh/chat/status").json() == {"state": "stopped"}  # one playground: run a's
    finally:
        process = c.app.state.playground.process
        assert c.post("/runs/a/chat/stop", data={"csrf": csrf(c)}).status_code == 303
    assert process.poll() is not None and c.get("/runs/a/chat/status").json() == {"state": "stopped"}


def finished_run(runs: Path, name: str, base: str = "tiny") -> Path:
    """A run as training leaves it at the end: its config and final_adapter/ (no weights: nothing loads one)."""
    folder = cli_run(runs, name)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump(config | {"model": {"name": base}}))
    (folder / "final_adapter").mkdir()
    (folder / "final_adapter" / "adapter_config.json").write_text("{}")
    return folder


def test_chat_beside_another_run_of_the_same_base_multi_turn(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    finished_run(runs, "a")
    finished_run(runs, "b")  # the same base, finished: offered
    finished_run(runs, "c", base="other-model")  # another base: not offered
    cli_run(runs, "d")  # the same base ("tiny"), no final adapter yet: not offered
    finished_run(tmp_path / "outside", "e")
    (runs / "e").symlink_to(tmp_path / "outside" / "e")  # a run folder leading out of the runs folder
    c = client(runs)
    chat_page = c.get("/runs/a/chat").text
    assert re.findall(r"<option value='([^']*)'", chat_page) == ["", "b"]  # its base model, or run b
    commands = [html.unescape(shown) for shown in re.findall(r"data-command='([^']*)'", chat_page)]
    assert commands == [
        "qlora-llm serve runs/a --host 127.0.0.1",
        "qlora-llm serve runs/a --host 127.0.0.1 --adapter b=runs/b/final_adapter",
    ]  # the folders shown as runs/, never where they are
    seen = fake_serve(monkeypatch, tmp_path)
    for second, code, message in [
        ("c", 409, "another base model"),
        ("d", 409, "no final adapter"),
        ("a", 409, "this run itself"),
        ("e", 403, "outside"),
        ("../outside/e", 404, "no such run"),
        ("nope", 404, "no such run"),
    ]:
        response = c.post("/runs/a/chat/start", data={"csrf": csrf(c), "second": second})
        assert response.status_code == code and message in response.text, second
        assert str(runs) not in response.text
    assert seen == []  # nothing started

    assert c.post("/runs/a/chat/start", data={"csrf": csrf(c), "second": "b"}).status_code == 303
    try:
        assert seen[-1][4:] == [
            str((runs / "a").resolve()),
            "--host",
            "127.0.0.1",
            "--adapter",
            f"b={(runs / 'b' / 'final_adapter').resolve()}",
            "--port",
            seen[-1][-1],
        ]
        assert ready(c, "a") == {
            "state": "ready",
            "tuned": "run",
            "models": ["run", "base", "b"],
            "other": "b",
        }
        assert "selected>the run b" in c.get("/runs/a/chat").text  # the page shows what is running
        # The third turn: the column's earlier turns and its own answers go with it, in order.
        turns = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "and again"},
        ]
        body = {"model": "b", "messages": turns, "temperature": "0", "max_tokens": "8"}
        answer = c.post("/runs/a/chat/complete", json=body, headers={"x-csrf-token": csrf(c)})
        assert answer.status_code == 200
        assert streamed(answer) == ["b ", "user:hi/assistant:hello there/user:and again ", "0.0 "]

        # Another comparison: the server beside run b stops before the one beside the base starts.
        first = c.app.state.playground.process
        assert c.post("/runs/a/chat/start", data={"csrf": csrf(c), "second": ""}).status_code == 303
        assert first.poll() is not None and len(seen) == 2 and "--adapter" not in seen[-1]
        assert ready(c, "a")["other"] is None
    finally:
        process = c.app.state.playground.process
        c.post("/runs/a/chat/stop", data={"csrf": csrf(c)})
    assert process.poll() is not None


def test_the_memory_plan_is_shown_before_launch_and_nothing_is_created(tmp_path, tiny_mistral, tiny_data):
    """ "Check memory first" runs `qlora-llm plan` on the form's config (a subprocess: the studio never
    loads torch) and shows its verdict above the form, which keeps what was typed; no run, no job."""
    runs = tmp_path / "runs"
    c = client(runs, data=tiny_data)
    fields = {
        "run_name": "planned",
        "model.name": str(tiny_mistral),
        "model.device": "cpu",
        "data.train_file": str(tiny_data / "train.jsonl"),
        "lora.r": "8",
        "csrf": csrf(c),
    }
    response = c.post("/new", data=fields | {"action": "plan"})
    assert response.status_code == 200, response.text
    verdict = re.search(r"<p id='verdict'>(.*?)</p>", response.text).group(1)
    assert verdict.startswith("verdict: FITS - peak ") and "GiB (in train)" in verdict
    plan = html.unescape(re.search(r"<pre id='plan'>(.*?)</pre>", response.text, re.S).group(1))
    assert "LoRA r=8" in plan and "\nevaluate " in plan and "config.yaml" not in plan  # no temporary path
    assert "value='8'" in response.text  # the form keeps what was typed
    assert not (runs / "planned").exists() and JobStore(runs).all() == []
    launched = c.post("/new", data=fields | {"action": "launch"})
    assert launched.status_code == 303 and len(JobStore(runs).all()) == 1


def test_upload_is_refused_without_csrf_past_the_size_limit_or_when_prepare_refuses_it(tmp_path, monkeypatch):
    from qlora_llm.studio import upload

    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    c = client(runs, data)
    rows = "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3))
    file = {"file": ("mine.jsonl", rows.encode())}
    assert c.post("/new/upload", files=file).status_code == 403  # no CSRF token
    assert c.post("/new/upload", files={"file": ("x.exe", b"MZ")}, data={"csrf": csrf(c)}).status_code == 400
    monkeypatch.setattr(upload, "MAX_BYTES", 100)
    too_big = c.post("/new/upload", files=file, data={"csrf": csrf(c)})
    assert too_big.status_code == 413 and "larger than" in too_big.text
    # Past the limit by far, the body is refused by its Content-Length before it is read.
    huge = c.post("/new/upload", files={"file": ("h.jsonl", b"x" * (2**20 + 200))}, data={"csrf": csrf(c)})
    assert huge.status_code == 413
    monkeypatch.setattr(upload, "MAX_BYTES", 2**20)
    monkeypatch.setattr(upload, "run_prepare", lambda *a: (1, "error: only 3 valid examples"))
    refused = c.post("/new/upload", files=file, data={"csrf": csrf(c)})
    assert refused.status_code == 422 and "only 3 valid examples" in refused.text
    assert list((data / ".uploads").iterdir()) == []  # nothing half-written is left behind


def test_upload_is_prepared_and_shown_before_launch(tmp_path, tiny_mistral):
    """The file lands inside --data under a safe name whatever its name says; `qlora-llm prepare` runs on
    it; its report and the first example rendered with the model's template are shown above the form,
    which then launches a run on the prepared files."""
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    c = client(runs, data)
    assert "action='/new/upload'" in c.get("/new").text
    fields = {"csrf": csrf(c), "model": str(tiny_mistral), "max_seq_length": "64"}
    rows = "".join(
        json.dumps({"instruction": f"What comes after {i}?", "output": str(i + 1)}) + "\n" for i in range(30)
    )
    sent = {"file": ("../../../etc/my data.jsonl", rows.encode())}
    response = c.post("/new/upload", files=sent, data=fields)
    assert response.status_code == 200, response.text
    folder = data / ".uploads" / "my-data"
    assert (folder / "source" / "my-data.jsonl").read_text() == rows
    assert not (tmp_path / "etc").exists()
    report = html.unescape(re.search(r"<pre id='prepare-report'>(.*?)</pre>", response.text, re.S).group(1))
    assert "read 30 records: wrote 27 train, 3 eval" in report and str(data) not in report
    prompt = html.unescape(re.search(r"<pre id='example-prompt'>(.*?)</pre>", response.text, re.S).group(1))
    first = json.loads((folder / "train.jsonl").read_text().splitlines()[0])
    assert prompt.startswith("<s>[INST]") and first["instruction"] in prompt  # the Mistral template
    assert "value='data/.uploads/my-data/train.jsonl'" in response.text
    assert "value='data/.uploads/my-data/eval.jsonl'" in response.text
    launch = {"run_name": "uploaded", "model.name": str(tiny_mistral), "csrf": csrf(c)}
    launch |= {
        "data.train_file": "data/.uploads/my-data/train.jsonl",
        "data.eval_file": "data/.uploads/my-data/eval.jsonl",
    }
    assert c.post("/new", data=launch).status_code == 303
    job = JobStore(runs).all()[0]
    assert yaml.safe_load(job.config)["data"]["train_file"] == str((folder / "train.jsonl").resolve())


# A stand-in for a job's CLI command (`python -c STAND_IN train JOB`, so its stage reads "train"): it writes the CUDA_VISIBLE_DEVICES it was given to JOB.env, then
# runs until the test writes JOB.release, and exits with the code written there.
STAND_IN = """
import os, pathlib, sys, time
out = pathlib.Path(sys.argv[2])
out.with_suffix(".env").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
release = out.with_suffix(".release")
while not release.exists():
    time.sleep(0.02)
sys.exit(int(release.read_text() or "0"))
"""


def stand_in(store: JobStore, folder: Path, run: str, nproc: int = 1) -> int:
    """Queue a job whose command is STAND_IN (`--nproc K` in it when K > 1, as `train` would have)."""
    (store.home.parent / run).mkdir(exist_ok=True)
    job = store.add_stage(run, ["train"])
    command = [sys.executable, "-c", STAND_IN, "train", str(folder / f"job{job.id}")]
    store.set(job.id, command=json.dumps(command + (["--nproc", str(nproc)] if nproc > 1 else [])))
    return job.id


def wait_for(condition, what: str, timeout: float = 60):
    import time

    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def started_on(folder: Path, job_id: int) -> str:
    """The CUDA_VISIBLE_DEVICES a stand-in job was started with (waits for it to start)."""
    env = folder / f"job{job_id}.env"
    return wait_for(lambda: env.is_file() and env.read_text(), f"job {job_id} to start")


def release(folder: Path, job_id: int, code: int = 0) -> None:
    (folder / f"job{job_id}.part").write_text(str(code))
    (folder / f"job{job_id}.part").rename(folder / f"job{job_id}.release")


def still_waiting(store: JobStore, folder: Path, *job_ids: int) -> bool:
    """After a few of the worker's passes, these jobs have not started."""
    import time

    time.sleep(0.5)  # 10 passes at poll_s=0.05
    return all(store.get(i).state == "queued" and not (folder / f"job{i}.env").exists() for i in job_ids)


def test_gpu_jobs_run_side_by_side_each_pinned_to_its_own_gpus(tmp_path):
    """With GPUs 0 and 1: two 1-GPU jobs at once on "0" and "1", a third on the first GPU freed (a job
    that failed frees it too), a 2-GPU job waits for both and nothing behind it jumps it, unless the user
    moves it up; a waiting job can be cancelled; a job asking for more GPUs than the studio has never starts."""
    from qlora_llm.studio.jobs import Worker

    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    # The pages of a CPU studio and of a 2-GPU one on the same folder (made first: a studio starting
    # marks the jobs it finds running as interrupted).
    cpu_view, gpu_view = client(runs), TestClient(create_app(runs, start_worker=False, gpus=["0", "1"]))
    store = JobStore(runs)
    too_big = stand_in(store, out, "big", nproc=4)
    a, b, c = (stand_in(store, out, name) for name in ("a", "b", "c"))
    d = stand_in(store, out, "d", nproc=2)
    e, f = stand_in(store, out, "e"), stand_in(store, out, "f")
    worker = Worker(store, ["0", "1"], poll_s=0.05)
    worker.start()
    try:
        assert (started_on(out, a), started_on(out, b)) == ("0", "1")
        assert still_waiting(store, out, c, d, e, f)
        assert store.get(too_big).state == "failed"
        assert (
            "--nproc 4 asks for 4 GPUs; this studio has 2 (0, 1)" in Path(store.get(too_big).log).read_text()
        )

        release(out, a, code=3)  # a fails: its GPU is free all the same
        assert started_on(out, c) == "0"
        assert (store.get(a).state, store.get(a).exit_code, store.get(a).gpus) == ("failed", 3, "0")
        release(out, b)
        wait_for(lambda: store.get(b).state == "done", "b to end")
        # GPU 1 is free, d needs two: d waits, and e behind it waits too (first in, first out).
        assert worker.free_gpus() == ["1"] and still_waiting(store, out, d, e)
        assert store.cancel(f) and store.get(f).state == "cancelled"
        assert store.move(e, -1)  # the user moves e ahead of d: e starts on the free GPU
        assert started_on(out, e) == "1" and still_waiting(store, out, d)

        release(out, c)
        release(out, e)
        assert started_on(out, d) == "0,1"
        assert store.get(d).gpus == "0,1" and worker.free_gpus() == []
        page = cpu_view.get("/").text
        assert re.search(rf"<li id='running-{d}'>job {d}: <a href='/runs/d'>d</a> \(train\)</li>", page)
        gpu_page = gpu_view.get("/")
        assert (
            f"<li id='running-{d}'>job {d}: <a href='/runs/d'>d</a> (train) on GPUs 0,1</li>" in gpu_page.text
        )
        assert "GPUs 0, 1: up to 2 jobs at once" in gpu_page.text
        release(out, d)
        wait_for(lambda: store.get(d).state == "done", "d to end")
        assert worker.free_gpus() == ["0", "1"]
    finally:
        for job in store.all():
            release(out, job.id)
        worker.close()
    assert not (out / f"job{f}.env").exists()
    assert [store.get(i).state for i in (a, b, c, d, e, f)] == [
        "failed",
        "done",
        "done",
        "done",
        "done",
        "cancelled",
    ]
    assert [store.get(i).gpus for i in (b, c, d, e)] == ["1", "0", "0,1", "1"]
    run_page = gpu_view.get("/runs/d").text
    assert (
        f"<tr id='job-{d}'><td>{d}</td><td>train</td><td class='state'>done</td><td class='gpus'>GPUs 0,1</td>"
        in run_page
    )


def test_without_gpus_one_job_runs_at_a_time_in_the_studios_environment(tmp_path, monkeypatch):
    from qlora_llm.studio.jobs import Worker

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    store = JobStore(runs)
    first, second = stand_in(store, out, "first"), stand_in(store, out, "second", nproc=2)
    worker = Worker(store, [], poll_s=0.05)
    worker.start()
    try:
        assert started_on(out, first) == "unset" and still_waiting(store, out, second)
        release(out, first)
        assert started_on(out, second) == "unset"  # --nproc 2 on a CPU machine: 2 CPU processes, alone
        assert store.get(first).state == "done" and store.get(second).gpus == ""
    finally:
        for job in store.all():
            release(out, job.id)
        worker.close()
    page = client(runs).get("/").text
    assert "no GPU: one job at a time" in page


def test_a_new_run_asks_for_gpus_and_more_than_the_studio_has_is_refused(tmp_path):
    c = TestClient(create_app(tmp_path, start_worker=False, gpus=["0", "1"]), follow_redirects=False)
    page = c.get("/new").text
    assert "name='nproc' value='1'" in page and "this studio has 2 (0, 1)" in page
    refused = c.post("/new", data={"run_name": "wide", "nproc": "3", "csrf": csrf(c)})
    assert refused.status_code == 422
    assert _field_error(refused.text, "nproc") == (
        "--nproc 3 asks for 3 GPUs; this studio has 2 (0, 1): ask for at most 2"
    )
    assert "--nproc 3" in re.search(r"<pre id='command'>([^<]*)</pre>", refused.text).group(1)
    assert c.post("/new", data={"run_name": "bad", "nproc": "two", "csrf": csrf(c)}).status_code == 422
    assert not (tmp_path / "wide").exists() and JobStore(tmp_path).all() == []

    assert c.post("/new", data={"run_name": "wide", "nproc": "2", "csrf": csrf(c)}).status_code == 303
    (job,) = JobStore(tmp_path).all()
    assert job.command[-2:] == ["--nproc", "2"]
    assert "name='nproc' value='2'" in c.get("/runs/wide/clone").text  # a clone asks for as many
    assert "job 1: wide (train, asks for 2 GPUs)" in c.get("/").text
    # Resumed on as many GPUs; a studio with fewer refuses to resume it, in one line.
    JobStore(tmp_path).set(job.id, state="stopped")
    assert c.post("/runs/wide/resume", data={"csrf": csrf(c)}).status_code == 303
    assert JobStore(tmp_path).get(2).command[-4:] == ["--resume", "auto", "--nproc", "2"]
    JobStore(tmp_path).set(2, state="interrupted")
    one = TestClient(create_app(tmp_path, start_worker=False, gpus=["0"]), follow_redirects=False)
    response = one.post("/runs/wide/resume", data={"csrf": csrf(one)})
    assert response.status_code == 409 and "asks for 2 GPUs; this studio has 1 (0)" in response.text
    # A CPU studio asks for no GPU count: one job at a time.
    assert "name='nproc'" not in client(tmp_path).get("/new").text


def test_the_studio_learns_its_gpus_without_torch(tmp_path):
    import os
    import subprocess

    from qlora_llm.cli import build_parser
    from qlora_llm.studio.gpus import detect_gpus, gpus_wanted, parse_gpus

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\n[ "$1 $2" = "--query-gpu=index --format=csv,noheader" ] || exit 9\nprintf "0\\n1\\n"\n'
    )
    smi.chmod(0o755)
    assert detect_gpus({"PATH": str(bin_dir)}) == ["0", "1"]
    # An explicit CUDA_VISIBLE_DEVICES wins: nvidia-smi would list every GPU whatever it says.
    assert detect_gpus({"PATH": str(bin_dir), "CUDA_VISIBLE_DEVICES": "1"}) == ["1"]
    assert detect_gpus({"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert detect_gpus({"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]  # as CUDA reads it
    assert detect_gpus({"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}) == []
    assert detect_gpus({"PATH": str(tmp_path)}) == []  # neither: the CPU rule
    smi.write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n"
    )
    assert detect_gpus({"PATH": str(bin_dir)}) == []

    assert parse_gpus("0,1") == ["0", "1"] and parse_gpus("none") == [] and parse_gpus(" 3 ") == ["3"]
    for bad in ("0,,1", "0,0", ""):
        with pytest.raises(QloraError, match="distinct GPU ids"):
            parse_gpus(bad)
    assert build_parser().parse_args(["studio", "--gpus", "0,1"]).gpus == "0,1"
    assert gpus_wanted(["python", "-m", "qlora_llm.cli", "train", "c.yaml", "--nproc", "4"]) == 4
    assert gpus_wanted(["python", "-m", "qlora_llm.cli", "train", "c.yaml", "--nproc=2"]) == 2
    assert gpus_wanted(["python", "-m", "qlora_llm.cli", "evaluate", "runs/a"]) == 1
    # The studio process never imports torch (it stays small), GPUs or not.
    code = "import sys, qlora_llm.cli, qlora_llm.studio.app, qlora_llm.studio.gpus; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert done.stdout.strip() == "False", done.stderr


# What an export logs, step by step (q4_k_m, the first on this machine: merge, fetch and build too): each
# format string as it stands in the module that logs it, with arguments as a real export gives them.
EXPORT_LOG = [
    (
        "export",
        "no verified merge of this adapter beside %s yet: merging it first (qlora-llm merge)",
        ("/r/a",),
    ),
    (
        "merge",
        "merged %s into %s in %.0f s: max logit difference %.1e, %d/%d greedy answers identical",
        ("/r/a/final_adapter", "/r/a/merged", 41.2, 3.1e-6, 4, 4),
    ),
    ("llamacpp", "fetching llama.cpp (vendored in llama-cpp-python %s, 76 MB, once)", ("0.3.36",)),
    ("export", "converting %s to GGUF %s with llama.cpp's converter", ("/r/a/merged", "f16")),
    (
        "llamacpp",
        "building llama.cpp's %s from source, once (a few minutes per core)...",
        ("llama-quantize, llama-results, llama-completion",),
    ),
    ("llamacpp", "building llama.cpp: %d%%%s", (3, "")),
    ("llamacpp", "building llama.cpp: %d%%%s", (40, ", about 3 min left")),
    ("llamacpp", "built llama.cpp's tools in %.0f s (%s)", (212.4, "/cache/llama.cpp/0.3.36/bin")),
    ("export", "quantizing to %s with llama-quantize", ("q4_k_m",)),
    ("export", "verifying the %s GGUF in llama.cpp against transformers on %d prompts", ("q4_k_m", 4)),
    ("export", "exported %s as %s to %s in %.0f s", ("a", "gguf", "/r/a/export-gguf-q4_k_m", 301.7)),
]
EXPORT_STEPS_SHOWN = [
    ("merging the adapter", None),
    ("merged and checked", None),
    ("fetching llama.cpp", None),
    ("converting to GGUF f16", None),
    ("building llama.cpp", 0),
    ("building llama.cpp", 3),
    ("building llama.cpp, about 3 min left", 40),
    ("built llama.cpp", None),
    ("quantizing to q4_k_m", None),
    ("verifying in llama.cpp", None),
    ("exported", 100),
]


def export_log_lines() -> list[str]:
    """EXPORT_LOG as the CLI writes it to the job's log (cli.py's logging format)."""
    import logging

    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return [
        formatter.format(
            logging.makeLogRecord(
                {"name": f"qlora_llm.{module}", "levelname": "INFO", "msg": fmt, "args": args}
            )
        )
        for module, fmt, args in EXPORT_LOG
    ]


def test_export_progress_is_read_from_the_exports_own_log_lines():
    from qlora_llm.studio.stages import export_progress

    src = Path(__file__).resolve().parents[1] / "src" / "qlora_llm"
    for module, fmt, _ in EXPORT_LOG:  # the messages are the source's own, not made up here
        assert f'"{fmt}"' in (src / f"{module}.py").read_text(), (module, fmt)
    lines = export_log_lines()
    assert lines[6] == "INFO qlora_llm.llamacpp: building llama.cpp: 40%, about 3 min left"
    assert export_progress([]) is None
    noise = [
        "Loading checkpoint shards:  50%|#####     | 1/2 [00:01<00:01,  1.02s/it]",
        "WARNING qlora_llm.export: llama.cpp's output does not start with the prompt it was given: 'x'",
        "INFO qlora_llm.model: applied adapter /r/a/final_adapter (unmerged)",
    ]
    assert export_progress(noise) is None
    for n, shown in enumerate(EXPORT_STEPS_SHOWN, start=1):  # after each line, its step: the last one wins
        assert export_progress(lines[:n] + noise) == shown, lines[n - 1]


def test_an_export_jobs_progress_is_on_the_run_page_and_pushed_live(tmp_path):
    cli_run(tmp_path, "a")
    c = client(tmp_path)
    c.post("/runs/a/export", data={"format": "gguf", "quant": "q4_k_m", "csrf": csrf(c)})
    store = JobStore(tmp_path)
    store.set(1, state="running", pid=4242)
    lines = export_log_lines()
    Path(store.get(1).log).write_text("")
    row = re.search(r"<tr id='job-1'>.*?</tr>", c.get("/runs/a").text).group(0)
    assert "<progress id='progress-1' max='100'></progress>" in row  # under way, no step logged yet
    Path(store.get(1).log).write_text("".join(line + "\n" for line in lines[:7]))
    row = re.search(r"<tr id='job-1'>.*?</tr>", c.get("/runs/a").text).group(0)
    assert "<progress id='progress-1' max='100' value='40'></progress>" in row
    assert "building llama.cpp, about 3 min left · 40%" in row
    # The run's live events carry it: reset, 3 metrics rows, the status, the jobs, then the progress.
    events = first_events(tmp_path, "a", 7, c.app)
    assert events[6] == 'event: progress\ndata: {"1": ["building llama.cpp, about 3 min left", 40]}\n\n'
    with open(store.get(1).log, "a") as log:
        log.write("".join(line + "\n" for line in lines[7:9]))
    assert (
        first_events(tmp_path, "a", 7, c.app)[6]
        == 'event: progress\ndata: {"1": ["quantizing to q4_k_m", null]}\n\n'
    )
    with open(store.get(1).log, "a") as log:
        log.write("".join(line + "\n" for line in lines[9:]))
    store.set(1, state="done", exit_code=0)
    assert "exported · 100%" in c.get("/runs/a").text
    # Other stages have no progress cell.
    c.post("/runs/a/merge", data={"csrf": csrf(c)})
    assert "<progress id='progress-2'" not in c.get("/runs/a").text


def test_pages_name_a_local_model_folder_without_its_server_path(tmp_path):
    runs = tmp_path / "runs"
    folder = cli_run(runs)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model"]["name"] = "/srv/models/team/my-model"
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    c = client(runs)
    for url in ("/", "/runs/from-cli"):
        page = c.get(url).text
        assert "/srv/models" not in page and "my-model" in page, url
    assert ".../my-model" in c.get("/runs/from-cli").text  # the config shown, path shortened

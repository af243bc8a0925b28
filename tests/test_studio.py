"""The web studio over HTTP: sign-in, CSRF, path confinement, the config form, the queue, restarts."""

from __future__ import annotations

import json
import re
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
    posts = ["/new", "/runs/from-cli/stop", "/runs/from-cli/resume", "/jobs/1/cancel"]
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
    c = client(tmp_path)
    row = re.search(r"<tr><td><a href='/runs/from-cli'>.*?</tr>", c.get("/").text).group(0)
    assert "tiny" in row and "train.jsonl" in row and "4 / 4" in row and "1.2500" in row
    assert "/somewhere" not in row
    page = c.get("/runs/from-cli").text
    assert "checkpoint-2" in page and str(folder) not in page
    assert c.get("/runs/from-cli/metrics").json()["checkpoints"] == ["checkpoint-2"]


def test_events_stream_every_logged_row(tmp_path):
    cli_run(tmp_path)
    app = create_app(tmp_path, start_worker=False)
    route = next(r for r in app.routes if getattr(r, "path", "") == "/runs/{name}/events")
    import asyncio

    class Request:
        async def is_disconnected(self):
            return False

    async def first_events(n):
        response = await route.endpoint("from-cli", Request())
        out = []
        async for chunk in response.body_iterator:
            out.append(chunk)
            if len(out) == n:
                return out

    events = asyncio.run(asyncio.wait_for(first_events(5), 10))
    assert events[0].startswith("event: reset")
    assert [json.loads(e[len("data: ") :])["step"] for e in events[1:4]] == [1, 2, 4]
    assert events[4] == "event: status\ndata: started outside the studio\n\n"


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

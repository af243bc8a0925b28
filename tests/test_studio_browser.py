"""The studio end to end in a real Chromium (Debian's, driven by Playwright): form -> live chart -> stop ->
resume -> done -> evaluate (the report in the page) -> clone with changes -> compare -> chat (the run beside
its clone, two turns of one conversation), on the tiny test model. Screenshots land in the test's tmp folder; with STUDIO_SCREENSHOTS=DIR
they are also copied into DIR (how docs/img/ was made).

    .venv/bin/pytest tests/test_studio_browser.py -q
    STUDIO_SCREENSHOTS=docs/img .venv/bin/pytest tests/test_studio_browser.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "browser-test-key"
STEPS = 40
TIMEOUT_MS = 240_000  # the CI machine has 2 shared cores: loading the model alone can take a while


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Studio:
    """A `qlora-llm studio` process on a runs folder and a fixed port, which the test can restart."""

    def __init__(self, tmp_path: Path, tiny_data: Path):
        self.runs, self.data, self.port = tmp_path / "runs", tiny_data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "studio.log", "ab")
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qlora_llm.cli",
                "studio",
                "--runs",
                str(self.runs),
                "--data",
                str(self.data),
            ]
            + ["--port", str(self.port), "--api-key", KEY],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )

        def up():
            try:
                return httpx.get(f"{self.url}/login", timeout=2).status_code == 200
            except httpx.HTTPError:
                return self.process.poll() is not None

        _wait(up, 60, "the studio to listen")
        assert self.process.poll() is None, "the studio exited at start"

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: the studio stops its running jobs, which checkpoint
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def studio(tmp_path, tiny_data):
    running = Studio(tmp_path, tiny_data)
    yield running
    running.stop()
    running.log.close()


def test_launch_watch_stop_resume_in_chromium(studio, tmp_path, tiny_mistral, tiny_data):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    url, runs = studio.url, studio.runs
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # Without the key every route is refused (the sign-in page and static files excepted).
    for method, path in [("GET", "/"), ("GET", "/new"), ("GET", "/runs/x"), ("GET", "/runs/x/metrics")] + [
        ("GET", "/runs/x/events"),
        ("POST", "/new"),
        ("POST", "/runs/x/stop"),
        ("POST", "/runs/x/resume"),
        ("POST", "/jobs/1/cancel"),
    ]:
        assert httpx.request(method, url + path, timeout=10).status_code == 401, path

    fields = {
        "run_name": "browser",
        "model.name": str(tiny_mistral),
        "model.device": "cpu",
        "data.train_file": str(tiny_data / "train.jsonl"),
        "data.eval_file": str(tiny_data / "eval.jsonl"),
        "data.max_seq_length": "64",
        "train.max_steps": str(STEPS),
        # 12 batches of 1 per step: ~0.1 s a step on an idle machine (0.02 s at one batch of 4), so the
        # page watches, shows an ETA and stops a run that is still running, however fast the host.
        "train.batch_size": "1",
        "train.gradient_accumulation_steps": "12",
        "train.eval_steps": "10",
        "train.save_steps": "1000",
        "train.logging_steps": "1",
        "train.learning_rate": "0.01",
        "train.warmup_ratio": "0",
        "train.early_stopping_patience": "0",
        # The evaluation the run page queues later: a few short answers, no benchmark prompts.
        "eval.max_new_tokens": "4",
        "eval.speed_runs": "1",
        "eval.benchmark_prompts": "null",
        "lora.r": "0",  # invalid: the form must say so beside the field
    }
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        assert page.url.endswith("/login")
        page.fill("input[name=key]", KEY)
        page.click("button")
        page.wait_for_url(url + "/")

        page.goto(url + "/new")
        for name, value in fields.items():
            page.fill(f"input[name='{name}']", value)
        page.click("#new-run button")
        # The click starts the navigation; the old form (empty error spans) may still be there: wait.
        page.wait_for_selector("#command")
        expect = sync_api.expect
        expect.set_options(timeout=60_000)
        expect(page.locator("[id='error-lora.r']")).to_have_text("Input should be greater than 0 (got 0)")
        expect(page.locator("#command")).to_contain_text("lora.r=0")
        page.screenshot(path=str(shots / "form-error.png"), full_page=True)
        page.fill("input[name='lora.r']", "8")
        page.click("#new-run button")
        page.wait_for_url(url + "/runs/browser")

        # The chart gains points while the job runs; a reload mid-run loses nothing.
        page.wait_for_function("Number(document.getElementById('chart').dataset.points) >= 3")
        page.wait_for_selector("#stop")
        before = int(page.locator("#chart").get_attribute("data-points"))
        expect(page.locator("#speed")).to_contain_text("tokens/s")  # chart.js, from the same events
        expect(page.locator("#memory")).to_contain_text("GiB")
        expect(page.locator("#eta")).to_contain_text(" s left")  # from the times the rows were logged at
        page.screenshot(path=str(shots / "run-live.png"), full_page=True)
        page.reload()
        page.wait_for_function(f"Number(document.getElementById('chart').dataset.points) >= {before}")
        # x by tokens trained: every logged row carries the run's token count, so no point is dropped.
        page.select_option("#xaxis", "tokens")
        expect(page.locator("#chart")).to_have_attribute("data-axis", "tokens")
        page.wait_for_function(f"Number(document.getElementById('chart').dataset.points) >= {before}")
        page.select_option("#xaxis", "step")

        # Stop: SIGTERM, the CLI saves a checkpoint at the next step and exits.
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        checkpoints = sorted(p.name for p in (runs / "browser").glob("checkpoint-*"))
        assert checkpoints, "stopping must leave a checkpoint"
        stopped_at = int(checkpoints[-1].split("-")[1])
        assert 0 < stopped_at < STEPS
        expect(page.locator("#checkpoints")).to_contain_text(checkpoints[-1])
        page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)

        # Resume from that checkpoint; restart the studio while it runs: the job shows interrupted (the
        # studio's shutdown stopped it, with a checkpoint), and resumes to completion in the new studio.
        page.click("#resume")
        page.wait_for_function("document.getElementById('status').textContent === 'running'")
        studio.stop()
        studio.start()
        page.reload()  # a new studio process: a new session secret, so sign in again
        assert page.url.endswith("/login")
        page.fill("input[name=key]", KEY)
        page.click("button")
        page.wait_for_url(url + "/")
        page.goto(url + "/runs/browser")
        expect(page.locator("#status")).to_have_text("interrupted")
        page.click("#resume")
        page.wait_for_function("document.getElementById('status').textContent === 'done'")
        rows = [json.loads(line) for line in (runs / "browser" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == STEPS
        assert any("eval_loss" in r for r in rows)
        page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{STEPS} /')")
        page.screenshot(path=str(shots / "run-done.png"), full_page=True)
        page.goto(url + "/")
        expect(page.locator("#runs")).to_contain_text("done")
        page.screenshot(path=str(shots / "runs.png"), full_page=True)

        # Evaluate from the run page: a queued `qlora-llm evaluate` job; when it ends, the page shows the
        # figures base vs tuned and embeds the report.
        page.goto(url + "/runs/browser")
        page.fill("#evaluate-form input[name=max_examples]", "2")
        page.check("#evaluate-form input[name=skip_general]")
        page.click("#evaluate")
        page.wait_for_selector("#eval-metrics")
        expect(page.locator("#jobs")).to_contain_text("qlora-llm evaluate runs/browser eval.max_examples=2")
        expect(page.locator("#eval-metrics")).to_contain_text("ROUGE-L F1")
        expect(page.frame_locator("#report").locator(".headline")).not_to_be_empty()
        assert (runs / "browser" / "eval" / "report.html").is_file()
        page.screenshot(path=str(shots / "run-evaluated.png"), full_page=True)
        page.goto(url + "/")
        expect(page.locator("#runs .task")).to_contain_text("ROUGE-L F1")

        # Clone with changes: the form holds the run's settings; the clone trains 4 steps in its own folder.
        page.goto(url + "/runs/browser")
        page.click("#clone")
        expect(page.locator("input[name='train.max_steps']")).to_have_value(str(STEPS))
        expect(page.locator("input[name='run_name']")).to_have_value("browser-2")
        page.fill("input[name='train.max_steps']", "4")
        page.click("#new-run button")
        page.wait_for_url(url + "/runs/browser-2")
        page.wait_for_function("document.getElementById('status').textContent === 'done'")
        page.screenshot(path=str(shots / "clone-done.png"), full_page=True)

        page.goto(url + "/compare?run=browser&run=browser-2")
        expect(page.locator("#diff")).to_contain_text("train.max_steps")
        expect(page.locator("#diff")).not_to_contain_text("lora.r")
        page.screenshot(path=str(shots / "compare.png"), full_page=True)

        # Chat: the run beside its clone (the same base, both trained above): the studio starts
        # `qlora-llm serve runs/browser --adapter browser-2=runs/browser-2/final_adapter`, and both answer
        # side by side (the base beside the run is tested over HTTP: test_studio.py).
        asked = []  # what the page sends the studio's relay: a column's model and its whole conversation
        page.on(
            "request", lambda r: asked.append(r.post_data_json) if r.url.endswith("/chat/complete") else None
        )
        page.goto(url + "/runs/browser")
        page.click("#chat-link")
        page.select_option("#chat-second", "browser-2")
        expect(page.locator("#serve-command")).to_contain_text(
            "--adapter browser-2=runs/browser-2/final_adapter"
        )
        page.click("#chat-start")
        page.wait_for_function("document.getElementById('chat-state').textContent === 'ready'")
        expect(page.locator("#tuned-model")).to_have_text("fine-tuned: browser")
        expect(page.locator("#base-model")).to_have_text("other run: browser-2")
        page.fill("#prompt", "What comes after a?")
        page.fill("input[name=max_tokens]", "6")
        # Sampled, seeded: greedy, the 4-step clone's first token is its end of text (an empty answer). The
        # tiny model's logits are nearly flat, so the seed decides most tokens and the two columns may read
        # alike: the requests below show which model each column asked.
        page.fill("input[name=temperature]", "1")
        page.fill("input[name=seed]", "0")
        page.click("#send")
        answers = {}
        for side in ("base", "tuned"):
            page.wait_for_function(f"document.getElementById('{side}-answer').dataset.done === '1'")
            expect(page.locator(f"#{side}-finish")).to_contain_text("finish: ")
            answers[side] = page.locator(f"#{side}-answer").text_content()
            assert answers[side].strip(), f"the {side} column's answer is empty"
        assert page.locator("#chat-error").text_content() == ""
        model = {"base": "browser-2", "tuned": "browser"}  # the second column is the other run
        assert sorted((a["model"], len(a["messages"])) for a in asked) == [("browser", 1), ("browser-2", 1)]
        # A second turn of the same conversation: each column sends its first turn and its own answer too.
        page.fill("#prompt", "And after b?")
        page.click("#send")  # waits for Send to be enabled again: one turn at a time
        for side in ("base", "tuned"):
            page.wait_for_function(f"document.getElementById('{side}-answer').dataset.done === '1'")
            turns = page.locator(f"#{side}-history .turn")
            expect(turns).to_have_count(3)  # you: the first prompt, its answer, you: the second prompt
            assert turns.nth(0).text_content() == "you: What comes after a?"
            assert turns.nth(1).text_content() == answers[side]
            assert turns.nth(2).text_content() == "you: And after b?"
            assert page.locator(f"#{side}-answer").text_content().strip(), (
                f"the {side} column's second answer"
            )
        assert page.locator("#chat-error").text_content() == ""
        second = {a["model"]: a["messages"] for a in asked[2:]}
        for side in ("base", "tuned"):  # each column sent its own first turn and its own answer
            assert [m["role"] for m in second[model[side]]] == ["user", "assistant", "user"]
            assert second[model[side]][1]["content"] == answers[side]
        page.screenshot(path=str(shots / "chat.png"), full_page=True)
        page.click("#chat-stop")
        page.wait_for_function("document.getElementById('chat-state').textContent === 'stopped'")
        browser.close()
    assert len(list(shots.glob("*.png"))) == 9
    keep = os.environ.get("STUDIO_SCREENSHOTS")
    if keep:  # opt-in: keep the shots outside the tmp folder (docs/img/ for the README)
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, Path(keep) / f"studio-{shot.name}")

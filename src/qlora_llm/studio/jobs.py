"""The studio's jobs: an SQLite table of CLI subprocesses and the queue that runs them one at a time.

A job is the command a user would type (`python -m qlora_llm.cli train CONFIG ...`, or `evaluate`, `merge`,
`export` on a run folder), so the studio never does what the CLI cannot. Jobs belong to the studio process, not to a browser page: closing the page
changes nothing, and a studio restart marks jobs that were running as interrupted (resumable).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    state TEXT NOT NULL,
    command TEXT NOT NULL,
    config TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    exit_code INTEGER,
    log TEXT NOT NULL,
    pid INTEGER,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    position REAL
)
"""
ACTIVE = ("queued", "running")


@dataclass
class Job:
    id: int
    run: str
    state: str  # queued, running, done, failed, stopped, cancelled, interrupted
    command: list[str]
    config: str
    created: float
    started: float | None
    ended: float | None
    exit_code: int | None
    log: str
    pid: int | None
    stop_requested: bool
    position: float | None  # queue order of waiting jobs; the job id until the user moves it

    @property
    def stage(self) -> str:
        """The CLI command the job runs: train, evaluate, merge or export."""
        return self.command[3] if len(self.command) > 3 else "train"


class JobStore:
    """The jobs table under `<runs>/.studio/jobs.db`; one connection per call, so any thread may use it."""

    def __init__(self, runs: Path):
        self.home = runs / ".studio"
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        (self.home / "configs").mkdir(parents=True, exist_ok=True)
        self.path = self.home / "jobs.db"
        self.lock = threading.Lock()
        with self._db() as db:
            db.execute(SCHEMA)
            # A jobs.db written before the queue could be reordered has no position column.
            if "position" not in {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}:
                db.execute("ALTER TABLE jobs ADD COLUMN position REAL")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def _job(self, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["command"] = json.loads(values["command"])
        values["stop_requested"] = bool(values["stop_requested"])
        return Job(**values)

    def add(self, run: str, config_yaml: str, extra_args: list[str] | None = None) -> Job:
        """Queue `train` on `config_yaml` (the whole resolved config) for the run folder `run`."""
        return self._insert(run, config_yaml, lambda path: ["train", str(path), *(extra_args or [])])

    def add_stage(self, run: str, args: list[str]) -> Job:
        """Queue another stage on a run: `args` is the CLI command after `qlora-llm` (`evaluate RUN ...`)."""
        return self._insert(run, "", lambda _: args)

    def _insert(self, run: str, config_yaml: str, command_args: Callable[[Path], list[str]]) -> Job:
        with self.lock, self._db() as db:
            cur = db.execute(
                "INSERT INTO jobs (run, state, command, config, created, log) VALUES (?, 'queued', '[]', ?, ?, '')",
                (run, config_yaml, time.time()),
            )
            job_id = cur.lastrowid
            config_path = self.home / "configs" / f"{job_id}.yaml"
            if config_yaml:
                config_path.write_text(config_yaml, encoding="utf-8")
            command = [sys.executable, "-m", "qlora_llm.cli", *command_args(config_path)]
            log_path = self.home / "logs" / f"{job_id}.log"
            db.execute(
                "UPDATE jobs SET command = ?, log = ?, position = ? WHERE id = ?",
                (json.dumps(command), str(log_path), job_id, job_id),
            )
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def all(self) -> list[Job]:
        with self._db() as db:
            return [self._job(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]

    def for_run(self, run: str) -> list[Job]:
        return [j for j in self.all() if j.run == run]

    def latest(self, run: str, stage: str | None = None) -> Job | None:
        jobs = [j for j in self.for_run(run) if stage is None or j.stage == stage]
        return jobs[-1] if jobs else None

    def queued(self) -> list[Job]:
        """Waiting jobs in the order they will start: first queued, first run, unless the user moved one."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY COALESCE(position, id), id")
            return [self._job(r) for r in rows]

    def move(self, job_id: int, offset: int) -> bool:
        """Move a waiting job `offset` places in the queue (-1: one earlier); False if it is not waiting."""
        with self.lock, self._db() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY COALESCE(position, id), id"
            ).fetchall()
            order = [r["id"] for r in rows]
            if job_id not in order:
                return False
            old = order.index(job_id)
            order.insert(max(0, min(len(order) - 1, old + offset)), order.pop(old))
            # Renumber the whole queue: positions stay distinct however often jobs move.
            db.executemany("UPDATE jobs SET position = ? WHERE id = ?", list(enumerate(order)))
        return True

    def set(self, job_id: int, **values: object) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.lock, self._db() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))

    def cancel(self, job_id: int) -> bool:
        """Cancel a waiting job; a running one is stopped instead (see `stop`)."""
        with self.lock, self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'cancelled', ended = ? WHERE id = ? AND state = 'queued'",
                (time.time(), job_id),
            )
        return cur.rowcount == 1

    def mark_interrupted(self) -> list[int]:
        """At start-up: jobs a previous studio left running are interrupted (resume with --resume auto)."""
        with self.lock, self._db() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            db.execute(
                "UPDATE jobs SET state = 'interrupted', ended = ? WHERE state = 'running'", (time.time(),)
            )
        if ids:
            log.warning("jobs %s were running when the studio last stopped: marked interrupted", ids)
        return ids


class Worker:
    """Runs queued jobs one at a time (a CPU machine trains one run at a time), each as a subprocess."""

    def __init__(self, store: JobStore, poll_s: float = 0.5):
        self.store = store
        self.poll_s = poll_s
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="studio-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Studio shutdown: SIGTERM the running job so it checkpoints; it is marked interrupted (resumable)."""
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.thread.join(timeout=5)

    def stop(self, job: Job) -> bool:
        """SIGTERM the job's process: the CLI finishes the step, saves a checkpoint and exits."""
        if job.state != "running" or job.pid is None:
            return False
        self.store.set(job.id, stop_requested=1)
        try:
            os.kill(job.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def _loop(self) -> None:
        while not self.stopping.is_set():
            waiting = self.store.queued()
            if not waiting:
                time.sleep(self.poll_s)
                continue
            self._run(waiting[0])

    def _run(self, job: Job) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(job.log, "ab") as out:
            self.process = subprocess.Popen(
                job.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
            self.store.set(job.id, state="running", started=time.time(), pid=self.process.pid)
            log.info("job %d started (pid %d): %s", job.id, self.process.pid, " ".join(job.command))
            code = self.process.wait()
        if self.stopping.is_set() and not self.store.get(job.id).stop_requested:
            state = "interrupted"
        elif self.store.get(job.id).stop_requested:
            state = "stopped"
        else:
            state = "done" if code == 0 else "failed"
        self.store.set(job.id, state=state, ended=time.time(), exit_code=code)
        self.process = None

"""The studio's jobs: an SQLite table of CLI subprocesses and the queue that runs them.

A job is the command a user would type (`python -m qlora_llm.cli train CONFIG ...`, or `evaluate`, `merge`,
`export` on a run folder), so the studio never does what the CLI cannot. Jobs belong to the studio process, not to a browser page: closing the page
changes nothing, and a studio restart marks jobs that were running as interrupted (resumable).

On a CPU machine the queue runs one job at a time. With GPUs (gpus.py) it starts, in queue order, every
waiting job whose GPU count fits in the free GPUs, each with CUDA_VISIBLE_DEVICES set to exactly its
own, and frees them when the job ends.
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

from qlora_llm.studio.gpus import gpus_wanted, too_many

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
    position REAL,
    gpus TEXT
)
"""
# Columns added after the first jobs.db: an older file gains them when the studio opens it.
ADDED_COLUMNS = {"position": "REAL", "gpus": "TEXT"}
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
    gpus: str | None  # the GPUs it ran on ("0,1"); "" without a GPU; None until it starts

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
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

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

    def claim(self, job_id: int, gpus: list[str]) -> bool:
        """Mark a waiting job running on `gpus`; False if it stopped waiting meanwhile (cancelled)."""
        with self.lock, self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'running', started = ?, gpus = ? WHERE id = ? AND state = 'queued'",
                (time.time(), ",".join(gpus), job_id),
            )
        return cur.rowcount == 1

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


@dataclass
class Running:
    """A job the worker started: its process and the GPUs it holds until it ends."""

    job_id: int
    process: subprocess.Popen
    gpus: list[str]


class Worker:
    """Starts queued jobs as subprocesses and records how they end.

    `gpus` are the GPU ids jobs may use (gpus.detect_gpus); none (a CPU machine): one job at a time. With
    GPUs: every waiting job whose GPU count (gpus.gpus_wanted: 1, or K for `--nproc K`) fits in the free
    ones starts, in queue order, pinned to its own with CUDA_VISIBLE_DEVICES; they are free again when it
    ends, however it ends (exit, crash, Stop; a studio restart starts with every GPU free).
    """

    def __init__(self, store: JobStore, gpus: list[str] | None = None, poll_s: float = 0.5):
        self.store = store
        self.gpus = list(gpus or [])
        self.poll_s = poll_s
        self.running: dict[int, Running] = {}
        self.lock = threading.Lock()  # `running` is the worker thread's, read by the pages
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="studio-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Studio shutdown: SIGTERM the running jobs so they checkpoint; they are marked interrupted."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

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

    def free_gpus(self) -> list[str]:
        """The studio's GPUs that no running job holds, in the studio's order."""
        with self.lock:
            held = {gpu for running in self.running.values() for gpu in running.gpus}
        return [gpu for gpu in self.gpus if gpu not in held]

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._reap()
                self._start_waiting()
            except Exception:  # a failing pass (a locked jobs.db) must not end the queue for good
                log.exception("the studio's job queue failed a pass; trying again")
            self.stopping.wait(self.poll_s)
        with self.lock:
            processes = [running.process for running in self.running.values()]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        self._reap(wait_s=5)

    def _start_waiting(self) -> None:
        """Start waiting jobs, first in the queue first, while the next one fits."""
        for job in self.store.queued():
            if self.stopping.is_set():
                return
            wanted = gpus_wanted(job.command)
            refused = too_many(wanted, self.gpus)
            if refused:  # queued by a studio with more GPUs (--gpus changed): it could never start
                self._refuse(job, refused)
                continue
            if not self.gpus:
                if not self.running:  # the CPU rule: one job at a time
                    self._start(job, [])
                return
            free = self.free_gpus()
            if wanted > len(free):
                # Strict first in, first out: a later job that would fit the free GPUs does not jump this
                # one, or a stream of 1-GPU jobs could keep a 2-GPU job waiting forever (starvation).
                # The user may move a job up the queue to run it first.
                return
            self._start(job, free[:wanted])

    def _start(self, job: Job, gpus: list[str]) -> None:
        if not self.store.claim(job.id, gpus):
            return  # cancelled since the queue was read
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            # nvidia-smi numbers GPUs in PCI bus order; CUDA's default order (fastest first) may differ.
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        try:
            with open(job.log, "ab") as out:
                process = subprocess.Popen(
                    job.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
                )
        except OSError as err:
            log.error("job %d could not start: %s", job.id, err)
            self.store.set(job.id, state="failed", ended=time.time())
            return
        with self.lock:
            self.running[job.id] = Running(job.id, process, gpus)
        self.store.set(job.id, pid=process.pid)
        where = f"on GPU {','.join(gpus)}" if gpus else "without a GPU"
        log.info("job %d started (pid %d) %s: %s", job.id, process.pid, where, " ".join(job.command))

    def _refuse(self, job: Job, why: str) -> None:
        with open(job.log, "a", encoding="utf-8") as out:
            out.write(f"error: not started: {why}\n")
        self.store.set(job.id, state="failed", ended=time.time())
        log.error("job %d not started: %s", job.id, why)

    def _reap(self, wait_s: float = 0.0) -> None:
        """Record the jobs that ended (within `wait_s` seconds, at shutdown) and free their GPUs."""
        deadline = time.monotonic() + wait_s
        with self.lock:
            started = list(self.running.values())
        for running in started:
            try:
                code = running.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            job = self.store.get(running.job_id)
            if job.stop_requested:
                state = "stopped"
            elif self.stopping.is_set():
                state = "interrupted"
            else:
                state = "done" if code == 0 else "failed"
            with self.lock:
                del self.running[running.job_id]  # its GPUs are free
            self.store.set(job.id, state=state, ended=time.time(), exit_code=code)

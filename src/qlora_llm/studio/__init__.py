"""The web studio: launch, watch, stop, resume, evaluate, export and clone runs from a browser.

    qlora-llm studio --runs runs --port 7860

Server-rendered pages on the package's FastAPI stack (app.py: login, runs, a run, the form; evaluation.py,
stages.py, clone.py, upload.py: a run's report, its evaluate/merge/export jobs, clone with changes, data
upload with prepare's preview), a job queue in
SQLite (jobs.py), and a small chart script shipped in static/. Every job is the CLI subprocess a user would run.
"""

from qlora_llm.studio.app import create_app
from qlora_llm.studio.jobs import JobStore

__all__ = ["JobStore", "create_app"]

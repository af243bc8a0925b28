"""One base exception for everything qlora-llm refuses or cannot do.

Each layer raises its own subclass (ConfigError, TrainError, EvalError, ...) with a message that says what
went wrong and how to fix it; the CLI catches `QloraError` once and prints that message as one line, no
traceback. Each subclass keeps the built-in base it had (ValueError for bad settings, RuntimeError for
failures), so code that caught those still does.
"""

from __future__ import annotations


class QloraError(Exception):
    """Something qlora-llm refused or could not do; the message is for the user, in one line."""


class TrainError(QloraError, RuntimeError):
    """Training cannot start or cannot go on; the message says why and what to change. Here, not in
    train.py, because the checkpoint, monitor and trainer modules raise it too."""

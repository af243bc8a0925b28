"""One library call in a process of its own: whatever it allocates goes back to the system when it exits.

    result = call("qlora_llm.pipeline:train_in_child", {"config": ..., "force": False}, what="training")

Why: a process keeps memory after the work that needed it is done. Training leaves ~0.35 GiB on CPU
(oneDNN's kernel caches; no API empties them), and an evaluation leaves the allocator's free pages in
every thread that worked (mimalloc returns a thread's pages only from that thread: after the demo's base
evaluation the fine-tuned model's evaluation peaked 0.25 GiB higher than alone). What runs next in the
same process stacks on that, so `qlora-llm run` trains, and `evaluate` scores the base, in a child.

The request and the result are JSON (the request on the child's stdin, the answer in a file of a
temporary folder). The child is in a session of its own, so a Ctrl-C at the terminal reaches it once,
through us: SIGINT and SIGTERM are forwarded (training stops at the next step with a checkpoint on the
first), and if this process dies, even by SIGKILL, the child gets one SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_write_text
from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)


class ApartError(QloraError, RuntimeError):
    """The child process died before it answered; the message says how and what to do."""


def call(function: str, request: dict[str, Any], *, what: str, again: str = "") -> Any:
    """`function(request)` ("module:name", returning JSON) in a process of its own; its return value.

    The child's QloraError is raised here as the same class (else as ApartError), a KeyboardInterrupt as
    KeyboardInterrupt. `what` names the work and `again` says what running the same command again does,
    in the error for a child that died.
    """
    import subprocess
    import sys
    import tempfile
    import threading

    from qlora_llm import quiet

    with tempfile.TemporaryDirectory(prefix="qlora-llm-apart-") as tmp:
        out = Path(tmp) / "result.json"
        level = logging.getLogger("qlora_llm").getEffectiveLevel()
        command = [sys.executable, "-m", "qlora_llm.apart", function, str(out), str(level)]
        command.append(str(int(quiet.installed())))
        child = subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
        try:
            assert child.stdin is not None
            child.stdin.write(json.dumps({"parent": os.getpid(), "request": request}).encode())
            child.stdin.close()
            code = child.wait()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        answer = json.loads(out.read_text()) if out.is_file() else {}
    if "result" in answer:
        return answer["result"]
    if answer.get("interrupted"):
        raise KeyboardInterrupt
    if "error" in answer:
        raise _library_error(answer["kind"], answer["error"])
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    hint = (
        " (out of memory? `qlora-llm plan CONFIG` shows what the run needs)"
        if code == -signal.SIGKILL
        else ""
    )
    raise ApartError(f"the {what} process {how}{hint}; its own messages are above. {again}".rstrip())


def _library_error(kind: str, message: str) -> Exception:
    """The child's refusal as the same error class here where it takes a message alone, else ApartError."""
    import importlib

    module, _, name = kind.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        err = cls(message)
    except Exception:  # a class with other constructor arguments: its message is what the user reads
        return ApartError(message)
    return err if isinstance(err, QloraError) else ApartError(message)


def _child(function: str, out: Path, level: int, install_filters: bool) -> int:
    """The process `call` starts: the request on stdin, the outcome as JSON in `out`."""
    import ctypes
    import importlib
    import sys

    from qlora_llm import quiet

    sent = json.loads(sys.stdin.read())
    if sys.platform.startswith("linux"):
        # Told when the parent dies (even by SIGKILL), so no orphan works on; checked after. Not as SIGTERM:
        # the kernel repeats the notice as each of the dying parent's threads exits, and a second SIGTERM
        # means "stop now, no checkpoint" to training. The first notice asks once for the stop.
        def parent_died(_signum: int, _frame: Any) -> None:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            log.warning("the process that started this one died: stopping")
            signal.raise_signal(signal.SIGTERM)

        signal.signal(signal.SIGHUP, parent_died)
        ctypes.CDLL(None).prctl(1, signal.SIGHUP)  # PR_SET_PDEATHSIG
    if os.getppid() != sent["parent"]:
        return 1
    quiet.setup_logging(level)
    if install_filters:
        quiet.install()
    module, _, name = function.partition(":")
    try:
        answer: dict[str, Any] = {"result": getattr(importlib.import_module(module), name)(sent["request"])}
    except KeyboardInterrupt:
        answer = {"interrupted": True}
    except QloraError as err:
        answer = {"error": str(err), "kind": f"{type(err).__module__}.{type(err).__qualname__}"}
    atomic_write_text(out, json.dumps(answer))
    if os.getppid() != sent["parent"]:  # the caller that reads the answer and removes its folder died
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0 if "result" in answer else 1


if __name__ == "__main__":
    import sys

    sys.exit(_child(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))

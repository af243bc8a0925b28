"""Keep third-party noise a user can do nothing about off the terminal, each filter as narrow as it can be.

Filtered by message and module, never by category alone, so a new warning from the same library still
shows. Our own warnings are untouched. What is filtered and why:
- bitsandbytes, at import on a CPU with AVX512-BF16, tries to fetch a faster kernel from the Hugging
  Face Hub (`kernels-community`) and logs "Failed to load CPU gemm_4bit_forward ..." when the optional
  `kernels` package is missing; its own kernel is used instead, and our log says which (cpu4bit.py).
  Where `kernels` is installed (0.19 and later) and the Hub is offline, it first logs "Skipping
  publisher trust check for 'kernels-community/..." for the same attempt: the same non-event.
- transformers 5 renamed gradient checkpointing to activation checkpointing and warns whenever PEFT or
  TRL still use the old names (`is_gradient_checkpointing`, `gradient_checkpointing_enable`, DPO's
  `gradient_checkpointing_disable` around its reference pass); our own
  code uses the new ones.
- TRL warns on every import of `trl.experimental`, where ORPO's trainer lives: `train.method=orpo` is a
  choice the user made, and our log says it runs on TRL's experimental trainer.
- the per-call progress bars of `datasets` (TRL's "Building labels ...") and of transformers' weight
  loading and saving: our progress bar and log lines say what is happening.

    install()   # once, by the command-line entry points, before the libraries are imported

Only the command-line entry points call it; the library itself never changes global state.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
KERNELS_TRUST_NOTICE = "Skipping publisher trust check for 'kernels-community/"
RENAMED_CHECKPOINTING = (
    r"`(is_)?gradient_checkpointing(_enable|_disable|_kwargs)?` is deprecated and will be removed in v6"
)


TRL_EXPERIMENTAL = r"You are importing from 'trl\.experimental'"


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_installed = False

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "matplotlib", "PIL", "absl", "lm_eval")
"""Loggers held at WARNING: lm-eval logs a dozen lines per task per model at INFO, the rest per request."""


def setup_logging(level: int) -> None:
    """The command line's logging: our records at `level` on stderr, one line each, the noisy held back."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def installed() -> bool:
    """Whether this process installed the filters (a child process of ours installs them when so)."""
    return _installed


def install() -> None:
    """Install the filters; idempotent."""
    global _installed
    _installed = True
    for name, notice in (
        (BITSANDBYTES_CPU_LOGGER, KERNELS_NOTICE),
        (KERNELS_HUB_LOGGER, KERNELS_TRUST_NOTICE),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(notice))
    warnings.filterwarnings(
        "ignore", message=RENAMED_CHECKPOINTING, category=FutureWarning, module="transformers"
    )
    warnings.filterwarnings("ignore", message=TRL_EXPERIMENTAL)
    # datasets reads it at import; Hub downloads keep their bars (a 14 GB download wants an ETA).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()

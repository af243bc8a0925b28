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
- lm-eval warns, per task and load, that "custom kwargs can be passed to `--metadata` in console": our
  offline tasks read their data through a function, which is what triggers it; there is no console of
  lm-eval's to pass them to. It also warns, per model, that it was given a loaded model rather than a
  name: benchmarks.py does that on purpose (the model the evaluation already loaded, in one process).
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


LM_EVAL_TASK_LOGGER = "lm_eval.api.task"
LM_EVAL_CUSTOM_DATASET_NOTICE = ": Custom kwargs can be passed to `--metadata`"
"""lm-eval warns so (two lines) for every task whose data is read by a function, as our offline tasks are
(benchmarks.py), on every load: about its command line, which the user of ours does not have."""
LM_EVAL_HF_LOGGER = "lm_eval.models.huggingface"
LM_EVAL_MODEL_NOTICES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)
"""lm-eval's notices that it was handed a loaded model (benchmarks.py does so, one process, on purpose)."""
TRL_EXPERIMENTAL = r"You are importing from 'trl\.experimental'"


class _DropMessages(logging.Filter):
    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


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
    for name, *notices in (
        (BITSANDBYTES_CPU_LOGGER, KERNELS_NOTICE),
        (KERNELS_HUB_LOGGER, KERNELS_TRUST_NOTICE),
        (LM_EVAL_TASK_LOGGER, LM_EVAL_CUSTOM_DATASET_NOTICE),
        (LM_EVAL_HF_LOGGER, *LM_EVAL_MODEL_NOTICES),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*notices))
    warnings.filterwarnings(
        "ignore", message=RENAMED_CHECKPOINTING, category=FutureWarning, module="transformers"
    )
    warnings.filterwarnings("ignore", message=TRL_EXPERIMENTAL)
    # datasets reads it at import; Hub downloads keep their bars (a 14 GB download wants an ETA).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()

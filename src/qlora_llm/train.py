"""The training layer: `train(cfg)` fine-tunes a 4-bit (QLoRA) or plain base model with LoRA via TRL.

    result = train(load_config("configs/smollm2-cpu.yaml"), resume="auto")

Read top to bottom, it does what the seed's data flow says: load and split the prepared JSONL, tokenize
it with the one template (loss on the completion only, EOS learned), load the base model in NF4 on the
chosen device, attach LoRA, run TRL's SFTTrainer with early stopping and checkpoints, and write the
final adapter. What it adds, and why it is written here rather than found in TRL:
- checkpoints are staged under a hidden name and renamed into place when complete, so a crash or
  `kill -9` mid-save never leaves a checkpoint that resume would pick (Trainer writes in place);
- SIGTERM / Ctrl-C save a checkpoint at the next step boundary and stop; a non-finite loss stops
  before the bad update is applied; an out-of-memory error says which settings to lower;
- every run folder is self-describing: resolved config, manifest, metrics.jsonl, loss.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qlora_llm.atomic import atomic_write_text
from qlora_llm.checkpoint import (
    CHECKPOINT_FILES,
    SaveFailed,
    check_processes,
    check_resumable,
    checkpoint_identity,
    complete_checkpoints,
    last_good,
    verify_checksums,
    write_final_adapter,
)
from qlora_llm.config import Config, save_config
from qlora_llm.data import load_examples, split_examples, tokenize_examples, tokenize_pairs
from qlora_llm.errors import TrainError
from qlora_llm.fingerprint import base_model_identity, library_versions, sha256_file
from qlora_llm.memory import peak_bytes
from qlora_llm.model import adapter_folder, ensure_pad_token
from qlora_llm.monitor import (
    make_monitor,
    make_tracker_params,
    plot_loss,
    setup_trackers,
    stop_on_signals,
)
from qlora_llm.replay import mix
from qlora_llm.templates import render, resolve_template

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_adapter: Path | None
    global_step: int
    stopped: Literal["completed", "early_stopping", "SIGTERM", "SIGINT"]
    summary: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True
    """False in every process of a multi-process run but rank 0, which alone wrote files and reports."""

    @property
    def exit_code(self) -> int:
        """What a CLI should exit with: 143 after SIGTERM, 130 after Ctrl-C, as shells expect."""
        return {"SIGTERM": 143, "SIGINT": 130}.get(self.stopped, 0)


def _method_args(method: str, cfg: Config, beta: float) -> tuple[type, dict[str, Any]]:
    """TRL's config class for `method` and the settings only it takes."""
    t = cfg.train
    if method == "sft":
        from trl import SFTConfig

        return SFTConfig, {
            "train_sampling_strategy": "group_by_length" if t.group_by_length and not t.packing else "random",
            "packing": t.packing,
            "packing_strategy": "bfd",
            "padding_free": t.packing,
            "max_length": cfg.data.max_seq_length,
            "completion_only_loss": not t.train_on_prompt,
        }
    if method == "dpo":
        from trl import DPOConfig

        # Pairs are tokenized and length-checked by us (tokenize_pairs): nothing for TRL to cut.
        extra = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, t.sft_weight]} if t.sft_weight else {}
        return DPOConfig, {"beta": beta, "max_length": None, "precompute_ref_log_probs": False, **extra}
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig, {
        "beta": beta,
        "max_length": cfg.data.max_seq_length,
        "remove_unused_columns": False,
    }


def _check_kind(records: list[dict], method: str, path: Path) -> None:
    from qlora_llm.data import is_pair

    pairs = bool(records) and is_pair(records[0])
    if method == "sft" and pairs:
        raise TrainError(f"{path} holds preference pairs: set train.method=dpo or orpo to tune on them.")
    if method != "sft" and records and not pairs:
        raise TrainError(
            f"train.method={method} needs preference pairs (prompt, chosen, rejected); {path} holds "
            "supervised examples. Prepare a pairs file, or set train.method=sft."
        )


# --------------------------------------------------------------------------------------------------
# Checkpoints


def check_context(cfg: Config) -> None:
    """`data.max_seq_length` within the model's context, said before anything is loaded or tokenized."""
    from qlora_llm.plan import PlanError, load_model_config

    try:
        config, _ = load_model_config(cfg.model.name, cfg.model.revision)
    except PlanError:  # no config.json to read offline: the model's own loading will say what is wrong
        return
    context = config.get("max_position_embeddings")
    if context and cfg.data.max_seq_length > context:
        raise TrainError(
            f"data.max_seq_length={cfg.data.max_seq_length} is beyond the context of {cfg.model.name} "
            f"({context} tokens, its max_position_embeddings): set data.max_seq_length={context} or less."
        )


def fsdp_settings(quantized: bool) -> dict[str, Any]:
    """TrainingArguments for FSDP: full sharding of each decoder layer, one full adapter at the end.

    FSDP1 with `use_orig_params`, the path PEFT and bitsandbytes document for QLoRA: the frozen 4-bit
    weights (stored in the compute dtype, see load_base_model's quant_storage) and the trainable LoRA
    weights share flat parameters. Checkpoints use the full state dict: a LoRA adapter and its optimizer
    state are small, and a full checkpoint is the same files as a one-process one.
    """
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 1,
            "use_orig_params": True,
            # Wrap each decoder layer (the model's `_no_split_modules`): one layer gathered at a time.
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT",
            # Rank 0 reads the weights, the others get them by broadcast (a plain base only:
            # transformers loads a quantized one on every rank).
            "cpu_ram_efficient_loading": not quantized,
            "sync_module_states": True,
        },
    }


# --------------------------------------------------------------------------------------------------
# Trainer pieces


@contextlib.contextmanager
def _cpu_loss_tiles(device: str) -> Iterator[None]:
    """TRL's fused LM head on CPU: smaller tiles, and only the labelled positions scored; put back after.

    Without Triton, TRL folds each logits tile with plain torch ops that hold several fp32 temporaries of
    the tile's size: 1024 tokens x 32768 vocabulary entries is 128 MiB each, ~1 GiB for a moment in every
    step, half of the whole run's peak for SmolLM2. TRL has no setting for the tile, so its two module
    constants are set here; smaller tiles do the same arithmetic (bench/loss_tiles.py measures both).

    TRL gathers the positions that have a label before the head only where its Triton kernels run
    (`_use_triton`): elsewhere it scores every position and zeroes the unlabelled ones, because on
    compiling backends (Neuron) a batch-dependent row count recompiles. The CPU fold is plain eager torch,
    which compiles nothing, so the gather is switched on here: with the loss on the answer only, the
    prompt's positions (most of a summarization example's) no longer pass through the head, forward and
    backward. Each labelled position's log-probability is the same arithmetic on the same row, but the
    head's matmul has fewer rows, and a CPU matmul may round a row differently with another row count:
    a whole run is not bit-identical to one that scores every position (docs/train.md).
    """
    if device != "cpu":
        yield
        return
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    from qlora_llm.plan import CPU_LOSS_TILE

    saved = kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_utils._use_triton
    kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LOSS_TILE
    # Read only by the fused forward's `compact` switch; the kernel module keeps its own reference, so the
    # fold itself still runs the torch ops.
    trl_utils._use_triton = _compact_on_cpu(saved[2])
    try:
        yield
    finally:
        kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_utils._use_triton = saved


def _compact_on_cpu(use_triton: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """TRL's `_use_triton`, answering yes for the CPU: score only the labelled positions there."""

    def compact(device: Any) -> bool:
        return device.type == "cpu" or use_triton(device)

    return compact


def _apply_checkpointing(args: Any, setting: bool | str, memory: Any) -> str:
    """Set the Trainer's checkpointing from `train.gradient_checkpointing` (auto: the plan's choice)."""
    if setting != "auto":
        return "on" if setting else "off"
    if memory is None:
        log.info("gradient checkpointing auto: on for every layer (no memory plan to decide with)")
        return "auto: on (no memory plan)"
    # Both names: TRL still reads transformers' deprecated `gradient_checkpointing*` aliases.
    args.activation_checkpointing = args.gradient_checkpointing = memory.setup["gradient_checkpointing"]
    args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = {
        "use_reentrant": False,
        "every_n_layers": memory.setup["every_n_layers"],
    }
    log.info(
        "gradient checkpointing %s; planned peak %.2f GiB (in %s) of %.2f GiB usable",
        memory.checkpointing,
        memory.peak / 2**30,
        memory.peak_stage,
        memory.usable_memory / 2**30,
    )
    return memory.checkpointing


def _replay_file(cfg: Config) -> Path:
    """The cached file of the base's answers for self-replay (data.replay_fraction), made on first use."""
    from qlora_llm.replay import base_answers

    if cfg.train.method != "sft":
        raise TrainError("data.replay_fraction mixes supervised examples into SFT; set it to 0 for DPO/ORPO.")
    return base_answers(cfg, base_model_identity(cfg.model))


SMOOTH_LOGS = 3  # logged train losses averaged at each end of the summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


CPU_OPTIMIZERS = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit"}


def _optimizer_for(optim: str, device: str) -> str:
    """Paged optimizers page their state from GPU to CPU memory under pressure; on CPU there is nothing to page."""
    if device == "cpu" and optim in CPU_OPTIMIZERS:
        log.info(
            "optimizer %s -> %s on CPU: paging moves optimizer state off the GPU, which a CPU run "
            "does not have (same AdamW math)",
            optim,
            CPU_OPTIMIZERS[optim],
        )
        return CPU_OPTIMIZERS[optim]
    return optim


def train(cfg: Config, *, resume: str | None = None, force: bool = False) -> TrainResult:
    """Fine-tune `cfg.model.name` with LoRA on `cfg.data.train_file`; return where everything went.

    `resume`: None refuses a run folder that already has checkpoints; "auto" continues from the newest
    complete checkpoint (or starts fresh if there is none); a path continues from that checkpoint.
    `force` trains even when the memory plan says it will not fit.
    """
    from transformers import set_seed

    from qlora_llm.model import describe_device, load_tokenizer, pick_compute_dtype, pick_device

    t, m = cfg.train, cfg.model
    run_dir = Path(t.output_dir)
    device = pick_device(m.device)
    dtype = pick_compute_dtype(m.compute_dtype, device, probe_cpu=True)
    log.info("device: %s; compute dtype %s", describe_device(device), str(dtype).removeprefix("torch."))

    checkpoint = _resume_point(run_dir, resume)
    _check_settings(cfg)
    tracker_env = setup_trackers(t.report_to, run_dir)
    tokenizer = load_tokenizer(m.name, m.revision, m.cache_dir, m.trust_remote_code)
    # The run records the template it really used (`default` resolved for this tokenizer), so it is
    # prompted, resumed and compared with that one ever after.
    cfg = cfg.model_copy(deep=True)
    cfg.model.template = resolve_template(m.template, tokenizer)
    data = _load_data(cfg, tokenizer)
    ensure_pad_token(tokenizer)

    args = _training_args(cfg, device, dtype, has_eval=bool(data.eval_rows), fresh=checkpoint is None)
    # Reading the world size sets up the process group (gloo on CPU, nccl on CUDA) in a launched worker.
    world, main = args.world_size, args.should_save
    _check_processes(cfg, args, device, checkpoint)
    checkpointing = _fit_memory(cfg, args, world, force, data.train_rows + data.eval_rows)

    # Seeded first: LoRA's A matrices are drawn at get_peft_model, before the Trainer seeds anything,
    # and runs must be reproducible.
    set_seed(t.seed)
    model, targets = _build_model(cfg, args, device, dtype, checkpoint)
    if device == "cpu" and cfg.lora.dropout_masks != "torch":
        from qlora_llm.plan import planned_steps

        _use_hash_dropout(
            cfg, model, dtype, checkpointing, steps=planned_steps(cfg, len(data.train_rows), world)
        )
    if device == "cpu" and str(dtype) != "torch.float32":
        _lora_inputs_as_they_come(model)
    manifest = _manifest(cfg, data, tokenizer, targets, device, world)
    if main:  # only rank 0 writes; the others hold the same model and data
        _start_run_folder(run_dir, cfg, manifest, fresh=checkpoint is None)

    stop_requests: list[str] = []
    monitor = make_monitor(run_dir, device, stop_requests, world)
    trainer = _make_trainer(cfg, model, args, tokenizer, data, manifest, monitor, device)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    log.info(
        "LoRA r=%d on %s: %s trainable parameters; %d train / %d eval examples; resume from %s",
        cfg.lora.r,
        ",".join(targets),
        f"{trainable:,}",
        len(data.train_rows),
        len(data.eval_rows),
        checkpoint or "scratch",
    )

    try:
        stopped, final, elapsed = _fit(
            trainer, cfg, tokenizer, manifest, checkpoint, stop_requests, monitor, device, main
        )
    finally:
        for key in tracker_env:  # the next run in this process picks its own folders
            os.environ.pop(key, None)
    _finish_processes(trainer, world)
    step = trainer.state.global_step
    if not main:
        return TrainResult(run_dir, final, step, stopped, main_process=False)  # type: ignore[arg-type]
    summary = _write_summary(run_dir, trainer, monitor, stopped, elapsed, device, dtype, checkpointing)
    summary |= {"trainable_parameters": trainable, "final_adapter": str(final) if final else None}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("training %s after %d steps in %.0fs", stopped, step, elapsed)
    return TrainResult(run_dir, final, step, stopped, summary)  # type: ignore[arg-type]


def _resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from (None: a fresh start), its chain's checksums verified."""
    existing = complete_checkpoints(run_dir)
    checkpoint: Path | None = None
    if resume is None and existing:
        raise TrainError(
            f"{run_dir} already has checkpoints ({existing[-1].name}, ...). Continue it with "
            "--resume auto, or set train.output_dir to a new folder."
        )
    if resume == "auto":
        checkpoint = existing[-1] if existing else None
    elif resume:
        checkpoint = Path(resume)
        if checkpoint not in existing and not all((checkpoint / f).is_file() for f in CHECKPOINT_FILES):
            raise TrainError(
                f"{checkpoint} is not a complete checkpoint (needs {', '.join(CHECKPOINT_FILES)})."
            )
    if checkpoint is not None:
        verify_checksums(checkpoint, existing[: existing.index(checkpoint)] if checkpoint in existing else [])
    return checkpoint


def _check_settings(cfg: Config) -> None:
    """What can be refused before anything loads: the context, the start adapter, early stopping's saves."""
    t = cfg.train
    check_context(cfg)
    if cfg.model.adapter is not None:
        adapter_folder(cfg.model.adapter, "model.adapter=")
    if t.early_stopping_patience and t.save_steps % t.eval_steps:
        raise TrainError(
            f"train.save_steps={t.save_steps} must be a multiple of train.eval_steps={t.eval_steps}: "
            "early stopping keeps the best checkpoint, so every save needs an evaluation."
        )


@dataclass
class _Data:
    """The run's examples as read (for the manifest) and as tokenized (for the Trainer)."""

    train_records: list[dict]
    train_rows: list[dict]
    eval_rows: list[dict]
    replay_file: Path | None


def _load_data(cfg: Config, tokenizer: Any) -> _Data:
    """The prepared JSONL, split 90/10 unless an eval file is given, self-replay mixed in, tokenized."""
    t = cfg.train
    records = load_examples(cfg.data.train_file)
    _check_kind(records, t.method, cfg.data.train_file)
    if cfg.data.eval_file:
        train_records, eval_records = records, load_examples(cfg.data.eval_file)
        _check_kind(eval_records, t.method, cfg.data.eval_file)
    else:
        train_records, eval_records = split_examples(records, cfg.data.eval_fraction, cfg.data.seed)
    replay_file = _replay_file(cfg) if cfg.data.replay_fraction else None
    if replay_file is not None:
        task = len(train_records)
        train_records = mix(
            train_records, load_examples(replay_file), cfg.data.replay_fraction, cfg.data.seed
        )
        log.info(
            "self-replay: %d of the base model's own answers beside %d task examples",
            len(train_records) - task,
            task,
        )
    tokenize = tokenize_examples if t.method == "sft" else tokenize_pairs
    template, max_len = cfg.model.template, cfg.data.max_seq_length
    train_rows, dropped = tokenize(train_records, tokenizer, template, max_len)
    eval_rows, eval_dropped = tokenize(eval_records, tokenizer, template, max_len)
    if dropped or eval_dropped:
        log.warning(
            "dropped %d train / %d eval examples longer than data.max_seq_length=%d",
            dropped,
            eval_dropped,
            max_len,
        )
    if not train_rows:
        raise TrainError(f"no training example fits data.max_seq_length={max_len}.")
    if t.eval_max_examples is not None and len(eval_rows) > t.eval_max_examples:
        log.info(
            "evaluating during training on the first %d of %d eval examples (train.eval_max_examples)",
            t.eval_max_examples,
            len(eval_rows),
        )
        eval_rows = eval_rows[: t.eval_max_examples]
    if t.early_stopping_patience and not eval_rows:
        raise TrainError(
            "early stopping needs eval data: set data.eval_file or data.eval_fraction > 0, "
            "or train.early_stopping_patience=0."
        )
    return _Data(train_records, train_rows, eval_rows, replay_file)


def _training_args(cfg: Config, device: str, dtype: Any, *, has_eval: bool, fresh: bool) -> Any:
    """TRL's arguments for the method: our settings in its names."""
    import torch

    t = cfg.train
    args_class, method_args = _method_args(t.method, cfg, t.beta)
    return args_class(
        output_dir=str(Path(t.output_dir)),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        weight_decay=t.weight_decay,
        neftune_noise_alpha=t.neftune_noise_alpha,
        max_grad_norm=t.max_grad_norm,
        optim=_optimizer_for(t.optim, device),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=has_eval and t.early_stopping_patience > 0,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=t.logging_steps,
        report_to=t.report_to or "none",
        seed=t.seed,
        data_seed=t.seed,
        disable_tqdm=True,  # our bar shows loss, tokens/s and memory
        dataloader_num_workers=0,
        # The untrained baseline, so a fall in eval loss is visible; after the model is wrapped for
        # many processes (an evaluate() before train() marks it prepared and DDP never wraps it).
        # Our evaluate() puts the RNG back, so it does not change the run.
        eval_on_start=has_eval and fresh,
        # Every trainable parameter (LoRA) is used in every forward: no search for unused ones. The
        # frozen base and its buffers are the same files on every rank: nothing to broadcast per step.
        ddp_find_unused_parameters=False,
        # `auto` is decided once the memory plan has been made (_fit_memory).
        activation_checkpointing=t.gradient_checkpointing is not False,
        activation_checkpointing_kwargs={"use_reentrant": False},
        **method_args,
        **(
            fsdp_settings(cfg.model.quantization != "none")
            if t.distributed == "fsdp" and device == "cuda"
            else {}
        ),
    )


def _check_processes(cfg: Config, args: Any, device: str, checkpoint: Path | None) -> None:
    """Many processes: FSDP only on GPUs, the global batch said once, a checkpoint resumed with as many."""
    t = cfg.train
    world = args.world_size
    if t.distributed == "fsdp" and device == "cpu" and world > 1:
        # accelerate's FSDP plugin asks for an accelerator device when it is built (no CPU FSDP there).
        raise TrainError(
            "train.distributed=fsdp needs GPUs (accelerate's FSDP support has no CPU device); "
            "on CPU use train.distributed=ddp."
        )
    if args.should_save and world > 1:
        log.info(
            "%d processes (%s, %s): global batch %d = %d per device x %d processes x %d accumulation steps",
            world,
            t.distributed,
            args.distributed_state.backend,
            t.batch_size * world * t.gradient_accumulation_steps,
            t.batch_size,
            world,
            t.gradient_accumulation_steps,
        )
    if checkpoint is not None:
        check_processes(checkpoint, world)


def _fit_memory(cfg: Config, args: Any, world: int, force: bool, rows: list[dict]) -> str:
    """The memory plan (sized by the run's own tokenized rows): it decides checkpointing `auto`, and
    refuses a run it says will not fit."""
    from qlora_llm.plan import PlanError, plan

    try:
        memory = plan(cfg, processes=world, rows=rows)
    except PlanError as err:  # an architecture or config.json the planner cannot read: train unchecked
        log.warning("memory plan unavailable (%s); training without the fit check", err)
        memory = None
    checkpointing = _apply_checkpointing(args, cfg.train.gradient_checkpointing, memory)
    if memory is not None and not memory.fits:
        if not force:
            raise TrainError(
                f"this run is estimated not to fit: {memory.verdict} Run `qlora-llm plan` for the "
                "breakdown, lower the settings it suggests, or pass --force."
            )
        log.warning("estimated not to fit, training anyway (--force): %s", memory.verdict)
    return checkpointing


def _build_model(
    cfg: Config, args: Any, device: str, dtype: Any, checkpoint: Path | None
) -> tuple[Any, list[str]]:
    """The base (4-bit for QLoRA) with LoRA on the target modules, or the adapter being continued."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_llm.model import load_base_model, resolve_target_modules

    m = cfg.model
    # One GPU per process (LOCAL_RANK); FSDP shards 4-bit weights only when they are stored in the
    # dtype its flat parameters have, so the packed bytes are kept in the compute dtype there.
    model = load_base_model(
        m,
        str(args.device) if device == "cuda" else device,
        dtype=dtype,
        quant_storage=dtype if args.fsdp else None,
    )
    if m.quantization != "none" and m.upcast_layers:
        # Checkpointing is switched on by the Trainer (activation_checkpointing), under the name
        # transformers 5 uses; PEFT would switch it on again under the old one.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif m.quantization != "none":
        log.info(
            "embeddings, norms and the output head in %s (model.upcast_layers=false)",
            str(dtype).removeprefix("torch."),
        )
    explicit = "target_modules" in cfg.lora.model_fields_set
    targets = resolve_target_modules(model, cfg.lora.target_modules)
    if explicit and targets != cfg.lora.target_modules:
        raise TrainError(
            f"lora.target_modules {cfg.lora.target_modules} are not all in {type(model).__name__}; "
            f"its linear layers are: {', '.join(targets)}."
        )
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, targets)
    if m.adapter is not None:
        # Continue an adapter (DPO after SFT): its own rank and targets; TRL keeps a frozen copy of it as
        # DPO's reference.
        from qlora_llm.model import attach_adapter

        folder = adapter_folder(m.adapter, "model.adapter=")
        model = attach_adapter(model, folder, trainable=True, base_name=m.name, allow_pickle=m.allow_pickle)
        log.info("starting from the adapter in %s (its LoRA settings, not lora.*)", m.adapter)
        return model, targets
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), targets


def _use_hash_dropout(cfg: Config, model: Any, dtype: Any, checkpointing: str, steps: int) -> None:
    """LoRA dropout masks from dropout.py's hash on CPU, compiled when that pays for this run."""
    from qlora_llm.dropout import fuse_hash_dropout, lora_input_dtypes, mask_draws, use_hash_dropout

    swapped = use_hash_dropout(model)
    if not swapped:
        return
    dtypes = lora_input_dtypes(dtype, cfg.model.quantization != "none" and cfg.model.upcast_layers)
    checkpointed = checkpointing.startswith(("on", "auto: on"))
    draws = mask_draws(swapped, steps, cfg.train.gradient_accumulation_steps, checkpointed)
    shape = (cfg.train.batch_size, cfg.data.max_seq_length, model.config.hidden_size)
    chosen = fuse_hash_dropout(cfg.lora.dropout, shape, dtypes, draws, cfg.lora.dropout_masks)
    log.info(
        "LoRA dropout on CPU: masks from a counter-based hash in %d layers, %s",
        swapped,
        chosen,
    )


def _lora_inputs_as_they_come(model: Any) -> None:
    """Stop PEFT casting each LoRA layer's input to the LoRA weights' dtype (fp32) under CPU autocast.

    PEFT skips that cast when `torch.is_autocast_enabled()`, which asks about CUDA's autocast only: on a
    CPU training in bf16 every LoRA input went bf16 -> fp32 (a copy), through dropout in fp32, and back
    to bf16 inside autocast's matmul (another copy), in the forward, the recompute and the backward.
    Autocast decides the matmul's dtype either way, so the result is the same matmul.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def _manifest(
    cfg: Config, data: _Data, tokenizer: Any, targets: list[str], device: str, world: int
) -> dict[str, Any]:
    """What the run is: identity (for resume), base model, template, tokens, data hashes, versions."""
    from qlora_llm.data import is_pair, pair_examples
    from qlora_llm.model import describe_device

    t, m = cfg.train, cfg.model
    files = [cfg.data.train_file] + ([cfg.data.eval_file] if cfg.data.eval_file else [])
    files += [data.replay_file] if data.replay_file is not None else []
    first = data.train_records[0]
    first = pair_examples(first)[0] if is_pair(first) else first
    example = render(first, m.template, tokenizer)
    replayed = sum(r.get("source") == "replay" for r in data.train_records)
    return {
        "identity": {**checkpoint_identity(cfg), "target_modules": sorted(targets)},
        "base_model": base_model_identity(cfg.model),
        "template": {"name": m.template, "example": example.text},
        "tokens": {
            "bos_id": tokenizer.bos_token_id,
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
            "eos": tokenizer.eos_token,
        },
        "data": {str(p): sha256_file(Path(p)) for p in files}
        | {"train_examples": len(data.train_rows), "eval_examples": len(data.eval_rows)}
        | ({"replay_examples": replayed} if data.replay_file else {}),
        "device": describe_device(device),
        "versions": library_versions(),
        "seed": t.seed,
        "method": t.method,
        "start_adapter": str(m.adapter) if m.adapter is not None else None,
        # The data order and the saved RNG states are per process: a checkpoint resumes with as many.
        "processes": world,
        "distributed": t.distributed if world > 1 else None,
    }


def _start_run_folder(run_dir: Path, cfg: Config, manifest: dict[str, Any], *, fresh: bool) -> None:
    """The run folder's config and manifest; what a cut-short save or an earlier attempt left, removed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".staging-checkpoint-*"):  # a save cut short by a kill or a crash
        shutil.rmtree(stale, ignore_errors=True)
    if fresh:
        # A fresh start: rows left by an earlier attempt that never reached a checkpoint would mix in.
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def _make_trainer(
    cfg: Config,
    model: Any,
    args: Any,
    tokenizer: Any,
    data: _Data,
    manifest: dict[str, Any],
    monitor: Any,
    device: str,
) -> Any:
    """TRL's trainer for the method with our callbacks: early stopping, the monitor, trackers."""
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, PrinterCallback

    from qlora_llm import trainer as trainer_module  # imports TRL: only when training

    t = cfg.train
    callbacks = []
    if data.eval_rows and t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    callbacks.append(monitor)
    # The pad the tokenizer was given, in the model's configs too (transformers would align them and say so).
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if t.method == "orpo":
        log.info("ORPO runs on TRL's ORPOTrainer, which TRL keeps in trl.experimental (its API may change)")
    start_weights = (
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if cfg.model.adapter is not None
        else {}
    )
    trainer = trainer_module.trainer_class(t.method)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.train_rows),
        eval_dataset=Dataset.from_list(data.eval_rows) if data.eval_rows else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.run_manifest, trainer.run_config, monitor.trainer = manifest, cfg, trainer
    if t.report_to:
        tracker_params = make_tracker_params(cfg, manifest)
        tracker_params.callbacks = list(trainer.callback_handler.callbacks)
        trainer.add_callback(tracker_params)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; our bar and metrics.jsonl show them
    if device == "cpu":
        # TRL casts LoRA weights to bf16 on a 4-bit base even with bf16=False. The trainable weights go
        # back to fp32 (with bf16 compute, autocast runs their matmuls in bf16 and the optimizer updates
        # fp32 masters; without it, bf16 math is ~30x slower on a CPU lacking AVX-512 BF16): a continued
        # adapter (model.adapter) exactly as it was saved, as DPO's reference copy of it is.
        for name, p in trainer.model.named_parameters():
            if name in start_weights:
                p.data = start_weights[name]
            elif p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return trainer


def _fit(
    trainer: Any,
    cfg: Config,
    tokenizer: Any,
    manifest: dict[str, Any],
    checkpoint: Path | None,
    stop_requests: list[str],
    monitor: Any,
    device: str,
    main: bool,
) -> tuple[str, Path | None, float]:
    """Train, then write the final adapter; how it stopped, the adapter and the seconds it took.

    The errors a user can act on (out of memory, a failed save, a non-finite loss) become one TrainError
    that says what to change.
    """
    import torch

    from qlora_llm import trainer as trainer_module

    t, run_dir = cfg.train, Path(cfg.train.output_dir)
    start = time.perf_counter()
    final = None
    try:
        # The handler stays on through the final adapter write: a SIGTERM there lets it finish.
        with stop_on_signals(stop_requests), _cpu_loss_tiles(device):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            elapsed = time.perf_counter() - start
            state = trainer.state
            stopped = "completed"
            if state.max_steps and state.global_step < state.max_steps:
                stopped = "early_stopping"
            # A signal that stopped training left a checkpoint at that step; one that came after the
            # last step boundary (in the final evaluation, say) had none left to save at, so the
            # adapter is written as if it had not come. Decided by the monitor, which all ranks agree
            # on, not by this rank's signals.
            if not monitor.stopped_by_signal:
                final = write_final_adapter(trainer, run_dir, tokenizer, cfg, manifest, main)
            stopped = stop_requests[0] if stop_requests else stopped
    except torch.OutOfMemoryError:
        raise TrainError(
            f"out of memory on {device} at step {trainer.state.global_step}. Lower train.batch_size "
            f"(now {t.batch_size}; raise train.gradient_accumulation_steps to keep the effective batch), "
            f"data.max_seq_length (now {cfg.data.max_seq_length}), or lora.r (now {cfg.lora.r}); keep "
            "train.gradient_checkpointing=true. `qlora-llm plan` shows what fits."
        ) from None
    except SaveFailed as err:
        raise TrainError(
            f"{err}{last_good(run_dir)}. Free some space (or fix the cause) and continue with --resume auto."
        ) from None
    except trainer_module.LossNotFinite as err:
        raise TrainError(f"{err}{last_good(run_dir)}. Lower train.learning_rate or check the data.") from None
    return stopped, final, elapsed


def _finish_processes(trainer: Any, world: int) -> None:
    """Every rank returns once the run's files are complete; the process group closed here."""
    import torch

    trainer.accelerator.wait_for_everyone()
    if world > 1 and torch.distributed.is_initialized():
        # Closed here, not left to interpreter exit: there gloo's threads can still be running when the
        # process ends, and it aborts ("terminate called without an active exception", exit 134; seen
        # once in CI on rank 1 after a complete 2-process run).
        torch.distributed.destroy_process_group()


def _write_summary(
    run_dir: Path,
    trainer: Any,
    monitor: Any,
    stopped: str,
    elapsed: float,
    device: str,
    dtype: Any,
    checkpointing: str,
) -> dict[str, Any]:
    """The loss plot and the run's figures: steps, losses at each end, speed, memory."""
    state = trainer.state
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        plot_loss(metrics_path, run_dir / "loss.png")
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    eval_losses = [r["eval_loss"] for r in rows if "eval_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    smooth = max(1, min(SMOOTH_LOGS, len(losses) // 2))
    return {
        "steps": state.global_step,
        "stopped": stopped,
        "seconds": round(elapsed, 1),
        # One batch's loss swings with its examples: the summary smooths over a few logs at each end.
        "train_loss_first": _mean(losses[:smooth]),
        "train_loss_last": _mean(losses[-smooth:]),
        "train_loss_logs_averaged": smooth,
        "eval_loss_first": eval_losses[0] if eval_losses else None,
        "eval_loss_best": min(eval_losses) if eval_losses else None,
        "best_checkpoint": state.best_model_checkpoint,
        "tokens_trained": trainer.tokens_seen,
        "train_seconds": round(monitor.train_seconds, 1),
        "tokens_per_s": round(trainer.tokens_seen / monitor.train_seconds, 2)
        if monitor.train_seconds
        else None,
        "peak_memory_bytes": peak_bytes(device),
        "load_peak_memory_bytes": monitor.load_peak,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": checkpointing,
    }

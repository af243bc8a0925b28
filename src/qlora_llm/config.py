"""Every setting of qlora-llm and its default, in one place.

One pydantic model per layer (model, data, lora, train, eval, serve), gathered in `Config`. YAML files
under `configs/` carry only what differs from these defaults; `key=value` overrides on the command line
(`train.max_steps=20 lora.r=8`) come last. An unknown key or a wrong type is a `ConfigError` that names
the key and where it came from.

    cfg = load_config("configs/smollm2-cpu.yaml", ["train.max_steps=20"])
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from qlora_llm.errors import QloraError


class ConfigError(QloraError, ValueError):
    """A config file or override is wrong; the message says where and how to fix it."""


class _Section(BaseModel):
    # Field docstrings become descriptions, so `qlora-llm` can show them and the defaults stay documented.
    # No inf or NaN anywhere: `train.weight_decay=.inf` would otherwise pass every range check.
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _one_value_is_a_list_of_one(cls, value: Any, info: ValidationInfo) -> Any:
        """`train.report_to=tensorboard` means `[tensorboard]`, as transformers' own `report_to` takes it."""
        if info.field_name in list_fields(cls) and value is not None and not isinstance(value, list | tuple):
            return [value]
        return value


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(arg) for arg in typing.get_args(annotation))
    return False


def list_fields(section: type[BaseModel]) -> set[str]:
    """The fields of a section that hold a list (a single value given for one becomes a one-item list)."""
    return {name for name, field in section.model_fields.items() if _is_list(field.annotation)}


SEED_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelConfig(_Section):
    name: str = "mistralai/Mistral-7B-Instruct-v0.2"
    """Base model: a Hub id, a local folder, or a built-in name (`qlora-llm models`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; None takes the default branch."""
    quantization: Literal["nf4", "fp4", "none"] = "nf4"
    """4-bit storage type of the frozen base weights; `none` trains plain LoRA on full weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 GB on a 7B model)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Matmul dtype: auto = bf16 on CUDA that supports it, else fp16 on CUDA; on CPU, training takes bf16
    where a quick matmul probe shows this CPU computes it natively (>= 1.3x fp32; AVX-512 BF16 / AMX), else
    fp32, and says why. Evaluation and serving stay fp32 on CPU. LoRA weights and optimizer state stay fp32."""
    upcast_layers: bool = True
    """Training a 4-bit base: keep the layers that stay unquantized (embeddings, norms, output head) in fp32,
    as PEFT's prepare_model_for_kbit_training (the QLoRA recipe) does, so the residual stream between the
    decoder layers is fp32. false keeps them in the 16-bit compute dtype, as LLaMA-Factory's and LitGPT's
    bf16 settings do: no fp32 -> bf16 cast of every projection's input (a checkpointed QLoRA step ~1.2x
    faster on a CPU with AMX, docs/train.md), less activation memory, bf16 rounding of the residual."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: auto picks CUDA when present, else CPU; never falls back silently."""
    cpu_4bit_kernel: Literal["auto", "fused", "plain"] = "auto"
    """4-bit matmul on CPU for evaluation and generation: fused = bitsandbytes' AVX512-BF16 kernel (bf16
    math), plain = dequantize then matmul in compute_dtype; auto = fused where the CPU has AVX512-BF16.
    Training always runs plain."""
    template: Literal["default", "mistral", "auto"] = "default"
    """Prompt format: `mistral` = the seed's `[INST]` format, `auto` = the tokenizer's own chat template,
    `default` = the model's own chat template when it has one, else the seed's format (and the seed's
    format for Mistral-Instruct models, whose own template is that format). A run records the one used."""
    cache_dir: Path = Path("~/.cache/qlora-llm")
    """Where built-in models are converted to HF folders (once)."""
    trust_remote_code: bool = False
    """Run model code shipped with a Hub repository; off unless you trust it."""
    allow_pickle: bool = False
    """Load pickle weights (`*.bin`) when a folder has no safetensors; unpickling can run code."""
    adapter: Path | None = None
    """Start from this LoRA adapter (a run folder or an adapter folder) instead of a fresh one: DPO after
    SFT continues the SFT adapter, which is then also DPO's reference. None starts a fresh adapter."""
    adapter_scale: float = Field(1.0, ge=0.0, le=4.0)
    """Scale of the LoRA delta wherever an adapter is applied or merged: W0 + scale x delta (WiSE-FT).
    1 = as trained, 0 = the base; below 1 trades task gain for general ability (`evaluate`, `merge`)."""


class DataConfig(_Section):
    train_file: Path = Path("data/train.jsonl")
    """Validated training JSONL written by `qlora-llm prepare`."""
    eval_file: Path | None = None
    """Evaluation JSONL; None splits `eval_fraction` off the training file."""
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of examples held out for evaluation (the seed's 90/10 split)."""
    max_seq_length: int = Field(512, gt=0)
    """Longest example in tokens (prompt + completion, counted with the model's tokenizer)."""
    overlength: Literal["drop", "truncate", "error"] = "drop"
    """What to do with an example longer than `max_seq_length`."""
    min_examples: int = Field(10, ge=1)
    """Fewer valid examples than this is an error: too little data to fine-tune on."""
    seed: int = 42
    """Seed of the train/eval split."""
    replay_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Self-replay: add this fraction (of the training examples) of general prompts answered by the base
    model itself, generated once and cached, to keep its general behaviour. 0 = off (SFT only)."""
    replay_prompts: Path = Path("configs/replay_prompts.jsonl")
    """General prompts for self-replay, one {"prompt": ...} per line (none from the evaluation sets)."""
    replay_max_new_tokens: int = Field(96, gt=0)
    """Length limit of the base model's replay answers."""


class LoraSettings(_Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: int = Field(32, gt=0)
    """LoRA scaling numerator (alpha / r = 2)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    dropout_masks: Literal["auto", "compiled", "hash", "torch"] = "auto"
    """On CPU: LoRA dropout masks from a counter-based hash keyed by torch's generator, vectorized (`hash`) or
    fused into one loop by torch.compile (`compiled`: the same masks, not kept for the backward); `auto`: the
    hash, compiled when the run is long enough to pay for compiling and the compiled masks measure faster;
    `torch`: torch's own nn.Dropout (serial)."""
    target_modules: list[str] = Field(default_factory=lambda: list(SEED_TARGET_MODULES))
    """Linear layers that get adapters: the 7 attention and MLP projections."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""


class TrainConfig(_Section):
    output_dir: Path = Path("models/qlora-model")
    """Run folder: checkpoints, final adapter, metrics, plots."""
    num_epochs: float = Field(3.0, gt=0)
    """Passes over the training set (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 runs num_epochs."""
    batch_size: int = Field(2, gt=0)
    """Examples per device per step."""
    gradient_accumulation_steps: int = Field(4, gt=0)
    """Micro-batches summed into one optimizer step."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Share of steps spent warming the learning rate up."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    neftune_noise_alpha: float | None = Field(None, gt=0)
    """NEFTune: uniform noise of size alpha / sqrt(sequence length x width) added to the input embeddings
    in training steps only (transformers' own hook; the paper's values are 5-15). None = off."""
    max_grad_norm: float = Field(0.3, gt=0)
    """Gradient clipping norm (QLoRA paper value)."""
    optim: str = "paged_adamw_32bit"
    """Optimizer: paged AdamW keeps optimizer state off the GPU when memory runs short."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: far less activation memory for ~30% more compute.
    auto = the memory plan decides: off when the run fits the device without it, else on for only as many
    decoder layers as needed (every n-th layer), else on for all; the run logs what it chose."""
    group_by_length: bool = True
    """Batch examples of similar length together to waste less padding."""
    packing: bool = False
    """Padding-free packing of several examples per row, without attention across examples."""
    train_on_prompt: bool = False
    """Also learn the prompt tokens; off = loss on the completion only."""
    early_stopping_patience: int = Field(3, ge=0)
    """Evaluations without eval_loss improvement before stopping; 0 disables early stopping."""
    eval_steps: int = Field(50, gt=0)
    """Evaluate every this many steps."""
    eval_max_examples: int | None = Field(None, gt=0)
    """Evaluate during training on the first this many eval examples only (the same ones every time), to
    make each evaluation cheaper; early stopping and the best checkpoint then follow their loss. None = all."""
    save_steps: int = Field(50, gt=0)
    """Write a checkpoint every this many steps."""
    save_total_limit: int | None = 3
    """Keep at most this many checkpoints (the best is always kept); None keeps all."""
    logging_steps: int = Field(10, gt=0)
    """Log loss and throughput every this many steps."""
    seed: int = 42
    """Seed of weights init, dropout and data order."""
    method: Literal["sft", "dpo", "orpo"] = "sft"
    """sft = supervised fine-tuning on examples; dpo / orpo = preference tuning on chosen/rejected pairs
    (TRL's DPOTrainer / ORPOTrainer). DPO's reference is the starting model (the base with a fresh
    adapter, or `model.adapter`), held as a frozen copy of the adapter: no second model is loaded."""
    beta: float = Field(0.1, gt=0)
    """DPO's beta (how far the tuned model may move from the reference) or ORPO's lambda (the weight of
    its odds-ratio term beside the supervised loss on the chosen answer)."""
    sft_weight: float = Field(0.0, ge=0)
    """DPO: add this weight times the supervised loss on the chosen answers (RPO, Pang et al. 2024). It
    keeps the model writing the chosen kind of answer while it learns the preference: plain DPO on easy
    pairs can win by making every answer unlikely, down to answering nothing. 0 = plain DPO."""
    kl_weight: float = Field(0.0, ge=0)
    """SFT: add this weight times KL(base || tuned) per answer token to the loss, to keep the tuned model's
    answers near the base's (general ability). The base's distribution is the same model with the
    adapter disabled: no second model in memory, one more forward pass per step. 0 = off."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = []
    """Also hand the metrics to these trackers (their packages are optional: `pip install tensorboard`,
    ...), with the run's config and manifest as parameters; offline by default where the tool allows."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With `--nproc N` > 1: ddp = each process holds the whole model, fsdp = weights, gradients and
    optimizer state sharded over the processes (for models that do not fit one GPU)."""


class EvalConfig(_Section):
    data_file: Path | None = None
    """Eval JSONL; None takes the run's eval split."""
    output_dir: Path | None = None
    """Where the report goes; None writes `<run>/eval`."""
    batch_size: int = Field(4, gt=0)
    """Examples per forward pass for perplexity."""
    answers_batch_size: int = Field(8, gt=0)
    """Greedy answers per batch for ROUGE (the same answers at any size, up to float rounding; larger is
    faster on a CPU but holds a KV cache and a prefill of that many long prompts)."""
    max_examples: int | None = None
    """Evaluate at most this many examples; None takes all."""
    max_new_tokens: int = Field(128, gt=0)
    """Generation length for ROUGE and benchmark prompts."""
    speed_runs: int = Field(3, gt=0)
    """Timed runs of the speed benchmark, after one warm-up pass."""
    benchmark_prompts: Path | None = Path("configs/benchmark_prompts.json")
    """Prompts with expected keywords for the qualitative check; None skips it."""
    max_length: int | None = Field(None, gt=1)
    """Perplexity window in tokens; longer texts slide it by `stride`. None = the model's context."""
    stride: int | None = Field(None, gt=0)
    """Step of the sliding window; None = half the window. Each token is scored once."""
    quantization: Literal["none", "nf4", "fp4"] = "none"
    """Weights to evaluate in: full precision by default (what the model really is; NF4 costs quality)."""
    compare: str = "auto"
    """Model to compare against: auto = the base the run was trained from, none, or a model/folder."""
    general_tasks: list[str] = Field(default_factory=lambda: ["arc_easy", "hellaswag", "piqa"])
    """lm-eval likelihood tasks for general ability (offline: arc_easy, arc_challenge, hellaswag, piqa); [] skips."""
    general_generative: list[str] = Field(default_factory=lambda: ["basic_skills_common_knowledge"])
    """Generative general tasks answered greedily through the chat template (basic_skills_*); [] skips."""
    general_limit: int | None = Field(100, gt=0)
    """Items per likelihood task, a fixed seeded subset; None takes all."""
    general_generative_limit: int | None = Field(256, gt=0)
    """Questions per generative task, a fixed seeded subset; None takes all. 256: a paired interval of about
    +-4 points (at 64 it was ~17 points wide, too wide to tell a fine-tune's cost: docs/demo.md)."""
    general_max_new_tokens: int = Field(24, gt=0)
    """Answer length for the generative general tasks (short answers)."""
    general_batch_size: int = Field(16, gt=0)
    """Batch of lm-eval's likelihood requests: its (B, T, vocab) logits are often evaluate's largest allocation."""
    general_answers_batch_size: int = Field(64, gt=0)
    """Greedy answers per batch for the generative general tasks. Their prompts and answers are short, so 64
    rows keep a small KV cache; 64 answered 256 questions in 32 s, 16 in 53 s (the same answers, 2 cores)."""
    general_seed: int = 0
    """Seed of the general subsets and of the paired bootstrap."""
    kl_prompts: int = Field(16, ge=0)
    """General prompts (the first generative questions, with the base's answers) for KL(base||tuned); 0 skips."""


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """Interface to bind; loopback by default."""
    port: int = Field(8000, gt=0, lt=65536)
    """TCP port."""
    max_new_tokens: int = Field(512, gt=0)
    """Default generation length."""
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    """Sampling temperature: 0.1 near-deterministic, 0.9 creative; 0 is greedy."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_new_tokens_limit: int = Field(2048, gt=0)
    """Largest `max_new_tokens` a request may ask for (422 above it)."""
    quantization: Literal["none", "nf4", "fp4"] = "none"
    """Weights to serve: full precision by default (NF4 costs quality); nf4 for small GPUs or little memory."""
    max_batch_size: int = Field(8, gt=0)
    """Requests decoded together in one batch (dynamic batching)."""
    batch_wait_ms: float = Field(10.0, ge=0)
    """How long the first queued request waits for others to join its batch."""
    max_queue: int = Field(32, gt=0)
    """Requests running or waiting before new ones get 429 with Retry-After."""
    shutdown_timeout_s: float = Field(10.0, ge=0)
    """On SIGTERM/Ctrl-C: how long in-flight requests may finish before they are cancelled."""
    max_body_bytes: int = Field(1_000_000, gt=0)
    """Largest request body; bigger ones get 413 before they are parsed."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed by CORS; empty (the default) leaves CORS off."""


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraSettings,
    "train": TrainConfig,
    "eval": EvalConfig,
    "serve": ServeConfig,
}


def _known_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in cls.model_fields]


def _unknown_key_message(key: str, where: str) -> str:
    hint = difflib.get_close_matches(key, _known_keys(), n=1)
    fix = f" Did you mean '{hint[0]}'?" if hint else " Run `qlora-llm config --keys` to list them."
    return f"{where}: unknown key {key!r}.{fix}"  # repr: a key with a newline stays on one line


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=20` -> (['train', 'max_steps'], 20); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected section.key=value, e.g. train.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unquoted string YAML cannot read (e.g. "a: b") is still a string
    return key.strip().split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{part}' is a value, not a section")
        tree = node
    tree[path[-1]] = value


def _check_keys(tree: dict, sources: dict[str, str]) -> None:
    """Name every unknown key before pydantic sees it, with where it came from and a near match."""
    problems = []
    for section, body in tree.items():
        if section not in SECTIONS:
            where = sources.get(section, "config")
            problems.append(f"{where}: unknown section {section!r}; sections are {', '.join(SECTIONS)}.")
            continue
        if not isinstance(body, dict):
            where = sources.get(section, "config")
            problems.append(f"{where}: {section!r} must be a mapping of keys, got {type(body).__name__}")
            continue
        for key in body:
            if key not in SECTIONS[section].model_fields:
                dotted = f"{section}.{key}"
                problems.append(
                    _unknown_key_message(dotted, sources.get(dotted, sources.get(section, "config")))
                )
    if problems:
        raise ConfigError("\n".join(problems))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; validated once, here."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found. The shipped ones are in configs/.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{at}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected sections (model:, train:, ...) at the top level")
        tree = loaded
        for section, body in tree.items():
            sources[section] = str(path)
            if isinstance(body, dict):
                for key in body:
                    sources[f"{section}.{key}"] = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise ConfigError(f"override '{text}': keys have two parts, section.key (e.g. lora.r=8)")
        _set_path(tree, keys, value)
        sources[".".join(keys)] = f"override '{text}'"
        sources.setdefault(keys[0], f"override '{text}'")
    _check_keys(tree, sources)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            dotted = ".".join(str(p) for p in e["loc"])
            where = sources.get(".".join(str(p) for p in e["loc"][:2]), "config")
            lines.append(f"{where}: {dotted}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (every value, defaults included) so a run can be reproduced alone."""
    from qlora_llm.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, description) for every setting: the reference table in the README and CLI."""
    rows = []
    defaults = Config().model_dump(mode="json")
    for section, cls in SECTIONS.items():
        for key, field in cls.model_fields.items():
            rows.append((f"{section}.{key}", repr(defaults[section][key]), field.description or ""))
    return rows

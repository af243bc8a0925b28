"""Which kernel a 4-bit layer runs on a CPU, and keeping bitsandbytes' fused AVX512-BF16 kernel correct.

bitsandbytes (0.50) has two CPU paths for an NF4/FP4 `Linear4bit`:
- **plain**: dequantize the weight to the compute dtype, then an ordinary matmul. It has a backward,
  so training always runs it.
- **fused**: on a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without gradients repacks
  the weight into blocks of 32 output rows and runs one fused dequantize + matmul kernel in bf16.

Left to bitsandbytes, the fused path breaks three things, which is why it is driven from here:
1. a layer with out_features not a multiple of 32 (or in_features not a multiple of the quantization
   block) dies inside bitsandbytes with `N must be divisible by block_n`;
2. the repacked weight stays repacked when training resumes after an evaluation: the next training
   forward runs the bf16 kernel, which has no backward, so no gradient reaches the layers below it
   (bitsandbytes only warns "an autograd kernel was not registered");
3. its inverse re-quantizes the quantization constants from their bf16 copies, so a `state_dict()`
   (every checkpoint save) after an evaluation silently changes the frozen base weights.

So bitsandbytes' own switch (`support_avx512bf16_for_cpu`) is turned off on every 4-bit layer, and a
forward pre-hook puts each layer whose shape fits into the fused layout for no-grad, eval-mode forwards
and back into its exact original bytes and quantization state for anything else (training, or a
`state_dict()`). Layers whose shape does not fit keep the plain path.

The fused kernel bitsandbytes has offline is a matrix-vector kernel: it wins on a few rows (a decode
step: 3-8x the plain path's speed at 1-16 rows) and can lose badly on many (scoring, prefill, the
evaluation during training): on a Xeon with AMX, where the plain path's bf16 matmul runs on AMX tiles,
it was 8-11x slower at 1472 rows. So under `auto` each call picks by its rows: fused up to
`SMALL_CALL_ROWS`, and above that whichever kernel a probe measured faster on this CPU at `PROBE_ROWS`
rows (`large_call_speedup`, once per process, in the log line). Such layers keep both layouts while
they alternate (one more copy of the 4-bit weights during evaluation and generation; dropped again
when training resumes), so switching costs nothing.

    kernel = choose_kernel(cfg.model.cpu_4bit_kernel)   # before loading: "fused" or "plain"
    setup_cpu_4bit(model, kernel, route=cfg.model.cpu_4bit_kernel == "auto")  # says what it did, one line
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import time
from typing import Any, Literal

from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)

Kernel = Literal["fused", "plain"]
FUSED_BLOCK_N = 32  # output rows per block in bitsandbytes' CPU layout (`_convert_weight_packed_for_cpu`)
SMALL_CALL_ROWS = 32
"""Rows (tokens) up to which `auto` always runs the fused kernel: a decode step of up to 32 sequences."""
PROBE_ROWS = 1024
"""The rows of the probe call that decides larger calls (an evaluation batch is 4 x 300 tokens)."""
PLAIN_WINS_AT = 1.1
"""Larger calls run plain where the probe measured it at least this many times as fast as fused. Between
the hosts measured, so timing noise does not flip the choice: a Xeon with AMX 4.2-7.7x in bf16 and 1.87x
and over 2x in fp32; an AMD EPYC without AMX 1.3-1.44x in bf16 (scoring the real model, plain ran 1.34x
fused's speed) and 0.70x in fp32 (fused scored the real model 1.47x faster) (docs/cpu.md)."""


class KernelError(QloraError, ValueError):
    """The configured 4-bit CPU kernel cannot run on this machine."""


def fused_kernel_available() -> bool:
    """Whether bitsandbytes' fused CPU kernel runs here: it needs AVX512-BF16 (registered at bnb import)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def choose_kernel(setting: str) -> Kernel:
    """`auto` -> fused where the CPU has AVX512-BF16 (measured faster there, docs/cpu.md), else plain."""
    if setting == "plain":
        return "plain"
    available = fused_kernel_available()
    if setting == "fused" and not available:
        raise KernelError(
            "model.cpu_4bit_kernel=fused needs a CPU with AVX512-BF16, and this one has none "
            "(bitsandbytes.functional.has_avx512bf16() is False). Use model.cpu_4bit_kernel=auto or plain."
        )
    return "fused" if available else "plain"


def fused_layout_problem(module: Any) -> str | None:
    """Why a Linear4bit cannot take the fused layout, or None when it can."""
    n, k = module.out_features, module.in_features
    blocksize = module.weight.quant_state.blocksize
    if n % FUSED_BLOCK_N:
        return f"{n} outputs, not a multiple of {FUSED_BLOCK_N}"
    if k % blocksize:
        return f"{k} inputs, not a multiple of the quantization block {blocksize}"
    return None


def is_fused(module: Any) -> bool:
    return hasattr(module, "_qlora_plain_state")


def to_fused(module: Any) -> None:
    """Repack the layer's weight for the fused kernel, keeping the original quantization state aside.

    A routed layer (`_qlora_max_rows` set) keeps its plain bytes too, and its packed ones once made."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    weight = module.weight
    plain_state = weight.quant_state
    packed = module.__dict__.get("_qlora_packed")
    if packed is not None and module._qlora_plain_data.data_ptr() != weight.data.data_ptr():
        drop_packed(module)  # the weight was replaced since (a merge, a load): its packed copy is stale
        packed = None
    if packed is None:
        # The converter rewrites the state object it is given; give it a copy so the original stays exact.
        packed = _convert_weight_packed_for_cpu(weight.data, copy.copy(plain_state))
        if module.__dict__.get("_qlora_max_rows") is not None:
            module._qlora_packed = packed
            module._qlora_plain_data = weight.data
    data, state = packed
    weight.data, weight.quant_state, module.quant_state = data, state, state
    module._qlora_plain_state = plain_state


def to_plain(module: Any, keep_packed: bool = False) -> None:
    """Undo `to_fused` exactly: the kept plain bytes, or the nibble permutation inverted, and the original
    state object put back. `keep_packed`: a routed layer keeps its packed copy for the next small call."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    plain_state = module.__dict__.pop("_qlora_plain_state")
    data = module.__dict__.get("_qlora_plain_data")
    if data is None:
        # bitsandbytes' inverse also rebuilds a quantization state from the bf16 constants (lossy): dropped.
        data, _ = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    weight.data, weight.quant_state, module.quant_state = data, plain_state, plain_state
    if not keep_packed:
        drop_packed(module)


def drop_packed(module: Any) -> None:
    """Free a routed layer's packed copy (training and saves need only the plain layout)."""
    module.__dict__.pop("_qlora_packed", None)
    module.__dict__.pop("_qlora_plain_data", None)


def _pick_layout(module: Any, args: tuple) -> None:
    x = args[0]
    inference = not module.training and not x.requires_grad and x.device.type == "cpu"
    limit = module.__dict__.get("_qlora_max_rows")
    fused = inference and (limit is None or x.numel() <= limit * x.shape[-1])
    if fused and not is_fused(module):
        to_fused(module)
    elif not fused and is_fused(module):
        to_plain(module, keep_packed=inference)
    elif not inference:
        drop_packed(module)


def _plain_for_state_dict(module: Any, prefix: str, keep_vars: bool) -> None:
    if is_fused(module):
        to_plain(module)
    drop_packed(module)


@functools.cache
def large_call_speedup(dtype: Any) -> float:
    """How many times as fast the plain kernel (dequantize, then a `dtype` matmul) runs a `PROBE_ROWS`-row
    call as the fused one, on this CPU: a random 1024 x 1024 NF4 layer, best of 3 each (0.1 s; 1.6 s when it
    is the process's first bf16 matmul), once per process and dtype."""
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit

    generator = torch.Generator().manual_seed(0)
    # nn.Linear's init draws from the global RNG: forked, so the probe does not change the run's LoRA init.
    with torch.random.fork_rng(devices=[]):
        layer = Linear4bit(
            1024, 1024, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True
        )
    layer.weight = Params4bit(
        torch.randn(1024, 1024, generator=generator), requires_grad=False, quant_type="nf4"
    )._quantize("cpu")
    layer.eval()
    layer.support_avx512bf16_for_cpu = False
    x = torch.randn(PROBE_ROWS, 1024, generator=generator).to(dtype)

    def best(call: Any) -> float:
        times = []
        for _ in range(4):  # the first is a warm-up
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    with torch.no_grad():
        plain = best(lambda: layer(x))
        to_fused(layer)
        fused = best(lambda: layer(x))
        to_plain(layer)
    return fused / plain


def setup_cpu_4bit(model: Any, kernel: Kernel, route: bool = False) -> None:
    """Route every 4-bit layer of `model` (on CPU) to `kernel` (from `choose_kernel`), in one log line.

    `route` (the `auto` setting): calls of more than `SMALL_CALL_ROWS` rows run plain where the probe
    measured plain faster on this CPU (module docstring)."""
    from bitsandbytes.nn import Linear4bit

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        return
    limit, routing = None, ""
    if kernel == "fused" and route:
        speedup = large_call_speedup(layers[0][1].compute_dtype)
        if speedup >= PLAIN_WINS_AT:
            limit = SMALL_CALL_ROWS
            routing = (
                f"; calls of more than {limit} rows (scoring, prefill) run plain: it measured "
                f"{speedup:.2f}x as fast at {PROBE_ROWS} rows on this CPU"
            )
        else:
            routing = f"; at {PROBE_ROWS} rows plain measured {speedup:.2f}x fused's speed here, so every call runs fused"
    odd: dict[str, str] = {}
    for name, module in layers:
        module.support_avx512bf16_for_cpu = False  # bitsandbytes' own repacking: see the module docstring
        if kernel == "plain":
            continue
        problem = fused_layout_problem(module)
        if problem:
            odd[name] = problem
            continue
        module._qlora_max_rows = limit
        module.register_forward_pre_hook(_pick_layout)
        module.register_state_dict_pre_hook(_plain_for_state_dict)
    if kernel == "plain":
        why = "model.cpu_4bit_kernel=plain" if fused_kernel_available() else "this CPU has no AVX512-BF16"
        log.info(
            "4-bit CPU kernel: plain (dequantize, then a %s matmul) in all %d layers (%s)",
            _dtype(layers),
            len(layers),
            why,
        )
    elif odd:
        log.info(
            "4-bit CPU kernel: fused AVX512-BF16 (bf16 math) for evaluation and generation in %d of %d "
            "layers%s; training always runs the plain kernel. Kept plain, their shapes do not fit the fused "
            "layout: %s",
            len(layers) - len(odd),
            len(layers),
            routing,
            _group_names(odd),
        )
    else:
        log.info(
            "4-bit CPU kernel: fused AVX512-BF16 (bf16 math) for evaluation and generation in all %d "
            "layers%s; training always runs the plain kernel (model.cpu_4bit_kernel=plain opts out)",
            len(layers),
            routing,
        )


def _group_names(odd: dict[str, str]) -> str:
    """`model.layers.*.self_attn.k_proj x30 (8 outputs, ...)`: one entry per layer kind, not per block."""
    groups: dict[tuple[str, str], int] = {}
    for name, problem in odd.items():
        key = (re.sub(r"\.\d+\.", ".*.", name), problem)
        groups[key] = groups.get(key, 0) + 1
    return "; ".join(f"{n} x{c} ({p})" if c > 1 else f"{n} ({p})" for (n, p), c in groups.items())


def _dtype(layers: list[tuple[str, Any]]) -> str:
    dtype = layers[0][1].compute_dtype
    return str(dtype).removeprefix("torch.") if dtype is not None else "input-dtype"

"""Will it fit? Estimate the memory of a QLoRA training run from the model's config.json alone.

No weights are read and no model is built: the estimate is arithmetic over the shapes in config.json
(hidden size, layers, heads, vocabulary) and the run's settings (quantization, LoRA rank and targets,
batch, sequence length, gradient checkpointing, optimizer). `plan` then compares the peak with the
device's memory and, when it does not fit, names the `key=value` overrides that would.

    report = plan(load_config("configs/mistral-7b-8gb.yaml"), device_memory_bytes=8 * 2**30)
    text = format_plan(report)

Units: every field is in bytes; reports show GiB (2**30 bytes), like `torch.cuda` and `nvidia-smi`.
The seed design's table is in decimal GB (10**9 bytes); it is shown beside our own GB column.

The estimate follows what `qlora_llm.train` does: a bitsandbytes 4-bit base passed through peft's
`prepare_model_for_kbit_training`, LoRA via peft, TRL's SFTTrainer with bf16 autocast on CUDA.
Symbols: B batch, T sequence length, H hidden, I intermediate, L layers, V vocabulary, nh heads,
hd head_dim, r LoRA rank, a = bytes of the compute dtype (2 for bf16/fp16, 4 for fp32), w = bytes of
the unquantized weights (4 on a 4-bit base, which prepare_model_for_kbit_training upcasts to fp32;
else a), l = bytes of a LoRA param (2 on a 4-bit base on CUDA, where TRL casts adapters to bf16 as the
QLoRA paper does; else 4: peft's fp32, and train.py casts them back to fp32 on CPU).

- base weights: 4-bit storage packs 2 params per byte for every linear layer inside the decoder blocks
  (`Linear4bit` stores uint8). Quantization constants: bitsandbytes uses blocks of 64 params; without
  double quant each block has one fp32 absmax (4/64 = 0.0625 B/param); with it the absmax is 8-bit
  (1/64) plus one fp32 absmax per 256 of those blocks (4/16384): 0.0159 B/param, the ~0.37 bit/param
  saving of the QLoRA paper. Embeddings, lm_head (unless `tie_word_embeddings`), norms and biases are
  not quantized: w bytes each. Without quantization every param is a bytes.
- LoRA weights: r * (in + out) params per targeted linear per layer, l bytes each.
- LoRA gradients: one gradient per LoRA param, in the param's dtype (l bytes).
- optimizer states: bitsandbytes AdamW 32-bit (the paged ones too) keeps 2 fp32 moments per trainable
  param whatever its dtype (8 B); torch AdamW keeps them in the param's dtype (2l B); 8-bit AdamW keeps
  2 uint8 moments (2 B, block constants ignored). Paged optimizers need the same bytes but can move
  them to CPU RAM under pressure (CUDA unified memory; train.py swaps in plain AdamW on CPU).
- activations, tensors autograd saves for backward, per token per decoder layer:
  two RMSNorms keep an fp32 input (HF's `LlamaRMSNorm` computes in fp32): 2 * 4H;
  attention keeps q, k, v (k and v repeated to all nh heads when a padding mask is given: sdpa only
  uses GQA without a mask) and its output: 4 * a * nh*hd, plus an fp32 logsumexp per head (4 * nh);
  sdpa turns the bool padding mask into a float one in each layer and keeps it: T * a;
  eager attention instead keeps the fp32 softmax and its compute-dtype copy: nh*T * (4 + a);
  the SwiGLU MLP keeps the SiLU input and the two factors of the gated product, 3 * w * I
  (bitsandbytes' Linear4bit returns its input's dtype, fp32 on an upcast base, even under autocast);
  each LoRA-targeted linear keeps its dropped-out input (or autocast's copy of it) and the dropout
  mask, (a + 1) * in_features on CUDA (bool mask of the fused kernel), (a + 2) * in_features on CPU
  (dropout.py's 0/1 masks in 2 bytes; none when compiled, whose backward redraws the mask from its key:
  `lora.dropout_masks=compiled`, or `auto` on a run long enough that train.py compiles them, which
  plan() asks with the run's steps, by the run's own rule and timing, `dropout.compiles`; with `torch` nn.Dropout's
  noise in the input's dtype: the residual stream's, w, since train.py stops peft's cast to fp32, but a
  for o_proj, whose input is sdpa's output), or with dropout 0 the shared input once; plus the rank-r
  output of LoRA A (a * r). The frozen 4-bit base linears keep nothing (bitsandbytes' MatMul4Bit saves
  only the packed weight). Mistral-7B, bf16, all 7 targets: 347 KiB per token per layer on the
  upcast base train.py uses (263 KiB in a plain loop with bf16 embeddings).
  Without gradient checkpointing all L layers are kept. With it, only each layer's input is kept,
  B*T*H*w per layer (the residual stream has the embeddings' dtype: bf16 layer outputs added to an
  fp32 residual stay fp32), plus one layer's full set while it is recomputed in backward. On CUDA that
  recomputed set is in `transient`: the loss's buffers are freed before it (a CUDA allocation trace put
  every checkpointed peak in a recompute; docs/plan.md), so the peak is the larger phase, not the sum.
  Both add the final norm's fp32 input (4H per token) and, for fp32 adapters under 16-bit autocast,
  autocast's cached 16-bit copies of them (a bytes per LoRA param).
  Checked against the tensors autograd actually saves (`torch.autograd.graph.saved_tensors_hooks`)
  for a 4-layer Llama with LoRA on all 7 projections on CPU: within 0.2% for plain and NF4 bases in
  fp32 and under bf16 autocast, 3% over for the upcast NF4 base with bf16 adapters. The CUDA-only
  terms (bool mask of the fused dropout, no cast to fp32) are read from the kernels' code, unmeasured.
- logits + loss, `lm_head_loss="chunked"` (TRL's SFTTrainer >= 1.16, what train.py runs): the fused
  LM head never builds the (B, T, V) logits; it keeps the final hidden states (B*T*H*w) and works on
  one tile of min(B*T, 4096) tokens by min(V, 32768) vocabulary entries in the compute dtype, through a
  compute-dtype copy of (that slice of) the lm_head when w != a. With `"full"` (transformers' own
  loss): the (B, T, V) logits in the compute dtype and the fp32 log-softmax cross-entropy keeps,
  B*T*V * (a + 4); in fp32 that is "B*T*V*4 twice". On CUDA (Triton) TRL's head gathers the labelled
  positions first and tiles only them (the answers, under answers-only loss: `scored_tokens`), and
  its forward tile is freed before the backward's (allocated bytes); on CPU it tiles every position,
  and RSS keeps the freed tile (calibrated so).
- allocator slack (CPU only): the RSS holds more than the bytes of the tensors a step keeps: mimalloc
  keeps freed temporaries committed for a while and rounds blocks up to size classes. 20% of the
  activations line (`CPU_ACTIVATION_SLACK`; 12-28% measured on 7 runs without checkpointing).
- runtime overhead: CUDA context, cuBLAS workspace and kernels ~0.5 GiB on CUDA. On CPU the Python
  process with torch, transformers, peft, trl, datasets and bitsandbytes imported: 0.47 GiB RSS was
  measured (torch 2.13 CPU), counted as 0.5 GiB. Plus, on CPU, the rest of the weights file when the
  weights load in the file's own dtype: the unquantized weights are then its mapped pages, the mapping
  stays, and every page read while quantizing stays in the RSS.
- loading (CPU, only in `peak`): runtime overhead + the weights file (mapped while it is read) + the
  model built from it (quantized, or cast to the compute dtype). It sets the peak of short CPU runs.
- CPU loss tiles: train.py gives TRL's fused head 256 x 8192 tiles on CPU (`CPU_LOSS_TILE`), and its
  torch fold (no Triton) holds ~8 fp32 temporaries of a tile (`CPU_FOLD_TEMPORARIES`).
  Calibrated on CPU against whole-process peaks (`bench/plan_accuracy.py`, docs/plan.md).
- transient (only in `peak`): buffers alive for a moment, in no line above: the largest 4-bit weight
  dequantized to the compute dtype for its matmul (forward and backward) plus the gradients of one
  layer's largest intermediates in backward, B*T*(3I + 2H)*a; or, when larger, the loss's backward
  buffers: for the fused head a tile, the lm_head copy and the fp32 gradient of the hidden states
  (B*T*H*4); for the full loss the logits' fp32 upcast and gradient, B*T*V * (4 [+ a if a < 4]).

`total` sums the lines as if each were at its maximum at once (slightly conservative: the logits are
freed before the layers are recomputed); `peak` adds the transient buffers (or is the loading line,
when larger). A run fits when its peak is at most 92% of the device's memory: PyTorch's caching
allocator rounds and fragments blocks (reserved memory is typically a few percent above allocated),
other processes and the display hold some, and this estimate has its own error of several percent.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from qlora_llm.config import Config
from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)

GIB = 2**30
GB = 10**9
FIT_MARGIN = 0.92
"""Share of device memory a run may plan to use; see the module docstring for why not 100%."""

CUDA_OVERHEAD = GIB // 2
CPU_OVERHEAD = GIB // 2
EVAL_LIBRARIES = GIB // 10
"""lm-eval, its task objects and rouge-score imported: +0.09 GiB RSS measured over training's imports."""
RUN_PARENT = int(0.38 * GIB)
"""`qlora-llm run` while its training process trains (pipeline.py trains apart): its imports and the prepared
data, 0.38 GiB measured (proportional set size: 0.33 private + its share of the mapped libraries; RSS 0.42)
beside a demo-recipe training, on CPU. Counted on training's stage in the plan of a `run`; and on
evaluate's, beside the base's evaluation in its own process (the demo's `run` waited there with 0.39 GiB
of its own memory, RssAnon, and 0.23 of mapped files it shares with the base's process)."""
QUANT_BLOCK = 64  # bitsandbytes 4-bit blocksize (BitsAndBytesConfig default)
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level fp32 constant with double quant
FUSED_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
FUSED_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
CPU_LOSS_TILE = (256, 8192)
"""Tokens x vocabulary entries per tile of TRL's fused LM head on CPU, which train.py sets (see there)."""
CPU_ACTIVATION_SLACK = 0.2
"""RSS above the bytes of the tensors a CPU step keeps for its backward: mimalloc keeps freed temporaries
committed for a while (MIMALLOC_PURGE_DELAY=0 halved this, at 1.6x the step time) and rounds each block up
to its size class. +12 to +28% of the kept tensors, measured on 7 no-checkpointing runs (docs/plan.md)."""
CPU_FOLD_TEMPORARIES = 8
"""fp32 tile-sized temporaries TRL's torch fold (no Triton: CPU) holds at once; bench/loss_tiles.py."""
LM_EVAL_LOGITS_COPIES = 3
"""(B, T, vocab) logits-sized tensors lm-eval's log-likelihood batch holds at once: 2.7-2.8 measured."""
EVAL_LOGITS_TILE_BYTES = 64 * 2**20
"""The most fp32 logits `evaluate.next_token_nll` holds at once with their log-softmax (~170 positions of a
49k vocabulary). Whole (B, T, vocab) logits and their log-softmax were the evaluation's peak: +1.2 GiB for
the demo's test papers at batch 4 (docs/plan.md)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The stages the verdict and the suggestions cover: `plan` and `train` decide on training. The others
# load other weights (eval.quantization, serve.quantization; often on another machine): they are planned
# and shown too, with a note when they do not fit this one.
VERDICT_STAGES = ("train",)
RUN_STAGES = ("train", "evaluate")
"""The stages `qlora-llm run` goes through (bench/plan_accuracy.py --whole run compares with them)."""

SEED_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
# The seed design's table for Mistral-7B, NF4 + double quant, r=16 on 7 projections, batch 2, seq 512,
# gradient checkpointing, paged_adamw_32bit; decimal GB as the seed wrote them.
SEED_TABLE_GB: dict[str, float | None] = {
    "base_weights": 3.5,
    "lora_weights": 0.2,
    "lora_gradients": None,
    "optimizer_states": 0.5,
    "activations": 1.5,
    "logits": None,
    "overhead": 0.5,
}
SEED_TOTAL_GB = 6.2
SEED_PEAK_GB = 7.5

# config.json files shipped in the package, so planning works offline for the models the configs name.
# SmolLM2's says float32: the dtype of the folder qlora-llm converts the built-in model to (the Hub's own
# files are bf16, so its loading line is then on the safe side).
SHIPPED_CONFIGS = {
    "smollm2-135m-instruct": "smollm2-135m-instruct.json",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct.json",
    SEED_MODEL: "mistralai--Mistral-7B-Instruct-v0.2.json",
}

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PlanError(QloraError, ValueError):
    """The plan cannot be made (no config.json offline, unknown shapes); the message says what to do."""


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only Llama-style config.json that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    max_positions: int | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        needed = [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        ]
        missing = [k for k in needed if not isinstance(config.get(k), int)]
        if missing:
            raise PlanError(
                f"config.json lacks {', '.join(missing)}: the planner knows Llama-style decoder models "
                "(Llama, Mistral, Qwen2, SmolLM2, ...) with these keys"
            )
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            # transformers' Llama/Mistral default is untied; untied is also the larger, safer guess.
            tied=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            max_positions=config.get("max_position_embeddings"),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder block."""
        h, i, attn = self.hidden, self.intermediate, self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return {
            "q_proj": (h, attn),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (attn, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component of one training step; `how` says how each line was counted."""

    base_weights: int
    lora_weights: int
    lora_gradients: int
    optimizer_states: int
    activations: int
    logits: int
    overhead: int
    transient: int
    base_params: int
    lora_params: int
    paged_optimizer: bool
    how: dict[str, str] = field(default_factory=dict)
    loading: int = 0
    """Peak while the weights load (CPU), when the weights file and the model built from it are both in RAM."""
    allocator: int = 0
    """CPU: the allocator's slack over the kept activations (CPU_ACTIVATION_SLACK); 0 on CUDA."""

    COMPONENTS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("base_weights", "base weights"),
        ("lora_weights", "LoRA weights"),
        ("lora_gradients", "LoRA gradients"),
        ("optimizer_states", "optimizer states"),
        ("activations", "activations"),
        ("logits", "logits + loss"),
        ("allocator", "allocator slack"),
        ("overhead", "runtime overhead"),
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, key) for key, _ in self.COMPONENTS)

    @property
    def peak(self) -> int:
        return max(self.total + self.transient, self.loading)


def _resolve_targets(target_modules: list[str], shape: ModelShape) -> list[str]:
    unknown = [t for t in target_modules if t not in shape.linears() and t != "all-linear"]
    if "all-linear" in target_modules or unknown:
        if unknown:
            # train.py then targets the model's own linear layers (or refuses explicit wrong names with
            # its own message); all 7 projections is what that fallback gives a Llama-style model.
            log.warning("lora.target_modules %s are not Llama-style projections; planning for all 7", unknown)
        return list(ALL_LINEAR)
    return list(dict.fromkeys(target_modules))


def _optimizer_bytes(
    optim: str, lora_matrices: list[tuple[int, int]], n_params: int, lora_bytes: int
) -> tuple[int, str]:
    name = optim.lower()
    if "adafactor" in name:
        # Factored second moment: one fp32 row vector and one column vector per matrix, no momentum.
        states = sum(4 * (rows + cols) for rows, cols in lora_matrices)
        return states, "Adafactor: an fp32 row and column vector per matrix"
    if "lion" in name:
        per = 1 if "8bit" in name else 4
        return n_params * per, f"Lion: 1 state x {per} B per trainable param"
    if "sgd" in name:
        return 0, "SGD without momentum keeps no state"
    if "adam" in name:
        if "8bit" in name:
            per, what = 2, "2 uint8 moments"
        elif "paged" in name or "bnb" in name:
            per, what = 8, "2 fp32 moments"  # bitsandbytes' 32-bit states are fp32 whatever the param dtype
        else:
            per, what = 2 * lora_bytes, "2 moments in the params' dtype"  # torch AdamW: zeros_like(param)
        return n_params * per, f"{optim}: {what} = {per} B per trainable param"
    log.warning("optimizer %r is not known to the planner; counting it as AdamW 32-bit", optim)
    return n_params * 8, f"unknown optimizer {optim!r}: counted as AdamW 32-bit (8 B per param)"


def estimate_memory(
    model_config: dict[str, Any],
    *,
    quantization: Literal["nf4", "fp4", "none"],
    double_quant: bool,
    compute_dtype: Literal["float32", "bfloat16", "float16"],
    lora_r: int,
    target_modules: list[str],
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    optim: str,
    device: Literal["cuda", "cpu"],
    every_n_layers: int = 1,
    lora_dropout: float = 0.05,
    dropout_masks: Literal["auto", "compiled", "hash", "torch"] = "auto",
    attention: Literal["sdpa", "eager"] = "sdpa",
    lm_head_loss: Literal["chunked", "full"] = "chunked",
    kbit_prepared: bool = True,
    lora_dtype: Literal["float32", "bfloat16"] | None = None,
    processes: int = 1,
    distributed: Literal["ddp", "fsdp"] = "ddp",
    method: Literal["sft", "dpo", "orpo"] = "sft",
    scored_tokens: int | None = None,
) -> MemoryEstimate:
    """Bytes a LoRA/QLoRA training step needs, per component; the formulas are in the module docstring.

    The last four arguments default to what `qlora_llm.train` does: sdpa attention, TRL's fused LM head
    and loss, peft's `prepare_model_for_kbit_training` on a 4-bit base, and adapters in TRL's bf16 on a
    4-bit base on CUDA (fp32 otherwise). `lm_head_loss="full", kbit_prepared=False,
    lora_dtype="float32"` describe a plain transformers + peft loop instead.

    `processes` > 1: the memory of each device (GPU) of a run on that many. Under `ddp` every device
    holds the whole model and its own batch's activations, plus DDP's gradient buckets (a flat copy of
    the trainable gradients, `gradient_as_bucket_view=False`). Under `fsdp` the weights, gradients and
    optimizer states are divided by the processes, and one decoder layer's weights are gathered whole
    while it runs (a transient buffer); activations are per device batch as under DDP.

    `scored_tokens`: the batch's tokens that carry a label (the answers, when only they are trained on).
    On CUDA TRL's fused head scores only those (its Triton path gathers them first); None: every token.
    """
    shape = ModelShape.from_config(model_config)
    quantized = quantization != "none"
    lora_dtype = lora_dtype or ("bfloat16" if quantized and device == "cuda" else "float32")
    # A preference step forwards each example's chosen and rejected answer together: twice the sequences.
    # DPO's reference forward runs without gradients, so its activations never add to the training ones.
    sequences = batch_size * (1 if method == "sft" else 2)
    s = _Step(
        shape=shape,
        linears=shape.linears(),
        targets=_resolve_targets(target_modules, shape),
        a=DTYPE_BYTES[compute_dtype],
        # Weights that stay unquantized (embeddings, lm_head, norms): fp32 once
        # prepare_model_for_kbit_training upcast them. The embeddings' dtype is also the residual
        # stream's: bf16 layer outputs added to an fp32 residual stay fp32.
        w=4 if quantized and kbit_prepared else DTYPE_BYTES[compute_dtype],
        lb=DTYPE_BYTES[lora_dtype],
        quantized=quantized,
        sequences=sequences,
        seq_len=seq_len,
        tokens=sequences * seq_len,
        device=device,
    )
    how: dict[str, str] = {}
    base = _base_weights(s, quantization, double_quant, compute_dtype, how)
    lora = _lora_state(s, lora_r, lora_dtype, optim, method, how)
    dropout = (lora_dropout, dropout_masks)
    act = _activations(s, lora_r, dropout, attention, gradient_checkpointing, every_n_layers, lora, how)
    logits, logits_grad = _loss_head(s, lm_head_loss, scored_tokens, compute_dtype, how)
    overhead, loading = _runtime(s, model_config, base, how)
    # On CUDA a checkpointed layer is recomputed in backward after the loss's buffers and kept hidden
    # states are freed: its full set, the residual stream's fp32 gradient and its backward buffers then
    # sit on the kept activations (where an allocation trace put the peak of every checkpointed step).
    dequant = max(base.linear_numel) * s.a if quantized else 0
    layer_grads = s.tokens * (3 * shape.intermediate + 2 * shape.hidden) * s.a
    on_cuda_checkpointed = gradient_checkpointing and device == "cuda"
    recompute = (
        act.recomputed * act.per_layer + s.tokens * shape.hidden * 4 - logits if on_cuda_checkpointed else 0
    )
    transient = max(dequant + layer_grads + max(recompute, 0), logits_grad)
    how["transient"] = (
        ("a recomputed layer's set + " if recompute > 0 else "")
        + "largest dequantized weight + one layer's activation gradients"
        if dequant + layer_grads + max(recompute, 0) >= logits_grad
        else "the loss's backward buffers"
    )
    base_weights = base.bytes
    lora_weights, lora_gradients, optimizer_states = lora.weights, lora.gradients, lora.optimizer
    if processes > 1 and distributed == "ddp":
        lora_gradients *= 2
        how["lora_gradients"] += f" + DDP's gradient buckets (a copy of them), on each of {processes} GPUs"
    elif processes > 1:  # fsdp
        layer_weights = (
            (base_weights - base.other_numel * s.w) // shape.layers
            if quantized
            else sum(base.linear_numel) * s.a
        )
        base_weights, lora_weights, lora_gradients, optimizer_states = (
            math.ceil(x / processes) for x in (base_weights, lora_weights, lora_gradients, optimizer_states)
        )
        for key in ("base_weights", "lora_weights", "lora_gradients", "optimizer_states"):
            how[key] += f"; FSDP: 1/{processes} per GPU"
        transient += layer_weights
        how["transient"] += " + one decoder layer's weights gathered whole by FSDP"
    return MemoryEstimate(
        base_weights=base_weights,
        lora_weights=lora_weights,
        lora_gradients=lora_gradients,
        optimizer_states=optimizer_states,
        activations=act.bytes,
        logits=logits,
        allocator=_allocator_slack(act.bytes, device, how),
        overhead=overhead,
        transient=transient,
        loading=loading,
        base_params=base.params,
        lora_params=lora.params,
        paged_optimizer=lora.paged,
        how=how,
    )


@dataclass
class _Step:
    """What every component of a training step's memory reads: the shape, the byte widths, the batch."""

    shape: ModelShape
    linears: dict[str, tuple[int, int]]
    targets: list[str]
    a: int  # bytes of the compute dtype
    w: int  # bytes of the weights that stay unquantized (and of the residual stream)
    lb: int  # bytes of the LoRA weights
    quantized: bool
    sequences: int
    seq_len: int
    tokens: int
    device: str


@dataclass
class _Base:
    bytes: int
    params: int
    other_numel: int  # embeddings, lm_head, norms, biases: never quantized
    linear_numel: list[int]  # one decoder layer's linears


def _base_weights(s: _Step, quantization: str, double_quant: bool, compute_dtype: str, how: dict) -> _Base:
    """The base model: the decoder-block linears quantized (or not), everything else `w` bytes."""
    shape, a, w = s.shape, s.a, s.w
    h, i, n_layers, v = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    attn_width = shape.heads * shape.head_dim
    linear_numel = [inp * out for inp, out in s.linears.values()]
    biases = (4 * attn_width if shape.attention_bias else 0) + (2 * i + h if shape.mlp_bias else 0)
    other_numel = v * h * (1 if shape.tied else 2) + (2 * n_layers + 1) * h + n_layers * biases
    base_params = n_layers * sum(linear_numel) + other_numel
    head = "embeddings" if shape.tied else "embeddings, lm_head"
    if not s.quantized:
        how["base_weights"] = f"{base_params / 1e9:.2f}B params x {a} B ({compute_dtype})"
        return _Base(base_params * a, base_params, other_numel, linear_numel)
    packed = n_layers * sum(math.ceil(n / 2) for n in linear_numel)
    blocks = [math.ceil(n / QUANT_BLOCK) for n in linear_numel]
    if double_quant:
        constants = n_layers * sum(b + 4 * math.ceil(b / DOUBLE_QUANT_BLOCK) for b in blocks)
        what = "8-bit absmax/64 + fp32/256"
    else:
        constants = n_layers * sum(4 * b for b in blocks)
        what = "fp32 absmax/64"
    how["base_weights"] = (
        f"{n_layers * sum(linear_numel) / 1e9:.2f}B params in 4-bit {quantization} ({packed / GB:.2f} GB)"
        f" + constants, {what} ({constants / GB:.2f} GB) + {head}, norms in "
        f"{'fp32, upcast by prepare_model_for_kbit_training' if w != a else compute_dtype} "
        f"({other_numel * w / GB:.2f} GB)"
    )
    return _Base(packed + constants + other_numel * w, base_params, other_numel, linear_numel)


@dataclass
class _Lora:
    params: int
    weights: int
    gradients: int
    optimizer: int
    paged: bool


def _lora_state(s: _Step, lora_r: int, lora_dtype: str, optim: str, method: str, how: dict) -> _Lora:
    """LoRA's A (r x in) and B (out x r) per targeted linear per layer, their gradients, the optimizer's state."""
    n_layers, lb = s.shape.layers, s.lb
    matrices = []
    for name in s.targets:
        inp, out = s.linears[name]
        matrices += [(lora_r, inp), (out, lora_r)] * n_layers
    lora_params = sum(rows * cols for rows, cols in matrices)
    lora_weights = lora_gradients = lb * lora_params
    how["lora_weights"] = (
        f"{lora_params:,} params (r={lora_r}, {len(s.targets)} targets x {n_layers} layers) x {lb} B "
        + ("(TRL casts adapters on a 4-bit base to bf16)" if lb == 2 else "(fp32)")
    )
    if method == "dpo":
        # The reference is the same base with a frozen copy of the adapter: no second model.
        lora_weights *= 2
        how["lora_weights"] += " x 2 (DPO's frozen reference copy; no second model is loaded)"
    how["lora_gradients"] = f"one {lora_dtype} gradient per LoRA param"
    optimizer_states, how["optimizer_states"] = _optimizer_bytes(optim, matrices, lora_params, lb)
    paged = "paged" in optim.lower() and s.device == "cuda"  # paging is CUDA unified memory
    if paged:
        how["optimizer_states"] += "; paged: can move to CPU RAM under pressure"
    return _Lora(lora_params, lora_weights, lora_gradients, optimizer_states, paged)


@dataclass
class _Activations:
    bytes: int
    per_layer: int  # one layer's full set for the batch
    recomputed: int  # sets counted in `transient` instead (CUDA, checkpointed)


def _activations(
    s: _Step,
    lora_r: int,
    dropout: tuple[float, str],
    attention: str,
    gradient_checkpointing: bool,
    every_n_layers: int,
    lora: _Lora,
    how: dict,
) -> _Activations:
    """What the forward keeps for the backward, per token per layer (the module docstring has each term)."""
    shape, a, w, lb, linears, targets = s.shape, s.a, s.w, s.lb, s.linears, s.targets
    h, i, n_layers, seq_len, tokens = shape.hidden, shape.intermediate, shape.layers, s.seq_len, s.tokens
    per_token = 2 * 4 * h  # fp32 inputs kept by the two RMSNorms
    per_token += 4 * a * shape.heads * shape.head_dim  # q, k, v (repeated to all heads), attention output
    if attention == "sdpa":
        per_token += 4 * shape.heads  # fp32 logsumexp per head
        per_token += seq_len * a  # sdpa turns the bool padding mask into a float one in every layer
    else:
        per_token += shape.heads * seq_len * (4 + (a if a < 4 else 0))  # fp32 softmax + its cast
    # SiLU input, SiLU output, up output. Linear4bit returns its input's dtype, so on an upcast base the
    # projections (and SiLU and the product after them) are fp32 even under autocast.
    per_token += 3 * w * i
    # Per LoRA input feature: what LoRA A keeps (the dropout output, or autocast's copy of it: a bytes)
    # and the dropout mask: bool from CUDA's fused dropout; on CPU dropout.py's 0/1 masks in 2 bytes, or
    # nn.Dropout's noise in the input's dtype: the residual stream's (train.py stops peft's cast to the
    # adapters' fp32, which only sees CUDA autocast), but the compute dtype for o_proj, whose input is
    # sdpa's output even on an fp32 stream.
    lora_dropout, masks = dropout
    into = {t: a if t == "o_proj" else w for t in targets}
    # `compiled` keeps no mask (the backward redraws it from its key); `auto` as planned without the run's
    # length (plan() resolves it, _dropout_masks): 2 bytes.
    cpu_mask = {"compiled": 0, "hash": 2, "auto": 2}
    mask = {t: 1 if s.device == "cuda" else cpu_mask.get(masks, into[t]) for t in targets}
    masks_kept = ""
    if lora_dropout > 0:
        per_token += sum((a + mask[t]) * linears[t][0] for t in targets)
        if s.device == "cpu":
            kept = "not kept (compiled: redrawn in the backward)" if masks == "compiled" else "kept"
            masks_kept = f"; LoRA dropout masks {kept}"
    elif s.device == "cuda" or a == w:
        # Without dropout the LoRA-A input is the module input itself, shared by q/k/v and by gate/up.
        inputs = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in"}
        inputs |= {"up_proj": "mlp_in", "o_proj": "attn_out", "down_proj": "mlp_mid"}
        per_token += a * sum({inputs[t]: linears[t][0] for t in targets}.values())
    else:
        per_token += sum(a * linears[t][0] for t in targets)  # one autocast copy per module
    per_token += a * lora_r * len(targets)  # the rank-r output of each LoRA A
    per_layer = tokens * per_token
    # The final norm's fp32 input; autocast's cached 16-bit copies of fp32 adapters.
    shared = tokens * 4 * h + (lora.params * a if lb > a else 0)
    if attention == "eager":
        shared += s.sequences * seq_len * seq_len * a  # one float mask, added (not kept) in each layer
    if not gradient_checkpointing:
        how["activations"] = (
            f"no checkpointing: {n_layers} layers x {per_layer / GB:.2f} GB "
            f"({per_token / 1024:.0f} KiB/token/layer) + final norm{masks_kept}"
        )
        return _Activations(n_layers * per_layer + shared, per_layer, 0)
    # transformers checkpoints layers 0, n, 2n, ...; the others keep their full set. The backward
    # pass frees each layer's set as it goes, so at most the uncheckpointed sets are alive at once,
    # plus one recomputed set when the last layer is a checkpointed one (its backward comes first).
    kept = math.ceil(n_layers / every_n_layers)
    checkpoints = kept * tokens * h * w
    sets = n_layers - kept + (1 if (n_layers - 1) % every_n_layers == 0 else 0)
    # On CUDA the recomputed set is counted in `transient` instead: it is alive only after the loss's
    # buffers are freed (see there). On CPU the lines are calibrated against RSS, which keeps freed
    # pages, so both stay in the total.
    recomputed = sets - (n_layers - kept) if s.device == "cuda" else 0
    whole = f"; {n_layers - kept} layers kept whole" if kept < n_layers else ""
    how["activations"] = (
        f"checkpointed: {kept} layer inputs ({checkpoints / GB:.2f} GB, {w} B/value){whole}; at most "
        f"{sets - recomputed} full layer sets alive ({per_layer / GB:.2f} GB each = "
        f"{per_token / 1024:.0f} KiB/token) + final norm"
        + (f"; {recomputed} recomputed set in the backward's buffers" if recomputed else "")
        + masks_kept
    )
    return _Activations(checkpoints + (sets - recomputed) * per_layer + shared, per_layer, recomputed)


def _allocator_slack(activations: int, device: str, how: dict) -> int:
    """CPU: the RSS the allocator holds beyond the kept activations; CUDA's counted bytes are allocated ones."""
    how["allocator"] = (
        f"{CPU_ACTIVATION_SLACK:.0%} of the activations: RSS the allocator holds beyond them (measured)"
    )
    return int(CPU_ACTIVATION_SLACK * activations) if device == "cpu" else 0


def _loss_head(
    s: _Step, lm_head_loss: str, scored_tokens: int | None, compute_dtype: str, how: dict
) -> tuple[int, int]:
    """The LM head and loss: what the forward keeps (`logits`) and the backward's buffers."""
    h, v, a, w, tokens = s.shape.hidden, s.shape.vocab, s.a, s.w, s.tokens
    # Under autocast a fp32 lm_head is used through a compute-dtype copy of (a tile of) its weight.
    token_tile, vocab_tile = CPU_LOSS_TILE if s.device == "cpu" else (FUSED_TOKEN_TILE, FUSED_VOCAB_TILE)
    # On CUDA the fused head gathers the labelled positions first (a copy) and tiles only those. On CPU
    # train.py has it gather too (`_cpu_loss_tiles`), but a whole tile is still planned there: the RSS of
    # checkpointed runs did not fall with the smaller tile (docs/plan.md), and this keeps their calibration.
    scored = tokens if s.device == "cpu" or scored_tokens is None else min(scored_tokens, tokens)
    token_tile, vocab_tile = min(scored, token_tile), min(v, vocab_tile)
    head_cast = (vocab_tile if lm_head_loss == "chunked" else v) * h * a if w != a else 0
    if lm_head_loss != "chunked":
        # The model's logits and the fp32 log-softmax cross-entropy keeps; the fp32 upcast (16-bit only)
        # and the logits' gradient come and go, so they are in `transient`.
        how["logits"] = f"(B,T,V)=({s.sequences},{s.seq_len},{v}) in {compute_dtype} + fp32 log-softmax"
        return tokens * v * (a + 4) + head_cast, tokens * v * (4 + (a if a < 4 else 0))
    tile = token_tile * vocab_tile * a
    if s.device == "cpu":
        tile += CPU_FOLD_TEMPORARIES * token_tile * vocab_tile * 4
    # The kernel keeps the final hidden states (w bytes) and works one logits tile at a time.
    kept_for_backward = tokens * h * w + (scored * h * w if scored < tokens else 0)
    # On CUDA (allocated bytes, bench/gpu_check.py's allocation trace) the forward's tile and head copy
    # are freed before the backward allocates its own; on CPU the RSS keeps them (calibrated so).
    logits = kept_for_backward + (0 if s.device == "cuda" else tile + head_cast)
    how["logits"] = (
        f"TRL's fused LM head + loss: one {token_tile} x {vocab_tile} logits tile"
        + (f" (+ {CPU_FOLD_TEMPORARIES} fp32 temporaries of it on CPU)" if s.device == "cpu" else "")
        + ", never the full (B,T,V)"
        + (", + bf16 copy of the lm_head" if head_cast else "")
    )
    return logits, tile + tokens * h * 4 + head_cast  # backward: fp32 grad of the hidden states


def _runtime(s: _Step, model_config: dict[str, Any], base: _Base, how: dict) -> tuple[int, int]:
    """The runtime's own memory (`overhead`) and the loading phase's peak (CPU: the mapped weights file)."""
    overhead = CUDA_OVERHEAD if s.device == "cuda" else CPU_OVERHEAD
    how["overhead"] = (
        "CUDA context, cuBLAS workspace, kernels"
        if s.device == "cuda"
        else "Python + torch/transformers/peft/trl imported (0.47 GiB measured)"
    )
    if s.device != "cpu":
        return overhead, 0
    # from_pretrained maps the weights file: its pages count in the RSS next to the model being built
    # from them (quantized, or cast to the compute dtype; mapped as they are when the dtypes agree).
    file_dtype = str(model_config.get("dtype") or model_config.get("torch_dtype") or "float32")
    file_bytes = base.params * DTYPE_BYTES.get(file_dtype, 4)
    built = base.bytes if s.quantized or DTYPE_BYTES.get(file_dtype, 4) != s.a else 0
    loading = overhead + file_bytes + built
    how["loading"] = (
        f"runtime overhead + the {file_dtype} weights file ({file_bytes / GB:.2f} GB, mapped)"
        + (f" + the model built from it ({built / GB:.2f} GB)" if built else "")
    )
    if s.quantized and DTYPE_BYTES.get(file_dtype, 4) == s.a:
        # Loaded in the file's own dtype, the unquantized weights are the file's pages, so the mapping
        # outlives the load and every page read for quantizing stays in the RSS (clean, reclaimable,
        # but counted). Loaded in another dtype they are copies, and the mapping goes.
        mapped = max(file_bytes - base.other_numel * s.w, 0)
        overhead += mapped
        how["overhead"] += f" + the rest of the weights file, still mapped ({mapped / GB:.2f} GB)"
    return overhead, loading


# --------------------------------------------------------------------------------------------------
# Planning a Config: find config.json, the device and its memory, and what would fit.


def load_model_config(name: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """The model's config.json as a dict, and where it came from; never reads weights or the network."""
    path = Path(name).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise PlanError(f"{path}: no config.json in this folder, so its shapes are unknown")
        return json.loads(config_file.read_text(encoding="utf-8")), str(config_file)
    if name in SHIPPED_CONFIGS:
        shipped = resources.files("qlora_llm").joinpath("assets", "model_configs", SHIPPED_CONFIGS[name])
        return json.loads(shipped.read_text(encoding="utf-8")), f"shipped {SHIPPED_CONFIGS[name]}"
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(found, str):
            return json.loads(Path(found).read_text(encoding="utf-8")), found
    raise PlanError(
        f"config.json of '{name}' could not be found offline: it is not a local folder, not one of the "
        f"configs shipped with qlora-llm ({', '.join(SHIPPED_CONFIGS)}), and not in the Hugging Face "
        "cache. Download it once (`huggingface-cli download <id> config.json`) or point model.name at a "
        "folder that holds its config.json."
    )


def _device_memory(device: str) -> int:
    from qlora_llm.memory import total_bytes

    total = total_bytes(device)
    if total is None and device == "cuda":
        raise PlanError(
            "model.device=cuda but no CUDA GPU is visible here; to plan for a GPU this machine does "
            "not have, give its memory: `qlora-llm plan CONFIG --memory GIB`"
        )
    if total is None:
        raise PlanError("cannot read the total RAM; pass device_memory_bytes")
    return total


def _tokenizer(cfg: Config) -> Any:
    from qlora_llm.model import load_tokenizer

    m = cfg.model
    return load_tokenizer(m.name, m.revision, m.cache_dir, m.trust_remote_code)


def _tokenized(cfg: Config, files: list[Any], tokenizer: Any) -> list[dict[str, list[int]]]:
    """The examples of the files that exist, tokenized as train.py does it, none dropped."""
    from qlora_llm.data import load_examples, tokenize_examples
    from qlora_llm.templates import resolve_template

    records = [r for f in files if f and Path(f).is_file() for r in load_examples(Path(f))]
    if not records:
        return []
    template = resolve_template(cfg.model.template, tokenizer)
    return tokenize_examples(records, tokenizer, template, 10**9)[0]


def example_lengths(cfg: Config) -> list[tuple[int, int]] | None:
    """(tokens, labelled tokens) of the run's training and eval examples as train.py tokenizes them, or None.

    Batches are padded to their longest row, never to data.max_seq_length: on ACLSum (longest example
    347 Mistral tokens) a plan at max_seq_length=512 was 32% over the measured peak of the 7B check on an
    H200 (bench/gpu_check.py), 3.5% over at the data's longest. The labelled tokens (the answer and its
    end token; every token with train.train_on_prompt) are what TRL's fused head scores on CUDA. SFT
    without packing only (packed rows and preference pairs fill other shapes); None when the data or
    tokenizer cannot be read here.
    """
    if cfg.train.method != "sft" or cfg.train.packing:
        return None
    try:
        return row_lengths(cfg, _tokenized(cfg, [cfg.data.train_file, cfg.data.eval_file], _tokenizer(cfg)))
    except Exception as err:  # a plan from the config alone is still a plan
        log.debug("planning at data.max_seq_length: the examples could not be measured (%s)", err)
        return None


def row_lengths(cfg: Config, rows: list[dict[str, list[int]]]) -> list[tuple[int, int]] | None:
    """(tokens, labelled tokens) of tokenized SFT examples; None for other shapes (pairs, packing) or none."""
    if cfg.train.method != "sft" or cfg.train.packing or not rows:
        return None
    every = cfg.train.train_on_prompt
    return [(len(r["input_ids"]), len(r["input_ids"]) if every else sum(r["completion_mask"])) for r in rows]


@dataclass(frozen=True)
class EvaluationShape:
    """The longest sequences `evaluate` will run: an evaluation example, scored whole (prompt and answer,
    nothing dropped, up to eval.max_length), and a general-benchmark request (context + longest choice)."""

    example_tokens: int | None
    general_tokens: int | None
    kl_tokens: int | None = None
    """The longest KL prompt (a generative question, rendered) + eval.general_max_new_tokens: the base's
    log-probs over these stay in memory while the fine-tuned model is evaluated."""
    answer_tokens: int | None = None
    """The longest generative question, rendered, + eval.general_max_new_tokens: the greedy answers' KV
    cache at eval.general_answers_batch_size rows."""


def evaluation_shape(cfg: Config) -> EvaluationShape:
    """Measured from the evaluation data and the general tasks' items (`evaluate` picks the same ones)."""
    m, e = cfg.model, cfg.eval
    try:
        tokenizer = _tokenizer(cfg)
    except Exception as err:  # a plan from the config alone is still a plan
        log.debug("evaluate planned at data.max_seq_length: no tokenizer here (%s)", err)
        return EvaluationShape(None, None)
    example = general = None
    data = e.data_file or cfg.data.eval_file
    try:
        example = max((len(r["input_ids"]) for r in _tokenized(cfg, [data], tokenizer)), default=None)
        if example and e.max_length:
            example = min(example, e.max_length)
    except Exception as err:
        log.debug("evaluate planned at data.max_seq_length: %s could not be measured (%s)", data, err)
    if e.general_tasks:
        try:
            from qlora_llm.benchmarks import check_general, likelihood_samples, longest_request

            tasks = check_general(e.general_tasks, [], Path(m.cache_dir).expanduser() / "lm_eval_tasks")
            samples = likelihood_samples(tasks, e.general_limit, e.general_seed)
            general = longest_request(tasks, samples, tokenizer)
        except Exception as err:
            log.debug("the general benchmarks' requests could not be measured (%s)", err)
    return EvaluationShape(example, general, *_generative_tokens(cfg, tokenizer))


def _generative_tokens(cfg: Config, tokenizer: Any) -> tuple[int | None, int | None]:
    """The longest KL prompt (evaluate's KL prompts: the first eval.kl_prompts questions of the first
    generative task) and the longest question of every generative task, each rendered, + the answer."""
    e = cfg.eval
    if not e.general_generative:
        return None, None
    try:
        from qlora_llm.benchmarks import generative_items, generative_prompt
        from qlora_llm.templates import resolve_template

        template = resolve_template(cfg.model.template, tokenizer)
        lengths = [
            [
                len(
                    tokenizer(generative_prompt(it, template, tokenizer), add_special_tokens=True)[
                        "input_ids"
                    ]
                )
                for it in items
            ]
            for items in (
                generative_items(n, e.general_generative_limit, e.general_seed) for n in e.general_generative
            )
        ]
    except Exception as err:
        log.debug("the generative questions could not be measured (%s)", err)
        return None, None
    kl = max(lengths[0][: e.kl_prompts], default=0)
    answers = max((n for task in lengths for n in task), default=0)
    return (
        kl + e.general_max_new_tokens if kl else None,
        answers + e.general_max_new_tokens if answers else None,
    )


def _setup(
    cfg: Config,
    device: str,
    processes: int = 1,
    lengths: list[tuple[int, int]] | None = None,
    model_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The estimate's keyword arguments, resolved from the config for this device.

    `lengths` (example_lengths): the sequence length is then the longest example train.py keeps (it
    drops, not cuts, those over data.max_seq_length), not max_seq_length itself, and a batch scores at
    most batch_size x the most labelled tokens of one kept example. `model_config`: resolve
    `lora.dropout_masks: auto` on CPU as the run will (`_dropout_masks`); without it `auto` is planned
    with its masks kept."""
    compute = cfg.model.compute_dtype
    if compute == "auto" and device == "cuda":
        # bf16 and fp16 are both 2 bytes, so CUDA without bf16 (model.pick_compute_dtype) plans the same.
        compute = "bfloat16"
    elif compute == "auto":
        from qlora_llm.model import pick_compute_dtype

        compute = str(pick_compute_dtype("auto", "cpu", probe_cpu=True)).removeprefix("torch.")
    kept = [(n, labelled) for n, labelled in lengths or [] if n <= cfg.data.max_seq_length]
    return {
        "quantization": cfg.model.quantization,
        "double_quant": cfg.model.double_quant,
        "compute_dtype": compute,
        "lora_r": cfg.lora.r,
        "target_modules": list(cfg.lora.target_modules),
        "batch_size": cfg.train.batch_size,
        "seq_len": max((n for n, _ in kept), default=cfg.data.max_seq_length),
        "scored_tokens": cfg.train.batch_size * max(labelled for _, labelled in kept) if kept else None,
        # "auto" until _resolve_checkpointing decides, with the memory at hand.
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "every_n_layers": 1,
        "optim": cfg.train.optim,
        "device": device,
        "lora_dropout": cfg.lora.dropout,
        "dropout_masks": _dropout_masks(cfg, model_config, compute, processes, lengths)
        if device == "cpu" and model_config is not None
        else cfg.lora.dropout_masks,
        "kbit_prepared": cfg.model.upcast_layers,
        "processes": processes,
        "distributed": cfg.train.distributed,
        "method": cfg.train.method,
        # ORPO's trainer computes the full (B,T,V) logits; SFT and DPO use TRL's fused LM head.
        **({"lm_head_loss": "full"} if cfg.train.method == "orpo" else {}),
    }


def planned_steps(cfg: Config, examples: int, processes: int) -> int:
    """Optimizer steps a run takes: train.max_steps, else its epochs over `examples` in batches of
    batch_size per process, accumulated."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(examples / (t.batch_size * processes))
    return math.ceil(t.num_epochs * batches / t.gradient_accumulation_steps)


def _dropout_masks(
    cfg: Config,
    model_config: dict[str, Any],
    compute: str,
    processes: int,
    lengths: list[tuple[int, int]] | None,
) -> str:
    """`lora.dropout_masks: auto` on CPU as train.py will decide it: `compiled` (no mask kept for the
    backward) when its eager masks would take long enough to pay for compiling on this CPU, else `hash`
    (2-byte masks kept). Both ask `dropout.compiles`, with the same timing when `train` plans.

    The steps: train.max_steps, or the epochs over the examples read (eval rows included, so at most a
    few steps more than the run takes); a run whose data cannot be read is planned with its masks."""
    t, mode = cfg.train, cfg.lora.dropout_masks
    if mode != "auto" or cfg.lora.dropout == 0:
        return mode
    if t.max_steps <= 0 and not lengths:
        return "hash"
    steps = planned_steps(cfg, len(lengths or []), processes)
    import torch

    from qlora_llm.dropout import compiles, lora_input_dtypes, mask_draws

    shape = ModelShape.from_config(model_config)
    dropouts = len(_resolve_targets(list(cfg.lora.target_modules), shape)) * shape.layers
    # Checkpointing `auto` is not decided yet (it needs this plan's peak): counted as off, half the draws,
    # so a run that compiles only because checkpointing doubled its draws is planned with its masks kept.
    draws = mask_draws(dropouts, steps, t.gradient_accumulation_steps, t.gradient_checkpointing is True)
    upcast = cfg.model.quantization != "none" and cfg.model.upcast_layers
    dtypes = lora_input_dtypes(getattr(torch, compute), upcast)
    masks = (t.batch_size, cfg.data.max_seq_length, shape.hidden)
    return "compiled" if compiles(cfg.lora.dropout, masks, dtypes, draws) else "hash"


def _resolve_checkpointing(
    model_config: dict[str, Any], setup: dict[str, Any], usable: int
) -> tuple[dict[str, Any], str]:
    """`train.gradient_checkpointing: auto` decided with the memory at hand, and a phrase saying what.

    Off when the run fits without it (checkpointing costs ~a third of the speed); else on for the fewest
    decoder layers that make it fit (transformers checkpoints every n-th layer: 1, 2, 3, ... of L);
    else on for all, and the plan's suggestions take it from there.
    """
    chosen = setup["gradient_checkpointing"]
    layers = ModelShape.from_config(model_config).layers
    if chosen != "auto":
        return setup, "on" if chosen else "off"
    off = setup | {"gradient_checkpointing": False}
    if estimate_memory(model_config, **off).peak <= usable:
        return off, "auto: off (the run fits without it)"
    tried: set[int] = set()
    for every in range(layers, 1, -1):
        kept = math.ceil(layers / every)
        if kept in tried:
            continue
        tried.add(kept)
        partial = setup | {"gradient_checkpointing": True, "every_n_layers": every}
        if estimate_memory(model_config, **partial).peak <= usable:
            return partial, f"auto: on for {kept} of {layers} layers (every {every}), the fewest that fit"
    return setup | {"gradient_checkpointing": True}, f"auto: on for all {layers} layers"


def _with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    tree = cfg.model_dump()
    for key, value in overrides.items():
        section, name = key.split(".")
        tree[section][name] = value
    return Config.model_validate(tree)


def _format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _halved_batch(batch: int, effective: int) -> dict[str, Any]:
    # More accumulation keeps the examples per optimizer step (the effective batch) as they were.
    return {
        "train.batch_size": batch // 2,
        "train.gradient_accumulation_steps": math.ceil(effective / (batch // 2)),
    }


def _rank_8(cfg: Config) -> dict[str, Any]:
    fix: dict[str, Any] = {"lora.r": 8}
    if cfg.lora.alpha * 8 % cfg.lora.r == 0:
        fix["lora.alpha"] = cfg.lora.alpha * 8 // cfg.lora.r  # keep alpha/r, the adapter's scale
    return fix


def _single_fixes(cfg: Config) -> list[dict[str, Any]]:
    """One change each, in the order to try them: the cheapest in quality and speed first."""
    effective = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    fixes: list[dict[str, Any]] = []
    if cfg.train.gradient_checkpointing is False:  # "auto" already checkpoints as much as needed
        fixes.append({"train.gradient_checkpointing": True})
    if cfg.train.batch_size > 1:
        fixes.append(_halved_batch(cfg.train.batch_size, effective))
    if cfg.data.max_seq_length >= 64:
        fixes.append({"data.max_seq_length": cfg.data.max_seq_length // 2})
    if cfg.lora.r > 8:
        fixes.append(_rank_8(cfg))
    if cfg.model.quantization == "none":
        fixes.append({"model.quantization": "nf4"})
    return fixes


def _stacked_fixes(cfg: Config) -> Iterator[dict[str, Any]]:
    """The same changes piled up in the same order, the batch halved down to 1: for when none suffices alone."""
    effective = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    stacked: dict[str, Any] = {}
    if cfg.train.gradient_checkpointing is False:
        stacked["train.gradient_checkpointing"] = True
        yield dict(stacked)
    batch = cfg.train.batch_size
    while batch > 1:
        stacked |= _halved_batch(batch, effective)
        batch //= 2
        yield dict(stacked)
    if cfg.data.max_seq_length >= 64:
        stacked["data.max_seq_length"] = cfg.data.max_seq_length // 2
        yield dict(stacked)
    if cfg.lora.r > 8:
        stacked |= _rank_8(cfg)
        yield dict(stacked)
    if cfg.model.quantization == "none":
        stacked["model.quantization"] = "nf4"
        yield dict(stacked)


@dataclass(frozen=True)
class StagePeak:
    """The peak of one stage of the run (train, evaluate, merge, serve) as named components, in bytes."""

    name: str
    components: dict[str, int]
    how: str

    @property
    def peak(self) -> int:
        return sum(self.components.values())


def _weights_kind(quantization: str) -> str:
    return "plain" if quantization == "none" else f"4-bit {quantization}"


def _fused_copy(shape: ModelShape, quantization: str, device: str) -> dict[str, int]:
    """4-bit weights evaluated or served on a CPU: a layer that alternates between the fused kernel (decode
    steps) and the plain one (prefill, scoring) keeps both layouts (cpu4bit.py): the 4-bit data again and
    its bf16 block constants. Counted wherever it can happen (which kernel runs is measured at load)."""
    if quantization == "none" or device != "cpu":
        return {}
    per_layer = sum(
        math.ceil(i * o / 2) + 2 * math.ceil(i * o / QUANT_BLOCK) for i, o in shape.linears().values()
    )
    return {"fused kernel's copy": shape.layers * per_layer}


def _kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, a: int) -> int:
    # K and V per layer per token: 2 * kv_heads * head_dim values in the compute dtype.
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * a * batch * tokens


def estimate_stages(
    model_config: dict[str, Any],
    cfg: Config,
    setup: dict[str, Any],
    evaluation: EvaluationShape | None = None,
    under_run: bool = False,
) -> list[StagePeak]:
    """The peak of every stage `qlora-llm run` goes through, each as named components.

    `under_run`: on CPU, training's stage also holds `run` itself, waiting in RAM while its training
    process trains (RUN_PARENT); a `qlora-llm train` has no such process, and neither does what the
    training process decides for itself (the memory available to it already excludes its parent's).

    train: the larger of the training step (`estimate_memory`) and an in-training evaluation forward at
    the eval batch (train.batch_size, what train.py gives the Trainer) and the longest sequence
    (data.max_seq_length: sequences are cut there) over what is resident when it runs: on CPU the
    loading peak (the step-0 evaluation comes right after it), on CUDA the weights, adapter and
    optimizer state. The forward is without autograd through TRL's fused LM head: one layer's
    intermediates and the loss tiles, never the (B, T, V) logits. An evaluation after a step reuses the
    step's freed memory (measured: no rise in VmHWM, docs/plan.md). Saves copy only the adapter.
    evaluate: the base in eval.quantization (fp32 on CPU under compute_dtype auto) + adapter, and the
    largest of: the perplexity forward at eval.batch_size over the longest evaluation example
    (`evaluation`, else the training length; its LM head a tile of positions at a time), greedy answers at eval.answers_batch_size (their KV cache over prompt +
    eval.max_new_tokens and the prefill's activations), and lm-eval's batch of eval.general_batch_size general-benchmark requests
    (3 logits-sized tensors in the model's dtype); the base's KL log-probs, kept for the fine-tuned
    model (`qlora-llm run` trains, and `evaluate` scores the base, in a process of its own: nothing
    training or the base's evaluation leaves is under the fine-tuned model's). merge: the base as evaluation loads
    it, merged in place, and on CPU the copy written beside it. serve: the weights in serve.quantization and the KV cache of serve.max_batch_size rows.
    """
    shape = ModelShape.from_config(model_config)
    est = estimate_memory(model_config, **setup)
    a = DTYPE_BYTES[setup["compute_dtype"]]
    T = setup["seq_len"]
    V = shape.vocab
    params = est.base_params
    eval_b = cfg.train.batch_size
    # No autograd in eval: one layer's intermediates at a time, B*T*(3I + 4H) in the compute dtype, and
    # the LM head's tiles as in a step (`logits`: the final hidden states and a tile's temporaries; on
    # CUDA `logits` holds no tile, so the step's backward buffers stand in for it, an upper bound).
    head = est.logits + (est.transient if setup["device"] == "cuda" else 0)
    eval_forward = eval_b * T * (3 * shape.intermediate + 4 * shape.hidden) * a + head
    if est.loading:
        resident = est.loading
    else:
        resident = est.base_weights + est.lora_weights + est.optimizer_states + est.overhead
    parent = RUN_PARENT if under_run and setup["device"] == "cpu" else 0
    train = StagePeak(
        "train",
        {
            "training step": est.peak,
            "eval forward above it": max(0, resident + eval_forward - est.peak),
            **({"the waiting `run` process": parent} if parent else {}),
        },
        f"the larger of a step and an eval forward at batch {eval_b} x {T} tokens (fused LM head, no "
        f"logits: {_gib(eval_forward)}) over {'the loading peak' if est.loading else 'the resident state'} "
        f"({_gib(resident)}); saves copy only the adapter"
        + ("; beside `run`, which waits in RAM while its training process trains" if parent else ""),
    )
    # Evaluation and serving load the base in eval.quantization / serve.quantization (plain by default)
    # and, under compute_dtype auto on CPU, in fp32 (model.pick_compute_dtype), not as training did.
    infer_dtype = "float32" if cfg.model.compute_dtype == "auto" and setup["device"] == "cpu" else None
    infer_dtype = infer_dtype or setup["compute_dtype"]
    ai = DTYPE_BYTES[infer_dtype]

    def inference(quantization: str) -> MemoryEstimate:
        return estimate_memory(
            model_config, **setup | {"quantization": quantization, "compute_dtype": infer_dtype}
        )

    e = cfg.eval
    ev = inference(e.quantization)
    t_eval = evaluation.example_tokens if evaluation and evaluation.example_tokens else T
    t_general = evaluation.general_tokens if evaluation and e.general_tasks else None
    t_answers = evaluation.answer_tokens if evaluation and e.general_generative else None
    largest = _largest_eval_batch(cfg, shape, t_eval, t_general, t_answers, ai)
    # The base's next-token log-probs on the KL prompts (fp16), held until the fine-tuned model is scored.
    kl_t = evaluation.kl_tokens if evaluation and e.general_generative else None
    kl = e.kl_prompts * kl_t * V * 2 if kl_t else 0
    weights = ev.base_weights + est.lora_weights
    # The base is evaluated apart (evaluate._score_base_apart) with the evaluating process waiting beside it
    # (RUN_PARENT on CPU), where the fine-tuned model's window holds the base's KL log-probs instead.
    beside = RUN_PARENT if setup["device"] == "cpu" and e.compare != "none" else 0
    evaluate = StagePeak(
        "evaluate",
        {
            "weights + adapter": weights,
            **_fused_copy(shape, e.quantization, setup["device"]),
            "logits or KV cache": largest[0],
            "activations": e.batch_size * t_eval * (3 * shape.intermediate + 4 * shape.hidden) * ai,
            "loading": max(0, ev.loading - ev.overhead - weights),
            "runtime overhead": ev.overhead,
            # lm-eval, its tasks and rouge-score imported on top of training's libraries (RSS, CPU only).
            "evaluation libraries": EVAL_LIBRARIES if e.general_tasks and setup["device"] == "cpu" else 0,
            "base's KL log-probs": kl,
            "the evaluating process beside the base": max(0, beside - kl),
        },
        f"{_weights_kind(e.quantization)} weights in {infer_dtype}, the base (in a process of its own, "
        "the evaluating process waiting beside it) then the tuned model (with the base's KL log-probs); "
        f"the largest batch: {largest[1]}",
    )
    overhead = CUDA_OVERHEAD if setup["device"] == "cuda" else CPU_OVERHEAD
    merge = _merge_peak(params, infer_dtype, setup["device"], overhead)
    sv = cfg.serve
    served = inference(sv.quantization)
    serve = StagePeak(
        "serve",
        {
            "weights": served.base_weights,
            **_fused_copy(shape, sv.quantization, setup["device"]),
            "KV cache": _kv_cache_bytes(shape, sv.max_batch_size, T + sv.max_new_tokens, ai),
            "runtime overhead": served.overhead,
        },
        f"{_weights_kind(sv.quantization)} weights in {infer_dtype}, {sv.max_batch_size} rows of {T} + "
        f"{sv.max_new_tokens} tokens",
    )
    return [train, evaluate, merge, serve]


def _merge_peak(params: int, dtype: str, device: str, overhead: int) -> StagePeak:
    """merge.py loads the base as evaluation does (16-bit on CUDA, fp32 on CPU under auto) and merges in
    place; saving copies the weights through host memory (1.50 GiB planned and measured on SmolLM2, CPU),
    so on CUDA the device holds the base alone."""
    size = params * DTYPE_BYTES[dtype]
    on_gpu = device == "cuda"
    return StagePeak(
        "merge",
        {
            "base, full precision": size,
            **({} if on_gpu else {"merged copy": size}),
            "runtime overhead": overhead,
        },
        f"the base loaded in {dtype} and merged in place; "
        + ("the copy that is written goes through host memory" if on_gpu else "the copy written beside it"),
    )


def _greedy_batch_bytes(shape: ModelShape, rows: int, prompt: int, total: int, ai: int) -> int:
    """A batch of greedy answers: the KV cache over `total` tokens a row, the last position's fp32
    logits, and the prefill's activations over `prompt` tokens (one layer's at a time)."""
    return (
        _kv_cache_bytes(shape, rows, total, ai)
        + rows * shape.vocab * 4
        + rows * prompt * (3 * shape.intermediate + 4 * shape.hidden) * ai
    )


def _largest_eval_batch(
    cfg: Config, shape: ModelShape, t_eval: int, t_general: int | None, t_answers: int | None, ai: int
) -> tuple[int, str]:
    """The largest of evaluate's batches, in bytes, and what it is: the perplexity pass, greedy answers'
    KV cache, lm-eval's batch of general-benchmark requests, or the generative tasks' greedy answers."""
    e, V = cfg.eval, shape.vocab
    # evaluate.score_tokens: the decoder's last hidden states over the batch, then the LM head a tile of
    # positions at a time (next_token_nll): the tile's logits, their fp32 upcast (none when fp32 already)
    # and cross_entropy's fp32 log-softmax, never the whole (B, T, V).
    tile = min(e.batch_size * t_eval, max(1, EVAL_LOGITS_TILE_BYTES // (8 * V)))
    ev_logits = e.batch_size * t_eval * shape.hidden * ai + tile * V * (ai + (4 if ai < 4 else 0) + 4)
    r = e.answers_batch_size
    kv = _greedy_batch_bytes(shape, r, t_eval, t_eval + e.max_new_tokens, ai)  # ROUGE's answers
    # lm-eval's batch: measured +0.48 / +0.91 GiB at 8 / 16 requests of 116 tokens over a 49k vocabulary
    # in fp32, 2.7-2.8 copies of the (B, T, V) logits (its logits, their log-softmax and a temporary).
    general = e.general_batch_size * t_general * V * LM_EVAL_LOGITS_COPIES * ai if t_general else 0
    n = e.general_answers_batch_size
    answers = _greedy_batch_bytes(shape, n, t_answers, t_answers, ai) if t_answers else 0  # generative
    return max(
        (
            ev_logits,
            f"perplexity at batch {e.batch_size} x {t_eval} tokens, its LM head {tile} positions at a time",
        ),
        (kv, f"greedy answers at batch {r} with a KV cache of {t_eval} + {e.max_new_tokens} tokens"),
        (
            general,
            f"lm-eval's logits, log-softmax and a temporary at batch {e.general_batch_size} x {t_general} tokens",
        ),
        (answers, f"generative answers at batch {n} with a KV cache of {t_answers} tokens"),
    )


@dataclass(frozen=True)
class Suggestion:
    """Overrides that make the run fit, and the peak they give."""

    overrides: list[str]
    peak: int


@dataclass(frozen=True)
class PlanReport:
    """The estimate for one config on one device, whether it fits, and what would."""

    model: str
    config_source: str
    device: Literal["cuda", "cpu"]
    device_memory: int
    setup: dict[str, Any]
    estimate: MemoryEstimate
    fits: bool
    suggestions: list[Suggestion]
    notes: list[str]
    seed_setup: bool
    checkpointing: str = "on"
    """What gradient checkpointing the run gets: on, off, or what `auto` chose and why."""
    stages: list[StagePeak] = field(default_factory=list)
    """The peak of every stage of the whole run; the verdict is on VERDICT_STAGES (training)."""

    @property
    def peak(self) -> int:
        """The peak the verdict is on: training's stage (the training step when no stages were planned)."""
        return max([st.peak for st in self.stages if st.name in VERDICT_STAGES], default=self.estimate.peak)

    @property
    def peak_stage(self) -> str:
        ran = [st for st in self.stages if st.name in VERDICT_STAGES]
        return max(ran, key=lambda st: st.peak).name if ran else "train"

    @property
    def usable_memory(self) -> int:
        return int(FIT_MARGIN * self.device_memory)

    def too_large(self, names: tuple[str, ...]) -> list[StagePeak]:
        """The stages among `names` planned above the usable memory."""
        return [st for st in self.stages if st.name in names and st.peak > self.usable_memory]

    @property
    def verdict(self) -> str:
        """One sentence: the peak against the usable memory."""
        sign = "<=" if self.fits else ">"
        return (
            f"peak {_gib(self.peak)} GiB (in {self.peak_stage}) {sign} {_gib(self.usable_memory)} GiB usable "
            f"({FIT_MARGIN:.0%} of {_gib(self.device_memory)} GiB on {self.device})."
        )


def _is_seed_setup(model_config: dict[str, Any], setup: dict[str, Any]) -> bool:
    seed_model, _ = load_model_config(SEED_MODEL)
    return (
        ModelShape.from_config(model_config) == ModelShape.from_config(seed_model)
        and setup["quantization"] == "nf4"
        and setup["double_quant"]
        and setup["lora_r"] == 16
        and sorted(setup["target_modules"]) == sorted(ALL_LINEAR)
        and setup["batch_size"] == 2
        and setup["seq_len"] == 512
        and setup["gradient_checkpointing"] is True
        and setup["every_n_layers"] == 1
        and setup["optim"] == "paged_adamw_32bit"
        and setup["device"] == "cuda"
        and setup["processes"] == 1
    )


def _memory_budget(
    device: str, device_memory_bytes: int | None, processes: int, under_run: bool
) -> tuple[int, int, str, list[str]]:
    """This process's memory, the budget checkpointing (auto) is decided on, what it was decided on, notes."""
    from qlora_llm.memory import available_bytes

    memory = device_memory_bytes if device_memory_bytes is not None else _device_memory(device)
    notes: list[str] = []
    if device == "cpu" and processes > 1:
        # The processes of a CPU run share this machine's RAM; each may plan with its share.
        notes.append(
            f"{processes} processes share {_gib(memory)} GiB of RAM: {_gib(memory // processes)} each"
        )
        memory //= processes
    usable = int(FIT_MARGIN * memory)
    # Checkpointing (auto) is decided from the RAM available now, not the total, when the memory was
    # not given: a run that fits the total but not what other processes left is killed.
    available = available_bytes(device) if device_memory_bytes is None else None
    decide = usable if available is None else min(usable, int(FIT_MARGIN * available // processes))
    if under_run and device == "cpu":
        decide -= RUN_PARENT  # what `run`'s training process will find available, `run` itself running
    if available is not None and available // processes <= memory:
        basis = f"{_gib(available)} GiB available now"
    else:
        basis = f"{_gib(memory)} GiB {'given' if device_memory_bytes is not None else 'in total'}"
    return memory, decide, basis, notes


def plan(
    cfg: Config,
    *,
    device_memory_bytes: int | None = None,
    max_suggestions: int = 3,
    processes: int = 1,
    measure_evaluation: bool = False,
    rows: list[dict[str, list[int]]] | None = None,
    under_run: bool = False,
) -> PlanReport:
    """Estimate `cfg`'s training memory on its device and say whether it fits, and if not what would.

    `processes`: the run's number of processes (GPUs), `--nproc`; the estimate is then per GPU, for
    `train.distributed` (ddp or fsdp). `measure_evaluation`: size the evaluate stage from the evaluation
    data and the general benchmarks' items (`evaluation_shape`, a few seconds: `qlora-llm plan` does);
    without it that stage is planned at the training length, with no lm-eval batch. The verdict is on
    training either way. `rows`: the run's tokenized examples when the caller has them (train.py), so
    the data is not read and tokenized a second time. `under_run`: plan training as `qlora-llm run` runs
    it, beside `run`'s own process (`estimate_stages`); `qlora-llm plan` does.
    """
    model_config, source = load_model_config(cfg.model.name, cfg.model.revision)
    log.info("planning %s from %s", cfg.model.name, source)
    from qlora_llm.model import pick_device

    device = pick_device(cfg.model.device, check=False)
    memory, decide, basis, notes = _memory_budget(device, device_memory_bytes, processes, under_run)
    usable = int(FIT_MARGIN * memory)

    lengths = example_lengths(cfg) if rows is None else row_lengths(cfg, rows)

    def estimate(c: Config) -> MemoryEstimate:
        resolved, _ = _resolve_checkpointing(
            model_config, _setup(c, device, processes, lengths, model_config), decide
        )
        step = estimate_memory(model_config, **resolved)
        # A suggestion must make training fit, in-training evaluation included.
        stages = estimate_stages(model_config, c, resolved, under_run=under_run)
        ran = [st.peak for st in stages if st.name in VERDICT_STAGES]
        return replace(step, loading=max(step.peak, *ran))

    setup, checkpointing = _resolve_checkpointing(
        model_config, _setup(cfg, device, processes, lengths, model_config), decide
    )
    if setup["seq_len"] < cfg.data.max_seq_length:
        notes.append(
            f"batches are padded to their longest row: the longest example train.py keeps is "
            f"{setup['seq_len']} tokens (data.max_seq_length={cfg.data.max_seq_length}), so {setup['seq_len']} is planned"
        )
    if checkpointing.startswith("auto"):
        checkpointing += f", decided on {basis}"
    est = estimate_memory(model_config, **setup)
    evaluation = evaluation_shape(cfg) if measure_evaluation else None
    stages = estimate_stages(model_config, cfg, setup, evaluation, under_run=under_run)
    whole = max(est.peak, *(st.peak for st in stages if st.name in VERDICT_STAGES))
    fits = whole <= usable
    for st in stages:
        if st.name not in VERDICT_STAGES and st.peak > usable:
            hint = {
                # pipeline._check_evaluation_fits: `run` refuses what this note warns of, and says so.
                "evaluate": " (eval.quantization=nf4 loads it in 4-bit); `qlora-llm run` stops before "
                "training for it unless given --force",
                "serve": " (serve.quantization=nf4)",
                # pipeline._merge_will_not_fit: `run` skips the merge and keeps the adapter.
                "merge": "; `qlora-llm run` skips it and keeps the adapter as the run's model",
            }
            notes.append(
                f"{st.name} needs {_gib(st.peak)} GiB ({st.how}): more than this device's usable memory"
                + hint.get(st.name, "")
            )
    suggestions: list[Suggestion] = []
    if not fits:
        for fix in _single_fixes(cfg):
            peak = estimate(_with_overrides(cfg, fix)).peak
            if peak <= usable:
                suggestions.append(Suggestion([f"{k}={_format_value(v)}" for k, v in fix.items()], peak))
        if not suggestions:
            for fix in _stacked_fixes(cfg):
                peak = estimate(_with_overrides(cfg, fix)).peak
                if peak <= usable:
                    suggestions.append(Suggestion([f"{k}={_format_value(v)}" for k, v in fix.items()], peak))
                    break
        suggestions = suggestions[:max_suggestions]
        if not suggestions:
            floor = est.base_weights + est.overhead
            notes.append(
                f"nothing in reach fits: the base weights and runtime overhead alone take {floor / GIB:.2f} GiB "
                f"of {usable / GIB:.2f} GiB usable; use a smaller model or a device with more memory"
            )
        if device == "cuda" and est.paged_optimizer and est.peak - est.optimizer_states <= usable:
            notes.append(
                f"it may still run: the paged optimizer can move its {est.optimizer_states / GIB:.2f} GiB "
                "of state to CPU RAM, at some cost in speed"
            )
    shape = ModelShape.from_config(model_config)
    if shape.max_positions is not None and setup["seq_len"] > shape.max_positions:
        notes.append(
            f"data.max_seq_length={setup['seq_len']} is above the model's "
            f"max_position_embeddings={shape.max_positions}"
        )
    return PlanReport(
        model=cfg.model.name,
        config_source=source,
        device=device,
        device_memory=memory,
        setup=setup,
        estimate=est,
        fits=fits,
        suggestions=suggestions,
        notes=notes,
        seed_setup=_is_seed_setup(model_config, setup),
        checkpointing=checkpointing,
        stages=stages,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(report: PlanReport) -> str:
    """A table of the estimate (GiB; with GB and the seed's GB beside it for the seed's setup), the verdict,
    and what would fit."""
    est, s = report.estimate, report.setup
    quant = "no quantization" if s["quantization"] == "none" else s["quantization"]
    if s["quantization"] != "none" and s["double_quant"]:
        quant += " + double quant"
    lines = [
        f"Will it fit? {report.model} on {report.device} with {_gib(report.device_memory)} GiB "
        f"(config.json: {report.config_source})",
        f"setup: {quant}, {s['compute_dtype']} compute, LoRA r={s['lora_r']} on {len(s['target_modules'])} "
        f"modules ({est.lora_params / 1e6:.1f}M params), batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"gradient checkpointing {report.checkpointing}, {s['optim']}",
    ]
    if s.get("method", "sft") != "sft":
        lines.append(
            f"{s['method'].upper()}: each example's chosen and rejected answers in one step (2 x batch)"
            + (
                "; the reference is the base with a frozen copy of the adapter, not a second model"
                if s["method"] == "dpo"
                else "; no reference model"
            )
        )
    if s["processes"] > 1:
        lines.append(
            f"{s['processes']} processes, {s['distributed']}: memory per {report.device} device; "
            + (
                "each holds the whole model, activations for its own batch"
                if s["distributed"] == "ddp"
                else "weights, gradients and optimizer states sharded 1/" + str(s["processes"])
            )
        )
    lines.append("")
    seed = report.seed_setup
    header = f"{'component':<20}{'GiB':>7}" + (f"{'GB':>7}{'seed GB':>9}" if seed else "") + "  how"
    lines += [header, "-" * len(header)]

    def row(label: str, n: int, seed_value: str, how: str) -> str:
        extra = f"{n / GB:>7.2f}{seed_value:>9}" if seed else ""
        return f"{label:<20}{_gib(n):>7}{extra}  {how}"

    for key, label in est.COMPONENTS:
        if key == "allocator" and not est.allocator:
            continue  # CUDA: the caching allocator's bytes are what the activations line counts
        seed_gb = SEED_TABLE_GB.get(key)
        lines.append(
            row(label, getattr(est, key), "-" if seed_gb is None else f"{seed_gb:.1f}", est.how[key])
        )
    lines.append(row("total", est.total, f"{SEED_TOTAL_GB:.1f}", "sum of the lines above"))
    if est.loading:
        lines.append(row("while loading", est.loading, "-", est.how["loading"]))
    step_peak = f"total + transient: {est.how['transient']}"
    if est.loading:
        step_peak = f"the larger of loading and {step_peak}"
    lines.append(row("peak", est.peak, f"<={SEED_PEAK_GB:.1f}", step_peak))
    if seed:
        lines.append(
            "seed column: the seed's base is 4 bits x the linear params only; ours adds the quantization "
            "constants and the unquantized embeddings, lm_head and norms. The seed has no gradient or "
            "logits line, and does not itemize its 1.5 GB of activations."
        )
    if report.stages:
        lines += ["", f"{'stage':<20}{'GiB':>7}  components"]
        for st in report.stages:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in st.components.items())
            lines.append(f"{st.name:<20}{_gib(st.peak):>7}  {parts}; {st.how}")
        largest = max(report.stages, key=lambda st: st.peak)
        lines.append(
            f"the verdict is on {report.peak_stage} ({_gib(report.peak)} GiB); the largest stage is "
            f"{largest.name} ({_gib(largest.peak)} GiB)"
        )
    lines.append("")
    if report.fits:
        lines.append(
            f"verdict: FITS - {report.verdict} The other {1 - FIT_MARGIN:.0%} is headroom for allocator "
            "fragmentation, other processes and the estimate's own error."
        )
    else:
        lines.append(f"verdict: DOES NOT FIT - {report.verdict}")
    if report.suggestions:
        lines.append("would fit with:")
        for sug in report.suggestions:
            lines.append(f"  {' '.join(sug.overrides)}   -> peak {_gib(sug.peak)} GiB")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)

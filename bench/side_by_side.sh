#!/usr/bin/env bash
# The training table in docs/train.md: qlora-llm beside LLaMA-Factory, LitGPT and the seed's plain TRL script,
# one run at a time, through the peers harness (../shared/peers: its step clock, settings and summary).
#
#   .venv/bin/qlora-llm plan configs/smollm2-cpu.yaml   # converts the bundled model, which install.sh copies
#   bash ../shared/peers/install.sh                 # once, ~10 min
#   bash bench/side_by_side.sh PASS [RUN ...]       # default: every run below, ~30 min on 2 cores
#   python ../shared/peers/summarize.py             # one JSON row per run: tokens/s over steps 6-30, peak RSS
#
# Peer runs (trl-glibc, lf-qlora, lf-lora-nogc, litgpt-lora, ...) are the harness's own. Ours are run
# here with the harness's exact settings, environment and clock, plus `lora.dropout=0.05`: the
# harness's ours-* runs take the demo config's dropout 0, which the peers do not get.
#   ours-qlora       the library's defaults: compute_dtype auto, gradient_checkpointing auto (off: it fits;
#                    set here, since the demo config turns checkpointing on)
#   ours-qlora-gc    checkpointing on for every layer (the memory-matched comparison)
#   ours-qlora-gc-fp32, ours-qlora-fp32   the same in fp32 (what `auto` gave before the probe)
#   ours-lora        plain LoRA (model.quantization=none), checkpointing auto
#   ours-lora-fp32   the same in fp32
#   ours-qlora-gc-torchdrop   ours-qlora-gc with torch's nn.Dropout masks (lora.dropout_masks=torch): the A/B
#                    of the CPU dropout (src/qlora_llm/dropout.py)
#   ours-qlora-gc-bf16, ours-qlora-bf16   ours-qlora-gc / ours-qlora with model.upcast_layers=false: embeddings,
#                    norms and head in bf16 as in LLaMA-Factory's bf16 run (the like-for-like of lf-qlora-bf16)
#   ours-qlora-gc-bf16-pinned   the same with bf16 pinned: where `auto` keeps fp32 (a CPU whose bf16 matmul
#                    probe is slow), what bf16 would have given
#   ours-qlora-gc-compiled, ours-qlora-gc-bf16-compiled, ours-lora-compiled   the same with
#                    lora.dropout_masks=compiled: what `auto` picks for a run longer than this 30-step one
#                    (it compiles when the run would spend over 10 s in eager masks: from ~22 steps here
#                    with checkpointing, ~43 without)
set -u
PASS=${1:?usage: side_by_side.sh PASS [RUN ...]}; shift
RUNS=${*:-trl-glibc lf-qlora lf-lora-nogc litgpt-lora ours-qlora ours-qlora-gc ours-lora ours-qlora-gc-fp32 ours-lora-fp32}
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=$(cd "$PROJECT/../shared/peers" && pwd)
P=${PEERS_DIR:-$HOME/.cache/qlora-llm-peers}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
OURS="data.train_file=$P/data/train200.jsonl data.eval_file=null data.eval_fraction=0 data.max_seq_length=256 \
train.batch_size=4 train.gradient_accumulation_steps=1 train.max_steps=30 train.learning_rate=2e-4 train.logging_steps=1 \
train.early_stopping_patience=0 train.eval_steps=30 train.save_steps=30 lora.dropout=0.05"
mkdir -p "$P/logs" "$P/runs"
for RUN in $RUNS; do
  case $RUN in
    ours-qlora)         EXTRA="train.gradient_checkpointing=auto" ;;
    ours-qlora-gc)      EXTRA="train.gradient_checkpointing=true" ;;
    ours-qlora-fp32)    EXTRA="train.gradient_checkpointing=auto model.compute_dtype=float32" ;;
    ours-qlora-gc-fp32) EXTRA="train.gradient_checkpointing=true model.compute_dtype=float32" ;;
    ours-lora)          EXTRA="train.gradient_checkpointing=auto model.quantization=none" ;;
    ours-lora-fp32)     EXTRA="train.gradient_checkpointing=auto model.quantization=none model.compute_dtype=float32" ;;
    ours-qlora-gc-torchdrop) EXTRA="train.gradient_checkpointing=true lora.dropout_masks=torch" ;;
    ours-qlora-gc-bf16) EXTRA="train.gradient_checkpointing=true model.upcast_layers=false" ;;
    ours-qlora-gc-bf16-pinned) EXTRA="train.gradient_checkpointing=true model.upcast_layers=false model.compute_dtype=bfloat16" ;;
    ours-qlora-bf16)    EXTRA="train.gradient_checkpointing=auto model.upcast_layers=false" ;;
    ours-qlora-gc-compiled) EXTRA="train.gradient_checkpointing=true lora.dropout_masks=compiled" ;;
    ours-qlora-gc-bf16-compiled) EXTRA="train.gradient_checkpointing=true model.upcast_layers=false lora.dropout_masks=compiled" ;;
    ours-lora-compiled) EXTRA="train.gradient_checkpointing=auto model.quantization=none lora.dropout_masks=compiled" ;;
    *) (cd "$PROJECT" && bash "$HARNESS/run_bench.sh" "$PASS" "$RUN"); continue ;;
  esac
  N=$RUN-p$PASS; OUT=$P/runs/$N; rm -rf "$OUT"; rm -f "$P/logs/$N".*
  echo "=== $N start $(date -u +%FT%TZ)" | tee -a "$P/logs/bench.log"
  # shellcheck disable=SC2086  # the overrides are words
  (cd "$PROJECT" && PYTHONPATH=$HARNESS/hook BENCH_STEPLOG=$P/logs/$N.steps.jsonl \
    /usr/bin/time -v -o "$P/logs/$N.time" .venv/bin/qlora-llm train configs/smollm2-cpu.yaml $OURS $EXTRA \
    train.output_dir="$OUT") > "$P/logs/$N.log" 2>&1
  echo "=== $N end rc=$? $(date -u +%FT%TZ)" | tee -a "$P/logs/bench.log"
done

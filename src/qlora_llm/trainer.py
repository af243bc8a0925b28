"""The trainer: TRL's SFT, DPO or ORPO trainer with what a run here guarantees.

`QLoRATrainerMixin` holds all of it at module level; `trainer_class(method)` layers it over the TRL
trainer for the method, imported only then (TRL is slow to import, and ORPO's lives in
`trl.experimental`, which warns on import).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from qlora_llm.atomic import atomic_write_text
from qlora_llm.checkpoint import SaveFailed, complete_checkpoints, write_checksums
from qlora_llm.config import Config, save_config
from qlora_llm.errors import TrainError


class LossNotFinite(TrainError):
    """The loss became NaN or infinite; raised before the optimizer step, so the weights stay good."""


class EpochSeededLengthSampler(LengthGroupedSampler):
    """group_by_length whose shuffle is a function of (seed, epoch) only.

    transformers' LengthGroupedSampler shuffles with the global RNG when the epoch's iterator is
    made, which on a resume happens before the checkpoint's RNG state is restored: a run resumed
    in its second epoch then sees other batches than the uninterrupted run.
    """

    seed = 0

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class LongestFirstSampler(torch.utils.data.Sampler):
    """Evaluation in one fixed order: longest first (an out-of-memory shows at the first batch), ties in
    the dataset's order.

    transformers evaluates a group_by_length run through LengthGroupedSampler seeded with the run's seed:
    it pairs examples into batches at random within groups of a few batches, and eval loss (a mean of the
    batches' token means) then moved with the seed: the demo's step-0 evaluation, the same base model on
    the same 50 papers, gave 3.590 for seed 42 and 3.608 for seed 1. In this order it is a function of the
    model, the eval set and the batch size alone, and batches pad least.
    """

    def __init__(self, lengths: list[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


def loss_with_kl_to_base(trainer: Any, model: Any, inputs: dict, weight: float, num_items: Any) -> Any:
    """The answer loss plus `weight` x KL(base || tuned) summed over the answer tokens, normalised as TRL
    normalises the loss (by the tokens of the whole accumulated, all-rank batch when it is given).

    One forward of the tuned model gives both terms (TRL's fused head yields only the label log-probs, and
    KL needs the whole distribution); the base's comes from the same model with the adapter disabled,
    without gradients. At step 0 LoRA's B is zero, so the two are the same model and KL is exactly 0.
    """
    import torch
    import torch.nn.functional as F

    forward = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False}
    labels = inputs["labels"][:, 1:]
    mask = labels != -100
    logp = F.log_softmax(model(**forward).logits[:, :-1][mask].float(), dim=-1)
    nll = -logp.gather(-1, labels[mask].unsqueeze(-1)).sum()
    with torch.no_grad(), trainer.accelerator.unwrap_model(model).disable_adapter():
        base = F.log_softmax(model(**forward).logits[:, :-1][mask].float(), dim=-1)
    kl = (base.exp() * (base - logp)).sum(-1)  # per answer token
    tokens = mask.sum() if num_items is None else num_items
    loss = (nll + weight * kl.sum()) / torch.as_tensor(tokens).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items is not None:
        loss = loss * trainer.accelerator.num_processes  # DDP averages the gradients; TRL does the same
    trainer._metrics["train"]["kl"].append(kl.mean().item() if kl.numel() else 0.0)
    return loss


class QLoRATrainerMixin:
    """What every method's trainer adds to TRL's: staged checkpoints, a finite-loss guard, real-token
    counting, one data order per (seed, epoch), one evaluation order for every seed, evaluations that
    leave the RNG as they found it, and SFT's optional KL-to-base term. Layered over SFTTrainer,
    DPOTrainer or ORPOTrainer by trainer_class.
    """

    method: str = "sft"
    run_manifest: dict[str, Any] = {}
    run_config: Config | None = None
    tokens_seen: int = 0
    length_sampler: EpochSeededLengthSampler | None = None

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            # One order for the whole run, grouped by the global batch: accelerate gives process i
            # batches i, i+N, ... of it, so N processes see what one process with N times the batch sees.
            sampler = EpochSeededLengthSampler(
                sampler.batch_size * self.args.world_size, lengths=sampler.lengths
            )
            sampler.seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.length_sampler = sampler
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        sampler = super()._get_eval_sampler(eval_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            return LongestFirstSampler(sampler.lengths)
        return sampler

    def _run_epoch(self, *args, **kwargs):
        if self.state.max_steps and self.state.global_step >= self.state.max_steps:
            # Resumed from the last step's checkpoint (a stop during the final write): nothing is left
            # to train. transformers would take one more step, since it checks only after a step.
            self.control.should_training_stop = True
            return None
        # accelerate passes set_epoch through the BatchSamplerShard of a multi-process run, but not
        # through the SkipBatchSampler a resumed epoch puts over it: without this, a resumed 2-process
        # run shuffles its epoch with the global RNG and trains on other batches.
        if self.length_sampler is not None:
            self.length_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        # Each evaluation's DataLoader draws its base seed from the global RNG, which would shift every
        # later dropout mask: put the RNG back, so how often a run evaluates never changes its weights.
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kl_weight = self.run_config.train.kl_weight if self.run_config is not None else 0.0
        if self.method != "sft" or not kl_weight or not model.training:
            # Evaluation keeps the plain answer loss, so eval loss compares across runs and settings.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = loss_with_kl_to_base(self, model, inputs, kl_weight, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not math.isfinite(float(loss)):
            # Raised before optimizer.step(), so the last good weights and checkpoints stay good.
            raise LossNotFinite(f"loss became {float(loss)} at step {self.state.global_step + 1}")
        # SFT and DPO batches carry one attention_mask; ORPO's one per side (its prompt is in both).
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith("prompt")]
        tokens = sum(m.sum() for m in masks) if masks else torch.tensor(inputs["input_ids"].numel())
        if self.args.world_size > 1:
            tokens = self.accelerator.reduce(tokens.to(self.args.device), "sum")  # all ranks' tokens
        self.tokens_seen += int(tokens)
        # The run's total, in TrainerState: saved with each checkpoint and restored on resume (transformers'
        # own count, include_num_input_tokens_seen, is off: it would count these tokens a second time).
        self.state.num_input_tokens_seen += int(tokens)
        return loss

    def _prepare_dataset(self, dataset, *args, **kwargs):
        # DPO: the pairs come tokenized by the one template (tokenize_pairs); TRL would render them again.
        if self.method == "dpo" and "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, *args, **kwargs)

    def tokenize_row(self, feature, model=None):
        # ORPO: the same ids as DPO's (tokenize_pairs), in ORPO's columns; TRL's own would add a BOS
        # to tokenizers that have none in their template (SmolLM2's ChatML).
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = feature[f"{side}_ids"]
            row[f"{side}_input_ids"] = prompt + answer
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{side}_labels"] = [-100] * len(prompt) + answer
        return row

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f".staging-{name}"
        main = self.args.should_save  # rank 0; every rank writes its own RNG state into staging
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # nobody writes into a staging folder being cleared
        try:
            self._save_staged(model, trial, run_dir, name, staging, main)
        except BaseException as err:
            # A full disk, a write error, a second Ctrl-C: the part written goes, the last checkpoint stays.
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, Exception):
                raise SaveFailed(name, self.state.global_step, run_dir, err) from err
            raise
        if main:
            self._rotate(run_dir)

    def _save_staged(self, model, trial, run_dir: Path, name: str, staging: Path, main: bool) -> None:
        # Trainer writes into <_get_output_dir()>/<name>; point that at the staging folder.
        self._get_output_dir = lambda trial=None: str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank's part is written before it gets its name
        staged = staging / name
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging:
            self.state.best_model_checkpoint = str(run_dir / name)
            if main:
                self.state.save_to_json(str(staged / "trainer_state.json"))
        if not main:
            return
        if self.run_config is not None:
            save_config(self.run_config, staged / "config.yaml")
        atomic_write_text(staged / "manifest.json", json.dumps(self.run_manifest, indent=2) + "\n")
        write_checksums(staged)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(run_dir / name)  # the same step saved again (e.g. the final save)
        os.rename(staged, run_dir / name)  # the moment the checkpoint becomes visible, complete
        shutil.rmtree(staging, ignore_errors=True)

    def _rotate(self, run_dir: Path) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        checkpoints = complete_checkpoints(run_dir)
        best = self.state.best_model_checkpoint
        keep = set(checkpoints[-limit:]) | ({Path(best)} if best else set())
        for p in checkpoints:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


def trainer_class(method: str = "sft") -> type:
    """The trainer for `method`: QLoRATrainerMixin over TRL's SFTTrainer, DPOTrainer or ORPOTrainer."""
    if method == "dpo":
        from trl import DPOTrainer as Base
    elif method == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Base
    else:
        from trl import SFTTrainer as Base
    return type(f"QLoRA{Base.__name__}", (QLoRATrainerMixin, Base), {"method": method})

# prefopt: SimPO with LoRA / QLoRA on a single device.
#
# Modelled on torchtune 0.6.1's lora_dpo_single_device.py without the reference model: SimPO's
# reward is the policy's own length-normalised log-likelihood, so each micro-batch is ONE forward
# and backward of its pairs, packed (each prompt once, several pairs per row) or padded.
#
#   tune run recipes/simpo_lora_single_device.py --config configs/tiny/simpo_lora.yaml [key=value ...]
#
# This file is meant to be copied and edited (`prefopt cp simpo_lora_single_device .`): it
# depends on torchtune and the small `prefopt` library only, and shares no base class.

import math
import os
import resource
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, modules, training, utils
from torchtune.datasets import ConcatDataset
from torchtune.modules.peft import (
    get_adapter_params,
    get_lora_module_names,
    get_merged_lora_ckpt,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from tqdm import tqdm

from prefopt.checkpointing import check_checkpoint_space, check_output_dir, checkpoint_bytes, optimizer_states_per_param
from prefopt.collate import packed_collate_preference, padded_collate_preference
from prefopt.config import Key, at_least, one_of, parse, positive, validate_config
from prefopt.export import checkpointer_writing_to, missing_export, state_bytes, write_export
from prefopt.guards import CollapseGuard, check_device, lock_output_dir
from prefopt.metrics import PreferenceMetrics
from prefopt.models.match import CheckpointMismatchError, check_model_matches_checkpoint
from prefopt.packing import MIN_FLEX_LEN, packing_unsupported_reason
from prefopt.peft import keep_adapters_in_fp32, nf4_state_dict_dtype
from prefopt.resume import data_identity, load_checkpoint_file, read_newest_state, start_fresh_run, write_state
from prefopt.startup import component_problems, zero_lr_warning
from prefopt.step import preference_forward
from prefopt.teardown import release_data, run_script

log = utils.get_logger("INFO")

# Every key this recipe reads, read once in __init__/setup. Anything else in the config is an
# error at start-up (torchtune 0.6.1's lora_dpo_single_device silently ignores e.g. clip_grad_norm, and any
# typo of a key).
CONFIG_SPEC = {
    "output_dir": Key(str, doc="where logs and checkpoints go"),
    "model": Key(component=True, doc="a torchtune lora_* model builder"),
    "tokenizer": Key(component=True),
    "checkpointer": Key(component=True, doc="torchtune checkpointer holding the base weights"),
    "dataset": Key(component=True, doc="e.g. prefopt.data.preference_dataset"),
    "eval_dataset": Key(component=True, default=None, doc="held-out pairs for eval"),
    "loss": Key(component=True, doc="a reference-free loss, e.g. prefopt.loss.SimPOLoss"),
    "optimizer": Key(component=True),
    "lr_scheduler": Key(component=True, default=None),
    "metric_logger": Key(component=True),
    "seed": Key((int, type(None)), default=None),
    "shuffle": Key(bool, default=True),
    "batch_size": Key(int, check=at_least(1)),
    "eval_batch_size": Key((int, type(None)), default=None, check=at_least(1)),
    "gradient_accumulation_steps": Key(int, default=1, check=at_least(1)),
    "clip_grad_norm": Key((float, type(None)), default=None, check=positive),
    "epochs": Key(int, check=at_least(1)),
    "max_steps_per_epoch": Key((int, type(None)), default=None, check=at_least(1)),
    "device": Key(str, default="cpu"),
    "dtype": Key(str, default="fp32", check=one_of("fp32", "bf16")),
    "compile": Key(bool, default=False),
    "enable_activation_checkpointing": Key(bool, default=False),
    "enable_activation_offloading": Key(bool, default=False),
    "num_output_chunks": Key(int, default=16, check=at_least(1)),
    "packed": Key(bool, default=True, doc="each pair laid out once, prompt shared, several pairs per row"),
    "log_every_n_steps": Key(int, default=1, check=at_least(1)),
    "log_peak_memory_stats": Key(bool, default=False),
    "eval_every_n_steps": Key((int, type(None)), default=None, check=at_least(1)),
    "save_every_n_steps": Key((int, type(None)), default=None, check=at_least(1)),
    "resume_from_checkpoint": Key(bool, default=False),
    "save_adapter_weights_only": Key(bool, default=False),
    "on_nonfinite": Key(str, default="error", check=one_of("error", "skip")),
    "on_collapse": Key(str, default="error", check=one_of("error", "warn"),
                       doc="zero gradient norm at lr > 0, or all log-probs/logits of a step equal, collapse_steps steps in a row"),
    "collapse_steps": Key(int, default=3, check=at_least(1), doc="collapsed steps in a row before on_collapse acts"),
    "overwrite_output_dir": Key(bool, default=False, doc="a fresh run deletes the resume states already in output_dir"),
}
# Arguments the recipe passes to components itself; a config must not set them.
BOUND_ARGS = {
    "optimizer": ("params",),
    "lr_scheduler": ("optimizer", "num_training_steps", "last_epoch"),
    "dataset": ("tokenizer",),
    "eval_dataset": ("tokenizer",),
    "checkpointer": ("should_load_recipe_state", "resume_from_checkpoint"),
}
# A resume state: <output_dir>/checkpoints/step_<N>/{adapter.pt, recipe_state.pt, config.yaml, COMPLETE}


def _cross_checks(v: Dict[str, Any]) -> list:
    problems = []
    if v["enable_activation_offloading"] and not v["enable_activation_checkpointing"]:
        problems.append("enable_activation_offloading: needs enable_activation_checkpointing=True")
    if v["enable_activation_offloading"] and not v["device"].startswith("cuda"):
        problems.append(f"enable_activation_offloading: needs a CUDA device, got device={v['device']}")
    if v["eval_every_n_steps"] is not None and v["eval_dataset"] is None:
        problems.append("eval_every_n_steps: set, but there is no eval_dataset")
    return problems


class SimPORecipeSingleDevice:
    """SimPO (or any reference-free pairwise loss) with LoRA/QLoRA on one device.

    - One forward per micro-batch, packed and prefix-shared (``packed: True``: each pair once,
      the prompt shared, several pairs per row) or padded (chosen+rejected rows); per-sequence average
      log-probs of the response positions only, output layer fused with the log-softmax
      (no logits kept for backward).
    - Gradient accumulation, gradient clipping, fp32/bf16, activation checkpointing (and
      offloading on CUDA), torch.compile of the decoder layers and the loss.
    - Held-out evaluation at step 0, every ``eval_every_n_steps`` and at the end.
    - Checkpoints every ``save_every_n_steps`` and at each epoch end. Epoch ends also write the
      merged model in the checkpointer's format (HF in, HF out) plus the adapter. Every save
      writes a resume state (adapter, optimizer, LR scheduler, data position, RNG), atomically;
      ``resume_from_checkpoint=True`` continues from the newest complete one, mid-epoch included.
    """

    def __init__(self, cfg: DictConfig) -> None:
        # component_problems: the loss and optimizer built, the data files, splits and max_seq_len
        # checked against the model (on the meta device): in the same error, not hours in
        v = validate_config(
            cfg, CONFIG_SPEC, bound_args=BOUND_ARGS, extra_checks=_cross_checks, component_checks=component_problems
        )
        self._cfg = v
        self._run_cfg = cfg  # saved as config.yaml beside every resume state
        check_device(v["device"])  # utils.get_device does not check that CUDA exists
        self._device = utils.get_device(device=v["device"])
        self._dtype = training.get_dtype(v["dtype"], device=self._device)
        log.info(f"device {self._device}, dtype {self._dtype}")
        self._output_dir = Path(v["output_dir"])
        self._log_every_n_steps = v["log_every_n_steps"]
        # CUDA: allocator statistics; CPU: the process's peak resident set size.
        self._log_peak_memory_stats = v["log_peak_memory_stats"]
        self._grad_accum = v["gradient_accumulation_steps"]
        self._clip_grad_norm = v["clip_grad_norm"]
        self._eval_every = v["eval_every_n_steps"]
        self._save_every = v["save_every_n_steps"]
        self._on_nonfinite = v["on_nonfinite"]
        self._collapse = CollapseGuard(patience=v["collapse_steps"], action=v["on_collapse"])
        self._num_output_chunks = v["num_output_chunks"]
        self._batch_size = v["batch_size"]
        self.seed = training.set_seed(seed=v["seed"])
        self.total_epochs = v["epochs"]
        self.max_steps_per_epoch = v["max_steps_per_epoch"]
        self.epochs_run = 0
        self.global_step = 0
        self._step_in_epoch = 0  # optimizer steps already taken in the current epoch
        check_output_dir(self._output_dir)
        self._lock = lock_output_dir(self._output_dir)  # held until cleanup / the process ends
        if not v["resume_from_checkpoint"]:  # refuses another run's states; saves config.yaml
            start_fresh_run(self._output_dir, cfg, overwrite=v["overwrite_output_dir"])
        self._check_checkpoint_space()

    def _check_checkpoint_space(self) -> None:
        """Fail before any model is built if output_dir has less free space than the first
        checkpoint needs: the resume state (adapter + optimizer state) and the epoch-end export
        (merged model + adapter, or the adapter alone). Sizes are counted on a meta-device copy
        of the model: no memory, no weights read."""
        v = self._cfg
        try:
            with torch.device("meta"):
                model = config.instantiate(v["model"])
            check_model_matches_checkpoint(model, v["model"], v["checkpointer"])  # before any weight is read
            n_adapter = sum(p.numel() for p in get_adapter_params(model).values())
            n_all = sum(p.numel() for p in model.parameters())  # NF4 weights count their full size
            del model
            states = optimizer_states_per_param(lambda params: config.instantiate(v["optimizer"], params))
        except CheckpointMismatchError:
            raise  # not an estimate: the run would train another model
        except Exception as e:  # noqa: BLE001 - an estimate must not stop a run that would work
            log.warning(f"could not estimate the checkpoint size ({e!r}); output_dir free space not checked")
            return
        # the merged model has the base shapes (n_all - n_adapter); the adapter is written beside it
        export = n_adapter if v["save_adapter_weights_only"] else n_all
        sizes = checkpoint_bytes(
            trainable_numel=n_adapter, trainable_dtype=torch.float32, optimizer_states=states,  # fp32 adapters
            export_numel=export, export_dtype=self._dtype,
        )
        what = f"{n_adapter:,} adapter parameters, {states} optimizer states each; {n_all - n_adapter:,} base parameters"
        free = check_checkpoint_space(self._output_dir, sizes, what=what)
        log.info(f"output_dir: {free:,} bytes free; the first checkpoint needs about {sizes['total']:,} bytes")

    # ------------------------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        v = self._cfg
        # Build order: logger -> base weights -> model (+LoRA, AC, compile) -> tokenizer -> loss
        # -> optimizer -> data (needs tokenizer) -> LR scheduler (needs steps per epoch) ->
        # resume state last, because it restores into all of the above.
        self._metric_logger = config.instantiate(v["metric_logger"])
        self._metric_logger.log_config(cfg)

        self._checkpointer = config.instantiate(v["checkpointer"], should_load_recipe_state=False)
        base_state_dict = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._setup_model(v["model"], base_state_dict)
        del base_state_dict

        # packed: each pair once as [prompt][chosen][rejected], several pairs per row (exact: the
        # same log-probs, losses and gradients as the padded layout, each prompt computed once)
        self._packed = v["packed"]
        unsupported = packing_unsupported_reason(self._model) if self._packed else None
        if unsupported:
            log.info(f"packed=True: falling back to the padded layout for this model: {unsupported}")
            self._packed = False
        self._tokenizer = config.instantiate(v["tokenizer"])
        self._loss_fn = config.instantiate(v["loss"])
        if v["compile"]:
            self._loss_fn = training.compile_loss(self._loss_fn)
        self._optimizer = config.instantiate(v["optimizer"], self._adapter_params.values())

        self._sampler, self._dataloader = self._setup_data(v["dataset"], v["batch_size"], v["shuffle"])
        self._eval_dataloader = None
        if v["eval_dataset"] is not None:
            _, self._eval_dataloader = self._setup_data(
                v["eval_dataset"], v["eval_batch_size"] or v["batch_size"], shuffle=False
            )

        self._steps_per_epoch = len(self._dataloader) // self._grad_accum
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"dataset gives {len(self._dataloader)} batches of batch_size={v['batch_size']}, fewer than "
                f"gradient_accumulation_steps={self._grad_accum}: no optimizer step would be taken"
            )
        self._lr_scheduler = None
        if v["lr_scheduler"] is not None:
            self._lr_scheduler = config.instantiate(
                v["lr_scheduler"],
                self._optimizer,
                num_training_steps=self.total_epochs * self._steps_per_epoch,
                last_epoch=-1,
            )
        # a run whose rate is 0 at every step trains for hours and changes nothing
        warning = zero_lr_warning(v["optimizer"], v["lr_scheduler"], self.total_epochs * self._steps_per_epoch)
        if warning:
            log.warning(warning)
        self._metrics = PreferenceMetrics.for_loss(self._loss_fn, self._device)
        if v["resume_from_checkpoint"]:
            self._load_resume_state()

    def _setup_model(self, cfg_model: DictConfig, base_state_dict: Dict[str, Any]) -> torch.nn.Module:
        v = self._cfg
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)
        self._lora_rank = cfg_model.lora_rank
        self._lora_alpha = cfg_model.lora_alpha
        self._lora_attn_modules = list(cfg_model.lora_attn_modules)
        self._apply_lora_to_mlp = cfg_model.get("apply_lora_to_mlp", False)
        self._apply_lora_to_output = cfg_model.get("apply_lora_to_output", False)
        # Adapters (so their gradients and optimizer state) in float32 under a bf16 base: at SimPO's
        # learning rates most bf16 adapter updates would round to nothing (prefopt.peft).
        if self._dtype != torch.float32:
            keep_adapters_in_fp32(model)
        self._adapter_params = get_adapter_params(model)
        set_trainable_params(model, self._adapter_params)
        if v["enable_activation_checkpointing"]:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        missing, unexpected = model.load_state_dict(base_state_dict, strict=False)
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=self._lora_attn_modules,
            apply_lora_to_mlp=self._apply_lora_to_mlp,
            apply_lora_to_output=self._apply_lora_to_output,
            base_missing=missing,
            base_unexpected=unexpected,
        )
        self._activations_ctx = training.get_act_offloading_ctx_manager(
            model, v["enable_activation_offloading"]
        )
        if v["compile"]:
            training.compile_model(model)
        n_train = sum(p.numel() for p in self._adapter_params.values())
        n_all = sum(p.numel() for p in model.parameters())
        log.info(f"Model ready: {n_all:,} parameters, {n_train:,} trainable (LoRA), dtype {self._dtype}")
        return model

    def _setup_data(self, cfg_dataset: Any, batch_size: int, shuffle: bool):
        if isinstance(cfg_dataset, ListConfig):
            ds = ConcatDataset([config.instantiate(c, tokenizer=self._tokenizer) for c in cfg_dataset])
        else:
            ds = config.instantiate(cfg_dataset, tokenizer=self._tokenizer)
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=shuffle, seed=self.seed)
        collate = partial(padded_collate_preference, padding_idx=self._tokenizer.pad_id)
        if self._packed:
            # one unpadded row per micro-batch (its attention costs the same in any rows: per
            # part on the CPU, a BlockMask on CUDA); prefopt.attention compiles FlexAttention
            # once, with dynamic shapes, for every length, from MIN_FLEX_LEN positions up
            collate = partial(
                packed_collate_preference,
                padding_idx=self._tokenizer.pad_id,
                min_len=MIN_FLEX_LEN if self._device.type == "cuda" else 1,
                max_seq_len=self._model.max_seq_len,
            )
        loader = DataLoader(
            ds,
            sampler=sampler,
            batch_size=batch_size,
            drop_last=shuffle,  # eval keeps every pair; training keeps shapes regular
            collate_fn=collate,
            pin_memory=self._device.type == "cuda",  # the step copies the batch with non_blocking
        )
        return sampler, loader

    # ------------------------------------------------------------------------------------------
    def _forward(self, batch: Dict[str, Any], chosen_tokens_per_pair: Optional[torch.Tensor] = None):
        # One forward of a micro-batch (padded or packed) and its loss. Only the positions that
        # predict a response token go through the output layer, fused with the log-softmax so
        # that no [tokens, vocab] logits are kept for backward (num_output_chunks chunks).
        with self._activations_ctx:
            return preference_forward(
                self._model, batch, self._loss_fn, device=self._device,
                num_chunks=self._num_output_chunks, chosen_tokens_per_pair=chosen_tokens_per_pair,
            )

    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, float]]:
        if self._eval_dataloader is None:
            return None
        self._model.eval()
        metrics = PreferenceMetrics.for_loss(self._loss_fn, self._device)
        for batch in self._eval_dataloader:
            metrics.update(self._forward(batch))
        self._model.train()
        result = {f"eval/{k}": val for k, val in metrics.compute().items()}
        self._metric_logger.log_dict(result, step=self.global_step)
        log.info(
            f"eval @ step {self.global_step}: loss {result['eval/loss']:.4f}  "
            f"rewards/accuracies {result['eval/rewards/accuracies']:.3f}  "
            f"rewards/margins {result['eval/rewards/margins']:.4f}"
        )
        return result

    def train(self) -> None:
        if self._cfg["compile"]:
            log.info("torch.compile is on: the first step compiles and is slow.")
        self._first_eval = self.evaluate() if self.global_step == 0 else None
        self._last_eval = self._first_eval
        self._optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        num_tokens = 0
        running_loss = torch.zeros((), device=self._device)
        for epoch in range(self.epochs_run, self.total_epochs):
            self._sampler.set_epoch(epoch)
            # Resume mid-epoch: skip the micro-batches that the saved steps already consumed.
            skip = self._step_in_epoch * self._grad_accum
            batches = islice(self._dataloader, skip, self._steps_per_epoch * self._grad_accum)
            steps = iter(lambda: list(islice(batches, self._grad_accum)), [])  # micro-batches of a step
            pbar = tqdm(total=self._steps_per_epoch, initial=self._step_in_epoch, disable=not sys.stderr.isatty())
            for micro_batches in steps:
                # A "token"-mean NLL term (CPO, ORPO, princeton's sft) divides by the chosen tokens
                # of the whole step, whatever the split into micro-batches (CPU ints: no sync).
                per_pair = sum(mb["chosen_tokens"] for mb in micro_batches) / (self._grad_accum * self._batch_size)
                rows = []
                for batch in micro_batches:
                    out = self._forward(batch, chosen_tokens_per_pair=per_pair)
                    loss = out.losses.mean() / self._grad_accum
                    loss.backward()
                    running_loss += loss.detach()
                    self._metrics.update(out)
                    self._collapse.observe(out.chosen, out.rejected)
                    num_tokens += int(batch["num_tokens"])
                    rows.append(batch["rows"])

                params = list(self._adapter_params.values())
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=self._clip_grad_norm)
                else:  # the collapse and NaN checks need the norm without clipping too (no copy)
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                # One host sync per optimizer step: a NaN/inf must not reach the weights; the same
                # read feeds the collapse check.
                loss_v, norm_v, *spreads = torch.cat(
                    [running_loss.view(1).float(), grad_norm.view(1).float().to(self._device), self._collapse.spreads().to(self._device)]
                ).tolist()
                bad = not math.isfinite(loss_v) or not math.isfinite(norm_v)
                if bad:
                    msg = (
                        f"non-finite loss or gradient at step {self.global_step + 1} (epoch {epoch}); "
                        f"example rows of this step: {torch.cat(rows).tolist()}"
                    )
                    if self._on_nonfinite == "error":
                        raise FloatingPointError(msg + ". The last checkpoint is untouched; set on_nonfinite=skip to skip such steps.")
                    log.warning(msg + "; step skipped (on_nonfinite=skip)")
                else:
                    lr = self._optimizer.param_groups[0]["lr"]
                    self._collapse.check(self.global_step + 1, grad_norm=norm_v, lr=lr, spreads=spreads)
                    self._optimizer.step()
                    if self._lr_scheduler is not None:
                        self._lr_scheduler.step()
                self._optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                self._step_in_epoch += 1
                pbar.update(1)

                if self.global_step % self._log_every_n_steps == 0:
                    elapsed = time.perf_counter() - t0
                    log_dict = {
                        **self._metrics.compute(),
                        "lr": self._optimizer.param_groups[0]["lr"],
                        "tokens_per_second": num_tokens / elapsed,
                    }
                    log_dict["grad_norm"] = norm_v
                    if self._log_peak_memory_stats:
                        log_dict.update(_memory_stats(self._device))
                    self._metric_logger.log_dict(log_dict, step=self.global_step)
                    pbar.set_description(f"{epoch + 1}|{self.global_step}|loss {log_dict['loss']:.4f}")
                    # Metrics and throughput cover the whole logging window, as TRL's do.
                    t0, num_tokens = time.perf_counter(), 0
                    self._metrics.reset()
                running_loss.zero_()

                if self._eval_every is not None and self.global_step % self._eval_every == 0:
                    self._last_eval = self.evaluate()
                end_of_epoch = self._step_in_epoch == self._steps_per_epoch
                if self._save_every is not None and self.global_step % self._save_every == 0 and not end_of_epoch:
                    self.save_checkpoint(epoch=epoch, end_of_epoch=False)
            pbar.close()
            self.epochs_run = epoch + 1
            self._step_in_epoch = 0
            if self._eval_dataloader is not None and (self._eval_every is None or self.global_step % self._eval_every != 0):
                self._last_eval = self.evaluate()
            self.save_checkpoint(epoch=epoch, end_of_epoch=True)
        if self._first_eval is not None and self._last_eval is not None:
            log.info(
                "held-out rewards/accuracies: "
                f"{self._first_eval['eval/rewards/accuracies']:.3f} at step 0 -> "
                f"{self._last_eval['eval/rewards/accuracies']:.3f} at step {self.global_step}"
            )

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, end_of_epoch: bool) -> None:
        """Resume state (always, atomically), plus at epoch ends the merged model and adapter
        (:meth:`_export`: ``<output_dir>/epoch_<N>/``, HF format in -> out).

        Why our own resume state: torchtune 0.6.1's checkpointers resume only at epoch
        boundaries and reload the merged model; SimPO runs are often a single epoch, so a kill
        must lose at most ``save_every_n_steps`` steps, and the resumed losses must equal the
        uninterrupted run's.
        """
        # From the adapter parameters themselves: the model's state_dict() would dequantize every
        # NF4 base weight of a QLoRA model (~15 GB copied for 8B) only to pick out the adapter.
        adapter = {k: p.detach().cpu().clone() for k, p in self._adapter_params.items()}
        state = {
            "optimizer": self._optimizer.state_dict(),
            "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler is not None else None,
            "epochs_run": self.epochs_run,
            "step_in_epoch": self._step_in_epoch,
            "global_step": self.global_step,
            "seed": self.seed,
            "total_epochs": self.total_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "data": self._data_identity(),  # what a resume must read again: the same rows, the same order
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

        def write(d: Path) -> None:
            torch.save(adapter, d / "adapter.pt")
            torch.save(state, d / "recipe_state.pt")

        # atomic, with the run config beside it: a kill leaves no half state, a full disk an
        # error that names the last complete one (prefopt.resume). Files hold tensors and plain
        # values only: a resume reads them with weights_only=True (prefopt.safe_load).
        final_dir = write_state(self._output_dir, self.global_step, self._run_cfg, write)
        log.info(f"Resume state saved to {final_dir}")
        if end_of_epoch:
            self._export(epoch, adapter, final_dir)

    def _export(self, epoch: int, adapter: Dict[str, torch.Tensor], state_dir: Path) -> None:
        """``<output_dir>/epoch_<N>/``: the merged model and the adapter through the torchtune
        checkpointer (HF format in -> out), written to a temporary name and renamed
        (prefopt.export): the epoch's resume state, written just before, says the epoch is done,
        so a lost export must be visible (no ``epoch_<N>/``) for a resume to write it."""
        ckpt = {training.ADAPTER_KEY: adapter}
        if not self._cfg["save_adapter_weights_only"]:
            # state_dict() of a QLoRA model dequantizes NF4 weights through the builder's hook,
            # to bf16 whatever the run's dtype: to the run's dtype instead, the dtype the trained
            # model computed with, so that an fp32 run's small LoRA deltas survive the merge
            # copy=True: get_merged_lora_ckpt adds the LoRA delta in place, and on a CPU run
            # .cpu() returns the model's own tensors: the trained model's base weights would take
            # the delta too (its LoRA layers then adding it twice, for the rest of the run)
            with nf4_state_dict_dtype(self._model, self._dtype):
                full = {k: t.detach().to("cpu", copy=True) for k, t in self._model.state_dict().items()}
            ckpt[training.MODEL_KEY] = get_merged_lora_ckpt(full, rank=self._lora_rank, alpha=self._lora_alpha)
        ckpt[training.ADAPTER_CONFIG] = {
            "r": self._lora_rank,
            "lora_alpha": self._lora_alpha,
            "target_modules": get_lora_module_names(
                self._lora_attn_modules, self._apply_lora_to_mlp, self._apply_lora_to_output
            ),
            "peft_type": "LORA",
        }

        def write(root: Path) -> None:
            with checkpointer_writing_to(self._checkpointer, root):  # writes <root>/epoch_<N>/
                self._checkpointer.save_checkpoint(
                    ckpt, epoch=epoch, intermediate_checkpoint=False, adapter_only=self._cfg["save_adapter_weights_only"]
                )
            # torchtune writes the adapter next to the merged model. transformers' from_pretrained
            # then sees adapter_config.json and loads the folder as a PEFT adapter instead of the
            # merged model (failing when peft rejects the installed torchao), so the adapter files
            # move to epoch_<N>/adapter/: the folder is a plain HF model, the adapter sits beside it.
            epoch_dir = root / f"epoch_{epoch}"
            if not self._cfg["save_adapter_weights_only"]:
                (epoch_dir / "adapter").mkdir(exist_ok=True)
                for f in list(epoch_dir.glob("adapter_model.*")) + [epoch_dir / "adapter_config.json"]:
                    if f.exists():
                        os.replace(f, epoch_dir / "adapter" / f.name)

        final = write_export(self._output_dir, epoch, write, nbytes=state_bytes(ckpt), state=state_dir)
        log.info(f"Epoch {epoch} exported to {final}")

    def _data_identity(self) -> Dict[str, Any]:
        """The data a resume must train on again (prefopt.resume.data_identity), by config key."""
        loaders = {"dataset": self._dataloader, "eval_dataset": self._eval_dataloader}
        return {k: None if dl is None else data_identity(dl.dataset) for k, dl in loaders.items()}

    def _load_resume_state(self) -> None:
        def read(d: Path):  # a file that cannot be read, or would run code: the next older state is tried
            return load_checkpoint_file(d / "adapter.pt"), load_checkpoint_file(d / "recipe_state.pt")

        # Compared besides the config's RESUME_KEYS: the resolved seed (a null seed is drawn at
        # random: the saved one is taken instead), max_steps_per_epoch as recipe_state.pt has them
        # (states without a config.yaml), and the data (rows appended to the file, a file replaced).
        ckpt_dir, (adapter, state) = read_newest_state(
            self._output_dir, self._run_cfg, read,
            values={"seed": self.seed, "max_steps_per_epoch": self.max_steps_per_epoch},
            saved_values=lambda loaded: loaded[1],
            data=self._data_identity(), saved_data=lambda loaded: loaded[1].get("data"),
        )
        missing, unexpected = self._model.load_state_dict(adapter, strict=False)
        if unexpected or any(k in missing for k in adapter):
            raise ValueError(f"{ckpt_dir}/adapter.pt does not match this model's LoRA layout: unexpected {unexpected}")
        self._optimizer.load_state_dict(state["optimizer"])
        if self._lr_scheduler is not None and state["lr_scheduler"] is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epochs_run = state["epochs_run"]
        self._step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        if self._cfg["seed"] is None:  # the data order and RNG streams of the saved run, not a new draw
            self.seed = training.set_seed(seed=state["seed"])
            self._sampler.seed = self.seed
            log.info(f"seed: null in the config: the saved run's seed {self.seed} is used ({ckpt_dir})")
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info(f"Resumed from {ckpt_dir}: epoch {self.epochs_run}, step {self.global_step}")
        unexported = missing_export(self._output_dir, self.epochs_run, self._step_in_epoch)
        if unexported is not None:  # the run stopped while writing it: the epoch is not done without it
            log.warning(f"{self._output_dir}/epoch_{unexported}/ is missing: writing the export of epoch {unexported} now")
            self._export(unexported, {k: p.detach().cpu().clone() for k, p in self._adapter_params.items()}, ckpt_dir)

    def cleanup(self) -> None:
        self._metric_logger.close()
        # The data loaders, their samplers and the memory-mapped Arrow tables of the data sets go
        # now, while pyarrow is fully alive, not whenever the interpreter's teardown gets to them
        # (Arrow objects and pools torn down late sometimes abort the process: prefopt.teardown).
        release_data(getattr(self, "_dataloader", None), getattr(self, "_eval_dataloader", None))
        self._dataloader = self._eval_dataloader = self._sampler = None
        self._lock.close()  # releases the output_dir lock


def _memory_stats(device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        return training.get_memory_stats(device=device)
    # ru_maxrss is in KiB on Linux: the peak RSS of this process so far.
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# prefopt.config.parse: torchtune's, with a config that is a YAML list or bad YAML named in one line
@parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="SimPORecipeSingleDevice", cfg=cfg)
    recipe = SimPORecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    # Run through runpy (`tune run` on one device, a sweep driver, a notebook's %run): returns as
    # torchtune's recipes do, and the caller goes on. As the process's own program (`python <this
    # file>`, or `python -m recipes.<name>` as torchrun starts each rank): a finished run ends the
    # process before native libraries' teardown, which has aborted finished runs (prefopt.teardown).
    sys.exit(run_script(recipe_main, __file__))

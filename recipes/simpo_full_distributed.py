# prefopt: SimPO with full fine-tuning, sharded with FSDP2 across processes and nodes.
#
# Modelled on torchtune 0.6.1's full_dpo_distributed.py without the reference model: SimPO's
# reward is the policy's own length-normalised log-likelihood, so each micro-batch is ONE forward
# and backward of its pairs, packed (each prompt once, several pairs per row) or padded.
#
#   tune run --nproc_per_node 2 recipes/simpo_full_distributed.py --config configs/tiny/simpo_full.yaml [key=value ...]
#   tune run recipes/simpo_full_distributed.py --config ...      # one process, no launcher needed
#   tune run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
#       recipes/simpo_full_distributed.py --config ...           # several nodes (output_dir on shared storage)
#
# This file is meant to be copied and edited (`prefopt cp simpo_full_distributed .`): it depends on
# torchtune and the small `prefopt` library only, and shares no base class.

import gc
import resource
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, ListConfig
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, modules, training, utils
from torchtune.datasets import ConcatDataset
from torchtune.modules import TiedLinear
from tqdm import tqdm

from prefopt.checkpointing import check_checkpoint_space, check_output_dir, checkpoint_bytes, optimizer_states_per_param
from prefopt.collate import packed_collate_preference, padded_collate_preference
from prefopt.config import Key, at_least, one_of, parse, positive, validate_config
from prefopt.export import checkpointer_writing_to, missing_export, state_bytes, write_export
from prefopt.guards import CollapseGuard, check_device, lock_output_dir
from prefopt.metrics import PreferenceMetrics
from prefopt.models.match import check_model_matches_checkpoint
from prefopt.packing import MIN_FLEX_LEN, packing_unsupported_reason
from prefopt.resume import (
    RESUME_KEYS,
    data_identity,
    load_checkpoint_file,
    read_newest_state,
    start_fresh_run,
    write_state,
)
from prefopt.safe_load import dcp_load
from prefopt.startup import component_problems, zero_lr_warning
from prefopt.step import preference_forward
from prefopt.teardown import release_data, run_script

log = utils.get_logger("INFO")

# Every key this recipe reads, read once in __init__/setup. Anything else in the config is an
# error at start-up (torchtune 0.6.1's full_dpo_distributed reads clip_grad_norm, but lora_dpo_single_device
# silently ignores it, and any typo of a key).
CONFIG_SPEC = {
    "output_dir": Key(str, doc="where logs and checkpoints go (shared storage on several nodes)"),
    "model": Key(component=True, doc="a torchtune model builder, e.g. torchtune.models.llama3_2.llama3_2_1b"),
    "tokenizer": Key(component=True),
    "checkpointer": Key(component=True, doc="torchtune checkpointer holding the starting weights"),
    "dataset": Key(component=True, doc="e.g. prefopt.data.preference_dataset"),
    "eval_dataset": Key(component=True, default=None, doc="held-out pairs for eval"),
    "loss": Key(component=True, doc="a reference-free loss, e.g. prefopt.loss.SimPOLoss"),
    "optimizer": Key(component=True),
    "lr_scheduler": Key(component=True, default=None),
    "metric_logger": Key(component=True),
    "profiler": Key(component=True, default=None, doc="torchtune.training.setup_torch_profiler block"),
    "seed": Key((int, type(None)), default=None),
    "shuffle": Key(bool, default=True),
    "batch_size": Key(int, check=at_least(1), doc="pairs per micro-batch per process"),
    "eval_batch_size": Key((int, type(None)), default=None, check=at_least(1)),
    "gradient_accumulation_steps": Key(int, default=1, check=at_least(1)),
    "optimizer_in_bwd": Key(bool, default=False, doc="step each parameter's optimizer in backward"),
    "clip_grad_norm": Key((float, type(None)), default=None, check=positive),
    "epochs": Key(int, check=at_least(1)),
    "max_steps_per_epoch": Key((int, type(None)), default=None, check=at_least(1)),
    "device": Key(str, default="cuda", check=one_of("cuda", "cpu")),
    "dtype": Key(str, default="bf16", check=one_of("fp32", "bf16"), doc="compute dtype"),
    "fp32_master_weights": Key(bool, default=True, doc="with dtype=bf16: fp32 weights/grads/optimizer, bf16 compute"),
    "compile": Key(bool, default=False),
    "enable_activation_checkpointing": Key(bool, default=False),
    "enable_activation_offloading": Key(bool, default=False),
    "fsdp_reshard_after_forward": Key(bool, default=True),
    "fsdp_cpu_offload": Key(bool, default=False),
    "custom_sharded_layers": Key(
        (list, type(None)), default=None, doc="modules sharded on their own besides the decoder layers, e.g. [output]"
    ),
    "num_output_chunks": Key(int, default=16, check=at_least(1)),
    "packed": Key(bool, default=True, doc="each pair laid out once, prompt shared, several pairs per row"),
    "pad_to_multiple_of": Key(int, default=1, check=at_least(1), doc="round batch lengths up (fewer compiled shapes)"),
    "log_every_n_steps": Key(int, default=1, check=at_least(1)),
    "log_peak_memory_stats": Key(bool, default=False),
    "eval_every_n_steps": Key((int, type(None)), default=None, check=at_least(1)),
    "save_every_n_steps": Key((int, type(None)), default=None, check=at_least(1)),
    "keep_last_n_checkpoints": Key((int, type(None)), default=None, check=at_least(1), doc="null keeps all"),
    "resume_from_checkpoint": Key(bool, default=False),
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
PROFILER = "torchtune.training.setup_torch_profiler"
# A resume state: <output_dir>/checkpoints/step_<N>/{.metadata, __<rank>_0.distcp, rng_rank<r>.pt,
# recipe_state.pt, config.yaml, COMPLETE}
# What a resume must match besides the library's RESUME_KEYS: the world size may change (DCP
# reshards), so batch_size is compared as batch_size x world_size (the pairs of a micro-batch over
# all ranks) from recipe_state.pt, and optimizer_in_bwd decides the optimizer state's layout.
RESUME_CONFIG_KEYS = tuple(k for k in RESUME_KEYS if k != "batch_size") + ("optimizer_in_bwd",)


def _cross_checks(v: Dict[str, Any]) -> list:
    problems = []
    if v["enable_activation_offloading"] and not v["enable_activation_checkpointing"]:
        problems.append("enable_activation_offloading: needs enable_activation_checkpointing=True")
    if v["enable_activation_offloading"] and v["device"] != "cuda":
        problems.append(f"enable_activation_offloading: needs device=cuda, got device={v['device']}")
    if v["fsdp_cpu_offload"] and v["device"] != "cuda":
        problems.append(
            f"fsdp_cpu_offload: offloads from a GPU to the CPU; needs device=cuda, got device={v['device']}"
        )
    if v["eval_every_n_steps"] is not None and v["eval_dataset"] is None:
        problems.append("eval_every_n_steps: set, but there is no eval_dataset")
    if v["optimizer_in_bwd"]:
        # The weights change while the backward runs: there is no moment at which all of a
        # step's gradients exist, to be accumulated over micro-batches or clipped together.
        if v["gradient_accumulation_steps"] != 1:
            problems.append(
                f"optimizer_in_bwd: needs gradient_accumulation_steps=1, got {v['gradient_accumulation_steps']}"
            )
        if v["clip_grad_norm"] is not None:
            problems.append(f"optimizer_in_bwd: needs clip_grad_norm=null, got {v['clip_grad_norm']}")
    if v["profiler"] is not None and v["profiler"].get("_component_") != PROFILER:
        problems.append(f"profiler._component_: must be {PROFILER}, got {v['profiler'].get('_component_')!r}")
    return problems


class SimPORecipeDistributed:
    """SimPO (or any reference-free pairwise loss) with full fine-tuning under FSDP2.

    - One forward per micro-batch, packed and prefix-shared (``packed: True``: each pair once,
      the prompt shared, several pairs per row) or padded (chosen+rejected rows); per-sequence average
      log-probs of the response positions only, output layer fused with the log-softmax
      (no logits kept for backward).
    - FSDP2 (``fully_shard`` per decoder layer, then the root), parameters/gradients/optimizer
      state sharded over all processes; CPU offload on CUDA; meta-device init, the full state
      dict of the checkpointer loaded shard by shard.
    - Exact data parallelism: a step's gradient is the gradient of the mean loss over the GLOBAL
      batch (``batch_size x gradient_accumulation_steps x world_size`` pairs), and the examples
      of a step depend only on the global batch, so N processes with ``batch_size=B`` train on
      the same pairs, with the same losses, as one process with ``batch_size=N*B``.
    - Gradient accumulation, gradient clipping, optimizer-in-backward, fp32/bf16, activation
      checkpointing (and offloading on CUDA), torch.compile of the decoder layers and the loss,
      optional torch profiler.
    - Held-out evaluation (sharded over ranks, reduced exactly) at step 0, every
      ``eval_every_n_steps`` and at the end.
    - Checkpoints every ``save_every_n_steps`` and at each epoch end: a sharded resume state
      (model + optimizer through torch.distributed.checkpoint, LR scheduler, data position, RNG),
      written atomically; epoch ends also write the full model in the checkpointer's format (HF
      in, HF out). ``resume_from_checkpoint=True`` continues from the newest complete resume
      state, mid-epoch included, with the losses of the uninterrupted run.
    """

    def __init__(self, cfg: DictConfig) -> None:
        # Validate first: a bad key must fail before a process group or a model exists.
        # component_problems: the loss and optimizer built, the data files, splits and max_seq_len
        # checked against the model (on the meta device): in the same error, not hours in
        v = validate_config(
            cfg, CONFIG_SPEC, bound_args=BOUND_ARGS, extra_checks=_cross_checks, component_checks=component_problems
        )
        self._cfg = v
        self._run_cfg = cfg  # saved as config.yaml beside every resume state
        check_device(v["device"])  # utils.get_device does not check that CUDA exists
        self._device = utils.get_device(device=v["device"])  # cuda: cuda:<LOCAL_RANK>
        self._dtype = training.get_dtype(v["dtype"], device=self._device)  # compute dtype
        # Mixed precision: SimPO's learning rates (~1e-6) move a weight by ~1e-6 per step, far
        # below bf16's resolution (~4e-3 relative: 3e-5 for a weight of 0.01), so pure bf16 weights
        # would round every update away. fp32_master_weights keeps weights, gradients and
        # optimizer state in fp32 (sharded) and has FSDP2 cast the gathered weights to bf16
        # for the forward/backward (MixedPrecisionPolicy, gradients reduced in fp32).
        self._mixed = self._dtype == torch.bfloat16 and v["fp32_master_weights"]
        self._param_dtype = torch.float32 if self._mixed else self._dtype
        self.world_size, self.rank = _init_distributed(self._device)
        self._is_rank_zero = self.rank == 0
        self._output_dir = Path(v["output_dir"])
        self._log_every_n_steps = v["log_every_n_steps"]
        # CUDA: allocator statistics; CPU: the process's peak resident set size.
        self._log_peak_memory_stats = v["log_peak_memory_stats"]
        self._batch_size = v["batch_size"]
        self._grad_accum = v["gradient_accumulation_steps"]
        self._optimizer_in_bwd = v["optimizer_in_bwd"]
        self._clip_grad_norm = v["clip_grad_norm"]
        self._eval_every = v["eval_every_n_steps"]
        self._save_every = v["save_every_n_steps"]
        self._keep_last = v["keep_last_n_checkpoints"]
        self._on_nonfinite = v["on_nonfinite"]
        self._collapse = CollapseGuard(patience=v["collapse_steps"], action=v["on_collapse"])
        self._num_output_chunks = v["num_output_chunks"]
        # Loss scaling. FSDP2 AVERAGES gradients over the world_size ranks; each rank's loss is
        # the SUM of its per-pair losses times world_size / global_batch, so that the averaged
        # gradient is exactly d/dθ of (1/global_batch) Σ over every pair of the step, whatever
        # the split between ranks, micro-batches and batch_size (all micro-batches are full:
        # drop_last below).
        self._global_batch = self._batch_size * self._grad_accum * self.world_size
        self._loss_scale = self.world_size / self._global_batch
        self.seed = training.set_seed(seed=v["seed"])  # the same on every rank; torch RNG gets seed + rank
        self.total_epochs = v["epochs"]
        self.max_steps_per_epoch = v["max_steps_per_epoch"]
        self.epochs_run = 0
        self.global_step = 0
        self._step_in_epoch = 0  # optimizer steps already taken in the current epoch
        # A sharding layout the model cannot take fails here, before any weights are read; the
        # same meta-device model (no memory) gives the parameter count for the space check.
        with torch.device("meta"):
            meta_model = config.instantiate(v["model"])
        check_model_matches_checkpoint(meta_model, v["model"], v["checkpointer"])  # before any weight is read
        problem = sharding_problem(meta_model, v["custom_sharded_layers"])
        if problem:
            raise ValueError(problem)
        n_params = sum(p.numel() for p in meta_model.parameters())
        del meta_model
        self._lock = None
        if self._is_rank_zero:
            log.info(f"device {self._device} (rank 0 of {self.world_size}), dtype {self._dtype}")
            check_output_dir(self._output_dir)
            self._lock = lock_output_dir(self._output_dir)  # rank 0 holds it for the whole run
            if not v["resume_from_checkpoint"]:  # refuses another run's states; saves config.yaml
                start_fresh_run(self._output_dir, cfg, overwrite=v["overwrite_output_dir"])
            self._check_checkpoint_space(n_params)
        dist.barrier()

    def _check_checkpoint_space(self, n: int) -> None:
        """Fail before any model is built if output_dir has less free space than the first
        checkpoint needs: the resume state (all ``n`` parameters + optimizer state, summed over
        the ranks' shards) and the epoch-end export (the full model in the compute dtype)."""
        v = self._cfg
        try:
            states = optimizer_states_per_param(lambda params: config.instantiate(v["optimizer"], params))
        except Exception as e:  # noqa: BLE001 - an estimate must not stop a run that would work
            log.warning(f"could not estimate the checkpoint size ({e!r}); output_dir free space not checked")
            return
        sizes = checkpoint_bytes(
            trainable_numel=n, trainable_dtype=self._param_dtype, optimizer_states=states,
            export_numel=n, export_dtype=self._dtype,
        )
        free = check_checkpoint_space(self._output_dir, sizes, what=f"{n:,} parameters, {states} optimizer states each")
        log.info(f"output_dir: {free:,} bytes free; the first checkpoint needs about {sizes['total']:,} bytes")

    def _info(self, msg: str) -> None:
        """The recipe's one logging path: rank 0 speaks for all ranks."""
        if self._is_rank_zero:
            log.info(msg)

    # ------------------------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        v = self._cfg
        # Build order: logger (rank 0) -> starting weights (every rank reads the full state dict)
        # -> model on meta (compile, activation checkpointing, FSDP2 shard, load weights shard by
        # shard) -> tokenizer -> loss -> optimizer (needs the sharded params) -> data (needs the
        # tokenizer) -> LR scheduler (needs steps per epoch) -> profiler -> resume state last,
        # because it restores into the model, optimizer and scheduler.
        self._metric_logger = None
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(v["metric_logger"])
            self._metric_logger.log_config(cfg)

        self._checkpointer = config.instantiate(v["checkpointer"], should_load_recipe_state=False)
        full_state_dict = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._model = self._setup_model(v["model"], full_state_dict)
        del full_state_dict

        # packed: each pair once as [prompt][chosen][rejected], several pairs per row (exact: the
        # same log-probs, losses and gradients as the padded layout, each prompt computed once)
        self._packed = v["packed"]
        unsupported = packing_unsupported_reason(self._model) if self._packed else None
        if unsupported:
            self._info(f"packed=True: falling back to the padded layout for this model: {unsupported}")
            self._packed = False
        self._tokenizer = config.instantiate(v["tokenizer"])
        self._loss_fn = config.instantiate(v["loss"])
        if v["compile"]:
            self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        self._setup_optimizer(v["optimizer"])

        self._sampler, self._dataloader = self._setup_data(v["dataset"], self._batch_size, v["shuffle"])
        self._eval_dataloader = None
        if v["eval_dataset"] is not None:
            self._eval_dataloader, self._eval_counts = self._setup_eval_data(
                v["eval_dataset"], v["eval_batch_size"] or self._batch_size
            )

        # The same on every rank: the sampler gives each rank len(dataset) // world_size pairs.
        self._steps_per_epoch = len(self._dataloader) // self._grad_accum
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"dataset gives {len(self._dataloader)} micro-batches of batch_size={self._batch_size} per "
                f"process ({self.world_size} processes), fewer than gradient_accumulation_steps={self._grad_accum}: "
                "no optimizer step would be taken"
            )
        self._lr_scheduler = None
        if v["lr_scheduler"] is not None:
            # With optimizer_in_bwd the scheduler drives the first per-parameter optimizer and
            # _sync_lr copies its rate to the others after every change.
            self._lr_scheduler = config.instantiate(
                v["lr_scheduler"],
                self._optimizers[0],
                num_training_steps=self.total_epochs * self._steps_per_epoch,
                last_epoch=-1,
            )
            self._sync_lr()
        # a run whose rate is 0 at every step trains for hours and changes nothing
        warning = zero_lr_warning(v["optimizer"], v["lr_scheduler"], self.total_epochs * self._steps_per_epoch)
        if warning and self._is_rank_zero:
            log.warning(warning)
        self._profiler = self._setup_profiler(v["profiler"])
        self._metrics = PreferenceMetrics.for_loss(self._loss_fn, self._device)
        self._info(
            f"{self.world_size} process(es), global batch {self._global_batch} pairs = batch_size "
            f"{self._batch_size} x gradient_accumulation_steps {self._grad_accum} x world_size {self.world_size}; "
            f"{self._steps_per_epoch} steps per epoch"
        )
        if v["resume_from_checkpoint"]:
            self._load_resume_state()

    def _setup_model(self, cfg_model: DictConfig, full_state_dict: Dict[str, Any]) -> torch.nn.Module:
        v = self._cfg
        t0 = time.perf_counter()
        # On the meta device: no memory until the shards are materialised by the load below.
        with training.set_default_dtype(self._param_dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)
        if v["compile"]:
            training.compile_model(model, verbose=self._is_rank_zero)  # per decoder layer
        if v["enable_activation_checkpointing"]:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        # FSDP2: every decoder layer ("layers.<i>") and custom_sharded_layers, then the root.
        _shard_model(
            model,
            custom_sharded_layers=v["custom_sharded_layers"],
            cpu_offload=v["fsdp_cpu_offload"],
            reshard_after_forward=v["fsdp_reshard_after_forward"],
            mp_policy=(
                MixedPrecisionPolicy(param_dtype=self._dtype, reduce_dtype=torch.float32) if self._mixed else None
            ),
        )
        with training.set_default_dtype(self._param_dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
                    m.rope_init()
        # Full state dict -> this rank's shards (distribute_tensor), strict: every key must match.
        training.load_from_full_model_state_dict(
            model, full_state_dict, self._device, strict=True, cpu_offload=v["fsdp_cpu_offload"]
        )
        self._activations_ctx = training.get_act_offloading_ctx_manager(model, v["enable_activation_offloading"])
        training.validate_no_params_on_meta_device(model)
        training.disable_dropout(model)
        n_all = sum(p.numel() for p in model.parameters())  # DTensor numel is the global size
        precision = f"{self._param_dtype} weights" + (f", {self._dtype} compute" if self._mixed else "")
        self._info(
            f"Model ready in {time.perf_counter() - t0:.1f}s: {n_all:,} parameters, all trainable, "
            f"{precision}, FSDP2 over {self.world_size} process(es)"
        )
        if self._device.type == "cuda":
            self._info(str(training.get_memory_stats(device=self._device)))
        dist.barrier()
        return model

    def _setup_optimizer(self, cfg_optimizer: DictConfig) -> None:
        """``self._optimizers``: one optimizer over all (sharded) parameters, or with
        ``optimizer_in_bwd`` one per parameter, stepped by a hook as soon as FSDP has reduced
        that parameter's gradient (FSDP2 runs post-accumulate-grad hooks on the sharded params),
        so no full set of gradients is ever alive."""
        if not self._optimizer_in_bwd:
            self._optimizers = [config.instantiate(cfg_optimizer, self._model.parameters())]
            return
        optim_dict = {p: config.instantiate(cfg_optimizer, [p]) for p in self._model.parameters()}
        training.register_optim_in_bwd_hooks(model=self._model, optim_dict=optim_dict)
        self._optimizers = list(optim_dict.values())
        self._info(f"optimizer_in_bwd: {len(self._optimizers)} per-parameter optimizers stepped in backward")

    def _sync_lr(self) -> None:
        """Give every in-backward optimizer the scheduler's current rate (torchtune's wrapper
        only does it from the second scheduler step on, leaving step 1 at mixed rates)."""
        lr = self._optimizers[0].param_groups[0]["lr"]
        for opt in self._optimizers[1:]:
            for group in opt.param_groups:
                group["lr"] = lr

    def _zero_grad(self) -> None:
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=True)

    def _setup_data(self, cfg_dataset: Any, batch_size: int, shuffle: bool):
        self._collate = partial(
            padded_collate_preference,
            padding_idx=self._tokenizer.pad_id,
            pad_to_multiple_of=self._cfg["pad_to_multiple_of"],
        )
        if self._packed:
            # one unpadded row per micro-batch (its attention costs the same in any rows: per
            # part on the CPU, a BlockMask on CUDA); prefopt.attention compiles FlexAttention
            # once, with dynamic shapes, for every length, from MIN_FLEX_LEN positions up
            self._collate = partial(
                packed_collate_preference,
                padding_idx=self._tokenizer.pad_id,
                pad_to_multiple_of=self._cfg["pad_to_multiple_of"],
                min_len=MIN_FLEX_LEN if self._device.type == "cuda" else 1,
                max_seq_len=self._model.max_seq_len,
            )
        ds = self._build_dataset(cfg_dataset)
        # DistributedSampler permutes all indices with one generator seeded (seed + epoch), the
        # same on every rank, truncates to a multiple of world_size (drop_last=True) and gives
        # rank r the positions r, r + W, r + 2W, ...: micro-batch k of rank r is positions
        # k*B*W + j*W + r (j < B), so micro-batch k over all ranks is exactly positions
        # [k*B*W, (k+1)*B*W) of the permutation -- what one process with batch_size B*W reads as
        # its micro-batch k. The examples of a step depend only on B*W, not on how it is split.
        sampler = DistributedSampler(
            ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed, drop_last=True
        )
        loader = DataLoader(
            ds,
            sampler=sampler,
            batch_size=batch_size,
            drop_last=True,  # every micro-batch full: the loss scale above assumes it
            collate_fn=self._collate,
            pin_memory=self._device.type == "cuda",  # the step copies the batch with non_blocking
        )
        return sampler, loader

    def _setup_eval_data(self, cfg_dataset: Any, batch_size: int):
        """Every held-out pair exactly once: rank r scores pairs r, r + W, ...; shorter shares
        are padded (repeating their last pair) so that all ranks run the same number of
        forwards, which FSDP's collectives need, and the padding is left out of the metrics."""
        ds = self._build_dataset(cfg_dataset)
        n = len(ds)
        mine = list(range(self.rank, n, self.world_size))
        per_rank = -(-n // self.world_size)
        padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
        loader = DataLoader(
            ds,
            sampler=padded,
            batch_size=batch_size,
            collate_fn=self._collate,
        )
        return loader, len(mine)

    def _build_dataset(self, cfg_dataset: Any):
        if isinstance(cfg_dataset, ListConfig):
            return ConcatDataset([config.instantiate(c, tokenizer=self._tokenizer) for c in cfg_dataset])
        return config.instantiate(cfg_dataset, tokenizer=self._tokenizer)

    def _setup_profiler(self, cfg_profiler: Optional[DictConfig]):
        if cfg_profiler is None or not cfg_profiler.get("enabled", False):
            return training.DummyProfiler()
        cfg_profiler = cfg_profiler.copy()
        if cfg_profiler.get("output_dir") is None:
            cfg_profiler.output_dir = str(self._output_dir / "profiling_outputs")
        profiler, profiler_cfg = config.instantiate(cfg_profiler)
        self._info(f"Profiler: {profiler_cfg}")
        return profiler

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
        seen = 0
        for batch in self._eval_dataloader:
            out = self._forward(batch)
            n = out.losses.shape[0]
            keep = max(0, min(self._eval_counts - seen, n))  # drop the padding
            seen += n
            if keep:
                cut = lambda t: t[:keep]  # noqa: E731
                metrics.update(type(out)(
                    *map(cut, out[:3]), type(out.chosen)(*map(cut, out.chosen)),
                    type(out.rejected)(*map(cut, out.rejected)), {k: cut(t) for k, t in out.metrics.items()},
                ))
        self._model.train()
        result = {f"eval/{k}": val for k, val in metrics.compute(all_reduce=True).items()}
        if self._is_rank_zero:
            self._metric_logger.log_dict(result, step=self.global_step)
        self._info(
            f"eval @ step {self.global_step}: loss {result['eval/loss']:.4f}  "
            f"rewards/accuracies {result['eval/rewards/accuracies']:.3f}  "
            f"rewards/margins {result['eval/rewards/margins']:.4f}"
        )
        return result

    def train(self) -> None:
        # (training.cleanup_before_training() calls torch.cpu.empty_cache, which does not exist)
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        if self._cfg["compile"]:
            self._info("torch.compile is on: the first step compiles and is slow.")
        self._first_eval = self.evaluate() if self.global_step == 0 else None
        self._last_eval = self._first_eval
        self._zero_grad()
        t0 = time.perf_counter()
        num_tokens = 0.0  # real (non-padding) tokens over all ranks since the last log
        # [scaled loss sum, real tokens] of this rank's micro-batches of the current step
        running = torch.zeros(2, device=self._device, dtype=torch.float64)
        self._profiler.start()
        for epoch in range(self.epochs_run, self.total_epochs):
            self._sampler.set_epoch(epoch)
            # Resume mid-epoch: skip the micro-batches that the saved steps already consumed.
            skip = self._step_in_epoch * self._grad_accum
            batches = islice(self._dataloader, skip, self._steps_per_epoch * self._grad_accum)
            pbar = tqdm(
                total=self._steps_per_epoch,
                initial=self._step_in_epoch,
                disable=not (self._is_rank_zero and sys.stderr.isatty()),
            )
            steps = iter(lambda: list(islice(batches, self._grad_accum)), [])  # micro-batches of a step
            for micro_batches in steps:
                # A "token"-mean NLL term (CPO, ORPO, princeton's sft) divides by the chosen tokens
                # of the whole step over all ranks (CPU ints over gloo: no device sync).
                per_pair = torch.stack([mb["chosen_tokens"] for mb in micro_batches]).sum().double()
                if self.world_size > 1:
                    dist.all_reduce(per_pair)
                per_pair /= self._global_batch
                rows = []
                for batch in micro_batches:
                    out = self._forward(batch, chosen_tokens_per_pair=per_pair)
                    loss = out.losses.sum() * self._loss_scale
                    running[0] += loss.detach()
                    running[1] += batch["num_tokens"]
                    self._metrics.update(out)
                    self._collapse.observe(out.chosen, out.rejected)
                    rows.append(batch["rows"])
                    skipped = False
                    if self._optimizer_in_bwd:
                        # The weights change inside backward(): a bad loss must be caught before it.
                        dist.all_reduce(running)
                        skipped = self._nonfinite(running[0], None, rows, epoch)
                        if not skipped:
                            loss.backward()
                            self._check_collapse(None)  # the update is already made: report only
                    else:
                        loss.backward()
                    del loss, out

                grad_norm = None
                if not self._optimizer_in_bwd:
                    if self._clip_grad_norm is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            self._model.parameters(), max_norm=self._clip_grad_norm
                        )
                    else:  # the collapse and NaN checks need the norm without clipping too (no copy)
                        grad_norm = torch.nn.utils.get_total_norm(
                            [p.grad for p in self._model.parameters() if p.grad is not None]
                        )
                    if isinstance(grad_norm, DTensor):
                        grad_norm = grad_norm.full_tensor()
                    # One reduction and host sync per step: every rank takes the same decision,
                    # and a NaN/inf must not reach the weights.
                    dist.all_reduce(running)
                    skipped = self._nonfinite(running[0], grad_norm, rows, epoch)
                    if not skipped:
                        self._check_collapse(grad_norm)
                        self._optimizers[0].step()
                self._zero_grad()
                if not skipped and self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                    self._sync_lr()
                num_tokens += running[1].item()
                self.global_step += 1
                self._step_in_epoch += 1
                pbar.update(1)

                if self.global_step % self._log_every_n_steps == 0:
                    metrics = self._metrics.compute(all_reduce=True)  # example-weighted over ranks and steps
                    elapsed = time.perf_counter() - t0
                    log_dict = {
                        **metrics,
                        "lr": self._optimizers[0].param_groups[0]["lr"],
                        "tokens_per_second_per_device": num_tokens / (elapsed * self.world_size),
                    }
                    if grad_norm is not None:
                        log_dict["grad_norm"] = grad_norm.item()
                    if self._log_peak_memory_stats:
                        log_dict.update(_memory_stats(self._device))
                    if self._is_rank_zero:
                        self._metric_logger.log_dict(log_dict, step=self.global_step)
                    pbar.set_description(f"{epoch + 1}|{self.global_step}|loss {log_dict['loss']:.4f}")
                    # Metrics and throughput cover the whole logging window, as TRL's do.
                    t0, num_tokens = time.perf_counter(), 0.0
                    self._metrics.reset()
                running.zero_()
                self._profiler.step()

                if self._eval_every is not None and self.global_step % self._eval_every == 0:
                    self._last_eval = self.evaluate()
                end_of_epoch = self._step_in_epoch == self._steps_per_epoch
                if self._save_every is not None and self.global_step % self._save_every == 0 and not end_of_epoch:
                    self.save_checkpoint(epoch=epoch, end_of_epoch=False)
            pbar.close()
            self.epochs_run = epoch + 1
            self._step_in_epoch = 0
            evaluated_now = self._eval_every is not None and self.global_step % self._eval_every == 0
            if self._eval_dataloader is not None and not evaluated_now:
                self._last_eval = self.evaluate()
            self.save_checkpoint(epoch=epoch, end_of_epoch=True)
        self._profiler.stop()
        if self._first_eval is not None and self._last_eval is not None:
            self._info(
                "held-out rewards/accuracies: "
                f"{self._first_eval['eval/rewards/accuracies']:.3f} at step 0 -> "
                f"{self._last_eval['eval/rewards/accuracies']:.3f} at step {self.global_step}"
            )

    def _nonfinite(
        self, loss_sum: torch.Tensor, grad_norm: Optional[torch.Tensor], rows: List[torch.Tensor], epoch: int
    ) -> bool:
        """True if the step must be skipped; raises for on_nonfinite=error. ``loss_sum`` and
        ``grad_norm`` are already reduced over ranks, so every rank decides the same."""
        bad = not torch.isfinite(loss_sum) or (grad_norm is not None and not torch.isfinite(grad_norm))
        if not bad:
            return False
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, torch.cat(rows).tolist())
        all_rows = sorted(r for part in gathered for r in part)
        msg = (
            f"non-finite loss or gradient at step {self.global_step + 1} (epoch {epoch}); "
            f"example rows of this step: {all_rows}"
        )
        if self._on_nonfinite == "error":
            raise FloatingPointError(
                msg + ". The last checkpoint is untouched; set on_nonfinite=skip to skip such steps."
            )
        self._info(msg + "; step skipped (on_nonfinite=skip)")
        return True

    def _check_collapse(self, grad_norm: Optional[torch.Tensor]) -> None:
        """Collective: the step's log-prob/logit bounds reduced over ranks, then the same
        collapse decision on every rank (raises for on_collapse=error). Runs right after the
        non-finite check's host sync; ``grad_norm`` is already the global norm."""
        bounds = self._collapse.bounds().to(self._device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        spreads = CollapseGuard.spreads_from_bounds(bounds).tolist()
        norm = None if grad_norm is None else grad_norm.item()
        lr = self._optimizers[0].param_groups[0]["lr"]
        self._collapse.check(self.global_step + 1, grad_norm=norm, lr=lr, spreads=spreads)

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, end_of_epoch: bool) -> None:
        """A resume state (always, atomically), plus at epoch ends the full model in the
        checkpointer's format (``<output_dir>/epoch_<N>/``, HF format in -> HF out).

        The resume state is SHARDED (torch.distributed.checkpoint): every rank writes its own
        shards of the weights and optimizer state in parallel. A full copy gathered on rank 0
        would need weights + AdamW state in rank 0's CPU memory (12 bytes/parameter with fp32
        master weights: ~96 GB for 8B) and one writer for all of it; DCP needs neither, and can
        load into a different number of processes (resharding; tested 2 -> 1).
        The folder is written as ``step_<N>.tmp`` and renamed after every rank has finished and
        rank 0 wrote COMPLETE, so a kill leaves the previous states intact. On several nodes,
        ``output_dir`` must be on storage that every node sees.
        """
        t0 = time.perf_counter()
        model_sd, optim_sd = get_state_dict(self._model, self._optimizers)
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if self._device.type == "cuda" else None,
        }

        def write(d: Path) -> None:  # every rank: its shards and RNG state; rank 0 the recipe state
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=d)
            torch.save(rng, d / f"rng_rank{self.rank}.pt")
            if self._is_rank_zero:
                self._save_recipe_state(d)

        # Rank 0 makes step_<N>.tmp, adds config.yaml and, once every rank's files are on disk,
        # COMPLETE, then renames it (prefopt.resume). A write error on any rank (a full disk, ...)
        # stops every rank with one message naming the folder; the previous states stay intact.
        final_dir = write_state(
            self._output_dir, self.global_step, self._run_cfg, write,
            note=f"step {self.global_step}, {self.world_size} processes", keep_last=self._keep_last, distributed=True,
        )
        self._info(f"Resume state saved to {final_dir} in {time.perf_counter() - t0:.1f}s")

        if end_of_epoch:
            self._export(epoch, final_dir)

    def _export(self, epoch: int, state_dir: Path) -> None:
        """``<output_dir>/epoch_<N>/``: the full model in the checkpointer's format (HF in -> HF
        out), written by rank 0 to a temporary name and renamed (prefopt.export): the epoch's
        resume state, written just before, says the epoch is done, so a lost export must be
        visible (no ``epoch_<N>/``) for a resume to write it. Collective."""
        t0 = time.perf_counter()
        # All ranks take part in the all-gathers; only rank 0 keeps (and writes) the CPU copy.
        full = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        # fp32 master weights are written in the compute dtype (bf16), like the checkpoint read
        full = {k: t.to(self._dtype) for k, t in full.items()}

        def write(root: Path) -> None:  # rank 0
            with checkpointer_writing_to(self._checkpointer, root):  # writes <root>/epoch_<N>/
                self._checkpointer.save_checkpoint({training.MODEL_KEY: full}, epoch=epoch, intermediate_checkpoint=False)

        # a write error (a full disk) on rank 0 stops every rank with one message naming the folder
        final = write_export(
            self._output_dir, epoch, write, nbytes=state_bytes(full), state=state_dir, distributed=True
        )
        self._info(f"Full model of epoch {epoch} saved to {final} in {time.perf_counter() - t0:.1f}s")
        dist.barrier()

    def _save_recipe_state(self, tmp_dir: Path) -> None:
        """Rank 0: what the resume needs besides the DCP shards and the RNG states."""
        state = {
            "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler is not None else None,
            "epochs_run": self.epochs_run,
            "step_in_epoch": self._step_in_epoch,
            "global_step": self.global_step,
            "seed": self.seed,
            "total_epochs": self.total_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "world_size": self.world_size,
            "batch_size": self._batch_size,
            "gradient_accumulation_steps": self._grad_accum,
            "optimizer_in_bwd": self._optimizer_in_bwd,
            "data": self._data_identity(),  # what a resume must read again: the same rows, the same order
        }
        # tensors and plain values only: a resume reads it with weights_only=True (prefopt.safe_load)
        torch.save(state, tmp_dir / "recipe_state.pt")

    def _data_identity(self) -> Dict[str, Any]:
        """The data a resume must train on again (prefopt.resume.data_identity), by config key."""
        loaders = {"dataset": self._dataloader, "eval_dataset": self._eval_dataloader}
        return {k: None if dl is None else data_identity(dl.dataset) for k, dl in loaders.items()}

    def _load_resume_state(self) -> None:
        model_sd, optim_sd = get_state_dict(self._model, self._optimizers)
        loaded = {"model": model_sd, "optimizer": optim_sd}

        def read(d: Path):
            """This rank's small files (a damaged one on any rank, or one that would run code:
            every rank tries the next older state)."""
            state = load_checkpoint_file(d / "recipe_state.pt")
            rng_file = d / f"rng_rank{self.rank}.pt"
            same_world = state["world_size"] == self.world_size and rng_file.exists()
            rng = load_checkpoint_file(rng_file) if same_world else None
            return state, rng

        def restore(d: Path, _) -> None:
            """Collective, once the config matches (a wrong shape would look like a damaged file)."""
            dcp_load(loaded, d)  # into this rank's shards, resharding if needed; nothing unpickled runs code

        # Compared besides RESUME_CONFIG_KEYS: the resolved seed (a null seed is drawn at random:
        # the saved one is taken instead), the pairs per micro-batch over all ranks (batch_size x
        # world_size; the world size itself may change) and the data (rows appended to the file, a
        # file replaced). The same inputs on every rank: the same decision.
        mine = {
            "seed": self.seed,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "gradient_accumulation_steps": self._grad_accum,
            "batch_size x world_size": self._batch_size * self.world_size,
            "optimizer_in_bwd": self._optimizer_in_bwd,
        }

        def saved(result) -> Dict[str, Any]:
            state = result[0]
            return {**state, "batch_size x world_size": state["batch_size"] * state["world_size"]}

        ckpt_dir, (state, rng) = read_newest_state(
            self._output_dir, self._run_cfg, read, keys=RESUME_CONFIG_KEYS, values=mine, saved_values=saved,
            data=self._data_identity(), saved_data=lambda result: result[0].get("data"), restore=restore, distributed=True,
        )
        set_state_dict(
            self._model, self._optimizers, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
        )
        if self._lr_scheduler is not None and state["lr_scheduler"] is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
            self._sync_lr()
        self.epochs_run = state["epochs_run"]
        self._step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        if self._cfg["seed"] is None:  # the data order and RNG streams of the saved run, not a new draw
            self.seed = training.set_seed(seed=state["seed"])
            self._sampler.seed = self.seed
            self._info(f"seed: null in the config: the saved run's seed {self.seed} is used ({ckpt_dir})")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and self._device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        self._info(
            f"Resumed from {ckpt_dir} (saved by {state['world_size']} process(es)): epoch {self.epochs_run}, "
            f"step {self.global_step}"
        )
        dist.barrier()
        unexported = missing_export(self._output_dir, self.epochs_run, self._step_in_epoch, distributed=True)
        if unexported is not None:  # the run stopped while writing it: the epoch is not done without it
            self._info(f"{self._output_dir}/epoch_{unexported}/ is missing: writing the export of epoch {unexported} now")
            self._export(unexported, ckpt_dir)

    def cleanup(self) -> None:
        # Peak resident memory of every rank, in one line on rank 0.
        peaks: List[Any] = [None] * self.world_size
        dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        self._info("peak RSS per rank (GiB): " + ", ".join(f"{p:.2f}" for p in peaks))
        if self._metric_logger is not None:
            self._metric_logger.close()
        # The data loaders, their samplers and the memory-mapped Arrow tables of the data sets go
        # now, while pyarrow is fully alive, not whenever the interpreter's teardown gets to them
        # (Arrow objects and pools torn down late sometimes abort the process: prefopt.teardown).
        release_data(getattr(self, "_dataloader", None), getattr(self, "_eval_dataloader", None))
        self._dataloader = self._eval_dataloader = self._sampler = None
        if self._lock is not None:
            self._lock.close()  # releases the output_dir lock
        destroy_process_group()


def _shard_model(
    model: torch.nn.Module,
    *,
    custom_sharded_layers: Optional[List[str]],
    cpu_offload: bool,
    reshard_after_forward: bool,
    mp_policy: Optional[MixedPrecisionPolicy],
) -> None:
    """torchtune.training.shard_model (same conditions, bottom-up, the root last) plus FSDP2's
    ``mp_policy``, which torchtune's function does not pass through.

    The root is never resharded after forward: its parameters (the embedding, the final norm and,
    unless sharded on its own, the output layer) are needed again as soon as backward starts, so
    resharding them would cost one more all-gather per micro-batch for nothing.

    Raises:
        ValueError: for a tied output layer (``TiedLinear``) with ``tok_embeddings`` sharded on
            its own: the fused projection would see the embedding weight as a sharded DTensor.
    """
    problem = sharding_problem(model, custom_sharded_layers)
    if problem:
        raise ValueError(problem)
    kwargs: Dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    sharded = 0
    for name, module in reversed(list(model.named_modules())):
        if training.get_shard_conditions(name, module, names_to_match=custom_sharded_layers):
            fully_shard(module, **kwargs)
            sharded += 1
    if sharded == 0:
        raise ValueError("FSDP: no decoder layer ('layers.<i>') or custom_sharded_layers module found to shard")
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})


def sharding_problem(model: torch.nn.Module, custom_sharded_layers: Optional[List[str]]) -> Optional[str]:
    """Why ``custom_sharded_layers`` cannot shard ``model`` (None if it can)."""
    if isinstance(getattr(model, "output", None), TiedLinear) and "tok_embeddings" in (custom_sharded_layers or []):
        return (
            f"custom_sharded_layers={list(custom_sharded_layers)}: this model's output layer is tied to "
            "tok_embeddings, which must then stay in the root FSDP unit (the output projection, run by the "
            "root, would see a sharded embedding weight); use custom_sharded_layers: null"
        )
    return None


def _init_distributed(device: torch.device):
    """NCCL for CUDA tensors (and gloo for CPU ones, e.g. all_gather_object); gloo on CPU.
    Without a launcher (no RANK/WORLD_SIZE in the environment), a one-process group on an
    in-memory store, so that a plain `tune run` works as well."""
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if training.is_distributed():
        init_process_group(backend)
    else:
        init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_world_size(), dist.get_rank()


def _memory_stats(device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        return training.get_memory_stats(device=device)
    # ru_maxrss is in KiB on Linux: the peak RSS of this (rank 0's) process so far.
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# prefopt.config.parse: torchtune's, with a config that is a YAML list or bad YAML named in one line
@parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = SimPORecipeDistributed(cfg=cfg)
    config.log_config(recipe_name="SimPORecipeDistributed", cfg=cfg)  # rank 0, once the group exists
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    # Run through runpy (`tune run` on one device, a sweep driver, a notebook's %run): returns as
    # torchtune's recipes do, and the caller goes on. As the process's own program (`python <this
    # file>`, or `python -m recipes.<name>` as torchrun starts each rank): a finished run ends the
    # process before native libraries' teardown, which has aborted finished runs (prefopt.teardown).
    sys.exit(run_script(recipe_main, __file__))

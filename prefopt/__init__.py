"""prefopt: reference-free preference optimization (SimPO) for torchtune users.

Each module has one job:

- :mod:`prefopt.loss`: the preference losses: ``SimPOLoss`` (drop-in for torchtune 0.5's), CPO,
  ORPO, and torchtune's DPO/RSO/PPO re-exported.
- :mod:`prefopt.logprobs`: per-sequence average/sum log-probs of response tokens without a
  float32 logits copy.
- :mod:`prefopt.step`: one preference step's forward (tokens -> log-probs -> loss, rewards, metric
  inputs), written once for both recipes.
- :mod:`prefopt.data`: the preference data set: sources read, rows checked, tokenized, truncated
  and cached (its modules: ``sources``, ``encoding``, ``cache``, ``dataset``; ``prompts``: the
  prompts of a preference or prompts file, for generation).
- :mod:`prefopt.collate`: the padded and the packed collates, items -> the step's batch tensors.
- :mod:`prefopt.packing`: the packed, prefix-shared layout (which pairs share a row) and its
  attention mask.
- :mod:`prefopt.attention`: the packed layouts' attention: FlexAttention compiled once for any
  mix of lengths, never silently unfused, on CUDA; per-part SDPA elsewhere.
- :mod:`prefopt.metrics`: the metrics TRL and princeton log, reduced over micro-batches and ranks.
- :mod:`prefopt.config`: start-up validation of a recipe's config, every problem in one error.
- :mod:`prefopt.checkpointing`: the start-up checks that output_dir can hold the checkpoints.
- :mod:`prefopt.startup`: the start-up checks that need the components (loss and optimizer built,
  data files, splits and max_seq_len against the model on the meta device) and the zero-lr warning.
- :mod:`prefopt.resume`: resume states: written atomically, the newest intact one found, the config
  and the data compared.
- :mod:`prefopt.resume_check`: what a resume must keep (config keys, the data's identity) and the
  one message of a mismatch.
- :mod:`prefopt.safe_load`: reading back what a run saved (torch.load, torch.distributed.checkpoint)
  with nothing in a file able to run code.
- :mod:`prefopt.export`: the epoch-end exports (``epoch_<N>/``), whole or not at all; a resume
  finishes a lost one.
- :mod:`prefopt.guards`: the device check, the output-dir lock, the training-collapse guard.
- :mod:`prefopt.teardown`: how a run ends: what ``cleanup`` releases (the run's Arrow data), and a script's exit before native teardown.
- :mod:`prefopt.generation`: batched, seeded sampling from a torchtune decoder (KV caches,
  left-padded prompts, stop tokens, temperature/top-k/top-p).
- :mod:`prefopt.cpu_linear`: a model's linear layers run through oneDNN on weights packed once,
  while it generates or scores on CPU.
- :mod:`prefopt.reward`: scoring (prompt, response) pairs: a one-output reward model or any
  Python callable, behind one ``score``.
- :mod:`prefopt.judge`: the statistics of a judged run (win rate with ties half, lengths, win rate by
  length bucket, degenerate outputs), pure.
- :mod:`prefopt.peft`: LoRA adapters kept in float32 under a bf16 base.
- :mod:`prefopt.models`: builders where torchtune's differ from the checkpoint (``mistral``: Mistral 7B
  v0.2's RoPE θ; ``gemma2``: transformers' Gemma 2) or has none (``qwen3``: Qwen3 and its
  tokenizer; ``gemma3``: Gemma 3's text models; ``qk_norm``: the q/k-norm decoder both share), ``checkpointer``: their
  Hugging Face checkpoints loaded and saved, and ``match``: the configured model checked against
  the checkpoint's ``config.json`` at start-up, every mismatch in one error.
- :mod:`prefopt.logs`: reading the metric files torchtune's ``DiskLogger`` writes.
- :mod:`prefopt.cli`: the ``prefopt`` command (``ls``, ``cp``, ``run``, ``plot``).
- :mod:`prefopt.tune_compat`: makes ``tune run recipes/<name>.py`` find this repo's recipes.
"""

__version__ = "0.1.0"

from pathlib import Path as _Path

from omegaconf import OmegaConf as _OmegaConf
from omegaconf import __version__ as _omegaconf_version

ASSETS = _Path(__file__).resolve().parent / "assets"


def _asset_path(relative: str) -> str:
    return str(ASSETS / relative)


# `${prefopt_assets:tiny/tokenizer.model}` in a config resolves to the bundled file, wherever
# prefopt is installed (a checkout or a wheel), so the tiny configs run from any directory.
# (omegaconf 2.4 renamed register_new_resolver back to register_resolver; 2.1-2.3's
# register_resolver is the old, deprecated one.)
if not _OmegaConf.has_resolver("prefopt_assets"):
    if tuple(int(x) for x in _omegaconf_version.split(".")[:2]) >= (2, 4):
        _OmegaConf.register_resolver("prefopt_assets", _asset_path)
    else:
        _OmegaConf.register_new_resolver("prefopt_assets", _asset_path)

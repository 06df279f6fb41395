"""prefopt: reference-free preference optimization (SimPO) for torchtune users.

- :mod:`prefopt.loss`: ``SimPOLoss`` (drop-in for torchtune 0.5's), plus torchtune's DPO/RSO/PPO losses.
- :mod:`prefopt.logprobs`: per-sequence average/sum log-probs without a float32 logits copy.
- :mod:`prefopt.data`: preference datasets with princeton-style truncation, and the collate.
- :mod:`prefopt.metrics`: the metrics TRL and princeton log, reduced over micro-batches and ranks.
- :mod:`prefopt.config`: start-up config validation for the recipes.
- :mod:`prefopt.checkpointing`: the start-up checks that output_dir can hold the checkpoints.
- :mod:`prefopt.resume`: resume states: written atomically, the newest intact one found, the config compared.
- :mod:`prefopt.guards`: the device check, the output_dir lock, the training-collapse guard.
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

"""prefopt: reference-free preference optimization (SimPO) for torchtune users.

- :mod:`prefopt.loss`: ``SimPOLoss`` (drop-in for torchtune 0.5's), plus torchtune's DPO/RSO/PPO losses.
- :mod:`prefopt.logprobs`: per-sequence average/sum log-probs without a float32 logits copy.
- :mod:`prefopt.data`: preference datasets with princeton-style truncation, and the collate.
- :mod:`prefopt.metrics`: the metrics TRL and princeton log, reduced over micro-batches and ranks.
- :mod:`prefopt.config`: start-up config validation for the recipes.
"""

__version__ = "0.1.0"

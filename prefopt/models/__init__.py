"""Model builders where torchtune 0.6.1's do not build what the checkpoint holds, and the
start-up check that the configured model matches its checkpoint (:mod:`prefopt.models.match`).

- :mod:`prefopt.models.mistral`: Mistral 7B v0.2/v0.3 (RoPE θ = 1e6; torchtune's builders have v0.1's 1e4).
- :mod:`prefopt.models.gemma2`: Gemma 2 with transformers' soft-caps (attention 50, final 30 on the logits).
- :mod:`prefopt.models.match`: the configured model vs the checkpoint's ``config.json``, every mismatch in one error.
"""

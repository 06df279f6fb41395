"""Model builders where torchtune 0.6.1's do not build what the checkpoint holds (or has none), and the
start-up check that the configured model matches its checkpoint (:mod:`prefopt.models.match`).

- :mod:`prefopt.models.mistral`: Mistral 7B v0.2/v0.3 (RoPE θ = 1e6; torchtune's builders have v0.1's 1e4), and
  v0.1 for inputs within its 4096-token sliding window (torchtune's applies no window).
- :mod:`prefopt.models.gemma2`: Gemma 2 with transformers' soft-caps (attention 50, final 30 on the logits).
- :mod:`prefopt.models.qk_norm`: the decoder Qwen3 and Gemma 3 share (per-head q/k RMSNorm before RoPE,
  ``head_dim`` of its own, per-layer RoPE and sliding windows), from torchtune's components.
- :mod:`prefopt.models.qwen3`: Qwen3 0.6B-32B builders (full, LoRA, QLoRA 8B) and its tokenizer.
- :mod:`prefopt.models.gemma3`: Gemma 3 text builders (1B; the language model of 4B/12B/27B), full and LoRA.
- :mod:`prefopt.models.checkpointer`: Qwen3 / Gemma 3 Hugging Face checkpoints loaded and saved
  (torchtune's ``FullModelHFCheckpointer`` with our key conversion).
- :mod:`prefopt.models.match`: the configured model vs the checkpoint's ``config.json``, every mismatch in one error.
"""

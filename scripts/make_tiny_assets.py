#!/usr/bin/env python
"""(Re)create prefopt's embedded default assets under ``prefopt/assets/tiny/``.

    python scripts/make_tiny_assets.py

Deterministic (fixed seeds, fixed order, no network): the files committed in the repo are this
script's output.

* ``train.jsonl`` (1,200 pairs) and ``eval.jsonl`` (200 held-out pairs): preference pairs written
  by us in torchtune's chosen/rejected message format (the same user message on both sides).
  The user asks for one sentence on a topic; the *chosen* answer is a well-formed English
  sentence (subject, verb, object, place, time, drawn from word lists); the *rejected* answer is
  the same words with two adjacent words (not the first) swapped. Chosen and rejected have
  exactly the same tokens and the same opening word, so neither length, vocabulary nor
  capitalization gives the answer away: only word order (coherent vs incoherent) does. Held-out sentences never occur in the training file.
* ``heldout_prompts.jsonl`` (32) and ``onpolicy_prompts.jsonl`` (128): the eight topics in wordings
  no training pair uses (the judge's), and in the training wordings plus 12 more (the on-policy
  demo's pairs); the two sets share no prompt.
* ``tokenizer.model``: a SentencePiece BPE model (vocab 512) trained on that text, with Llama-2
  ids (unk=0, bos=1, eos=2) and byte fallback, for ``torchtune.models.llama2.llama2_tokenizer``.
* ``model/``: a 2-layer Llama-architecture model (1.4M parameters) built with
  ``torchtune.models.llama2.llama2`` from seed 0, **not** pre-trained (a pure seeded init),
  converted with ``tune_to_hf`` and saved in Hugging Face format (``config.json`` +
  ``model.safetensors``): loadable by ``FullModelHFCheckpointer(model_type="LLAMA2")`` and by
  ``transformers.AutoModelForCausalLM.from_pretrained``.

A random model prefers neither side (held-out reward accuracy ~0.5 at step 0); SimPO with LoRA
teaches it the preference for fluent word order in a few dozen steps, and the held-out accuracy
shows it generalizes to sentences it never saw.
"""

import io
import json
import random
import time
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama2 import llama2

OUT = Path(__file__).resolve().parents[1] / "prefopt" / "assets" / "tiny"
SEED = 0
N_TRAIN, N_EVAL = 1200, 200
MODEL = dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512, max_seq_len=256)

SUBJECTS = ["The cat", "My brother", "The old farmer", "A young girl", "Our teacher", "The doctor", "His neighbor",
            "The baker", "A tall man", "The pilot", "My aunt", "The student"]
VERBS = ["found", "painted", "carried", "washed", "sold", "bought", "fixed", "opened", "cleaned", "moved", "hid", "dropped"]
OBJECTS = ["a red box", "the small table", "an old map", "the green door", "a heavy bag", "the broken clock", "a new coat",
           "the wooden chair", "a blue cup", "the long rope", "a paper kite", "the silver key"]
PLACES = ["in the garden", "near the river", "at the market", "behind the house", "in the kitchen", "on the hill",
          "at school", "by the window", "in the city", "under the bridge", "at the station", "in the forest"]
TIMES = ["this morning", "last week", "yesterday", "at noon", "before dinner", "after the rain", "on Sunday", "at night"]
PROMPTS = ["Write one sentence about {t}.", "Tell me something about {t}.", "Describe {t} in one line.",
           "Say a short sentence about {t}."]
TOPICS = ["the weekend", "a small town", "a busy day", "the family", "a trip", "the house", "an afternoon", "the summer"]
# Held-out prompts for judging generations: the same topics asked in wordings no training pair
# uses, so that a judged gain is not one on prompts the policy was trained on
HELDOUT_PROMPTS = ["Write a short line about {t}.", "Tell me one thing about {t}.", "Describe {t} in one sentence.",
                   "Say something about {t}."]


# Prompts for the on-policy demo's pairs (scripts/onpolicy_demo.sh): the training wordings plus 12
# more (16 x 8 topics), none of them held out. With the 4 training wordings alone, the tiny policy
# learns which phrase fits each of the 32 prompt strings, not which fits the topic, and nothing
# carries over to the held-out wordings (benchmarks/README.md, the on-policy demo)
ONPOLICY_PROMPTS = PROMPTS + ["Give me a line about {t}.", "What can you say about {t}?", "Write a sentence on {t}.",
                              "Talk about {t} in one line.", "One sentence about {t}, please.", "Can you describe {t}?",
                              "Please write about {t}.", "Make a sentence about {t}.", "Share a thought about {t}.",
                              "I want a line about {t}.", "Tell a short story about {t}.", "Write about {t}."]


def write_onpolicy_prompts() -> None:
    """onpolicy_prompts.jsonl: every topic in every on-policy wording (format ``prompts``), none
    in a held-out wording."""
    rows = [{"prompt": w.format(t=t)} for w in ONPOLICY_PROMPTS for t in TOPICS]
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert not {r["prompt"] for r in rows} & {w.format(t=t) for t in TOPICS for w in HELDOUT_PROMPTS}
    (OUT / "onpolicy_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_heldout_prompts() -> None:
    """heldout_prompts.jsonl: every topic in every held-out wording (format ``prompts``)."""
    rows = [{"prompt": w.format(t=t)} for t in TOPICS for w in HELDOUT_PROMPTS]
    assert not {r["prompt"] for r in rows} & {w.format(t=t) for t in TOPICS for w in PROMPTS}
    (OUT / "heldout_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_pairs(rng: random.Random):
    rows, seen = [], set()
    while len(rows) < N_TRAIN + N_EVAL:
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(TIMES)]
        sentence = " ".join(words) + "."
        if sentence in seen:
            continue
        seen.add(sentence)
        tokens = sentence[:-1].split()
        # One swap of two adjacent words, never the first: both sides keep the same tokens, the
        # same length and the same capitalized opening word, so word order is the only cue.
        scrambled = tokens[:]
        while scrambled == tokens:
            scrambled = tokens[:]
            i = rng.randrange(1, len(tokens) - 1)
            scrambled[i], scrambled[i + 1] = scrambled[i + 1], scrambled[i]
        prompt = rng.choice(PROMPTS).format(t=rng.choice(TOPICS))
        rows.append({
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": sentence}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": " ".join(scrambled) + "."}],
        })
    return rows[N_EVAL:], rows[:N_EVAL]


def main() -> None:
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    train, held_out = make_pairs(random.Random(SEED))
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_heldout_prompts()
    write_onpolicy_prompts()
    # Trained from an iterator into memory: a file-based run records its input/output paths in
    # the model, so the bytes would depend on where the repo is checked out. Identity
    # normalization (as Llama-2's) also keeps the file small.
    sentences = [m["content"] for r in train + held_out for k in ("chosen", "rejected") for m in r[k]]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=MODEL["vocab_size"], model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        normalization_rule_name="identity", num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    (OUT / "tokenizer.model").write_bytes(buf.getvalue())

    torch.manual_seed(SEED)
    model = llama2(**MODEL)
    hf = tune_to_hf(model.state_dict(), num_heads=MODEL["num_heads"], num_kv_heads=MODEL["num_kv_heads"], dim=MODEL["embed_dim"])
    (OUT / "model").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(OUT / "model" / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": MODEL["vocab_size"], "hidden_size": MODEL["embed_dim"], "intermediate_size": MODEL["intermediate_dim"],
        "num_hidden_layers": MODEL["num_layers"], "num_attention_heads": MODEL["num_heads"],
        "num_key_value_heads": MODEL["num_kv_heads"], "head_dim": MODEL["embed_dim"] // MODEL["num_heads"],
        "max_position_embeddings": MODEL["max_seq_len"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
        "pretraining_tp": 1, "use_cache": True,
    }
    (OUT / "model" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {OUT}: {len(train)} train + {len(held_out)} held-out pairs, tokenizer vocab {MODEL['vocab_size']}, "
          f"model {n_params:,} parameters, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()

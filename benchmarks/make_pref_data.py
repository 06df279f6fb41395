"""A seeded UltraFeedback-shaped preference file for the data benchmark (no download).

    python benchmarks/make_pref_data.py /tmp/ufb60k.jsonl --rows 60000

Rows have HuggingFaceH4/ultrafeedback_binarized's columns (``prompt``, ``prompt_id``,
``chosen``, ``rejected``, ``messages``, ``score_chosen``, ``score_rejected``; ``chosen`` and
``rejected`` are message lists that include the prompt). Text is drawn from the tiny assets'
word lists, so prefopt's tiny sentencepiece tokenizer (vocab 512) encodes it at about the
density it encodes English; lengths are log-normal with medians chosen so that a pair (prompt +
chosen + rejected, the prompt counted once) has a median of ~1,030 tokens of that tokenizer,
and a long tail (p99 ~4x the median) as in UltraFeedback.
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_tiny_assets import OBJECTS, PLACES, PROMPTS, SUBJECTS, TIMES, TOPICS, VERBS  # noqa: E402

# median words per part (the tiny tokenizer gives ~1.9 tokens per word of this text)
MEDIAN_WORDS = {"prompt": 76, "chosen": 220, "rejected": 204}
SIGMA = 0.6


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} {rng.choice(TIMES)}"
    return s + rng.choice([".", ".", ".", "!", "?"])


def _text(rng: random.Random, median_words: int) -> str:
    words = max(3, int(median_words * math.exp(rng.gauss(0.0, SIGMA))))
    out, n = [], 0
    while n < words:
        s = _sentence(rng)
        out.append(s)
        n += len(s.split())
    return " ".join(out)


def make_row(rng: random.Random, i: int) -> dict:
    prompt = rng.choice(PROMPTS).format(t=rng.choice(TOPICS)) + " " + _text(rng, MEDIAN_WORDS["prompt"])
    chosen = _text(rng, MEDIAN_WORDS["chosen"])
    rejected = _text(rng, MEDIAN_WORDS["rejected"])
    user = {"role": "user", "content": prompt}
    c = [user, {"role": "assistant", "content": chosen}]
    return {
        "prompt": prompt,
        "prompt_id": f"{i:064x}",
        "chosen": c,
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "messages": c,
        "score_chosen": float(rng.randint(6, 10)),
        "score_rejected": float(rng.randint(1, 6)),
    }


def write(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            f.write(json.dumps(make_row(rng, i)) + "\n")
    tmp.rename(path)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write(a.path, a.rows, a.seed))

"""Sampling and reward scoring speed: prefopt.generation against Hugging Face ``generate``, and
prefopt.reward's batched scoring against princeton's one-at-a-time scoring (a benchmark, not a test).

    python benchmarks/generation_benchmark.py [--shape decoder] [--prompts 4] [--k 4] [--batch 2]
        [--max-new-tokens 32] [--rm-prompts 8] [--threads 2]

Same random Llama (benchmarks/_make_model.py's shapes; ``decoder`` is the 134M decoder-heavy one),
same prompts (random token ids of mixed lengths, left-padded), same k, max_new_tokens and batch
on both sides; sampling at princeton's settings (temperature 0.8, top_p 0.95) and no stop token,
so every row produces exactly max_new_tokens tokens on both sides (``--stop-ids N``: the last N
vocabulary ids end a response on both sides, so responses vary in length as real ones do; tokens
are then counted up to each row's stop token, the same way on both sides). Scoring: a one-output
``LlamaForSequenceClassification`` of the same shape scores what the pairs recipe scores, k
responses per prompt (``--rm-prompts`` prompts of ``--rm-prompt-min..max`` tokens, each with k
responses of ``--rm-response-min..max`` tokens; uniform lengths, a prompt about half as long as a
response: UltraFeedback's prompts are ~1/3 of an on-policy response); our ``RewardModel.score_ids``
with the prompt as each sequence's group (its tokens computed once per prompt; forwards of up to
``--rm-batch`` sequences), twice: with one SDPA call per prompt and per response (the CPU's
default) and with FlexAttention's BlockMask (``flex_attention: True``, the CUDA default; compiled
in the untimed warm-up batch, whose time is reported), against ``model(input_ids)`` one sequence at a time
(princeton's ``reward_model_annotate.py``). Each measurement runs in its own process, so its peak RSS is its
own; the first batch of each is a warm-up and is not timed. The measurements alternate,
``--repeats`` times each, and each one's median is reported.
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch's names (torch is imported in the parts only)
PARTS = ("ours_generate", "hf_generate", "ours_score_batched", "ours_score_flex", "hf_score_one_at_a_time")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(args):
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=g).tolist()
    return [[1] + torch.randint(3, 32000, (n - 1,), generator=g).tolist() for n in lengths]


def _sequences(args):
    """k conversations per prompt (the prompt's tokens, then a response's) and each one's prompt index."""
    import torch

    g = torch.Generator().manual_seed(1)
    seqs, keys = [], []
    for i in range(args.rm_prompts):
        n = int(torch.randint(args.rm_prompt_min, args.rm_prompt_max + 1, (1,), generator=g))
        prompt = [1] + torch.randint(3, 32000, (n - 1,), generator=g).tolist()
        for _ in range(args.k):
            m = int(torch.randint(args.rm_response_min, args.rm_response_max + 1, (1,), generator=g))
            seqs.append(prompt + torch.randint(3, 32000, (m,), generator=g).tolist())
            keys.append(i)
    return seqs, keys


def _batches(args, prompts):
    for start in range(0, len(prompts), args.batch):
        yield [p for p in prompts[start:start + args.batch] for _ in range(args.k)]


def run_part(part: str, args, model_dir: Path, rm_dir: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks._make_model import SHAPES

    shape = SHAPES[args.shape]
    prompts = _prompts(args)
    from prefopt.cpu_linear import packed_linears

    def pack(model):
        if not part.startswith("ours"):
            return contextlib.nullcontext()
        # --no-onednn: oneDNN off, so the library's own packing (per call) does nothing either
        return packed_linears(model) if args.onednn else torch.backends.mkldnn.flags(enabled=False)

    new = args.max_new_tokens
    # --stop-ids N: the last N ids of the vocabulary end a response on both sides (responses of
    # varying length); 0: every row runs to max_new_tokens
    stops = list(range(shape["vocab_size"] - args.stop_ids, shape["vocab_size"])) if args.stop_ids else []
    stop_set = set(stops)
    if part == "ours_generate":
        from torchtune.models.llama2 import llama2
        from torchtune.training import FullModelHFCheckpointer

        from prefopt.generation import generate_batch

        ckpt = FullModelHFCheckpointer(checkpoint_dir=str(model_dir), checkpoint_files=["model.safetensors"],
                                       model_type="LLAMA2", output_dir=str(model_dir.parent / "unused"))
        model = llama2(**shape)
        model.load_state_dict(ckpt.load_checkpoint()["model"])
        model.eval()

        def gen(rows):
            out = generate_batch(model, rows, seeds=list(range(len(rows))), max_new_tokens=new, temperature=0.8, top_p=0.95,
                                 stop_tokens=stops)
            assert stops or all(len(o.tokens) == new for o in out)
            return sum(o.num_generated for o in out)
    elif part == "hf_generate":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        torch.manual_seed(0)  # transformers samples from the global generator: the same draws every run

        def gen(rows):
            longest = max(map(len, rows))
            ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
            ends = dict(eos_token_id=stops) if stops else dict(min_new_tokens=new)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                                     max_new_tokens=new, pad_token_id=0, use_cache=True, **ends)
            made = out[:, longest:].tolist()
            # tokens generated per row: up to its first stop token (included), as counted on our side
            return sum(next((i + 1 for i, x in enumerate(r) if x in stop_set), len(r)) for r in made)
    if part in ("ours_generate", "hf_generate"):
        batches = list(_batches(args, prompts))
        gen(batches[0])  # warm-up
        t0 = time.perf_counter()
        # ours: as the recipes do, the linear layers packed for oneDNN once around the loop (timed;
        # --no-onednn: aten's F.linear, as transformers runs)
        with pack(model):
            tokens = sum(gen(rows) for rows in batches)
        sec = time.perf_counter() - t0
        return {"part": part, "tokens": tokens, "seconds": sec, "tokens_per_second": tokens / sec, "peak_rss_mib": _peak_mib()}

    seqs, keys = _sequences(args)
    rm_dtype = getattr(torch, RM_DTYPES[args.rm_dtype])  # both sides
    first = None
    if part in ("ours_score_batched", "ours_score_flex"):
        from omegaconf import OmegaConf

        from prefopt.reward import build_reward

        block = OmegaConf.create({
            "_component_": "prefopt.reward.reward_model",
            "model": {"_component_": "torchtune.models.llama2.llama2_classifier", "num_classes": 1, **shape},
            "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                          "path": str(REPO / "prefopt/assets/tiny/tokenizer.model"), "max_seq_len": None},
            "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(rm_dir),
                             "checkpoint_files": ["model.safetensors"], "model_type": "REWARD", "output_dir": str(rm_dir.parent / "unused")},
            "batch_size": args.rm_batch,
            # ours_score_flex: the rows through FlexAttention with a BlockMask, compiled on the CPU
            # (the default on CUDA); ours_score_batched: per-part SDPA calls (the CPU's default)
            "flex_attention": part == "ours_score_flex",
        })
        rm = build_reward(block, dtype=rm_dtype)
        t0 = time.perf_counter()
        rm.score_ids(seqs[: args.rm_batch], groups=keys[: args.rm_batch])  # warm-up (FlexAttention's one compile)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        with pack(rm.model):  # (timed, as for generation)
            scores = rm.score_ids(seqs, groups=keys)
    else:
        from transformers import LlamaForSequenceClassification

        model = LlamaForSequenceClassification.from_pretrained(rm_dir, dtype=rm_dtype).eval()
        with torch.no_grad():
            model(torch.tensor([seqs[0]]))  # warm-up
            t0 = time.perf_counter()
            scores = [model(torch.tensor([s])).logits[0, 0].float().item() for s in seqs]
    sec = time.perf_counter() - t0
    tokens = sum(map(len, seqs))
    return {"part": part, "sequences": len(seqs), "tokens": tokens, "seconds": sec, "tokens_per_second": tokens / sec,
            "peak_rss_mib": _peak_mib(), "scores_head": [round(x, 5) for x in scores[:3]], "warmup_seconds": first}


def make_reward_model(rm_dir: Path, shape_name: str) -> None:
    """A one-output LlamaForSequenceClassification of the shape, seeded (in this process: the
    launcher's peak memory is not measured)."""
    if (rm_dir / "model.safetensors").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from benchmarks._make_model import SHAPES

    s = SHAPES[shape_name]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["embed_dim"], intermediate_size=s["intermediate_dim"],
                      num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                      max_position_embeddings=s["max_seq_len"], rms_norm_eps=s["norm_eps"], rope_theta=10000.0,
                      tie_word_embeddings=False, num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForSequenceClassification(cfg).save_pretrained(rm_dir, safe_serialization=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="decoder")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="prompts per batch (k rows each)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stop-ids", type=int, default=0,
                   help="the last N vocabulary ids end a response on both sides (varying lengths); default 0: none")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=96)
    p.add_argument("--rm-prompts", type=int, default=8, help="prompts scored, k responses each")
    p.add_argument("--rm-batch", type=int, default=8)
    p.add_argument("--rm-prompt-min", type=int, default=24)
    p.add_argument("--rm-prompt-max", type=int, default=120)
    p.add_argument("--rm-response-min", type=int, default=48)
    p.add_argument("--rm-response-max", type=int, default=240)
    p.add_argument("--rm-dtype", choices=sorted(RM_DTYPES), default="fp32",
                   help="the reward model's dtype on both sides (princeton scores in bf16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-onednn", dest="onednn", action="store_false",
                   help="ours without prefopt.cpu_linear's packed oneDNN linear layers (aten's F.linear, as transformers)")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "results" / "_work"))
    p.add_argument("--repeats", type=int, default=3, help="runs of each part, alternating; the median is reported")
    p.add_argument("--parts", nargs="+", choices=("generate", "score"), default=["generate", "score"],
                   help="which comparisons to run (default both)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    wd = Path(args.workdir)
    model_dir, rm_dir = wd / f"model_{args.shape}", wd / f"reward_{args.shape}"
    if args.part:
        print(json.dumps(run_part(args.part, args, model_dir, rm_dir)))
        return
    from benchmarks._make_model import make_model

    wd.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(wd, args.shape, 0)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.generation_benchmark "
                    f"import make_reward_model; from pathlib import Path; make_reward_model(Path({str(rm_dir)!r}), {args.shape!r})"],
                   check=True, cwd=REPO)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    runs = {}
    # the parts alternate, --repeats times: on a shared machine a load that comes and goes then
    # falls on both sides of a ratio; each side's median is reported
    for _ in range(args.repeats):
        for part in PARTS:
            if part.split("_")[1] not in args.parts:
                continue
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part], check=True, cwd=REPO, env=env,
                                 capture_output=True, text=True).stdout
            runs.setdefault(part, []).append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[part][-1]), flush=True)
    results = {part: dict(sorted(rs, key=lambda r: r["tokens_per_second"])[len(rs) // 2],
                          all_tokens_per_second=[round(r["tokens_per_second"], 1) for r in rs],
                          peak_rss_mib=max(r["peak_rss_mib"] for r in rs)) for part, rs in runs.items()}
    print(f"\n{args.shape} shape, {args.threads} threads; {args.prompts} prompts x k={args.k}, {args.batch} prompts "
          f"({args.batch * args.k} rows) per batch, {args.max_new_tokens} new tokens at most, prompts {args.prompt_min}-{args.prompt_max} tokens"
          + (f", the last {args.stop_ids} vocabulary ids stop a response" if args.stop_ids else ", no stop token"))
    names = {"ours_generate": "prefopt.generation.generate_batch", "hf_generate": "transformers generate (KV cache)",
             "ours_score_batched": f"prefopt.reward, a prompt's k responses in one row, forwards of {args.rm_batch}, per-part SDPA",
             "ours_score_flex": "the same, FlexAttention with a BlockMask (flex_attention: True)",
             "hf_score_one_at_a_time": "transformers, one sequence at a time"}
    print("| measurement | tokens/s (median) | all runs | peak RSS (MiB) |\n| --- | --- | --- | --- |")
    for part, r in results.items():
        print(f"| {names[part]} | {r['tokens_per_second']:.1f} | {r['all_tokens_per_second']} | {r['peak_rss_mib']:.0f} |")

    def paired(ours, theirs):  # the ratio within each alternation round (the same moment's load), sorted
        return sorted(round(a["tokens_per_second"] / b["tokens_per_second"], 2) for a, b in zip(runs[ours], runs[theirs]))

    if "generate" in args.parts:
        print(f"ratios within each round: {paired('ours_generate', 'hf_generate')}")
        g, hg = results["ours_generate"], results["hf_generate"]
        print(f"\ngeneration: {g['tokens_per_second'] / hg['tokens_per_second']:.2f}x transformers")
    if "score" in args.parts:
        print(f"ratios within each round: per-part {paired('ours_score_batched', 'hf_score_one_at_a_time')}, "
              f"FlexAttention {paired('ours_score_flex', 'hf_score_one_at_a_time')}")
        s, f, hs = results["ours_score_batched"], results["ours_score_flex"], results["hf_score_one_at_a_time"]
        diff = max(abs(a - b) for r in (s, f) for a, b in zip(r["scores_head"], hs["scores_head"]))
        print(f"scoring: {s['tokens_per_second'] / hs['tokens_per_second']:.2f}x one at a time with per-part SDPA, "
              f"{f['tokens_per_second'] / hs['tokens_per_second']:.2f}x with FlexAttention (its warm-up batch, with the "
              f"one compile: {f['warmup_seconds']:.1f} s; the per-part one's {s['warmup_seconds']:.1f} s) "
              f"({args.rm_prompts} prompts of {args.rm_prompt_min}-{args.rm_prompt_max} tokens x k={args.k} responses of "
              f"{args.rm_response_min}-{args.rm_response_max} tokens, {args.rm_dtype}; first scores differ by {diff:.1e})")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

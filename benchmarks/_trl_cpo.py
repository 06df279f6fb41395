"""Peer C: TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0 (== SimPO) and a peft LoRA.

    python benchmarks/_trl_cpo.py --model DIR --data train.jsonl --output-dir DIR --steps N
        --batch-size 4 --lora-rank 8 --lora-alpha 16 --targets q_proj,v_proj

Run by peers_benchmark.py and packing_benchmark.py under benchmarks/_stepclock.py, which times
the optimizer steps.
Settings that differ from CPOConfig's defaults, to match the torchtune runs: fp32 (bf16=False),
no gradient checkpointing, no gradient clipping (max_grad_norm=0), constant LR, logging every
step (the torchtune recipes log every step too), no checkpoint saving.

--in-order: the pairs in file order (a SequentialSampler instead of the Trainer's RandomSampler),
for data whose pairs differ in length, so that TRL's steps take the same pairs as ours.
--rows-out FILE: the file rows each training step consumed, as JSON (one list per step), so the
launcher can check that order instead of assuming it; and next to it, FILE's stem + _tokens.json,
TRL's own token counts of every row (prompt, prompt + chosen, prompt + rejected), so that it can
check that TRL ran on the tokens it counts.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# peft 0.21 refuses to apply LoRA at all when torchao < 0.16 is installed (torchtune 0.6.1 pins
# torchao 0.13): its torchao dispatcher raises ImportError instead of returning "not mine". The
# base weights here are plain float32 tensors, which that dispatcher would decline anyway.
import peft.tuners.lora.torchao as _peft_torchao  # noqa: E402
import torch
from datasets import Dataset
from peft import LoraConfig

_peft_torchao.is_torchao_available = lambda: False
from torch.utils.data import SequentialSampler
from transformers import LlamaForCausalLM

try:  # TRL 1.x
    from trl.experimental.cpo import CPOConfig, CPOTrainer
except ImportError:  # older TRL
    from trl import CPOConfig, CPOTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.wordtok import hf_word_tokenizer  # noqa: E402


class BenchCPOTrainer(CPOTrainer):
    """CPOTrainer that can read the pairs in file order and notes which pairs each step took."""

    in_order = False
    consumed_rows = None  # a list to append each step's "row" column to, or None

    def _get_train_sampler(self, train_dataset=None):
        if not self.in_order:
            return super()._get_train_sampler(train_dataset)
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def compute_loss(self, model, inputs, *args, **kwargs):
        # one call per optimizer step here (gradient_accumulation_steps=1, no evaluation); the
        # collator passes the non-tensor "row" column through as a list
        if self.consumed_rows is not None:
            self.consumed_rows.append([int(r) for r in inputs["row"]])
        return super().compute_loss(model, inputs, *args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--in-order", action="store_true", help="train on the pairs in file order")
    p.add_argument("--rows-out", default=None, help="write the rows each step consumed here (JSON)")
    a = p.parse_args()

    rows = []
    with open(a.data) as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            # the user message is the prompt; a leading space keeps word boundaries when TRL
            # tokenizes prompt + answer as one string (WhitespaceSplit: same ids either way)
            rows.append(
                {
                    "row": i,  # the file row, kept through TRL's tokenization (map keeps columns)
                    "prompt": r["chosen"][0]["content"],
                    "chosen": " " + r["chosen"][1]["content"],
                    "rejected": " " + r["rejected"][1]["content"],
                }
            )
    tokenizer = hf_word_tokenizer(a.vocab_size)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    peft_config = LoraConfig(
        r=a.lora_rank,
        lora_alpha=a.lora_alpha,
        lora_dropout=0.0,
        target_modules=a.targets.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    args = CPOConfig(
        output_dir=a.output_dir,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=a.beta,
        simpo_gamma=a.gamma,
        max_length=a.max_length,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch_fused",
        max_grad_norm=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = BenchCPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    # Check that TRL's tokenization gives the lengths the benchmark counts.
    ex = trainer.train_dataset[0]
    print(
        "TRL row 0: chosen_input_ids",
        len(ex["chosen_input_ids"]),
        "rejected_input_ids",
        len(ex["rejected_input_ids"]),
        "prompt_input_ids",
        len(ex["prompt_input_ids"]),
        flush=True,
    )
    trainer.in_order = a.in_order
    if a.rows_out:
        trainer.consumed_rows = []
        ds = trainer.train_dataset
        tokens = {int(r): [len(p), len(c), len(j)] for r, p, c, j in
                  zip(ds["row"], ds["prompt_input_ids"], ds["chosen_input_ids"], ds["rejected_input_ids"])}
        with open(os.path.splitext(a.rows_out)[0] + "_tokens.json", "w") as f:
            json.dump([tokens[i] for i in sorted(tokens)], f)
    trainer.model.print_trainable_parameters()
    trainer.train()
    if a.rows_out:
        with open(a.rows_out, "w") as f:
            json.dump(trainer.consumed_rows, f)


if __name__ == "__main__":
    main()

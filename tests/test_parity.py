"""Peer parity: the same model and batch give the same numbers as TRL's CPO-SimPO and princeton's
SimPO trainer (CPU, float32). Background and the differences we keep on purpose: docs/parity.md.

What is driven on each side:

* **Ours**: a torchtune ``llama2`` loaded through ``FullModelHFCheckpointer(model_type="LLAMA2")``,
  ``prefopt.step.preference_forward`` (response positions only, fused output layer),
  ``prefopt.loss.SimPOLoss``, ``prefopt.metrics.PreferenceMetrics``, and
  ``prefopt.collate.padded_collate_preference``: the lines of ``recipes/simpo_lora_single_device.py``'s
  ``_forward``/``train``, with all weights trainable instead of LoRA.
* **TRL** (``trl.experimental.cpo``, or ``trl`` for releases that still export it there): a real
  ``CPOTrainer`` built offline (``CPOConfig(loss_type="simpo", cpo_alpha=0, ...)``, a tiny
  ``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model, the Hugging Face
  ``LlamaForCausalLM`` loaded with ``from_pretrained``). Its own ``tokenize_row`` (at construction)
  and ``DPODataCollatorWithPadding`` (``trainer.data_collator``) make the batches;
  ``get_batch_loss_metrics`` (-> ``concatenated_inputs``, ``concatenated_forward`` with the
  attention mask, ``get_batch_logps``, ``cpo_loss``) gives the loss and metrics; the 10-step run
  uses ``trainer.compute_loss`` + ``trainer.accelerator.backward`` (the core of ``Trainer.training_step``) and a plain
  ``torch.optim.AdamW`` on each side.
* **princeton-nlp/SimPO** (``scripts/simpo_trainer.py``; not installable): where TRL has no
  counterpart (hinge loss, ``sft_weight``, ``gamma_beta_ratio``, the prompt truncation of
  ``tokenize_row``), a line-by-line transcription of ``simpo_loss``, ``get_batch_logps``, the SFT
  term of ``get_batch_loss_metrics`` and ``tokenize_row`` (on token ids) lives in this file.
"""

import json
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("tokenizers")
try:  # TRL 1.x: trl.experimental.cpo; earlier releases exported it from trl
    from trl.experimental.cpo import CPOConfig, CPOTrainer
except ImportError:  # pragma: no cover - depends on the installed TRL
    try:
        from trl import CPOConfig, CPOTrainer
    except ImportError:
        pytest.skip("this TRL has no CPOTrainer", allow_module_level=True)

import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.models.llama2 import llama2
from torchtune.training import FullModelHFCheckpointer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prefopt.collate import padded_collate_preference
from prefopt.data import preference_dataset, truncate_pair
from prefopt.loss import SimPOLoss
from prefopt.metrics import PreferenceMetrics
from prefopt.step import preference_forward
from recipes.simpo_lora_single_device import CONFIG_SPEC

# TRL's CPOConfig still passes transformers' deprecated `gradient_checkpointing` name
pytestmark = [pytest.mark.peer, pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*deprecated:FutureWarning")]

IGNORE = CROSS_ENTROPY_IGNORE_IDX
PAD, BOS, EOS = 0, 1, 2
VOCAB = 512
SHAPE = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=128)
NUM_OUTPUT_CHUNKS = CONFIG_SPEC["num_output_chunks"].default  # the recipes' default
TOL = 1e-5
TOL_TRAIN = 1e-4
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)
# (prompt words, chosen words, rejected words) per pair, BOS/EOS not counted. Sequence lengths
# 4..34: the longest row is not padded at all, the shortest is almost all padding; chosen is the
# longer side in some pairs and the shorter in others.
LENGTHS = [(1, 1, 9), (12, 20, 3), (5, 2, 2), (3, 7, 14)]
# Same prompts/rejected spread but every chosen response has 6 words (+EOS): where princeton's
# token-mean SFT term and our per-example one must agree.
LENGTHS_EQUAL_CHOSEN = [(1, 6, 9), (12, 6, 3), (5, 6, 2), (3, 6, 14)]


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny Llama in HF format, loaded both ways; a word-level tokenizer for TRL


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The matrices here are tiny: one intra-op thread is fastest, and on a shared 2-core machine
    a second, spinning OpenMP thread makes the 10-step run ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved with ``save_pretrained`` (safetensors)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=SHAPE["embed_dim"],
        intermediate_size=SHAPE["intermediate_dim"],
        num_hidden_layers=SHAPE["num_layers"],
        num_attention_heads=SHAPE["num_heads"],
        num_key_value_heads=SHAPE["num_kv_heads"],
        max_position_embeddings=SHAPE["max_seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        # larger than the default 0.02 so that log-probs, rewards and margins spread out
        initializer_range=0.1,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    path = tmp_path_factory.mktemp("tiny_llama_hf")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    assert (path / "model.safetensors").exists()
    return path


def load_tune(hf_dir, output_dir):
    """torchtune model + the checkpointer that loaded it (the recipe's load path)."""
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(hf_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA2",
        output_dir=str(output_dir),
    )
    model = llama2(vocab_size=VOCAB, norm_eps=1e-5, **SHAPE)
    model.load_state_dict(ckpt.load_checkpoint()["model"], strict=True)
    model.set_num_output_chunks(NUM_OUTPUT_CHUNKS)
    return ckpt, model


def load_hf(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def word_tokenizer():
    """``w<i>`` -> id i; whitespace-split, so TRL's tokenize_row sees exactly our token ids."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_pairs(lengths, seed):
    """Random token-id pairs as (TRL text rows, our dataset items)."""
    g = torch.Generator().manual_seed(seed)
    rows, items = [], []
    for lp, lc, lr in lengths:
        p, c, r = (torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (lp, lc, lr))
        text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        rows.append({"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)})
        prompt = [BOS] + p
        items.append(
            {
                "chosen_input_ids": prompt + c + [EOS],
                "chosen_labels": [IGNORE] * len(prompt) + c + [EOS],
                "rejected_input_ids": prompt + r + [EOS],
                "rejected_labels": [IGNORE] * len(prompt) + r + [EOS],
            }
        )
    return rows, items


def make_trainer(model, tokenizer, rows, tmp_path, *, beta, simpo_gamma, label_smoothing=0.0):
    args = CPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type="simpo",
        cpo_alpha=0.0,  # CPO-SimPO without the NLL term == SimPO
        simpo_gamma=simpo_gamma,
        beta=beta,
        label_smoothing=label_smoothing,
        max_length=SHAPE["max_seq_len"],
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    return CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def trl_batch(trainer, idx):
    return trainer.data_collator([trainer.train_dataset[i] for i in idx])


def our_forward(model, batch, loss_fn):
    """What both recipes call: prefopt.step.preference_forward (with the recipes' default chunks)."""
    out = preference_forward(model, batch, loss_fn, device=torch.device("cpu"), num_chunks=NUM_OUTPUT_CHUNKS)
    return out.losses, out.chosen_rewards, out.rejected_rewards, out.chosen, out.rejected


def our_metrics(loss_fn, out):
    m = PreferenceMetrics.for_loss(loss_fn, torch.device("cpu"))
    m.update(out)
    return m.compute()


@pytest.fixture(scope="module")
def models(hf_dir, tmp_path_factory):
    """(torchtune model, HF model) with identical weights, in eval mode (no dropout anyway)."""
    _, tune = load_tune(hf_dir, tmp_path_factory.mktemp("tune_out"))
    return tune.eval(), load_hf(hf_dir).eval()


# ---------------------------------------------------------------------------------------------
# princeton-nlp/SimPO scripts/simpo_trainer.py, transcribed (self -> explicit arguments)


def princeton_get_batch_logps(logits, labels, average_log_prob=True, label_pad_token_id=-100):
    if logits.shape[:-1] != labels.shape:
        raise ValueError("Logits (batch and sequence length dim) and labels must have the same shape.")
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def princeton_simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta, gamma_beta_ratio, loss_type, label_smoothing):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    logits = pi_logratios - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(loss_type)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def princeton_get_batch_loss_metrics(model, input_ids, attention_mask, labels, *, beta, gamma_beta_ratio, loss_type, label_smoothing=0.0, sft_weight=0.0):
    """concatenated_forward + get_batch_loss_metrics on an already concatenated batch."""
    len_chosen = input_ids.shape[0] // 2
    all_logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    all_logps = princeton_get_batch_logps(all_logits, labels)
    policy_chosen_logps, policy_rejected_logps = all_logps[:len_chosen], all_logps[len_chosen:]
    policy_chosen_logits, policy_rejected_logits = all_logits[:len_chosen], all_logits[len_chosen:]
    chosen_labels = labels[:len_chosen]
    losses, chosen_rewards, rejected_rewards = princeton_simpo_loss(
        policy_chosen_logps, policy_rejected_logps, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
        loss_type=loss_type, label_smoothing=label_smoothing,
    )
    loss = losses.mean()
    metrics = {}
    if sft_weight > 0.0:
        policy_chosen_logits = policy_chosen_logits[..., :-1, :].contiguous()
        chosen_labels = chosen_labels[..., 1:].clone()
        sft_loss = nn.CrossEntropyLoss()(policy_chosen_logits.view(-1, policy_chosen_logits.shape[-1]), chosen_labels.view(-1))
        loss = sft_weight * sft_loss + loss
        metrics["sft_loss"] = sft_loss.detach()
    metrics["rewards/chosen"] = chosen_rewards.mean()
    metrics["rewards/rejected"] = rejected_rewards.mean()
    metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
    metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logits/rejected"] = policy_rejected_logits.detach().mean()
    metrics["logits/chosen"] = policy_chosen_logits.detach().mean()
    return loss, {k: float(v) for k, v in metrics.items()}, losses, policy_chosen_logps, policy_rejected_logps


def princeton_tokenize_row(prompt, chosen, rejected, *, bos_id, eos_id, max_length, max_prompt_length, truncation_mode="keep_end", label_pad_token_id=-100):
    """tokenize_row (decoder-only branch) from the point where the text is token ids: BOS added
    to the prompt and EOS to each response unless already there, then the two truncation steps.
    (Chosen and rejected share the prompt here, so princeton's three prompt copies are one.)"""
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    if len(prompt) == 0 or bos_id != prompt[0]:
        prompt = [bos_id] + prompt
    if len(chosen) == 0 or eos_id != chosen[-1]:
        chosen.append(eos_id)
    if len(rejected) == 0 or eos_id != rejected[-1]:
        rejected.append(eos_id)
    longer_response_length = max(len(chosen), len(rejected))
    if len(prompt) + longer_response_length > max_length:
        if truncation_mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif truncation_mode == "keep_end":
            prompt = prompt[-max_prompt_length:]
        else:
            raise ValueError(truncation_mode)
    if len(prompt) + longer_response_length > max_length:
        chosen = chosen[: max_length - max_prompt_length]
        rejected = rejected[: max_length - max_prompt_length]
    out = {}
    for key, resp in (("chosen", chosen), ("rejected", rejected)):
        out[f"{key}_input_ids"] = prompt + resp
        out[f"{key}_labels"] = [label_pad_token_id] * len(prompt) + resp
    return out


# ---------------------------------------------------------------------------------------------
# model and data layout


def test_checkpoint_loads_the_same_model_both_ways(models):
    tune, hf = models
    _, items = make_pairs(LENGTHS, seed=1)
    tokens = padded_collate_preference(items, padding_idx=PAD)["tokens"]
    with torch.no_grad():
        ours = torch.cat(tune(tokens), dim=1)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape == (8, 34, VOCAB)
    gap = (ours - theirs).abs().max().item()
    print(f"\nsame weights, no mask: max |logits torchtune - HF| = {gap:.3e}")
    assert gap <= TOL


def test_trl_tokenize_row_and_collator_give_our_batch_layout(models, word_tokenizer, tmp_path):
    """TRL's tokenize_row (BOS on the prompt, EOS on each response) + DPODataCollatorWithPadding
    + concatenated_inputs produce exactly our items + padded_collate_preference: same ids, same
    labels, rows [:b] chosen and [b:] rejected, right padding with pad id 0 / label -100."""
    _, hf = models
    rows, items = make_pairs(LENGTHS, seed=1)
    trainer = make_trainer(hf, word_tokenizer, rows, tmp_path, beta=2.0, simpo_gamma=1.0)
    for i, item in enumerate(items):
        for key, value in item.items():
            assert trainer.train_dataset[i][key] == value, (i, key)
    batch = trl_batch(trainer, range(len(items)))
    cat = CPOTrainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    ours = padded_collate_preference(items, padding_idx=PAD)
    assert torch.equal(cat["concatenated_input_ids"], ours["tokens"])
    assert torch.equal(cat["concatenated_labels"], ours["labels"])
    # TRL masks the padding; our recipe runs the model without a mask (see the logits test)
    assert torch.equal(cat["concatenated_attention_mask"].bool(), ours["tokens"] != PAD)


# ---------------------------------------------------------------------------------------------
# one batch: log-probs, loss and metrics against TRL's CPOTrainer (loss_type="simpo")

TRL_CASES = [
    # (beta, gamma in reward units = TRL's simpo_gamma, label_smoothing)
    pytest.param(2.0, 1.0, 0.0, id="sigmoid-beta2-gamma1"),
    pytest.param(2.5, 1.375, 0.0, id="sigmoid-princeton-ratio0.55"),
    pytest.param(10.0, 3.0, 0.1, id="sigmoid-label-smoothing0.1"),
    pytest.param(2.0, 0.0, 0.3, id="sigmoid-gamma0-label-smoothing0.3"),
]


@pytest.mark.parametrize("beta, gamma, label_smoothing", TRL_CASES)
def test_one_batch_matches_trl_cpo_simpo(models, word_tokenizer, tmp_path, beta, gamma, label_smoothing):
    tune, hf = models
    rows, items = make_pairs(LENGTHS, seed=1)
    trainer = make_trainer(hf, word_tokenizer, rows, tmp_path, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    batch = trl_batch(trainer, range(len(items)))
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(hf, batch)
        trl_c, trl_r = trainer.concatenated_forward(hf, batch)[:2]
        trl_losses = trainer.cpo_loss(trl_c, trl_r)[0]

    # our gamma is TRL's simpo_gamma; princeton's gamma_beta_ratio is gamma / beta
    loss_fn = SimPOLoss(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    assert loss_fn.gamma_beta_ratio == pytest.approx(gamma / beta)
    if gamma > 0:
        from_ratio = SimPOLoss(beta=beta, gamma_beta_ratio=gamma / beta, label_smoothing=label_smoothing)
        assert from_ratio.gamma == pytest.approx(trainer.simpo_gamma)
    with torch.no_grad():
        out = preference_forward(tune, padded_collate_preference(items, padding_idx=PAD), loss_fn,
                                 device=torch.device("cpu"), num_chunks=NUM_OUTPUT_CHUNKS)
        losses, chosen, rejected = out.losses, out.chosen, out.rejected
        # logits/*: ours is the mean over each sequence's own positions (no padding) and the vocab,
        # then over sequences -- the same figure in the padded and packed layouts. TRL's is the
        # mean over every entry of the padded rows (test_logits_metrics_differ_from_trl_only_at_padding);
        # here the masked HF model's logits give ours.
        cat = CPOTrainer.concatenated_inputs(batch, padding_value=PAD)
        real = cat["concatenated_attention_mask"].bool()
        logits = hf(cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"]).logits
        per_seq = (logits * real[..., None]).sum((1, 2)) / (real.sum(1) * logits.shape[-1])
        b = len(items)
        real_means = {"logits/chosen": per_seq[:b].mean().item(), "logits/rejected": per_seq[b:].mean().item()}
    ours = our_metrics(loss_fn, out)

    diffs = {
        "logps/per-sequence": max((chosen.logps - trl_c).abs().max().item(), (rejected.logps - trl_r).abs().max().item()),
        "losses/per-example": (losses - trl_losses).abs().max().item(),
        "loss": abs(losses.mean().item() - trl_loss.item()),
        "loss/metric": abs(ours["loss"] - trl_loss.item()),
    }
    for name in METRICS:
        if name.startswith("logits/"):
            diffs[name] = abs(ours[name] - real_means[name])
        else:
            diffs[name] = abs(ours[name] - trl_metrics[name])
    print(f"\nmax |ours - TRL| beta={beta} gamma={gamma} ls={label_smoothing}: " + json.dumps(diffs))
    assert all(d <= TOL for d in diffs.values()), diffs
    # the metrics mean something here: mixed accuracies, non-zero margins
    assert 0.0 < ours["rewards/accuracies"] < 1.0 and abs(ours["rewards/margins"]) > 1e-3


@pytest.mark.parametrize("beta", [0.5, 2.5, 10.0])
def test_gamma_conventions(models, word_tokenizer, tmp_path, beta):
    """TRL's ``simpo_gamma`` is in reward units (``logits = pi_logratios - simpo_gamma / beta``),
    like our ``gamma``; princeton's ``gamma_beta_ratio`` is gamma / beta. Checked on TRL's own
    ``cpo_loss`` over a spread of log-prob pairs, sigmoid with and without label smoothing."""
    _, hf = models
    rows, _ = make_pairs(LENGTHS[:1], seed=1)
    g = torch.Generator().manual_seed(3)
    c, r = -4 * torch.rand(64, generator=g), -4 * torch.rand(64, generator=g)
    ratio = 0.55
    for ls in (0.0, 0.2):
        trainer = make_trainer(hf, word_tokenizer, rows, tmp_path, beta=beta, simpo_gamma=ratio * beta, label_smoothing=ls)
        trl_losses, trl_cr, trl_rr = trainer.cpo_loss(c, r)
        for ours in (SimPOLoss(beta=beta, gamma=ratio * beta, label_smoothing=ls), SimPOLoss(beta=beta, gamma_beta_ratio=ratio, label_smoothing=ls)):
            losses, cr, rr = ours(c, r)
            print(f"\ncpo_loss beta={beta} ls={ls}: max |ours - TRL| = {(losses - trl_losses).abs().max().item():.3e}")
            assert (losses - trl_losses).abs().max().item() <= TOL
            assert torch.equal(cr, trl_cr) and torch.equal(rr, trl_rr)
        # giving TRL princeton's ratio as simpo_gamma is a different (smaller) margin
        wrong = make_trainer(hf, word_tokenizer, rows, tmp_path, beta=beta, simpo_gamma=ratio, label_smoothing=ls)
        assert (wrong.cpo_loss(c, r)[0] - trl_losses).abs().max().item() > 1e-3


def test_logits_metrics_differ_from_trl_only_at_padding(models, word_tokenizer, tmp_path):
    """``logits/chosen`` / ``logits/rejected`` are means over all [position, vocab] entries of the
    padded rows, padding included, in TRL, princeton and ours. TRL's forward passes the attention
    mask, so its padding positions attend to the real tokens only; our recipe calls the model
    without a mask, so ours attend to the pad tokens too. The two figures therefore differ (by
    ~3e-3 here); replacing just our padding-position logits by the masked model's reproduces
    TRL's figure to 1e-5, and every real position agrees."""
    tune, hf = models
    rows, items = make_pairs(LENGTHS, seed=1)
    trainer = make_trainer(hf, word_tokenizer, rows, tmp_path, beta=2.0, simpo_gamma=1.0)
    batch = trl_batch(trainer, range(len(items)))
    cat = CPOTrainer.concatenated_inputs(batch, padding_value=PAD)
    b = len(items)
    with torch.no_grad():
        _, trl_metrics = trainer.get_batch_loss_metrics(hf, batch)
        masked = hf(cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"]).logits
        ours = torch.cat(tune(cat["concatenated_input_ids"]), dim=1)
    real = cat["concatenated_attention_mask"].bool()
    assert (ours - masked)[real].abs().max().item() <= TOL
    spliced = torch.where(real.unsqueeze(-1), ours, masked)
    for name, rows_ in (("logits/chosen", slice(0, b)), ("logits/rejected", slice(b, 2 * b))):
        print(f"\n{name}: |spliced - TRL| = {abs(spliced[rows_].mean().item() - trl_metrics[name]):.3e}")
        assert abs(spliced[rows_].mean().item() - trl_metrics[name]) <= TOL
        gap = abs(ours[rows_].mean().item() - trl_metrics[name])
        print(f"\n{name}: |ours - TRL| with TRL's padding mask = {gap:.3e}")
        assert gap > TOL  # the documented difference; if this fails the docs need updating


# ---------------------------------------------------------------------------------------------
# hinge and sft_weight: no TRL counterpart, so princeton's formulas


@pytest.mark.parametrize(
    "loss_type, label_smoothing, sft_weight",
    [("hinge", 0.0, 0.0), ("sigmoid", 0.0, 0.5), ("hinge", 0.0, 1.0), ("sigmoid", 0.2, 0.0)],
)
def test_matches_princeton_with_equal_chosen_lengths(models, loss_type, label_smoothing, sft_weight):
    tune, hf = models
    beta, ratio = 2.5, 0.55
    _, items = make_pairs(LENGTHS_EQUAL_CHOSEN, seed=2)
    batch = padded_collate_preference(items, padding_idx=PAD)
    with torch.no_grad():
        p_loss, p_metrics, p_losses, p_c, p_r = princeton_get_batch_loss_metrics(
            hf, batch["tokens"], (batch["tokens"] != PAD).long(), batch["labels"], beta=beta,
            gamma_beta_ratio=ratio, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight,
        )
        loss_fn = SimPOLoss(beta=beta, gamma_beta_ratio=ratio, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight)
        out = preference_forward(tune, batch, loss_fn, device=torch.device("cpu"), num_chunks=NUM_OUTPUT_CHUNKS)
        losses, chosen, rejected = out.losses, out.chosen, out.rejected
        ours = our_metrics(loss_fn, out)
    assert len(set(chosen.num_tokens.tolist())) == 1  # all chosen responses: 7 tokens
    diffs = {
        "logps/per-sequence": max((chosen.logps - p_c).abs().max().item(), (rejected.logps - p_r).abs().max().item()),
        "loss": abs(losses.mean().item() - p_loss.item()),
    }
    if sft_weight == 0:
        diffs["losses/per-example"] = (losses - p_losses).abs().max().item()
    else:
        diffs["nll_loss"] = abs(ours["nll_loss"] - p_metrics["sft_loss"])
    for name in METRICS:
        if not name.startswith("logits/"):  # padding-dependent, see the TRL test above
            diffs[name] = abs(ours[name] - p_metrics[name])
    print(f"\nmax |ours - princeton| {loss_type} ls={label_smoothing} sft={sft_weight}: " + json.dumps(diffs))
    assert all(d <= TOL for d in diffs.values()), diffs


def test_sft_term_equals_princeton_when_chosen_lengths_differ(models):
    """princeton: sft_weight x cross-entropy averaged over ALL chosen tokens of the batch (long
    responses weigh more): ours with ``sft_reduction="token"`` (the default). With
    ``sft_reduction="sequence"`` each example's own token-mean NLL is averaged over examples
    instead: a different quantity unless the chosen lengths are equal."""
    tune, hf = models
    beta, ratio, w = 2.5, 0.55, 1.0
    _, items = make_pairs(LENGTHS, seed=1)  # chosen responses of 2, 21, 3 and 8 tokens
    batch = padded_collate_preference(items, padding_idx=PAD)
    with torch.no_grad():
        p_loss, p_metrics, p_losses, _, _ = princeton_get_batch_loss_metrics(
            hf, batch["tokens"], (batch["tokens"] != PAD).long(), batch["labels"], beta=beta,
            gamma_beta_ratio=ratio, loss_type="sigmoid", sft_weight=w,
        )
        token, _, _, chosen, _ = our_forward(tune, batch, SimPOLoss(beta=beta, gamma_beta_ratio=ratio, sft_weight=w))
        seq, *_ = our_forward(tune, batch, SimPOLoss(beta=beta, gamma_beta_ratio=ratio, sft_weight=w, sft_reduction="sequence"))
    n, avg = chosen.num_tokens.double(), chosen.logps.double()
    token_mean_nll = (-(n * avg).sum() / n.sum()).item()
    example_mean_nll = (-avg.mean()).item()
    assert abs(p_metrics["sft_loss"] - token_mean_nll) <= TOL
    assert abs(token.mean().item() - p_loss.item()) <= TOL
    assert abs(seq.mean().item() - (p_losses.mean().item() + w * example_mean_nll)) <= TOL
    gap = abs(seq.mean().item() - p_loss.item())
    print(f"\nsft term, unequal chosen lengths {n.tolist()}: |sequence - princeton| loss = {gap:.3e}")
    assert gap > 1e-3


# ---------------------------------------------------------------------------------------------
# ten optimizer steps: torchtune model + our path vs HF model + TRL's compute_loss

LR = 5e-4
STEP_LENGTHS = [
    [(1, 1, 9), (12, 20, 3), (5, 2, 2), (3, 7, 14)],
    [(8, 3, 3), (2, 15, 1), (6, 6, 10), (1, 2, 20)],
    [(10, 1, 1), (4, 9, 5), (2, 18, 12), (7, 4, 4)],
    [(3, 3, 3), (11, 2, 17), (1, 12, 6), (5, 1, 8)],
    [(6, 10, 2), (2, 2, 2), (9, 16, 13), (1, 5, 1)],
]


@pytest.fixture(scope="module")
def ten_steps(hf_dir, word_tokenizer, tmp_path_factory):
    """Full fine-tuning of every parameter on both sides, AdamW with the same hyper-parameters,
    the same five batches twice (so later losses are on batches already trained on)."""
    out = tmp_path_factory.mktemp("ten_steps")
    ckpt, tune = load_tune(hf_dir, out / "tune_output")
    hf = load_hf(hf_dir)
    beta, gamma = 2.5, 1.375
    all_rows, all_items, index = [], [], []
    for s, lengths in enumerate(STEP_LENGTHS):
        rows, items = make_pairs(lengths, seed=100 + s)
        index.append(range(len(all_rows), len(all_rows) + len(rows)))
        all_rows += rows
        all_items.append(items)
    trainer = make_trainer(hf, word_tokenizer, all_rows, out, beta=beta, simpo_gamma=gamma)
    loss_fn = SimPOLoss(beta=beta, gamma=gamma)
    opt_tune = torch.optim.AdamW(tune.parameters(), lr=LR, weight_decay=0.01)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.01)
    assert all(p.requires_grad for p in tune.parameters()) and all(p.requires_grad for p in hf.parameters())
    tune.train()
    ours, theirs = [], []
    for step in range(10):
        k = step % len(STEP_LENGTHS)
        # ours: the recipe's step (losses.mean(), backward, optimizer step)
        losses, *_ = our_forward(tune, padded_collate_preference(all_items[k], padding_idx=PAD), loss_fn)
        loss = losses.mean()
        loss.backward()
        opt_tune.step()
        opt_tune.zero_grad(set_to_none=True)
        ours.append(loss.item())
        # TRL: the core of Trainer.training_step: CPOTrainer.compute_loss (-> get_batch_loss_metrics)
        # and the accelerator's backward (training_step itself needs the state of Trainer.train)
        hf.train()
        trl_loss = trainer.compute_loss(hf, trainer._prepare_inputs(trl_batch(trainer, index[k])))
        trainer.accelerator.backward(trl_loss)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        theirs.append(trl_loss.item())
    tune.eval()
    hf.eval()
    return {"ours": ours, "trl": theirs, "tune": tune, "hf": hf, "ckpt": ckpt, "out": out, "items": all_items}


def test_ten_optimizer_steps_keep_losses_equal(ten_steps):
    ours, trl = ten_steps["ours"], ten_steps["trl"]
    gaps = [abs(a - b) for a, b in zip(ours, trl)]
    print(f"\n10-step losses ours {ours}\n               TRL  {trl}\nmax |ours - TRL| = {max(gaps):.3e}")
    assert max(gaps) <= TOL_TRAIN, gaps
    # training did something: the second pass over the same batches has lower losses
    assert sum(ours[5:]) < sum(ours[:5]) - 0.1


def test_recipe_hf_checkpoint_loads_in_transformers(ten_steps, hf_dir):
    """What the recipe writes at epoch end (FullModelHFCheckpointer.save_checkpoint of the model
    state dict) loads with AutoModelForCausalLM and gives our model's logits."""
    tune, ckpt, out = ten_steps["tune"], ten_steps["ckpt"], ten_steps["out"]
    state = {k: v.detach().clone() for k, v in tune.state_dict().items()}
    ckpt.save_checkpoint({"model": state}, epoch=0, intermediate_checkpoint=False)
    saved = out / "tune_output" / "epoch_0"
    assert (saved / "config.json").exists() and list(saved.glob("*.safetensors"))
    exported = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    original = load_hf(hf_dir).eval()
    tokens = padded_collate_preference(ten_steps["items"][1], padding_idx=PAD)["tokens"]
    with torch.no_grad():
        ours = torch.cat(tune(tokens), dim=1)
        loaded = exported(tokens).logits
        trl_trained = ten_steps["hf"](tokens).logits
        before = original(tokens).logits
    gap = (ours - loaded).abs().max().item()
    print(f"\nexported HF checkpoint: max |logits ours - AutoModelForCausalLM| = {gap:.3e}; "
          f"vs the TRL-trained model {(ours - trl_trained).abs().max().item():.3e}")
    assert gap <= TOL
    assert (ours - before).abs().max().item() > 1e-2  # the trained weights were saved, not the initial ones
    assert (ours - trl_trained).abs().max().item() <= TOL_TRAIN


# ---------------------------------------------------------------------------------------------
# tokenization: prefopt.data.preference_dataset vs princeton's tokenize_row on the same ids


def chat(user, chosen, rejected, system=None, history=()):
    head = ([{"role": "system", "content": system}] if system else []) + [
        {"role": role, "content": text} for turn in history for role, text in zip(("user", "assistant"), turn)
    ]
    return {
        "chosen": head + [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}],
        "rejected": head + [{"role": "user", "content": user}, {"role": "assistant", "content": rejected}],
    }


HUGO = "Hugo left the wallet in the garage, then moved it to the garden. Where is the wallet now?"
LUCY = "The chair of Lucy is red, not silver. What color is the chair?"
LONG_ANSWER = "The wallet was in the garage, but Hugo moved it to the garden, so you will find the wallet in the garden now."
MAX_LEN, MAX_PROMPT = 32, 16
SINGLE_TURN = {
    "fits": chat("Where are the keys?", "The keys are in the garden.", "No."),
    "long_prompt": chat(LUCY + " " + HUGO, "In the garden.", "In the garage."),
    "long_response": chat("Where are the keys?", LONG_ANSWER, "In the garage."),
    "both_long": chat(LUCY + " " + HUGO, LONG_ANSWER, "In the garage."),
}


def build(tokenizer, tmp_path, rows, name, **kw):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return preference_dataset(tokenizer, source="json", data_files=str(f), split="train", on_bad_example="error", **kw)


def split(ex, key):
    ids, labels = ex[f"{key}_input_ids"], [int(l) for l in ex[f"{key}_labels"]]
    n = next(i for i, l in enumerate(labels) if l != IGNORE)
    return ids[:n], ids[n:], labels


def test_single_turn_tokenization_vs_princeton(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    rows = list(SINGLE_TURN.values())
    full = build(tok, tmp_path, rows, "full")  # untruncated: the ids princeton's tokenize_row gets
    ours = build(tok, tmp_path, rows, "cut", max_seq_len=MAX_LEN, max_prompt_len=MAX_PROMPT)
    report = {}
    for i, name in enumerate(SINGLE_TURN):
        prompt, chosen, _ = split(full[i], "chosen")
        _, rejected, _ = split(full[i], "rejected")
        # BOS once, at the start of the prompt; EOS once, at the end of each response
        assert prompt[0] == tok.bos_id and tok.bos_id not in prompt[1:] + chosen + rejected
        assert chosen[-1] == rejected[-1] == tok.eos_id and tok.eos_id not in prompt + chosen[:-1] + rejected[:-1]
        # princeton gets the same ids without the specials and adds them back itself
        same = princeton_tokenize_row(prompt[1:], chosen[:-1], rejected[:-1], bos_id=tok.bos_id, eos_id=tok.eos_id, max_length=10**6, max_prompt_length=10**6)
        for key in ("chosen", "rejected"):
            assert same[f"{key}_input_ids"] == full[i][f"{key}_input_ids"]
            assert same[f"{key}_labels"] == [int(l) for l in full[i][f"{key}_labels"]]
        # now with truncation
        p = princeton_tokenize_row(prompt[1:], chosen[:-1], rejected[:-1], bos_id=tok.bos_id, eos_id=tok.eos_id, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT)
        o = ours[i]
        o_prompt, o_chosen, _ = split(o, "chosen")
        _, o_rejected, _ = split(o, "rejected")
        p_prompt, p_chosen, _ = split(p, "chosen")
        _, p_rejected, _ = split(p, "rejected")
        # the rule itself is prefopt.data.truncate_pair, on the same ids
        assert (o_prompt, len(o_chosen), len(o_rejected)) == truncate_pair(
            prompt, chosen, rejected, max_seq_len=MAX_LEN, max_prompt_len=MAX_PROMPT, bos_id=tok.bos_id
        )
        report[name] = {
            "prompt/chosen/rejected tokens": (len(prompt), len(chosen), len(rejected)),
            "ours": (len(o_prompt), len(o_chosen), len(o_rejected)),
            "princeton": (len(p_prompt), len(p_chosen), len(p_rejected)),
        }
        if name == "fits":
            assert all(o[k] == p[k] for k in p)
        elif name == "long_prompt":
            # both keep the last tokens of the prompt, same length; princeton's keep_end drops the
            # BOS with the rest of the head, ours keeps it (one content token fewer)
            assert len(o_prompt) == len(p_prompt) == MAX_PROMPT
            assert p_prompt == prompt[-MAX_PROMPT:] and p_prompt[0] != tok.bos_id
            assert o_prompt == [tok.bos_id] + prompt[-(MAX_PROMPT - 1):]
            assert o_chosen == p_chosen == chosen and o_rejected == p_rejected == rejected
        elif name == "long_response":
            # the prompt is shorter than max_prompt_len and stays whole in both; princeton cuts the
            # responses to max_length - max_prompt_length, we to max_seq_len - len(prompt)
            assert o_prompt == p_prompt == prompt
            assert len(p_chosen) == MAX_LEN - MAX_PROMPT and len(o_chosen) == MAX_LEN - len(prompt)
            assert o_chosen[: len(p_chosen)] == p_chosen and len(o_prompt) + len(o_chosen) == MAX_LEN
            assert o_rejected == p_rejected == rejected  # short enough for both rules
        elif name == "both_long":
            # prompt cut to max_prompt_len: the two response rules coincide; only the BOS differs
            assert len(o_prompt) == len(p_prompt) == MAX_PROMPT and o_prompt[1:] == p_prompt[1:]
            assert o_prompt[0] == tok.bos_id != p_prompt[0]
            assert o_chosen == p_chosen and len(o_chosen) == MAX_LEN - MAX_PROMPT
            assert o_rejected == p_rejected
        for ex in (o, p):
            assert all(len(ex[f"{k}_input_ids"]) <= MAX_LEN for k in ("chosen", "rejected"))
    print("\n" + json.dumps(report))


def test_multi_turn_tokenization_vs_princeton(tiny_tokenizer, tmp_path):
    """Multi-turn rows: torchtune's tokenizer puts BOS at the start of every user turn and EOS
    after every assistant turn. Like princeton, prefopt.data scores only the final assistant turn:
    the prompt is the whole conversation before it (earlier assistant turns are shared context).
    On the same ids the sequences and the scored positions are identical."""
    tok = tiny_tokenizer
    row = chat("Where is the wallet now?", "In the garden.", "In the garage.", system="Answer briefly.",
               history=[("Where are the keys?", "The keys are in the garden.")])
    ex = build(tok, tmp_path, [row], "multi")[0]
    ids, labels = ex["chosen_input_ids"], [int(l) for l in ex["chosen_labels"]]
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 2
    first_eos = ids.index(tok.eos_id)
    assert ids[first_eos + 1] == tok.bos_id  # </s><s> between the turns, Llama-2-chat style
    # princeton on the same ids: everything before the final assistant turn is the prompt
    final_start = max(i for i in range(len(ids)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
    p = princeton_tokenize_row(ids[1:final_start], ids[final_start:-1], ex["rejected_input_ids"][final_start:-1],
                               bos_id=tok.bos_id, eos_id=tok.eos_id, max_length=10**6, max_prompt_length=10**6)
    assert p["chosen_input_ids"] == ids and p["rejected_input_ids"] == ex["rejected_input_ids"]
    ours_scored = {i for i, l in enumerate(labels) if l != IGNORE}
    theirs_scored = {i for i, l in enumerate(p["chosen_labels"]) if l != IGNORE}
    assert ours_scored == theirs_scored
    assert min(ours_scored) > first_eos  # the earlier assistant turn is prompt, not response
    assert tok.decode([ids[i] for i in sorted(ours_scored)]).strip() == "In the garden."


def test_multi_turn_truncation_keeps_the_final_turn_like_princeton(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    row = chat("Where is the wallet now?", "In the garden.", "In the garage.", system="Answer briefly.",
               history=[("Where are the keys?", "The keys are in the garden.")])
    full = build(tok, tmp_path, [row], "multi_full")[0]
    ids, labels = full["chosen_input_ids"], [int(l) for l in full["chosen_labels"]]
    final_start = max(i for i in range(len(ids)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
    p = princeton_tokenize_row(ids[1:final_start], ids[final_start:-1], full["rejected_input_ids"][final_start:-1],
                               bos_id=tok.bos_id, eos_id=tok.eos_id, max_length=24, max_prompt_length=8)
    p_scored = {key: [l for l in p[f"{key}_labels"] if l != IGNORE] for key in ("chosen", "rejected")}
    assert p_scored["chosen"] != p_scored["rejected"]
    assert tok.decode(p_scored["chosen"]).strip() == "In the garden."
    ex = build(tok, tmp_path, [row], "multi_cut", max_seq_len=24, max_prompt_len=8)[0]
    scored = {key: [int(l) for l in ex[f"{key}_labels"] if l != IGNORE] for key in ("chosen", "rejected")}
    # both keep the end of the conversation (prompt keep_end) and score the final, differing turn
    assert scored["chosen"] != scored["rejected"]
    assert tok.decode(scored["chosen"]).strip() == "In the garden."

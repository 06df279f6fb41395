"""Scoring (prefopt.reward): a one-output reward model scores as transformers does, in batches of
different lengths; a head of more outputs is refused; callables are rewards as they are."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.reward import (
    CallableReward,
    RewardModel,
    build_reward,
    example_rule_reward,
    reward_bound_args,
    reward_head_problem,
    shared_prefix_layout,
)

SHAPE = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128)


def save_hf_classifier(path, num_labels=1):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_labels=num_labels,
    )
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def reward_block(path, tmp_path):
    return OmegaConf.create({
        "_component_": "prefopt.reward.reward_model",
        "model": {"_component_": "torchtune.models.llama2.llama2_classifier", "num_classes": 1, "vocab_size": 512,
                  "intermediate_dim": 128, "norm_eps": 1e-5, **SHAPE},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": str(__import__("prefopt").ASSETS / "tiny/tokenizer.model"), "max_seq_len": None},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(path),
                         "checkpoint_files": ["model.safetensors"], "model_type": "REWARD", "output_dir": str(tmp_path / "out")},
        "batch_size": 3,
    })


def test_shared_prefix_layout_by_hand():
    # [1 2 3 4] and [1 2 5] share [1 2]; [1 2] alone keeps its last token: the prefix is [1]
    ids, pos, mask, ends = shared_prefix_layout([[1, 2, 3, 4], [1, 2, 5]])
    assert ids.tolist() == [1, 2, 3, 4, 5] and pos.tolist() == [0, 1, 2, 3, 2] and ends.tolist() == [3, 4]
    assert mask.int().tolist() == [[1, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 0],
                                   [1, 1, 0, 0, 1]]
    ids, pos, mask, ends = shared_prefix_layout([[1, 2, 3], [1, 2]])
    assert ids.tolist() == [1, 2, 3, 2] and pos.tolist() == [0, 1, 2, 1] and ends.tolist() == [2, 3]
    assert mask[3].int().tolist() == [1, 0, 0, 1]
    ids, pos, mask, ends = shared_prefix_layout([[7, 8]])  # one sequence: itself, causal
    assert ids.tolist() == [7, 8] and ends.tolist() == [1] and mask.int().tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="non-empty"):
        shared_prefix_layout([[1], []])


@pytest.mark.peer
def test_reward_model_scores_as_transformers(tmp_path):
    hf = save_hf_classifier(tmp_path / "rm")
    rm = build_reward(reward_block(tmp_path / "rm", tmp_path), device="cpu", dtype=torch.float32)
    assert isinstance(rm, RewardModel)
    g = torch.Generator().manual_seed(3)
    # lengths 1..40 in batches of 3, sorted by length: every batch is padded
    seqs = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (0, 17, 5, 39, 8, 2, 23)]
    ours = rm.score_ids(seqs)
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert ours == pytest.approx(ref, abs=1e-5)
    assert rm.items == len(seqs) and rm.tokens == sum(map(len, seqs))
    # k responses of one prompt: its tokens computed once in a row (groups of 4, 1 and 3 rows in
    # batches of at most 3 sequences: a group of 4 alone), each scored as transformers scores it alone
    prompts = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (12, 3, 30)]
    tails = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (6, 1, 15, 6, 9, 2, 20, 4)]
    keys = [0, 0, 0, 0, 1, 2, 2, 2]
    grouped = [prompts[k] + t for k, t in zip(keys, tails)]
    widths = []
    hook = rm.model.tok_embeddings.register_forward_hook(lambda mod, args, out: widths.append(tuple(args[0].shape)))
    try:
        shared = rm.score_ids(grouped, groups=keys)
    finally:
        hook.remove()
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0, 0].item() for s in grouped]
    assert shared == pytest.approx(ref, abs=1e-5)
    # the 4 responses of prompt 0 in one row of 13 + 6 + 1 + 15 + 6 tokens, not 4 rows of up to 28
    assert (1, 13 + 6 + 1 + 15 + 6) in widths and sum(a * b for a, b in widths) < sum(map(len, grouped)), widths
    # a whole conversation through the reward model's tokenizer: scored at its last token
    conv = rm.encode([{"role": "user", "content": "Describe a trip."}], "We took the train.")
    assert rm.score([[{"role": "user", "content": "Describe a trip."}]], ["We took the train."]) == pytest.approx(
        [hf(torch.tensor([conv])).logits[0, 0].item()], abs=1e-5)


def test_a_head_of_two_outputs_is_refused(tmp_path):
    save_hf_classifier(tmp_path / "rm2", num_labels=2)
    assert "2 outputs" in reward_head_problem(tmp_path / "rm2")
    with pytest.raises(ValueError, match="reward.checkpointer.checkpoint_dir: .* 2 outputs"):
        build_reward(reward_block(tmp_path / "rm2", tmp_path), device="cpu")
    from torchtune.models.llama2 import llama2_classifier

    with pytest.raises(ValueError, match="2 outputs"):
        RewardModel(llama2_classifier(num_classes=2, vocab_size=16, intermediate_dim=8, **{**SHAPE, "embed_dim": 8}), None)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert "not a *ForSequenceClassification" in reward_head_problem(tmp_path / "lm")


def test_a_callable_is_a_reward():
    block = OmegaConf.create({"_component_": "prefopt.reward.example_rule_reward", "target_words": 4})
    assert reward_bound_args(block) == ("prompt", "response")
    r = build_reward(block)
    assert isinstance(r, CallableReward)
    prompts = [[{"role": "user", "content": "Describe the bridge."}]] * 3
    scores = r.score(prompts, ["The old bridge stood.", "bridge bridge bridge bridge", ""])
    assert scores[0] > scores[1] > scores[2] == 0.0
    assert reward_bound_args(OmegaConf.create({"_component_": "prefopt.reward.reward_model"})) == ("device", "dtype")


def test_example_rule_reward_does_not_pay_for_length():
    short = example_rule_reward("Describe the river.", "The river ran fast past the old mill today.")
    longer = example_rule_reward("Describe the river.", "The river ran fast past the old mill today and then on and on to the sea far away.")
    assert short > longer

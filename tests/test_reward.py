"""Scoring (prefopt.reward): a one-output reward model scores as transformers does, in batches of
different lengths; a head of more outputs is refused; callables are rewards as they are."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.packing import packed_attention_mask
from prefopt.reward import (
    CallableReward,
    RewardModel,
    build_reward,
    example_rule_reward,
    reward_bound_args,
    reward_head_problem,
    shared_prefix_layout,
    shared_rows,
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


def _row_mask(parts):
    """The dense mask prefopt.packing builds for one row of ``parts`` (one document)."""
    return packed_attention_mask(torch.zeros(1, parts.numel(), dtype=torch.long), parts[None], block_mask=False)[0]


def test_shared_prefix_layout_by_hand():
    # [1 2 3 4] and [1 2 5] share [1 2]; [1 2] alone keeps its last token: the prefix is [1]
    ids, pos, parts, ends = shared_prefix_layout([[1, 2, 3, 4], [1, 2, 5]])
    assert ids.tolist() == [1, 2, 3, 4, 5] and pos.tolist() == [0, 1, 2, 3, 2] and ends.tolist() == [3, 4]
    assert parts.tolist() == [0, 0, 1, 1, 2]
    assert _row_mask(parts).int().tolist() == [[1, 0, 0, 0, 0],
                                               [1, 1, 0, 0, 0],
                                               [1, 1, 1, 0, 0],
                                               [1, 1, 1, 1, 0],
                                               [1, 1, 0, 0, 1]]
    ids, pos, parts, ends = shared_prefix_layout([[1, 2, 3], [1, 2]])
    assert ids.tolist() == [1, 2, 3, 2] and pos.tolist() == [0, 1, 2, 1] and ends.tolist() == [2, 3]
    assert _row_mask(parts)[3].int().tolist() == [1, 0, 0, 1]
    # three parts: the third sees the prefix and itself, neither earlier part
    ids, pos, parts, ends = shared_prefix_layout([[4, 5, 6], [4, 7, 8], [4, 9]])
    assert parts.tolist() == [0, 1, 1, 2, 2, 3] and pos.tolist() == [0, 1, 2, 1, 2, 1]
    assert _row_mask(parts)[5].int().tolist() == [1, 0, 0, 0, 0, 1]
    assert _row_mask(parts)[4].int().tolist() == [1, 0, 0, 1, 1, 0]
    ids, pos, parts, ends = shared_prefix_layout([[7, 8]])  # one sequence: itself, causal
    assert ids.tolist() == [7, 8] and ends.tolist() == [1] and _row_mask(parts).int().tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="non-empty"):
        shared_prefix_layout([[1], []])


def test_shared_rows_split_a_group_that_does_not_fit_one_row():
    # a prompt of 3 tokens and responses of 4, 5, 2, 6 tokens: rows of 3 + 4 + 5 = 12, then 3 + 2 + 6 = 11
    prompt = [1, 2, 3]
    seqs = [prompt + [10 + j] * n for j, n in enumerate((4, 5, 2, 6))]
    assert shared_rows(seqs, [0, 1, 2, 3], limit=12) == [[0, 1], [2, 3]]
    assert shared_rows(seqs, [0, 1, 2, 3], limit=23) == [[0, 1, 2, 3]]  # 3 + 17: all in one
    assert shared_rows(seqs, [0, 1, 2, 3], limit=19) == [[0, 1, 2], [3]]  # 3 + 11 = 14, + 6 = 20 > 19
    assert shared_rows(seqs, [3, 1], limit=9) == [[3], [1]]  # each alone, in the members' order
    with pytest.raises(ValueError, match="9 tokens does not fit a row of 8"):
        shared_rows(seqs, [0, 3], limit=8)


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
    # a group longer than the model's max_seq_len (128) together: rows of 40 + 2 x 40 and 40 + 40,
    # in one forward (3 sequences)
    long_prompt = [1] + torch.randint(3, 512, (39,), generator=g).tolist()
    longs = [long_prompt + torch.randint(3, 512, (40,), generator=g).tolist() for _ in range(3)]
    widths.clear()
    hook = rm.model.tok_embeddings.register_forward_hook(lambda mod, args, out: widths.append(tuple(args[0].shape)))
    try:
        split = rm.score_ids(longs, groups=[0, 0, 0])
    finally:
        hook.remove()
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0, 0].item() for s in longs]
    assert split == pytest.approx(ref, abs=1e-5) and widths == [(2, 120)], widths
    # a whole conversation through the reward model's tokenizer: scored at its last token
    conv = rm.encode([{"role": "user", "content": "Describe a trip."}], "We took the train.")
    assert rm.score([[{"role": "user", "content": "Describe a trip."}]], ["We took the train."]) == pytest.approx(
        [hf(torch.tensor([conv])).logits[0, 0].item()], abs=1e-5)


@pytest.mark.peer
def test_flex_attention_scoring_equals_transformers(tmp_path):
    """reward.flex_attention: True on the CPU: the rows of a prompt's responses go through
    FlexAttention with a BlockMask (compiled), as on CUDA by default; each response scores what
    transformers scores for it alone. Rows of 256 positions and more (a row shorter than that is
    padded to it)."""
    from torch.nn.attention.flex_attention import BlockMask

    from prefopt.attention import FLEX_COMPILES, flex_compile_count

    hf = save_hf_classifier(tmp_path / "rm")
    block = reward_block(tmp_path / "rm", tmp_path)
    block.model.max_seq_len = 512
    block.flex_attention = True
    rm = build_reward(block, device="cpu", dtype=torch.float32)
    assert rm.flex_attention
    torch._dynamo.reset()
    masks = []
    hook = rm.model.register_forward_pre_hook(lambda mod, args, kw: masks.append((args[0].shape, kw["mask"])),
                                              with_kwargs=True)
    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (60, 9)]
    tails = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (70, 45, 90, 3, 30)]
    keys = [0, 0, 0, 1, 1]
    seqs = [prompts[k] + t for k, t in zip(keys, tails)]
    try:
        ours = rm.score_ids(seqs, groups=keys)
        rm.batch_size = 5
        together = rm.score_ids(seqs, groups=keys)
    finally:
        hook.remove()
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert ours == pytest.approx(ref, abs=1e-5) and together == pytest.approx(ref, abs=1e-5)
    # batch_size 3: the group of 2 (10 + 33 positions, padded to 256), then the group of 3 (61 + 205
    # = 266); batch_size 5: both in one forward, two rows of 266
    assert [(tuple(shape), type(m)) for shape, m in masks] == [
        ((1, 256), BlockMask), ((1, 266), BlockMask), ((2, 266), BlockMask)], masks
    assert flex_compile_count() == FLEX_COMPILES  # one compile for every row length and count
    # a model whose max_seq_len is under FlexAttention's shortest row: refused, naming the key
    block.model.max_seq_len = 128
    with pytest.raises(ValueError, match=r"reward.flex_attention: .*max_seq_len \(128\)"):
        build_reward(block, device="cpu")


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

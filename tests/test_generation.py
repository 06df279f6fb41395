"""Sampling (prefopt.generation): the filters keep exactly the tokens they should (hand-worked),
rows are seeded on their own, and greedy decoding of a left-padded batch equals transformers'
greedy decoding token for token."""

import pytest
import torch
from conftest import REPO

from prefopt.generation import filter_logits, generate_batch, prompt_ids, row_seed, sample_tokens, stop_token_ids

NEG = float("-inf")


def kept(logits, **kw):
    return (filter_logits(torch.tensor(logits), **kw) != NEG).tolist()


# ---------------------------------------------------------------------------------------------
# the filters, hand-worked


def test_top_k_keeps_the_k_largest():
    assert kept([[1.0, 4.0, 3.0, 2.0]], top_k=2) == [[False, True, True, False]]
    assert kept([[1.0, 4.0, 3.0, 2.0]], top_k=10) == [[True] * 4]  # k > vocab: all
    assert kept([[1.0, 4.0, 3.0, 3.0]], top_k=2) == [[False, True, True, True]]  # a tie with the k-th stays


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.25, 0.125, 0.125 (logs of them as logits)
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert (filter_logits(logits, top_p=0.5) != NEG).tolist() == [[True, False, False, False]]  # 0.5 reaches 0.5
    assert (filter_logits(logits, top_p=0.6) != NEG).tolist() == [[True, True, False, False]]  # 0.5 < 0.6 <= 0.75
    assert (filter_logits(logits, top_p=0.75) != NEG).tolist() == [[True, True, False, False]]
    assert (filter_logits(logits, top_p=0.8) != NEG).tolist() == [[True, True, True, False]]  # first of the tie
    assert (filter_logits(logits, top_p=1.0) != NEG).tolist() == [[True] * 4]
    assert (filter_logits(logits, top_p=0.01) != NEG).tolist() == [[True, False, False, False]]  # the top always stays
    # order in the vocabulary does not matter: 0.1, 0.6, 0.3 -> top_p 0.8 keeps 0.6 and 0.3
    assert (filter_logits(torch.tensor([[0.1, 0.6, 0.3]]).log(), top_p=0.8) != NEG).tolist() == [[False, True, True]]


def test_top_p_after_top_k_and_per_row():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]).log()
    # top_k=3 leaves 0.4, 0.3, 0.2 (renormalised 4/9, 3/9, 2/9); top_p=0.7: 4/9 < 0.7 <= 7/9
    assert (filter_logits(logits, top_k=3, top_p=0.7) != NEG).tolist() == [[True, True, False, False], [False, False, True, True]]


def test_temperature_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample_tokens(logits, temperature=0.0).tolist() == [1]
    # argmax(probs / noise): a noise that favours token 2 wins at temperature 1 ...
    noise = torch.tensor([[1.0, 1.0, 0.2]])
    assert sample_tokens(logits, temperature=1.0, noise=noise).tolist() == [2]  # p2/p1 = e^-1 > 0.2
    # ... but not when a low temperature sharpens the distribution (p2/p1 = e^-10 < 0.2)
    assert sample_tokens(logits, temperature=0.1, noise=noise).tolist() == [1]
    # a filtered token is never drawn, whatever its noise
    assert sample_tokens(logits, temperature=1.0, top_k=1, noise=torch.tensor([[1e-9, 1.0, 1e-9]])).tolist() == [1]
    with pytest.raises(ValueError, match="noise"):
        sample_tokens(logits, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_row_seed_depends_on_seed_and_key_only():
    assert row_seed(42, "a prompt") == row_seed(42, "a prompt")
    assert len({row_seed(42, "a"), row_seed(43, "a"), row_seed(42, "b")}) == 3
    assert 0 <= row_seed(13, "x") < 2**63


# ---------------------------------------------------------------------------------------------
# the loop, on the tiny model


@pytest.fixture(scope="module")
def tiny_model():
    from torchtune.models.llama2 import llama2
    from torchtune.training import FullModelHFCheckpointer

    from prefopt import ASSETS

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(ASSETS / "tiny/model"), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA2", output_dir="/tmp/prefopt-unused")
    model = llama2(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512, max_seq_len=256)
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    return model.eval()


def test_samples_do_not_depend_on_the_batch(tiny_model, tiny_tokenizer):
    prompts = [prompt_ids(tiny_tokenizer, [{"role": "user", "content": t}])
               for t in ("Describe a trip in one line.", "Hi", "Write one sentence about a busy day at the market.")]
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.95, top_k=50, stop_tokens=stop_token_ids(tiny_tokenizer))
    together = generate_batch(tiny_model, prompts, seeds=[1, 2, 3], **kw)
    reversed_ = generate_batch(tiny_model, prompts[::-1], seeds=[3, 2, 1], **kw)
    alone = [generate_batch(tiny_model, [p], seeds=[s], **kw)[0] for p, s in zip(prompts, [1, 2, 3])]
    assert together == reversed_[::-1] == alone
    assert generate_batch(tiny_model, prompts[:1], seeds=[4], **kw) != together[:1]  # another seed, other tokens
    assert all(0 < len(g.tokens) <= 12 for g in together)


def test_rows_of_one_prompt_share_its_prefill(tiny_model, tiny_tokenizer):
    # k rows per prompt, as the pairs recipe builds them: the prefill runs each distinct prompt
    # once (a forward of 2 rows, not 6), and every row samples what it samples alone
    prompts = [prompt_ids(tiny_tokenizer, [{"role": "user", "content": t}]) for t in ("Hi", "Describe a trip in one line.")]
    rows = [p for p in prompts for _ in range(3)]
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.95, stop_tokens=stop_token_ids(tiny_tokenizer))
    widths = []
    hook = tiny_model.tok_embeddings.register_forward_hook(lambda mod, args, out: widths.append(tuple(args[0].shape)))
    try:
        shared = generate_batch(tiny_model, rows, seeds=[1, 2, 3, 4, 5, 6], **kw)
    finally:
        hook.remove()
    assert widths[0] == (2, len(prompts[1])) and all(w == (6, 1) for w in widths[1:]), widths[:3]
    alone = [generate_batch(tiny_model, [r], seeds=[s], **kw)[0] for r, s in zip(rows, [1, 2, 3, 4, 5, 6])]
    assert shared == alone
    assert len({tuple(g.tokens) for g in shared[:3]}) > 1  # the rows of one prompt decode apart


def test_finished_rows_leave_the_batch(tiny_model, tiny_tokenizer):
    # rows stop at different steps; once a quarter of the batch has stopped, the stopped rows'
    # caches are dropped and the steps after run on the others only: every row samples what it
    # samples alone
    prompts = [prompt_ids(tiny_tokenizer, [{"role": "user", "content": t}])
               for t in ("Hi", "Describe a trip in one line.", "Write one sentence about a busy day at the market.")]
    rows = [p for p in prompts for _ in range(4)]
    seeds = list(range(12))
    free = generate_batch(tiny_model, rows, seeds=seeds, max_new_tokens=16, temperature=1.0)
    # stop tokens that end a sample of each prompt by step 3 (row i stops at its first stop token)
    stop = sorted({free[i].tokens[3] for i in (0, 4, 8)})
    kw = dict(max_new_tokens=16, temperature=1.0, stop_tokens=stop)
    widths = []
    hook = tiny_model.tok_embeddings.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[0]))
    try:
        together = generate_batch(tiny_model, rows, seeds=seeds, **kw)
    finally:
        hook.remove()
    alone = [generate_batch(tiny_model, [r], seeds=[sd], **kw)[0] for r, sd in zip(rows, seeds)]
    assert together == alone
    ends = sorted(g.num_generated for g in together if g.stopped)
    assert 3 <= len(ends) < 12 and ends[2] <= 4, ends
    assert widths[1] == 12 and min(widths[1:]) < 12 and widths[1:] == sorted(widths[1:], reverse=True), widths


def test_decode_runs_the_one_token_steps(tiny_model):
    # e.g. torch.compile(model): called for every step after the prefill, with one token per row
    calls = []

    def decode(tokens, **kw):
        calls.append(tuple(tokens.shape))
        return tiny_model(tokens, **kw)

    plain = generate_batch(tiny_model, [[1, 5, 6], [1, 7]], seeds=[0, 1], max_new_tokens=5, temperature=0.0)
    via = generate_batch(tiny_model, [[1, 5, 6], [1, 7]], seeds=[0, 1], max_new_tokens=5, temperature=0.0, decode=decode)
    assert via == plain and calls == [(2, 1)] * 4
    # caches of a fixed length (a compiled decode's shapes stay the same): the same tokens
    fixed = generate_batch(tiny_model, [[1, 5, 6], [1, 7]], seeds=[0, 1], max_new_tokens=5, temperature=0.0, cache_len=64)
    assert fixed == plain
    with pytest.raises(ValueError, match="cache_len=7: must hold the longest prompt"):
        generate_batch(tiny_model, [[1, 5, 6]], seeds=[0], max_new_tokens=5, temperature=0.0, cache_len=7)


def test_stop_tokens_end_a_row(tiny_model):
    greedy = generate_batch(tiny_model, [[1, 5, 6]], seeds=[0], max_new_tokens=6, temperature=0.0)[0]
    assert not greedy.stopped and len(greedy.tokens) == 6
    stop = greedy.tokens[2]
    first = greedy.tokens.index(stop)
    again = generate_batch(tiny_model, [[1, 5, 6]], seeds=[0], max_new_tokens=6, temperature=0.0, stop_tokens=[stop])[0]
    assert again.stopped and again.tokens == greedy.tokens[:first] and again.num_generated == first + 1


def test_prompt_longer_than_the_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate_batch(tiny_model, [[1] * 250], seeds=[0], max_new_tokens=10, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# greedy parity with transformers


@pytest.mark.peer
def test_greedy_equals_transformers_token_for_token(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torchtune.models.llama2 import llama2
    from torchtune.training import FullModelHFCheckpointer

    torch.manual_seed(0)
    shape = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=128)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(tmp_path / "hf"), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA2", output_dir=str(tmp_path / "out"))
    ours = llama2(vocab_size=256, norm_eps=1e-5, **shape)
    ours.load_state_dict(ckpt.load_checkpoint()["model"], strict=True)

    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 256, (n,), generator=g).tolist() for n in (2, 9, 5, 14)]  # padding exercised
    prompts = [prompts[0], prompts[1], prompts[1], prompts[2], prompts[3], prompts[0]]  # repeats: a shared prefill
    new = 16
    got = generate_batch(ours, prompts, seeds=[0] * 6, max_new_tokens=new, temperature=0.0, stop_tokens=[2])
    for p, mine in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=new,
                              do_sample=False, eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
        if 2 in ref:
            ref = ref[:ref.index(2)]
        assert mine.tokens == ref, f"prompt of {len(p)} tokens"


@pytest.mark.parametrize("family", ["llama3_1", "qwen2_5", "qwen3", "mistral", "gemma2"])
def test_prompt_ids_are_the_training_layouts_prompt(tmp_path, family):
    """The generation prompt of each family's tokenizer (its shipped config's, on a stand-in
    tokenizer file) is what precedes the response in the training layout: a prefix of the
    tokenized conversation, ending where the response's first token starts. Before: Gemma's,
    Mistral's and Qwen's tokenizers have no ``add_end_tokens`` (TypeError at the generation
    recipes' start-up: configs/gemma2/9B_generate_pairs.yaml could not run), and an empty
    assistant turn would end a Gemma prompt with the template's ``<end_of_turn>``."""
    from family_standins import write_tokenizer
    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.data import Message

    import prefopt  # noqa: F401

    name = {"llama3_1": "llama3_1/8B_simpo_lora_single_device", "qwen2_5": "qwen2_5/7B_simpo_lora_single_device",
            "qwen3": "qwen3/8B_simpo_lora_single_device", "mistral": "mistral/7B_simpo_lora_single_device",
            "gemma2": "gemma2/9B_simpo_lora_single_device"}[family]
    node = OmegaConf.load(REPO / "configs" / f"{name}.yaml").tokenizer
    folder = str(node.path).rsplit("/", 2)[0] if family == "llama3_1" else str(node.path).rsplit("/", 1)[0]
    node = OmegaConf.create(OmegaConf.to_yaml(node).replace(folder, str(tmp_path)))
    write_tokenizer(node.path, family, tmp_path)
    tok = config.instantiate(node)
    question, answer = "Describe a busy day in one line.", "The market was full of people."
    prompt = prompt_ids(tok, [{"role": "user", "content": question}])
    full, mask = tok.tokenize_messages([Message(role="user", content=question, masked=True),
                                        Message(role="assistant", content=answer, masked=False)])
    rest = full[len(prompt):]
    assert full[:len(prompt)] == prompt, (tok.decode(prompt), tok.decode(full))
    assert tok.decode(rest).lstrip().startswith(answer), tok.decode(rest)  # the response starts right there
    assert mask.index(False) <= len(prompt) and all(mask[:mask.index(False)])  # the turns before are masked

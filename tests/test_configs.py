"""Every YAML under configs/ is a valid config for its recipe, and builds.

For each config (found by globbing configs/ recursively, so configs added later are covered too):

- the recipe's own start-up validation (``validate_config`` with the recipe's ``CONFIG_SPEC`` and
  ``BOUND_ARGS``) passes: no unknown or missing key, no bad component argument;
- the model builds on the meta device, and the loss, the optimizer (on a dummy parameter), the LR
  scheduler and any tokenizer prompt template build; the dataset blocks' arguments bind to their
  builder's signature (nothing is downloaded: no weights, tokenizer files or hub datasets);
- a real-model config (anything outside configs/tiny/) carries the SimPO hyper-parameters we chose
  for its model family (FAMILIES below), a global batch of 128 pairs, a 10% warmup, and a header
  whose `tune download` / `tune run` lines match its paths.

The recipe is picked by file name: ``*simpo_full*`` -> recipes/simpo_full_distributed.py,
``*generate_pairs*`` -> recipes/generate_preference_pairs.py (whose real configs carry princeton's
sampling settings instead of SimPO's hyper-parameters), ``*judge*`` -> recipes/judge_generations.py,
``*sft_warmup*`` -> torchtune's own full_finetune_single_device (skipped here), anything else ->
recipes/simpo_lora_single_device.py; a recipe file that does not exist fails its configs.
"""

import functools
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".yml")
)
LORA_RECIPE = "recipes/simpo_lora_single_device.py"
FULL_RECIPE = "recipes/simpo_full_distributed.py"
GEN_RECIPE = "recipes/generate_preference_pairs.py"
JUDGE_RECIPE = "recipes/judge_generations.py"
# configs of torchtune's OWN recipes (the on-policy loop's warm-up): no CONFIG_SPEC to check them
# against; scripts/onpolicy_demo.sh runs them (tests/test_onpolicy_demo.py, slow)
TORCHTUNE_CONFIGS = ("sft_warmup",)

# The real-model configs of the LoRA recipe this file was written with; more may be added.
EXPECTED = [
    "configs/llama3_2/1B_simpo_lora_single_device.yaml",
    "configs/llama3_2/3B_simpo_lora_single_device.yaml",
    "configs/llama3_1/8B_simpo_lora_single_device.yaml",
    "configs/llama3_1/8B_simpo_qlora_single_device.yaml",
    "configs/qwen2_5/0.5B_simpo_lora_single_device.yaml",
    "configs/qwen2_5/1.5B_simpo_lora_single_device.yaml",
    "configs/qwen2_5/3B_simpo_lora_single_device.yaml",
    "configs/qwen2_5/7B_simpo_lora_single_device.yaml",
    "configs/gemma2/9B_simpo_lora_single_device.yaml",
    "configs/mistral/7B_simpo_lora_single_device.yaml",
]

UFB = ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
ARMORM = ("princeton-nlp/llama3-ultrafeedback-armorm", "train")
# (source, train split) -> pairs, for the warmup arithmetic. Sources not listed are not checked.
DATASET_SIZES = {UFB: 61_135, ARMORM: 59_876}


@dataclass(frozen=True)
class Family:
    setting: str  # princeton-nlp/SimPO's setting the values come from
    beta: float
    gamma_beta_ratio: float
    full_ft_lr: float  # the paper's (full fine-tuning) learning rate
    sources: Tuple[str, ...]  # training sets these values go with


# SimPO hyper-parameters per model family, keyed by the config's folder under configs/.
# Values: princeton-nlp/SimPO README and training_configs/ (β, γ/β, lr); Qwen is our choice.
FAMILIES: Dict[str, Family] = {
    # Llama 3.2 1B/3B Instruct: the Llama3-Instruct (v0.1) setting, on UltraFeedback pairs
    "llama3_2": Family("Llama3-Instruct", 2.5, 0.55, 1e-6, (UFB[0], "princeton-nlp/llama3-ultrafeedback")),
    # Llama 3.1 8B Instruct: the v0.2 setting, whose β/γ were tuned on the ArmoRM-annotated data
    "llama3_1": Family("Llama3-Instruct v0.2 (ArmoRM data)", 10.0, 0.3, 1e-6, (ARMORM[0],)),
    # Qwen2.5: no princeton setting; OUR CHOICE is the Llama3-Instruct values
    "qwen2_5": Family("Llama3-Instruct values (our choice for Qwen2.5)", 2.5, 0.55, 1e-6, (UFB[0],)),
    "gemma2": Family("Gemma2-IT", 10.0, 0.5, 8e-7, (UFB[0], "princeton-nlp/gemma2-ultrafeedback-armorm")),
    "mistral": Family("Mistral-Instruct", 2.5, 0.1, 5e-7, (UFB[0], "princeton-nlp/mistral-instruct-ultrafeedback")),
    # Qwen3 (non-thinking): no princeton setting; OUR CHOICE, as for Qwen2.5, the Llama3-Instruct values
    "qwen3": Family("Llama3-Instruct values (our choice for Qwen3)", 2.5, 0.55, 1e-6, (UFB[0],)),
    # Gemma 3: no princeton setting; OUR CHOICE, the Gemma2-IT values (the same turn format and lineage)
    "gemma3": Family("Gemma2-IT values (our choice for Gemma 3)", 10.0, 0.5, 8e-7,
                     (UFB[0], "princeton-nlp/gemma2-ultrafeedback-armorm")),
}
LORA_LR_RANGE = (1e-5, 5e-5)  # princeton has no LoRA numbers; see the configs' comments
GLOBAL_BATCH = 128

# torchtune.models.<family> of the model builder -> (checkpointer model_type, tokenizer builder)
MODEL_FAMILY = {
    "llama2": ("LLAMA2", "torchtune.models.llama2.llama2_tokenizer"),
    "llama3": ("LLAMA3", "torchtune.models.llama3.llama3_tokenizer"),
    "llama3_1": ("LLAMA3", "torchtune.models.llama3.llama3_tokenizer"),
    "llama3_2": ("LLAMA3_2", "torchtune.models.llama3.llama3_tokenizer"),
    "qwen2_5": ("QWEN2", "torchtune.models.qwen2_5.qwen2_5_tokenizer"),
    "gemma2": ("GEMMA2", "torchtune.models.gemma.gemma_tokenizer"),
    "mistral": ("MISTRAL", "torchtune.models.mistral.mistral_tokenizer"),
    "qwen3": ("QWEN3", "prefopt.models.qwen3.qwen3_tokenizer"),
    "gemma3": ("GEMMA3", "torchtune.models.gemma.gemma_tokenizer"),
}


# ---------------------------------------------------------------------------------------------
def recipe_for(path: str) -> str:
    # `*_simpo_full*` (e.g. 8B_simpo_full.yaml), and a bare `simpo_full*.yaml` under configs/tiny/
    if "generate_pairs" in Path(path).name:
        return GEN_RECIPE
    if "judge" in Path(path).name:
        return JUDGE_RECIPE
    return FULL_RECIPE if "simpo_full" in Path(path).name else LORA_RECIPE


def is_real(path: str) -> bool:
    return not path.startswith("configs/tiny/")


@functools.lru_cache(maxsize=None)
def _load_module(rel: str):
    path = REPO / rel
    name = "_prefopt_test_recipe_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(mod)
    return mod


def skip_torchtune_config(path: str) -> None:
    if any(m in Path(path).name for m in TORCHTUNE_CONFIGS):
        pytest.skip("a config of torchtune's own recipe (run by scripts/onpolicy_demo.sh)")


def recipe_module(path: str):
    skip_torchtune_config(path)
    rel = recipe_for(path)
    if not (REPO / rel).exists():  # a config naming a recipe that is not shipped is broken
        pytest.fail(f"{path} is run with {rel}, which does not exist")
    return _load_module(rel)


def load(path: str) -> DictConfig:
    return OmegaConf.load(REPO / path)


def resolve(dotted: str):
    module, _, attr = str(dotted).rpartition(".")
    return getattr(importlib.import_module(module), attr)


def blocks(value) -> List[DictConfig]:
    if value is None:
        return []
    return list(value) if isinstance(value, ListConfig) else [value]


def args_of(block: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(block, resolve=True).items() if k != "_component_"}


def header_commands(path: str) -> List[List[str]]:
    """The `tune ...` commands in the config's leading comment block, as argument lists."""
    cmds = []
    for line in (REPO / path).read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            break
        s = s.lstrip("#").strip()
        if s.startswith("tune "):
            try:
                cmds.append(shlex.split(s))
            except ValueError:  # unbalanced quotes in prose
                cmds.append(s.split())
    return cmds


def option(argv: List[str], name: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def run_command(path: str) -> Optional[List[str]]:
    runs = [c for c in header_commands(path) if c[1:2] == ["run"]]
    return runs[0] if runs else None


def nproc(path: str) -> int:
    run = run_command(path)
    n = option(run, "--nproc_per_node") if run else None
    return int(n) if n else 1


def family_of(path: str) -> str:
    return Path(path).parts[1]


config_param = pytest.mark.parametrize("path", CONFIGS)


# ---------------------------------------------------------------------------------------------
def test_configs_found():
    assert set(EXPECTED) <= set(CONFIGS), f"missing: {sorted(set(EXPECTED) - set(CONFIGS))}"


@config_param
def test_recipe_accepts_config(path):
    mod = recipe_module(path)
    cfg = load(path)
    mod.validate_config(
        cfg, mod.CONFIG_SPEC, bound_args=mod.BOUND_ARGS, extra_checks=getattr(mod, "_cross_checks", None)
    )


@config_param
def test_components_build(path):
    recipe_module(path)  # fails with the others when the recipe is missing
    cfg = load(path)
    from torchtune import config as tt_config

    # model, on the meta device: no memory, no weights
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    if recipe_for(path) == LORA_RECIPE:
        from torchtune.modules.peft import get_adapter_params

        assert get_adapter_params(model), f"{cfg.model._component_} has no LoRA adapter"
        quantized = "qlora_" in cfg.model._component_ or cfg.model.get("quantize_base", False)
        assert quantized == ("qlora" in Path(path).name), "QLoRA configs (and only those) quantize the base"

    if recipe_for(path) == GEN_RECIPE:
        _generation_blocks_build(cfg)
    elif recipe_for(path) == JUDGE_RECIPE:
        _generation_blocks_build(cfg)
        cfg = OmegaConf.merge(cfg, {"checkpointer": cfg.start_checkpointer})  # the family checks below
    else:
        loss = tt_config.instantiate(cfg.loss)
        assert isinstance(loss, torch.nn.Module)

        params = [torch.nn.Parameter(torch.zeros(4))]
        optimizer = tt_config.instantiate(cfg.optimizer, params)
        if cfg.get("lr_scheduler") is not None:
            sched = tt_config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=100, last_epoch=-1)
            assert sched.get_last_lr()[0] <= cfg.optimizer.lr

    # the tokenizer's files are not downloaded; its prompt template (dotpath or role->tags) must build
    template = cfg.tokenizer.get("prompt_template")
    if template is not None:
        from torchtune.data._prompt_templates import _get_prompt_template

        _get_prompt_template(OmegaConf.to_object(template) if not isinstance(template, str) else template)

    # dataset builders: the arguments bind (tokenizer is the recipe's); nothing is loaded
    from prefopt import data as pdata

    for key in ("dataset", "eval_dataset"):
        for block in blocks(cfg.get(key)):
            fn = resolve(block._component_)
            args = args_of(block)
            bound = inspect.signature(fn).bind(tokenizer=None, **args)
            if fn is pdata.preference_dataset:
                extra = bound.arguments.get("load_dataset_kwargs", {})
                allowed = set(inspect.signature(__import__("datasets").load_dataset).parameters) - {
                    "path", "split", "config_kwargs"
                }
                bad = sorted(set(extra) - allowed)
                assert not bad, f"{key}: {bad} are neither preference_dataset nor datasets.load_dataset arguments"
                assert args.get("prompt_truncation", "keep_end") in pdata.PROMPT_TRUNCATION
                assert args.get("on_bad_example", "drop") in pdata.ON_BAD_EXAMPLE
                assert not args.get("train_on_input", False)
                fmt = args.get("format", "messages")
                assert fmt in pdata.FORMATS, f"{key}.format {fmt!r}"
                if is_real(path):
                    assert "format" in args, f"{key}: a real config names the format it reads"
                if args.get("column_map") is not None:
                    assert set(args["column_map"]) <= set(pdata.FORMATS[fmt]), f"{key}.column_map"
                msl, mpl = args.get("max_seq_len"), args.get("max_prompt_len")
                if msl is not None and mpl is not None:
                    assert mpl < msl, f"{key}: max_prompt_len must be < max_seq_len"

    # checkpointer model_type and tokenizer fit the model's family
    from torchtune.training.checkpointing._utils import ModelType

    model_type = cfg.checkpointer.get("model_type")
    if model_type is not None:
        from prefopt.models.checkpointer import MODEL_TYPES

        # prefopt's HFCheckpointer takes its own types (Qwen 2, Qwen3, Gemma 3), torchtune's the enum's
        ours = cfg.checkpointer._component_ == "prefopt.models.checkpointer.HFCheckpointer"
        assert model_type in (MODEL_TYPES if ours else ModelType.__members__), f"checkpointer.model_type {model_type!r}"
    m = re.match(r"(?:torchtune|prefopt)\.models\.([a-z0-9_]+)\.", cfg.model._component_)
    if m and m.group(1) in MODEL_FAMILY:
        want_type, want_tok = MODEL_FAMILY[m.group(1)]
        if model_type is not None:
            assert model_type == want_type, f"{cfg.model._component_} needs model_type {want_type}"
        assert cfg.tokenizer._component_ == want_tok, f"{cfg.model._component_} needs {want_tok}"


def _generation_blocks_build(cfg: DictConfig) -> None:
    """The generation recipe's own blocks: the prompts reader's arguments bind, and a reward
    model's decoder builds on the meta device with a one-output head."""
    from torchtune import config as tt_config

    from prefopt.data import PROMPT_FORMATS, read_prompts

    inspect.signature(read_prompts).bind(**args_of(cfg.prompts))
    assert cfg.prompts.get("format", "prompts") in PROMPT_FORMATS
    if cfg.reward._component_ == "prefopt.reward.reward_model":
        with torch.device("meta"):
            rm = tt_config.instantiate(cfg.reward.model)
        assert rm.output.out_features == 1, "a reward model has one output"
        assert cfg.reward.checkpointer.model_type == "REWARD"


@config_param
def test_princeton_sampling_settings(path):
    if recipe_for(path) != GEN_RECIPE or not is_real(path):
        pytest.skip("not a real generation config")
    cfg = load(path)
    # princeton-nlp/SimPO on_policy_data_gen/decode.py: temperature 0.8, top_p 0.95, max_tokens
    # 4096, one run per seed in 13/21/42/79/100
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens) == (0.8, 0.95, 4096)
    assert (cfg.num_samples, list(cfg.sample_seeds)) == (5, [13, 21, 42, 79, 100])
    assert cfg.reward._component_ == "prefopt.reward.reward_model"
    downloads = [option(c, "--output-dir").rstrip("/") for c in header_commands(path) if c[1:2] == ["download"]]
    assert str(cfg.reward.checkpointer.checkpoint_dir).rstrip("/") in downloads, "the reward model needs its `tune download` line"
    assert any(str(cfg.reward.tokenizer.path).startswith(d + "/") for d in downloads), "reward.tokenizer.path is not downloaded"


@config_param
def test_paper_hyperparameters(path):
    if not is_real(path):
        pytest.skip("tiny/test config: not a paper setting")
    if recipe_for(path) == GEN_RECIPE:
        pytest.skip("a generation config: test_princeton_sampling_settings")
    recipe_module(path)
    cfg = load(path)
    fam_key = family_of(path)
    assert fam_key in FAMILIES, (
        f"no SimPO hyper-parameters chosen for configs/{fam_key}/: add the family to FAMILIES in "
        "tests/test_configs.py (with where the values come from)"
    )
    fam = FAMILIES[fam_key]
    from torchtune import config as tt_config

    from prefopt.loss import SimPOLoss

    name = Path(path).name
    loss = tt_config.instantiate(cfg.loss)
    if "_orpo_" in name:
        from prefopt.loss import ORPOLoss

        # TRL's ORPOConfig default beta (lambda); the NLL term token-normalised as TRL's
        assert isinstance(loss, ORPOLoss) and loss.beta == pytest.approx(0.1) and loss.chosen_nll == "token"
    else:
        assert cfg.loss._component_ == "prefopt.loss.SimPOLoss"
        assert isinstance(loss, SimPOLoss)
        where = f"{fam.setting}: beta={fam.beta}, gamma_beta_ratio={fam.gamma_beta_ratio}"
        assert loss.beta == pytest.approx(fam.beta), where
        assert loss.gamma_beta_ratio == pytest.approx(fam.gamma_beta_ratio), where
        assert loss.loss_type == "sigmoid" and loss.label_smoothing == 0
        if "_cpo_simpo_" in name:  # TRL's CPO-SimPO: cpo_alpha 1.0, the token-mean NLL term
            assert loss.sft_weight == 1.0 and loss.chosen_nll == "token"
        else:
            assert loss.sft_weight == 0

    lr = cfg.optimizer.lr
    assert isinstance(lr, float), f"optimizer.lr: {lr!r} is not a float"
    if recipe_for(path) == LORA_RECIPE:
        assert LORA_LR_RANGE[0] <= lr <= LORA_LR_RANGE[1], f"LoRA lr {lr} outside {LORA_LR_RANGE}"
    else:
        assert lr == pytest.approx(fam.full_ft_lr), f"{fam.setting}: full fine-tuning lr {fam.full_ft_lr}"

    n = nproc(path)
    assert recipe_for(path) == FULL_RECIPE or n == 1
    assert cfg.batch_size * cfg.gradient_accumulation_steps * n == GLOBAL_BATCH, (
        f"batch_size {cfg.batch_size} x gradient_accumulation_steps {cfg.gradient_accumulation_steps}"
        f" x {n} process(es) != {GLOBAL_BATCH}"
    )
    assert cfg.epochs == 1

    for key in ("dataset", "eval_dataset"):
        for block in blocks(cfg.get(key)):
            assert block._component_ == "prefopt.data.preference_dataset", key
            assert block.source in fam.sources, f"{key}.source {block.source}: {fam.setting} goes with {fam.sources}"
            # princeton's lengths; ORPO: TRL's ORPOConfig max_length 1024 (prompt: half)
            lengths = (1024, 512) if "_orpo_" in Path(path).name else (2048, 1800)
            assert (block.get("max_seq_len"), block.get("max_prompt_len")) == lengths, key

    # cosine with 10% warmup, counted for one epoch of the training set
    assert cfg.lr_scheduler._component_ == "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"
    train = blocks(cfg.dataset)
    size = DATASET_SIZES.get((train[0].source, train[0].split)) if len(train) == 1 else None
    if size is not None:
        steps = size // (cfg.batch_size * n) // cfg.gradient_accumulation_steps
        warmup = cfg.lr_scheduler.num_warmup_steps
        assert abs(warmup - 0.1 * steps) <= 1, f"num_warmup_steps {warmup}: 10% of {steps} steps is {0.1 * steps:.1f}"


@config_param
def test_real_config_header_and_paths(path):
    if not is_real(path):
        pytest.skip("tiny/test config: nothing to download")
    recipe_module(path)
    cfg = load(path)
    cmds = header_commands(path)
    downloads = [c for c in cmds if c[1:2] == ["download"]]
    assert downloads, "header needs a `tune download <repo> --output-dir <dir> ...` line"
    out = option(downloads[0], "--output-dir")
    assert out, "the `tune download` line needs --output-dir"
    out = out.rstrip("/")

    run = run_command(path)
    assert run, "header needs a `tune run <recipe> --config <this file>` line"
    assert recipe_for(path) in run, f"the `tune run` line must run {recipe_for(path)}"
    assert option(run, "--config") == path, f"the `tune run` line must use --config {path}"

    assert str(cfg.checkpointer.checkpoint_dir).rstrip("/") == out, "checkpointer.checkpoint_dir != download dir"
    for key in ("path", "merges_file"):
        if key in cfg.tokenizer:
            assert str(cfg.tokenizer[key]).startswith(out + "/"), f"tokenizer.{key} is not under {out}"
    assert cfg.tokenizer.get("max_seq_len", None) is None, "tokenizer.max_seq_len must be null"
    assert cfg.checkpointer.output_dir == cfg.output_dir
    assert str(cfg.output_dir).startswith("/tmp/simpo/")
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["metric_logger"]["log_dir"] == "${output_dir}/logs"
    assert (cfg.device, cfg.dtype) == ("cuda", "bf16")

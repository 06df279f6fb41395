"""The ``prefopt`` command: ``ls``, ``cp``, ``run`` and ``plot``, in the manner of ``tune``.

    prefopt ls
    prefopt cp simpo_lora_single_device .            # a recipe, to edit and own
    prefopt cp tiny/simpo_lora my.yaml               # a config
    prefopt run simpo_lora_single_device --config tiny/simpo_lora loss.beta=5.0
    prefopt run --nproc_per_node 2 simpo_full_distributed --config tiny/simpo_full
    prefopt plot outputs/tiny_simpo_lora -o run.png
    prefopt plot outputs/tiny_simpo_lora/judge -o judge.png   # recipes/judge_generations.py's report
"""

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from prefopt.config import load_config_file

__all__ = ["main", "recipes_dir", "configs_dir", "list_recipes", "resolve_recipe", "resolve_config"]

# which recipe a config is for, from its file name (the first marker found; else the LoRA recipe)
RECIPE_BY_CONFIG_NAME = (
    ("generate_pairs", "generate_preference_pairs"),
    ("simpo_full", "simpo_full_distributed"),
    ("judge", "judge_generations"),
    ("sft_warmup", "full_finetune_single_device"),  # torchtune's own recipe (tune run full_finetune_single_device)
)


def _bundled(name: str, checkout_dir: str) -> Path:
    """The recipes/configs shipped in the wheel (``prefopt/_recipes``, ``prefopt/_configs``), or,
    for a checkout (editable install), the checkout's top-level folder."""
    here = Path(__file__).resolve().parent
    installed = here / name
    if installed.is_dir() and any(installed.iterdir()):
        return installed
    return here.parent / checkout_dir


def recipes_dir() -> Path:
    return _bundled("_recipes", "recipes")


def configs_dir() -> Path:
    return _bundled("_configs", "configs")


def list_recipes() -> Dict[str, List[str]]:
    """``{recipe name: [config names]}``; config names are paths under configs/ without ``.yaml``."""
    recipes = sorted(p.stem for p in recipes_dir().glob("*.py") if not p.name.startswith("_"))
    configs = sorted(
        str(p.relative_to(configs_dir()).with_suffix("")) for p in configs_dir().rglob("*.yaml")
    )
    table: Dict[str, List[str]] = {r: [] for r in recipes}
    for c in configs:
        name = Path(c).name
        owner = next((r for marker, r in RECIPE_BY_CONFIG_NAME if marker in name), "simpo_lora_single_device")
        table.setdefault(owner, []).append(c)
    return table


def resolve_recipe(name: str) -> Path:
    """A recipe name (``simpo_lora_single_device``) or a path to a ``.py`` file.

    Raises:
        FileNotFoundError: naming the known recipes.
    """
    p = Path(name)
    if p.suffix == ".py" and p.is_file():
        return p.resolve()
    candidate = recipes_dir() / f"{p.stem if p.suffix == '.py' else name}.py"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no recipe {name!r}; known: {', '.join(list_recipes())} (or give a path to a .py file)")


def resolve_config(name: str) -> Path:
    """A config name (``tiny/simpo_lora``) or a path to a ``.yaml`` file.

    Raises:
        FileNotFoundError: naming where it looked.
    """
    p = Path(name)
    if p.is_file():
        return p.resolve()
    rel = name[: -len(".yaml")] if name.endswith(".yaml") else name
    rel = rel[len("configs/") :] if rel.startswith("configs/") else rel
    candidate = configs_dir() / f"{rel}.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no config {name!r}: not a file, and not in {configs_dir()} (see `prefopt ls`)")


def _ls(_: argparse.Namespace) -> int:
    table = list_recipes()
    width = max(len(r) for r in table) + 2
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe, configs in table.items():
        for i, c in enumerate(configs or ["-"]):
            print(f"{recipe if i == 0 else '':<{width}}{c}")
    return 0


def _cp(args: argparse.Namespace) -> int:
    try:
        src = resolve_recipe(args.name)
    except FileNotFoundError:
        src = resolve_config(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        print(f"prefopt cp: {dest} exists; use --force to overwrite", file=sys.stderr)
        return 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"Copied {src} to {dest}")
    return 0


def _torchrun_flag_takes_value(flag: str) -> bool:
    """Whether torchrun's parser gives ``flag`` a value (``--standalone`` is a switch: the word
    after it is the recipe, not its value). Unknown flags are assumed to take one."""
    from torch.distributed.run import get_args_parser

    for action in get_args_parser()._actions:
        if flag in action.option_strings:
            return action.nargs != 0
    return True


def _split_run_args(argv: List[str]) -> Tuple[List[str], str, List[str]]:
    """``[torchrun flags...] recipe [recipe args...]`` -> (flags, recipe, recipe args).
    torchrun flags are ``--name value`` or ``--name=value``; the recipe is the first bare word."""
    flags: List[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flags.append(argv[i])
        takes_value = "=" not in argv[i] and _torchrun_flag_takes_value(argv[i])
        if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            flags.append(argv[i + 1])
            i += 1
        i += 1
    if i >= len(argv):
        raise SystemExit("prefopt run: give a recipe name or path (see `prefopt ls`)")
    return flags, argv[i], argv[i + 1 :]


def _run(argv: List[str]) -> int:
    """Resolve names to files, then hand over to `tune run` (torchtune's own launcher code)."""
    flags, recipe, rest = _split_run_args(argv)
    recipe_path = resolve_recipe(recipe)
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        raise SystemExit("prefopt run: --config <name or path> is required")
    i = rest.index("--config") + 1
    rest = list(rest)
    rest[i] = str(resolve_config(rest[i]))
    load_config_file(rest[i])  # a YAML list or bad YAML: one line here, not torchtune's traceback

    # torchtune's `tune run` turns a non-built-in recipe path into a module dot path relative to
    # the cwd, which cannot name an installed file; its built-in branch runs a file by absolute
    # path (runpy.run_path / torchrun <script>). We use torchtune's own Run with that branch.
    from torchtune._cli.run import Run

    parser = argparse.ArgumentParser(prog="tune")
    run = Run(parser.add_subparsers(title="subcommands"))
    args = parser.parse_args(["run", *flags, str(recipe_path), *rest])
    sys.path.append(os.getcwd())
    if flags:
        run._run_distributed(args, is_builtin=True)
    else:
        run._run_single_device(args, is_builtin=True)
    return 0


PANELS = (
    ("loss", ["loss"]),
    ("rewards/accuracies", ["rewards/accuracies"]),
    ("rewards/margins", ["rewards/margins"]),
    ("log-probs", ["logps/chosen", "logps/rejected"]),
)


JUDGE_REPORT = "judge.json"


def judge_report(path: str) -> Optional[Path]:
    """The judge's ``judge.json`` that ``path`` names: the file itself, or one in the folder
    (recipes/judge_generations.py's output_dir); None if there is none."""
    p = Path(path)
    if p.is_file() and p.name == JUDGE_REPORT:
        return p
    if p.is_dir() and (p / JUDGE_REPORT).is_file():
        return p / JUDGE_REPORT
    return None


def plot_judge(report: Path, out: str) -> List[str]:
    """Draw a judge report (recipes/judge_generations.py's judge.json) into a PNG: mean reward,
    response lengths, win rates (overall and per length bucket) and degenerate shares, start
    against trained, per decoding mode; returns the panel titles."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(report).read_text())
    modes = data.get("modes") or {}
    if not modes:
        raise ValueError(f"{report}: no decoding mode in the judge report")
    names = list(modes)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    width = 0.38

    def bars(ax, labels, series, title, ylabel):
        xs = range(len(labels))
        for j, (name, values) in enumerate(series):
            ax.bar([x + (j - (len(series) - 1) / 2) * width for x in xs], [v if v is not None else 0 for v in values],
                   width, label=name)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)

    sides = ("start", "trained")
    bars(axes[0, 0], names, [(s, [modes[m][s]["mean_reward"] for m in names]) for s in sides], "mean reward", "reward")
    labels = [f"{m}\n{k}" for m in names for k in ("mean", "median", "p90")]
    bars(axes[0, 1], labels, [(s, [modes[m][s]["length"][k] for m in names for k in ("mean", "median", "p90")])
                              for s in sides], "response length", "tokens")
    buckets = ["all", "shorter", "similar", "longer"]
    wins = []
    for m in names:
        per = {b["bucket"]: b for b in modes[m]["length_buckets"]}
        wins.append((m, [modes[m]["win_rate"]] + [per[b]["win_rate"] for b in buckets[1:]]))
    counts = [f"{b}\n" + "/".join(str(next(x["pairs"] for x in modes[m]["length_buckets"] if x["bucket"] == b))
                                   for m in names) if b != "all" else "all" for b in buckets]
    bars(axes[1, 0], counts, wins, "win rate of trained over start (by length difference)", "win rate")
    axes[1, 0].axhline(0.5, color="grey", lw=1, ls="--")
    axes[1, 0].set_ylim(0, 1)
    kinds = ["any", "empty", "never_stopped", "repeated_ngram"]
    short = {"any": "any", "empty": "empty", "never_stopped": "no stop", "repeated_ngram": "repeats"}
    bars(axes[1, 1], [f"{m}\n{short[k]}" for m in names for k in kinds],
         [(s, [modes[m][s]["degenerate"][k] for m in names for k in kinds]) for s in sides], "degenerate outputs", "share")
    top = max((modes[m][s]["degenerate"][k] or 0) for m in names for s in sides for k in kinds)
    axes[1, 1].set_ylim(0, max(0.05, top * 1.1))  # a share; all zero draws an empty panel from 0
    titles = ["mean reward", "response length", "win rate", "degenerate outputs"]
    fig.suptitle(f"prefopt judge: {data.get('trained')} vs {data.get('start')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return titles


def plot_run(path: str, out: str) -> List[str]:
    """Plot a run's DiskLogger metrics (train and eval) into a PNG; returns the panel titles.
    A judge's output_dir (or its judge.json) is drawn by :func:`plot_judge` instead.

    Raises:
        FileNotFoundError: if there is no log; ValueError: if it holds no known metric.
    """
    report = judge_report(path)
    if report is not None:
        return plot_judge(report, out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefopt.logs import read_disk_log

    log = read_disk_log(path)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    titles = []
    drawn = 0
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            for prefix, style in (("", "-"), ("eval/", "o--")):
                pts = sorted((s, m[prefix + key]) for s, m in log.items() if prefix + key in m)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{'eval' if prefix else 'train'} {key}", markersize=4)
                    drawn += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        titles.append(title)
    if drawn == 0:
        plt.close(fig)
        raise ValueError(f"{path}: the log has none of the metrics {[k for _, ks in PANELS for k in ks]}")
    fig.suptitle(f"prefopt run: {path}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return titles


def _plot(args: argparse.Namespace) -> int:
    titles = plot_run(args.path, args.output)
    print(f"Wrote {args.output} ({', '.join(titles)})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":  # everything after `run` belongs to torchrun / the recipe
        try:
            return _run(argv[1:])
        except (FileNotFoundError, ValueError) as e:  # an unknown recipe or config, a config that is not a mapping
            print(f"prefopt run: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="prefopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls", help="list recipes and their configs").set_defaults(fn=_ls)
    cp = sub.add_parser("cp", help="copy a recipe or config out to edit")
    cp.add_argument("name", help="recipe name, or config name (e.g. tiny/simpo_lora)")
    cp.add_argument("dest", help="file or directory")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    cp.set_defaults(fn=_cp)
    sub.add_parser("run", help="run a recipe: prefopt run [torchrun flags] RECIPE --config CONFIG [key=value ...]")
    pl = sub.add_parser("plot", help="plot a run's metrics from its DiskLogger files")
    pl.add_argument("path", help="output_dir, its logs/ folder, or one log file; or a judge's output_dir / judge.json")
    pl.add_argument("-o", "--output", default="run.png", help="PNG to write (default run.png)")
    pl.set_defaults(fn=_plot)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"prefopt {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

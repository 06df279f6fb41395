"""Make `tune run recipes/<name>.py` find this repo's ``recipes`` package.

torchtune turns a recipe path into the module ``recipes.<name>`` and appends the current
directory to ``sys.path``. Its wheel also installs a top-level ``recipes`` package into
site-packages, whose ``__init__.py`` exists only to raise an error; being earlier on the path,
it wins and every ``tune run recipes/...`` of a checkout fails.

torchtune itself runs its built-in recipes by file path and never imports ``recipes`` as a
package, so deleting that single ``__init__.py`` is enough: torchtune's folder becomes a
namespace portion, and a regular ``recipes`` package (one with an ``__init__.py``, like ours)
later on ``sys.path`` takes precedence (PEP 420). ``pip install --force-reinstall torchtune``
restores the file; run ``python -m prefopt.tune_compat`` again after that.

    python -m prefopt.tune_compat          # fix, print what was done
    python -m prefopt.tune_compat --check  # exit 1 if the shadowing file is present
"""

import sys
from importlib import metadata
from pathlib import Path
from typing import Optional


def shadowing_init() -> Optional[Path]:
    """Path of torchtune's ``recipes/__init__.py`` if it is installed, else None."""
    try:
        dist = metadata.distribution("torchtune")
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("recipes/__init__.py"))
    return path if path.is_file() else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = shadowing_init()
    if "--check" in argv:
        if path is not None:
            print(f"torchtune's {path} shadows ./recipes: run python -m prefopt.tune_compat")
            return 1
        return 0
    if path is None:
        print("prefopt.tune_compat: nothing to do (torchtune's recipes/__init__.py is absent)")
        return 0
    path.unlink()
    print(f"prefopt.tune_compat: removed {path} so that `tune run recipes/<name>.py` finds ./recipes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

import os

# Keep the suite deterministic and friendly to a 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# `python -m pytest` puts the repository root first on sys.path, where the top-level folders
# (kernels/, model/, runtime/, ...) would shadow installed packages of the same name: transformers
# imports the Hugging Face `kernels` package, and would get ours. loc3r itself imports through its
# installed (editable) mapping, so the root is not needed on the path.
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

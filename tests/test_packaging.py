"""The wheel holds every subpackage (nested ones too), the embedded package and the kernel sources."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["model", "export", "calibration", "kernels", "runtime", "synthetic"]


def test_wheel_contains_every_module_and_the_default_package(tmp_path):
    # Build from a copy so that setuptools' build/ folder never lands in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("loc3r-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"loc3r/{p.relative_to(ROOT / 'loc3r')}" for p in (ROOT / "loc3r").glob("*.py")}
    for folder in FOLDERS:
        for py in (ROOT / folder).rglob("*.py"):
            expected.add(f"loc3r/{folder}/{py.relative_to(ROOT / folder).as_posix()}")
    for f in (ROOT / "loc3r" / "default_model").rglob("*"):
        if f.is_file():
            expected.add(f"loc3r/{f.relative_to(ROOT / 'loc3r').as_posix()}")
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel: {missing[:10]}"
    assert "loc3r/runtime/backends/ort.py" in names
    assert "loc3r/default_model/loc3r.json" in names

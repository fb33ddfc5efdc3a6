"""bench/gpu_check.sh checked here, without a GPU: the bundle it installs (the pins of
requirements-gpu.txt as wheels for CPython 3.12 on x86-64, the saved tokenizers), its
arguments, its stage time limits, and a dry run that installs a bundle and runs every
stage on tiny models, leaving the summary, the records and the archive under its output.

The bundle here holds stand-in wheels of the pinned names and versions (downloading the
real ones needs the network): pip installs them for real, for CPython 3.12."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gpu_bundle import REPO, problems, requirements, save_tokenizers


def stand_in_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any") -> Path:
    """A minimal valid wheel of `name` `version`: one module, its dist-info."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    wheel = folder / f"{stem}-{tag}.whl"
    info = f"{stem}.dist-info"
    files = {
        f"ragbench_stand_in_{name.replace('-', '_')}.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle")
    for name, version in requirements().items():
        stand_in_wheel(folder / "wheels", name, version)
    save_tokenizers(folder / "tokenizers")
    return folder


def gpu_check(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env={k: v for k, v in os.environ.items() if k != "OUT"},
    )  # fmt: skip


def test_the_bundle_pins_the_versions_tested_here():
    pinned_here = requirements(REPO / "requirements.txt")
    for name, version in requirements().items():
        assert importlib.metadata.version(name) == version, name
        assert pinned_here.get(name, version) == version, name


def test_a_bundle_that_cannot_serve_is_told_what_it_lacks(bundle, tmp_path):
    assert problems(bundle) == []
    broken = tmp_path / "broken"
    (broken / "tokenizers").mkdir(parents=True)
    for wheel in (bundle / "wheels").glob("*.whl"):
        if not wheel.name.startswith(("fastapi-", "faiss_cpu-")):
            stand_in_wheel(broken / "wheels", *wheel.name.split("-")[:2])
    stand_in_wheel(broken / "wheels", "faiss_cpu", "1.15.1", "cp311-cp311-manylinux_2_28_x86_64")
    stand_in_wheel(broken / "wheels", "leftpad", "1.0")
    found = "\n".join(problems(broken))
    assert "fastapi==0.165.0: wheels [] in the bundle" in found
    assert "faiss_cpu-1.15.1-cp311-cp311-manylinux_2_28_x86_64.whl does not install" in found
    assert "leftpad: a wheel not in requirements-gpu.txt" in found
    assert "tokenizer minilm is not saved" in found and "tokenizer smollm2" in found
    refused = gpu_check("--dry-run", "--bundle", str(broken), "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "the bundle cannot serve" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_the_carried_size_is_reported(bundle):
    checked = subprocess.run(
        [sys.executable, "bench/gpu_bundle.py", "check", "--bundle", str(bundle)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "(limit 64 MiB)" in checked.stdout and "working tree" in checked.stdout


def test_unknown_stages_and_limits_are_refused():
    unknown = gpu_check("--dry-run", "benchmarks")
    assert unknown.returncode == 2
    assert "unknown stage benchmarks; stages: env, tests, engine, continuous" in unknown.stderr
    bad = gpu_check("--dry-run", "--limit", "engine=soon")
    assert bad.returncode == 2 and "give STAGE=SECONDS" in bad.stderr


def test_a_stage_out_of_time_is_stopped_and_the_next_one_runs(bundle, tmp_path):
    out = tmp_path / "out"
    run = gpu_check("--dry-run", "--bundle", str(bundle), "--out", str(out),
                    "--limit", "env=1", "env", "tests")  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    summary = (out / "summary.txt").read_text()
    assert "stage env: timed out after 1 s" in summary and "--- env (timed out" in summary
    assert "stage tests: ok" in summary and "skipped" in summary
    assert "stage engine" not in summary


def test_a_dry_run_installs_the_bundle_and_runs_every_stage(bundle, tmp_path):
    out = tmp_path / "out"
    run = gpu_check("--dry-run", "--bundle", str(bundle), "--out", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for stage in ("env", "tests", "engine", "continuous"):
        assert f"stage {stage}: ok" in summary
    verdicts = [line for line in summary.splitlines() if "[target " in line]
    assert [line.split(":")[0] for line in verdicts] == ["engine"] * 2 + ["continuous"] * 3
    assert sorted(p.name.split("-2")[0] for p in (out / "records").iterdir()) == [
        "continuous", "engine-gpu",
    ]  # fmt: skip
    (engine,) = (out / "records").glob("engine-gpu-*.json")
    environment = json.loads(engine.read_text())["environment"]
    assert environment["weights"] == "random" and environment["decode_step"] == "static"
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        names = set(archive.getnames())
        install = archive.extractfile("gpu-check/logs/install.log").read().decode()
    assert {"gpu-check/pytest-cuda.xml", "gpu-check/summary.txt"} <= names
    assert {f"gpu-check/logs/{s}.log" for s in ("env", "tests", "engine", "continuous")} <= names
    for name, version in requirements().items():
        assert f"{name.replace('-', '_')}-{version}.dist-info" in install
    assert len(list(out.rglob("*"))) <= 8  # what a GPU machine hands back

"""What a point's figures depend on, recorded in its meta.json: the run tag, the resolved
config, the machine (CPU and GPU model), the software, the checkout, the SLURM job."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rag.harness.files import now
from rag.loadgen.files import machine

PACKAGES = (
    "torch", "transformers", "faiss-cpu", "fastapi", "uvicorn", "aiohttp", "numpy",
    "hydra-core", "submitit", "hydra-submitit-launcher",
)  # fmt: skip


def gpu_models() -> list[str]:
    """The GPUs nvidia-smi lists for this process ([] without one)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def slurm_job_id() -> str:
    """This job's id as squeue and sacct show it (`<array>_<task>` for an array task), also
    inside slurm/bench.sbatch (which clears SLURM_* for submitit)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("RAGBENCH_SLURM_JOB_ID", "")


def point_environment(cfg: DictConfig, overrides: list[str], started: str) -> dict[str, Any]:
    env = machine(PACKAGES)  # host, CPU model, load, packages, git commit and dirty flag
    env.pop("date", None)
    return {
        "tag": cfg.tag,
        "overrides": overrides,
        "start_time": started,
        "end_time": now(),
        **env,
        "gpus": gpu_models(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "slurm_job_id": slurm_job_id(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }

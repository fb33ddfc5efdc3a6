"""The torch line: light processes (load generator, cluster, harness) never import torch.

Each package is imported in a fresh interpreter, since this test process has torch loaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "faiss")

# package -> the rag packages it may pull in besides itself
TORCH_FREE = {
    "rag.loadgen": {"rag.storage"},  # its run files are written atomically
    "rag.clock": set(),  # what the batchers and the replica pool read time from
    "rag.cluster": {"rag.storage"},
    # balancer, autoscaler, launchers
    "rag.cluster.scaling": {
        "rag.clock",
        "rag.cluster",
        "rag.config",
        "rag.loadgen",
        "rag.storage",
        "rag.web",
    },
    "rag.web": set(),  # the HTTP guards, shared by the server and the balancer
    "rag.storage": set(),
    "rag.harness.point": {"rag.config", "rag.loadgen", "rag.cluster", "rag.harness", "rag.storage"},
    "rag.harness.report": {"rag.harness", "rag.storage"},
    "hydra_plugins.ragbench_launcher.slurm_sweep": {
        "hydra_plugins.ragbench_launcher",
        "rag.cluster",
        "rag.config",
        "rag.loadgen",
        "rag.harness",
        "rag.storage",
    },
    # The port opens before torch loads; the config schema holds the load settings; the
    # admin call checks the balancer's token (rag.cluster.admin).
    "rag.service.app": {
        "rag.clock",
        "rag.cluster",
        "rag.config",
        "rag.loadgen",
        "rag.service",
        "rag.storage",
        "rag.web",
    },
}


def imported_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(result.stdout.split())


@pytest.mark.parametrize("package", sorted(TORCH_FREE))
def test_package_imports_no_model_code(package: str):
    modules = imported_after(f"import {package}")
    assert not {m for m in modules if m.split(".")[0] in HEAVY}
    allowed = {package, *TORCH_FREE[package]}
    own = {m for m in modules if m.startswith(("rag.", "hydra_plugins.ragbench"))}
    strays = {m for m in own if not any(m == a or m.startswith(a + ".") for a in allowed)}
    assert not strays, f"{package} pulls in {sorted(strays)}"


def test_a_simulated_pipeline_loads_no_model_code(tmp_path):
    """model=simulated replicas stay light: several fit on a small machine."""
    modules = imported_after(
        "from rag.config import compose\n"
        "from rag.service.pipeline import RAGPipeline\n"
        f"RAGPipeline.from_config(compose(['model=simulated', 'corpus.cache_dir={tmp_path}']))"
    )
    assert not {m for m in modules if m.split(".")[0] in HEAVY[:2]}


@pytest.mark.parametrize("module", ["rag.config", "rag.service.server", "rag.service.core"])
def test_a_server_imports_no_http_client(module: str):
    """A server's two processes (and every CLI, which reads the config) start often, in the
    tests above all: they do not pay for the load generator's HTTP client they never use."""
    assert "aiohttp" not in imported_after(f"import {module}")

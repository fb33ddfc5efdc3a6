"""The sweep's config tree: every preset composes, and a typo is an error, not a default."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rag.config import CONF_DIR, ServerKind, batch_limits, point_name, register_configs

# Hydra imports its plugins (ours among them) on first use.
register_configs()


def sweep_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("variant", presets("variant"))
@pytest.mark.parametrize("model", presets("model"))
def test_every_variant_and_model_composes(variant: str, model: str):
    cfg = sweep_config(f"variant={variant}", f"model={model}")
    assert cfg.variant.name == variant
    assert cfg.model.name == model


KINDS = {
    "base": (ServerKind.one_at_a_time, (1, 0.0)),
    "batched": (ServerKind.batcher, (20, 10.0)),
    "continuous": (ServerKind.continuous, (64, 0.0)),
    "scaling": (ServerKind.balancer, (20, 10.0)),
    "external": (ServerKind.external, (20, 10.0)),
}


def test_each_variant_names_its_kind_and_runs_its_batch_limits():
    assert sorted(KINDS) == presets("variant")
    for variant, (kind, limits) in KINDS.items():
        cfg = sweep_config(f"variant={variant}")
        assert (cfg.variant.kind, batch_limits(cfg.variant)) == (kind, limits)
    # A sweep's batching axis leaves one-at-a-time alone.
    base = sweep_config("variant=base", "variant.max_batch_size=20", "variant.max_wait_ms=10")
    assert batch_limits(base.variant) == (1, 0.0)


@pytest.mark.parametrize("corpus", presets("corpus"))
def test_every_corpus_composes(corpus: str):
    assert sweep_config(f"corpus={corpus}").corpus.name == corpus


@pytest.mark.parametrize("experiment", presets("experiment"))
def test_every_experiment_composes_and_names_its_sweep(experiment: str):
    cfg = sweep_config(f"experiment={experiment}")
    params = cfg.hydra.sweeper.params
    assert params, "an experiment preset sweeps something"
    assert cfg.tag == experiment
    for key, values in params.items():
        for value in str(values).split(","):  # each value composes on its own
            sweep_config(f"experiment={experiment}", f"{key}={value}")


def test_the_study_preset_has_the_original_design():
    cfg = sweep_config("experiment=study")
    params = cfg.hydra.sweeper.params
    assert set(params["variant"].split(",")) == {"base", "batched", "scaling"}
    assert [float(r) for r in params["rps"].split(",")] == [5, 10, 20, 50, 100]
    assert set(params["timing_mode"].split(",")) == {"ideal", "poisson"}
    assert params["variant.max_batch_size"] == "10,20"
    assert cfg.num_requests == 1000 and cfg.duration == 0


def test_top_level_axes_reach_the_load_and_the_model():
    cfg = sweep_config("rps=7", "timing_mode=ideal", "num_requests=50", "seed=3", "tag=t")
    load = OmegaConf.to_container(cfg.load, resolve=True)
    assert (load["rps"], load["timing_mode"], load["num_requests"]) == (7.0, "ideal", 50)
    assert (load["seed"], load["tag"], cfg.model.seed) == (3, "t", 3)


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launchers_compose(launcher: str):
    cfg = sweep_config(f"hydra/launcher={launcher}")
    target = cfg.hydra.launcher._target_
    expected = "SlurmSweepLauncher" if launcher == "slurm" else "BasicLauncher"
    assert target.endswith(expected)


def test_slurm_launcher_asks_for_an_a6000_and_takes_site_settings():
    cfg = sweep_config("hydra/launcher=slurm", "site.partition=gpu", "site.setup=[module load x]")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["gres"] == "gpu:a6000:1"
    # CPUs and memory left to the launcher: an A6000 job's, or less where the nodes have less
    assert launcher["cpus_per_task"] is None and launcher["mem_gb"] is None
    assert (launcher["default_cpus_per_task"], launcher["default_mem_gb"]) == (4, 32)
    assert launcher["partition"] == "gpu"
    assert launcher["setup"] == ["module load x"]


def test_scaling_replica_jobs_go_where_the_site_says_unless_told_otherwise():
    site = ("variant=scaling", "site.partition=gpu", "site.qos=short", "site.setup=[module load x]")
    replica_jobs = sweep_config(*site).variant.scaling.slurm
    assert (replica_jobs.partition, replica_jobs.qos, replica_jobs.account) == (
        "gpu",
        "short",
        None,
    )
    assert list(replica_jobs.setup) == ["module load x"]
    assert (
        sweep_config(*site, "variant.scaling.slurm.partition=a6000").variant.scaling.slurm.partition
        == "a6000"
    )


def test_search_and_slo_compose():
    cfg = sweep_config("+search=max_rps", "slo.p99_s=2", "variant=base")
    assert cfg.search.name == "max_rps"
    assert cfg.slo.p99_s == 2.0
    assert sweep_config().search is None


@pytest.mark.parametrize(
    "override",
    [
        "rps=fast",
        "rsp=5",
        "load.rpss=5",
        "variant=nonesuch",
        "variant.kind=batches",
        "slo.p99=2",
        "num_requests=1.5",
    ],
)
def test_a_typo_is_an_error(override: str):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        sweep_config(override)


def test_point_folders_are_named_by_their_overrides():
    a = point_name("rps=5,variant=base")
    assert a.startswith("variant-base_rps-5-") and a == point_name("rps=5,variant=base")
    assert a != point_name("rps=5,variant=batched")
    with_path = point_name("corpus.source=/a/long/path/docs.jsonl,rps=5," + "x=" + "y" * 200)
    assert with_path.startswith("rps-5-")  # paths and long values only in the hash
    assert with_path != point_name("corpus.source=/another/path/docs.jsonl,rps=5")
    assert not set("=,/ '\"") & set(with_path + point_name("a=x y,b='q'"))
    assert point_name("").startswith("defaults-")
    assert point_name("a=1,model=tiny,rps=2,variant=base").startswith(
        "variant-base_rps-2_model-tiny_a-1-"
    )

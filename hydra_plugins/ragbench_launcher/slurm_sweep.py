"""The SLURM launcher of the sweep: hydra-submitit-launcher's, with a deadline.

The stock launcher waits on each job's result without limit, and a job that dies without
writing one (cancelled, killed, out of time) either aborts the whole sweep or, where
`sacct` cannot see it, hangs it forever.  This one polls the jobs' states, gives up at a
deadline (cancelling what is left), turns every job that ended without a result into the
point's `failure.json`, and lets the sweep finish.  It reports progress as it waits.

A Hydra plugin must live in the `hydra_plugins` package.  No `from __future__ import
annotations` here: Hydra loads plugin modules outside sys.modules, where dataclasses
cannot resolve string annotations.
"""

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from rag.config import register_configs
from rag.harness.files import FAILURE, is_finished, read_failure, tail, write_failure

log = logging.getLogger(__name__)


@dataclass
class SlurmSweepConf(SlurmQueueConf):
    """The stock SLURM launcher's settings, plus how long and how often to wait."""

    _target_: str = "hydra_plugins.ragbench_launcher.slurm_sweep.SlurmSweepLauncher"
    wait_timeout_min: float = 0.0  # 0 = each wave of the array gets timeout_min, plus 60 min
    poll_s: float = 15.0  # seconds between job state checks (sacct)
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load)


# Hydra imports every hydra_plugins module when it starts, and a SLURM job imports this one
# to unpickle its launcher: both find the schema and the point-folder resolver registered.
register_configs()
ConfigStore.instance().store(
    group="hydra/launcher", name="slurm_sweep", node=SlurmSweepConf, provider="ragbench"
)


def _state(job: Any) -> str:
    """The job's SLURM state; UNKNOWN until sacct has seen it."""
    state = job.state
    return "submitted" if state == "UNKNOWN" else state


class SlurmSweepLauncher(SlurmLauncher):
    def __init__(self, wait_timeout_min: float = 0.0, poll_s: float = 15.0, **params: Any):
        super().__init__(**params)
        self.wait_timeout_min = wait_timeout_min
        self.poll_s = poll_s

    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params.pop("submitit_folder"),
            cluster="slurm",
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{key if key in shared else f"slurm_{key}": v for key, v in params.items()}
        )
        return executor

    def _point_folder(self, overrides: list[str]) -> Path:
        assert self.hydra_context is not None and self.config is not None
        job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        return Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"SLURM sweep of {len(job_overrides)} points, output dir {sweep_dir}")
        params = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}"))
        folders = [self._point_folder(list(o)) for o in job_overrides]
        for folder in folders:  # a failure from an earlier try is not this one's
            (folder / FAILURE).unlink(missing_ok=True)
        state = Singleton.get_state()
        columns = zip(*[(*p, state) for p in params], strict=True)
        jobs = self._executor().map_array(self, *columns)
        return self._collect(jobs, folders, [list(o) for o in job_overrides])

    def _deadline_s(self, n_jobs: int) -> float:
        if self.wait_timeout_min > 0:
            return self.wait_timeout_min * 60
        waves = math.ceil(n_jobs / max(1, int(self.params.get("array_parallelism", 256))))
        return (waves * float(self.params["timeout_min"]) + 60) * 60

    def _collect(self, jobs: list, folders: list[Path], overrides: list[list[str]]) -> list:
        """Every job's JobReturn, in order; a job without a result becomes a failure."""
        deadline = time.monotonic() + self._deadline_s(len(jobs))
        results: dict[int, JobReturn] = {}
        last_report = ""
        while len(results) < len(jobs) and time.monotonic() < deadline:
            pending = [i for i in range(len(jobs)) if i not in results]
            jobs[pending[0]].done(force_check=True)  # one sacct call refreshes every job
            for i in pending:
                if jobs[i].done():
                    results[i] = self._result(jobs[i], folders[i], overrides[i])
            states = Counter(_state(jobs[i]) for i in range(len(jobs)) if i not in results)
            failed = sum(1 for r in results.values() if r.return_value.get("status") == "failed")
            report = f"{len(results)}/{len(jobs)} points finished ({failed} failed)" + "".join(
                f", {n} {s.lower()}" for s, n in sorted(states.items())
            )
            if report != last_report:
                log.info(f"SLURM sweep: {report}")
                last_report = report
            if len(results) < len(jobs):
                time.sleep(self.poll_s)
        for i in (i for i in range(len(jobs)) if i not in results):
            jobs[i].cancel(check=False)
            minutes = self._deadline_s(len(jobs)) / 60
            results[i] = self._failed(
                jobs[i], folders[i], overrides[i], f"no result within {minutes:g} min; cancelled"
            )
        return [results[i] for i in range(len(jobs))]

    def _result(self, job: Any, folder: Path, overrides: list[str]) -> JobReturn:
        try:
            ret = job.results()[0]
        except Exception as exc:  # the job ended without a result: cancelled, killed, ...
            return self._failed(job, folder, overrides, f"SLURM job {job.state}: {exc}")
        if ret.status == JobStatus.FAILED:
            return self._failed(job, folder, overrides, f"job raised {ret._return_value!r}")
        return ret

    def _failed(self, job: Any, folder: Path, overrides: list[str], reason: str) -> JobReturn:
        if not is_finished(folder) and read_failure(folder) is None:
            logs = tail(job.stdout()) + "\n" + tail(job.stderr())
            write_failure(folder, reason, logs.strip(), slurm_job_id=job.job_id)
        log.warning(f"point {folder.name}: {reason}")
        ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        ret.return_value = {"status": "failed", "reason": reason, "folder": str(folder)}
        return ret

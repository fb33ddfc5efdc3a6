"""The SLURM launcher of the sweep: hydra-submitit-launcher's, with a deadline, jobs that
cannot start failed at once, and default resources that fit the partition.

The stock launcher waits on each job's result without limit, and a job that dies without
writing one (cancelled, killed, out of time) either aborts the whole sweep or, where
`sacct` cannot see it, hangs it forever; a job that can never start (it asks for more than
any node has) waits just as silently.  This one reads the jobs' states (one reader,
`rag.cluster.slurm_state`, shared with the scaling variant's replica jobs), fails a job
pending for a reason that waiting cannot clear at once (cancelled, its point's
`failure.json` quoting the reason and what was asked against what the partition has),
shows the reasons it waits for in its progress line, gives up at a deadline (cancelling
what is left), turns every job that ended without a result into the point's
`failure.json`, and lets the sweep finish.  Unless told otherwise (`cpus_per_task`,
`mem_gb`), a job asks for an A6000 job's CPUs and memory, or what the partition's largest
node has where that is less (a laptop's one-node cluster), and says so.

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

from rag.cluster.slurm_state import JobState, Partition, read_partition, read_states
from rag.config import register_configs
from rag.harness.files import FAILURE, is_finished, read_failure, tail, write_failure

log = logging.getLogger(__name__)


@dataclass
class SlurmSweepConf(SlurmQueueConf):
    """The stock SLURM launcher's settings, plus how long and how often to wait and what a
    job asks for when its CPUs and memory are not given."""

    _target_: str = "hydra_plugins.ragbench_launcher.slurm_sweep.SlurmSweepLauncher"
    wait_timeout_min: float = 0.0  # 0 = each wave of the array gets timeout_min, plus 60 min
    poll_s: float = 15.0  # most seconds between job state checks (the first ones come sooner)
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load)
    # What cpus_per_task and mem_gb null ask for: these, or the largest node's if it has less.
    default_cpus_per_task: int = 4
    default_mem_gb: int = 32


# Hydra imports every hydra_plugins module when it starts, and a SLURM job imports this one
# to unpickle its launcher: both find the schema and the point-folder resolver registered.
register_configs()
ConfigStore.instance().store(
    group="hydra/launcher", name="slurm_sweep", node=SlurmSweepConf, provider="ragbench"
)


class SlurmSweepLauncher(SlurmLauncher):
    def __init__(
        self,
        wait_timeout_min: float = 0.0,
        poll_s: float = 15.0,
        default_cpus_per_task: int = 4,
        default_mem_gb: int = 32,
        **params: Any,
    ):
        super().__init__(**params)
        self.wait_timeout_min = wait_timeout_min
        self.poll_s = poll_s
        self.defaults = {"cpus_per_task": default_cpus_per_task, "mem_gb": default_mem_gb}
        self.partition: Partition | None = None
        self.asked: dict[str, Any] = {}

    def _fit_resources(self) -> None:
        """Decide cpus_per_task and mem_gb: as given, or the default lowered to what the
        partition's largest node has (with a warning); keep what is asked, to quote it."""
        partition = self.partition = read_partition(self.params.get("partition"))
        largest = (
            {"cpus_per_task": partition.max_cpus, "mem_gb": partition.max_memory_gb}
            if partition
            else {}
        )
        for key, default in self.defaults.items():
            if self.params.get(key) is None:
                self.params[key] = max(1, min(default, largest.get(key, default)))
                if self.params[key] < default:
                    log.warning(
                        f"hydra.launcher.{key}: {default} by default, but {partition.describe()}:"
                        f" asking for {self.params[key]} (set hydra.launcher.{key} to choose)"
                    )
        self.asked = {
            "partition": partition.name if partition else self.params.get("partition"),
            **{k: self.params.get(k) for k in ("nodes", "cpus_per_task", "mem_gb", "gres")},
            "timeout_min": self.params.get("timeout_min"),
        }

    def _asked_against_offered(self) -> str:
        a = self.asked
        gres = f", gres {a['gres']}" if a["gres"] else ""
        asked = (f"asked for {a['cpus_per_task']} CPUs, {a['mem_gb']} GB{gres} and"
                 f" {a['timeout_min']} min on {a['nodes']} node(s)")  # fmt: skip
        if self.partition is None:
            return f"{asked}; the partition's nodes could not be read (sinfo)"
        return f"{asked}; {self.partition.describe()}"

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
        from submitit.core.utils import FailedJobError, FailedSubmissionError

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
        overrides = [list(o) for o in job_overrides]
        for folder in folders:  # a failure from an earlier try is not this one's
            (folder / FAILURE).unlink(missing_ok=True)
        self._fit_resources()
        state = Singleton.get_state()
        columns = zip(*[(*p, state) for p in params], strict=True)
        try:
            jobs = self._executor().map_array(self, *columns)
        except (FailedJobError, FailedSubmissionError) as exc:  # sbatch said no
            said = " ".join(str(exc).split())  # sbatch's lines, as one
            reason = f"sbatch refused the jobs: {said}; {self._asked_against_offered()}"
            return [
                self._failed(None, f, o, reason) for f, o in zip(folders, overrides, strict=True)
            ]
        return self._collect(jobs, folders, overrides)

    def _deadline_s(self, n_jobs: int) -> float:
        if self.wait_timeout_min > 0:
            return self.wait_timeout_min * 60
        waves = math.ceil(n_jobs / max(1, int(self.params.get("array_parallelism", 256))))
        return (waves * float(self.params["timeout_min"]) + 60) * 60

    def _collect(self, jobs: list, folders: list[Path], overrides: list[list[str]]) -> list:
        """Every job's JobReturn, in order; a job without a result becomes a failure."""
        started = time.monotonic()
        deadline = started + self._deadline_s(len(jobs))
        results: dict[int, JobReturn] = {}
        states: dict[str, JobState] = {}
        last_report = ""
        while len(results) < len(jobs) and time.monotonic() < deadline:
            pending = [i for i in range(len(jobs)) if i not in results]
            states.update(read_states([jobs[i] for i in pending]))
            for i in pending:
                job, state = jobs[i], states.get(jobs[i].job_id)
                if job.paths.result_pickle.exists() or (state and state.ended):
                    results[i] = self._result(job, folders[i], overrides[i], state)
                elif state and state.never_starts:
                    job.cancel(check=False)
                    why = f"{state.reason}; cancelled; {self._asked_against_offered()}"
                    reason = f"SLURM job {job.job_id} cannot start: {why}"
                    results[i] = self._failed(job, folders[i], overrides[i], reason)
            report = self._progress(jobs, results, states)
            if report != last_report:
                log.info(f"SLURM sweep: {report}")
                last_report = report
            if len(results) < len(jobs):
                time.sleep(min(self.poll_s, max(1.0, (time.monotonic() - started) / 2)))
        for i in (i for i in range(len(jobs)) if i not in results):
            jobs[i].cancel(check=False)
            minutes = self._deadline_s(len(jobs)) / 60
            last = states.get(jobs[i].job_id)
            seen = f" (last {last.describe()})" if last else ""
            reason = f"no result within {minutes:g} min{seen}; cancelled"
            results[i] = self._failed(jobs[i], folders[i], overrides[i], reason)
        return [results[i] for i in range(len(jobs))]

    @staticmethod
    def _progress(jobs: list, results: dict[int, JobReturn], states: dict[str, JobState]) -> str:
        """'1/3 points finished (0 failed), 1 pending (Resources), 1 running'."""
        waiting = Counter(
            states[job.job_id].describe() if job.job_id in states else "submitted"
            for i, job in enumerate(jobs)
            if i not in results
        )
        failed = sum(1 for r in results.values() if r.return_value.get("status") == "failed")
        return f"{len(results)}/{len(jobs)} points finished ({failed} failed)" + "".join(
            f", {n} {what}" for what, n in sorted(waiting.items())
        )

    def _result(
        self, job: Any, folder: Path, overrides: list[str], state: JobState | None
    ) -> JobReturn:
        ended = f"SLURM job {job.job_id} {state.state if state else 'ended'}"
        if state and state.state == "ENDED" and not job.paths.result_pickle.exists():
            # no accounting: submitit cannot tell that it ended, and would wait on it forever
            return self._failed(job, folder, overrides, f"{ended} without a result")
        try:
            ret = job.results()[0]
        except Exception as exc:  # the job ended without a result: cancelled, killed, ...
            return self._failed(job, folder, overrides, f"{ended}: {exc}")
        if ret.status == JobStatus.FAILED:
            return self._failed(job, folder, overrides, f"job raised {ret._return_value!r}")
        return ret

    def _failed(self, job: Any, folder: Path, overrides: list[str], reason: str) -> JobReturn:
        """The point's failure.json (unless the job wrote its own) and a failed JobReturn;
        `job` is None when sbatch refused it."""
        if not is_finished(folder) and read_failure(folder) is None:
            logs = (tail(job.stdout()) + "\n" + tail(job.stderr())).strip() if job else ""
            job_id = job.job_id if job else None
            write_failure(folder, reason, logs, slurm_job_id=job_id, asked=self.asked)
        log.warning(f"point {folder.name}: {reason}")
        ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        ret.return_value = {"status": "failed", "reason": reason, "folder": str(folder)}
        return ret

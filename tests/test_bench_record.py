"""bench/record.py's account of the machine: a run whose machine was robbed by its host or
changed speed names itself in its record and its last line; a quiet one does not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import record
from record import BenchRecord, noise, processor_times, processor_use


def environment(stolen: float, before: float, after: float) -> dict:
    times = {"busy": 10.0, "idle": 10.0 - stolen, "stolen": stolen}
    use = processor_use(dict.fromkeys(times, 0.0), times)
    return {"processor_s": use, "machine_gflops_before": before, "machine_gflops_after": after}


def test_processor_use_splits_the_machines_time_by_kind() -> None:
    before = processor_times()
    after = {kind: seconds + 1.0 for kind, seconds in before.items()}
    assert processor_use(before, after) == {
        "busy": 1.0, "idle": 1.0, "stolen": 1.0, "stolen_share": pytest.approx(1 / 3, abs=1e-4)
    }  # fmt: skip
    assert min(before.values()) >= 0 and before["busy"] + before["idle"] > 0


def test_a_quiet_run_is_not_noisy_and_a_robbed_or_slowed_one_says_why() -> None:
    assert noise(environment(stolen=0.1, before=430.0, after=445.0)) == ""
    assert noise(environment(stolen=1.0, before=430.0, after=430.0)) == (
        "the host took 5.0% of the processors"
    )
    slowed = noise(environment(stolen=0.0, before=900.0, after=430.0))
    assert slowed == "the machine's matmul speed went from 900 to 430 GFLOP/s"


def test_a_record_carries_the_machines_speed_and_time(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(record, "RECORD_DIR", tmp_path)
    speeds = iter([900.0, 430.0])
    monkeypatch.setattr(record, "machine_gflops", lambda: next(speeds))
    # A host that steals nothing: the real one may steal, which this test is not about.
    quiet = {"busy": 5.0, "idle": 5.0, "stolen": 0.0}
    times = iter([dict.fromkeys(quiet, 0.0), quiet])
    monkeypatch.setattr(record, "processor_times", lambda: next(times))
    bench = BenchRecord("probe", {})
    bench.target("ratio", 1.0, at_least=0.9)
    assert bench.finish() == 0
    (path,) = tmp_path.glob("probe-*.json")
    env = json.loads(path.read_text())["environment"]
    assert (env["machine_gflops_before"], env["machine_gflops_after"]) == (900.0, 430.0)
    assert env["processor_s"] == {"busy": 5.0, "idle": 5.0, "stolen": 0.0, "stolen_share": 0.0}
    assert "900 to 430" in env["noisy"]
    assert "all targets met; NOISY: the machine's matmul speed" in capsys.readouterr().out


def test_the_machines_speed_is_measured_on_all_its_processors() -> None:
    import torch

    threads = torch.get_num_threads()
    assert record.machine_gflops() > 0
    assert torch.get_num_threads() == threads  # the caller's setting is left as it was

"""The sweep end to end on loopback with tiny models: the local launcher runs every point,
the files and the aggregated results appear, a second run resumes, a failing point leaves
failure.json while the sweep goes on, and no process outlives its point."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from sweep_helpers import SMALL, VARIANTS, leftovers, points, sweep

from rag.harness.report import aggregate
from rag.storage import write_csv


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, cache_overrides: list[str]) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    sweep(root, f"variant={','.join(VARIANTS)}", "rps=4,8", "tag=t1", *SMALL, *cache_overrides)
    return root


def test_every_point_writes_its_files(swept: Path):
    folders = points(swept, "t1")
    assert len(folders) == 2 * len(VARIANTS)
    for folder in folders:
        summary = pd.read_csv(folder / "summary.csv")
        requests = pd.read_csv(folder / "requests.csv")
        meta = json.loads((folder / "meta.json").read_text())
        assert len(summary) == 1 and len(requests) == 12
        row = summary.iloc[0]
        assert row["ok"] == 12
        # Whether 12 sends kept their times says how busy the machine was, not whether the
        # sweep works (bench_loadgen measures that); a point that did not says why.
        assert row["schedule_kept"] or row["schedule_kept_reason"]
        assert row["point"] == folder.name and row["tag"] == "t1"
        for frame in (summary, requests):  # the run tag and the varying keys on every row
            assert {"tag", "variant", "offered_rps", "timing_mode", "rps"} <= set(frame)
            assert (frame["tag"] == "t1").all() and (frame["variant"] == row["variant"]).all()
        assert meta["config"]["variant"]["name"] == row["variant"]
        assert meta["git_commit"] and meta["cpu_model"] and meta["start_time"] < meta["end_time"]
        assert meta["server_controlled"] is True
        assert (folder / "server.log").exists()
        assert not list(folder.glob(".*.tmp")), "a staging file was left behind"
        if row["variant"] == "scaling":
            assert (folder / "autoscaler.csv").exists()


def test_no_process_outlives_the_sweep(swept: Path):
    assert leftovers(swept) == []


def test_aggregate_writes_the_table_every_plot_and_the_report(swept: Path):
    out = swept / "test-results"
    table = aggregate(swept / "outputs", out)
    assert len(table) == 2 * len(VARIANTS) and (table["outcome"] == "ok").all()
    assert {"schedule_kept", "ok_fraction", "stage_generate_ms", "hostname"} <= set(table)
    written = pd.read_csv(out / "summary.csv")
    assert list(written["point"]) == list(table["point"])
    expected = {"latency", "throughput", "latency_cdf", "stages", "batch_sizes"}
    if "scaling" in VARIANTS:
        expected.add("replicas")
    assert expected <= {p.stem for p in out.glob("*.png")}
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(list(out.glob("*.png")))
    assert 'src="http' not in report  # self-contained


def test_running_again_skips_finished_points(swept: Path, cache_overrides: list[str]):
    before = {p: (p / "summary.csv").stat().st_mtime_ns for p in points(swept, "t1")}
    result = sweep(swept, f"variant={','.join(VARIANTS)}", "rps=4,8", "tag=t1", *SMALL,
                   *cache_overrides)  # fmt: skip
    assert result.stderr.count("already finished, skipped") + result.stdout.count(
        "already finished, skipped"
    ) == len(before)
    assert {p: (p / "summary.csv").stat().st_mtime_ns for p in points(swept, "t1")} == before


def overrides(point: Path) -> str:
    """The overrides a point ran with, as Hydra kept them."""
    return (point / ".hydra" / "overrides.yaml").read_text()


def test_a_point_whose_server_fails_leaves_failure_json_and_the_sweep_goes_on(
    tmp_path: Path, cache_overrides: list[str]
):
    sweep(tmp_path, "variant=base", "model.generator=tiny:nonesuch,tiny:llama", "tag=t2", *SMALL,
          *cache_overrides)  # fmt: skip
    (bad,) = [p for p in points(tmp_path, "t2") if "nonesuch" in overrides(p)]
    (good,) = [p for p in points(tmp_path, "t2") if "nonesuch" not in overrides(p)]
    failure = json.loads((bad / "failure.json").read_text())
    assert "ServerFailed" in failure["reason"] and "nonesuch" in failure["log_tail"]
    assert not (bad / "summary.csv").exists()
    assert (good / "summary.csv").exists() and not (good / "failure.json").exists()
    table = aggregate(tmp_path / "outputs", tmp_path / "results")
    assert sorted(table["outcome"]) == ["failed", "ok"]
    assert "nonesuch" in (tmp_path / "results" / "report.html").read_text()
    assert leftovers(tmp_path) == []


def test_external_variant_measures_a_server_it_did_not_start_in_either_loop(
    tmp_path: Path, start_server
):
    server = start_server("variant=batched")
    sweep(tmp_path, "variant=external", f"target={server.url}", "rps=5", "tag=t3", *SMALL)
    (folder,) = points(tmp_path, "t3")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["server_controlled"] is False and meta["target"] == server.url
    summary = pd.read_csv(folder / "summary.csv").iloc[0]
    assert summary["ok"] == 12 and summary["variant"] == "external"
    assert not (folder / "server.log").exists()
    # A closed-loop point: its warm-up is the open loop's, its load three users.
    closed = [o for o in SMALL if not o.startswith("timing_mode=")]
    sweep(tmp_path, "variant=external", f"target={server.url}", "timing_mode=concurrency",
          "load.concurrency=3", "tag=t5", *closed)  # fmt: skip
    (folder,) = points(tmp_path, "t5")
    summary = pd.read_csv(folder / "summary.csv").iloc[0]
    assert summary["ok"] == 12 and summary["loop"] == "closed" and summary["concurrency"] == 3
    table = aggregate(tmp_path / "outputs", tmp_path / "results", ["t5"])
    assert table["repeats"].tolist() == [1] and (tmp_path / "results" / "latency.png").exists()
    assert "closed loop" in (tmp_path / "results" / "report.html").read_text()


def test_max_rps_search(tmp_path: Path, cache_overrides: list[str]):
    sweep(tmp_path, "+search=max_rps", "slo.p99_s=1", "variant=batched", "tag=t4",
          "search.start_rps=4", "search.trial_duration_s=2", "search.min_trial_requests=6",
          "search.max_trials=3", *SMALL, *cache_overrides)  # fmt: skip
    (folder,) = points(tmp_path, "t4")
    trials = pd.read_csv(folder / "trials.csv")
    summary = pd.read_csv(folder / "summary.csv").iloc[0]
    assert len(trials) == summary["trials"] <= 3
    assert trials["offered_rps"].iloc[0] == 4.0
    met = trials.loc[trials["meets_slo"], "offered_rps"]  # none on a machine busy enough
    assert summary["max_rps"] == (met.max() if len(met) else 0.0)
    requests = pd.read_csv(folder / "requests.csv")
    assert sorted(requests["trial"].unique()) == list(range(len(trials)))
    aggregate(tmp_path / "outputs", tmp_path / "results")
    assert (tmp_path / "results" / "max_rps.png").exists()


def test_an_external_openai_server_swept_with_repeats_has_token_plots_and_goodput(
    tmp_path: Path, start_server
):
    server = start_server("variant=continuous")
    sweep(tmp_path, "variant=external", "api=openai-chat", f"target={server.url}", "rps=5,10",
          "seed=0,1", "load.max_tokens=3", "load.ignore_eos=true", "slo.ttft_s=30",
          "slo.tpot_s=30", "tag=t6", *SMALL)  # fmt: skip
    folders = points(tmp_path, "t6")
    assert len(folders) == 4
    for folder in folders:
        summary = pd.read_csv(folder / "summary.csv").iloc[0]
        assert summary["ok"] == 12 and summary["api"] == "openai-chat"
        assert summary["model"] == "external" and summary["model_name"] == "tiny"
        assert summary["output_tokens_total"] == 36 and summary["good"] == 12
        assert 0 < summary["ttft_p50_s"] <= summary["latency_p50_s"]
        requests = pd.read_csv(folder / "requests.csv")
        assert requests["ttft_s"].notna().all() and (requests["output_tokens"] == 3).all()
    out = tmp_path / "results"
    table = aggregate(tmp_path / "outputs", out)
    assert (table["repeats"] == 2).all() and table["setting"].nunique() == 2
    assert not table["setting"].str.contains("seed").any()
    assert {"tokens", "goodput", "latency", "throughput"} <= {p.stem for p in out.glob("*.png")}
    report = (out / "report.html").read_text()
    assert re.search(r"2 repeats: 2 settings", report) and "TTFT p50 s" in report


def test_the_report_says_where_the_autoscaler_found_no_gain(swept: Path, tmp_path: Path):
    (point,) = [p for p in points(swept, "t1") if "scaling" in p.name and "rps-8" in p.name]
    copy = tmp_path / "outputs" / "t1" / point.name
    shutil.copytree(point, copy)
    decisions = pd.read_csv(copy / "autoscaler.csv", keep_default_na=False)
    judged = decisions.iloc[-1].to_dict() | {
        "verdict": "no gain", "replicas_after": 1, "knee": 1,
        "reason": "take back to 1; no gain: 1 replica served 7.5/s, 2 serve 7.4/s; above 1"
        " held 120 s",
    }  # fmt: skip
    write_csv(copy / "autoscaler.csv", [*decisions.to_dict("records"), judged], decisions.columns)
    table = aggregate(tmp_path / "outputs", tmp_path / "results")
    found = table["no_gain"].iloc[0]
    assert found.startswith("at ") and "1 replica served 7.5/s, 2 serve 7.4/s" in found
    assert table["replicas_max"].iloc[0] >= 1
    report = (tmp_path / "results" / "report.html").read_text()
    assert "Where replication bought nothing" in report
    assert "no gain at " in report and "1 replica served 7.5/s, 2 serve 7.4/s" in report
    assert (tmp_path / "results" / "replicas.png").exists()

"""model=simulated: its cost model, fitted from a recorded pipeline benchmark."""

from __future__ import annotations

import json
import time

import pytest

from rag.config import compose
from rag.service.simulated import SimulatedGenerator, fit_line, fit_record, main


def test_fit_recovers_a_known_cost_line():
    fixed_ms, per_query_ms = fit_line([1, 4, 8, 16], [0.3 + 0.05 * b for b in (1, 4, 8, 16)])
    assert fixed_ms == pytest.approx(300) and per_query_ms == pytest.approx(50)
    with pytest.raises(ValueError, match="two batch sizes"):
        fit_line([8, 8], [1.0, 1.1])


def test_fit_reads_a_pipeline_record_and_the_model_then_costs_that(tmp_path, capsys):
    rows = [{"batch": b, "seconds": 0.8 + 0.02 * b, "dtype": "bfloat16"} for b in (1, 8, 32)]
    rows += [{"batch": b, "seconds": 9.0 * b, "dtype": "float32"} for b in (1, 8)]
    record = tmp_path / "pipeline-1.json"
    record.write_text(json.dumps({"bench": "pipeline", "results": {"offline": rows}}))
    overrides = fit_record(record, dtype="bfloat16")
    assert overrides == [
        "model.simulated.generate_fixed_ms=800.0",
        "model.simulated.generate_per_query_ms=20.00",
        "model.simulated.fitted_from=pipeline-1.json",
    ]
    generator = SimulatedGenerator(compose(["model=simulated", *overrides]).model)
    started = time.perf_counter()
    answers = generator.generate(["a prompt"] * 10)
    assert time.perf_counter() - started >= 1.0  # 800 + 10 x 20 ms
    assert all("simulated" in a.text for a in answers)
    assert main(["fit", str(record), "--dtype", "bfloat16"]) == 0
    assert "generate_fixed_ms=800.0" in capsys.readouterr().out
    (tmp_path / "empty.json").write_text("{}")
    assert main(["fit", str(tmp_path / "empty.json")]) == 1

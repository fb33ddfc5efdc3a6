"""A schemathesis run against a real server on loopback (tiny models): every operation in
the OpenAPI document, positive and negative cases, every check.  The document must say
what the server does: valid requests answered 2xx, invalid ones refused with a documented
4xx, every status, header, media type and body as documented, never a 5xx.

Deterministic (the same cases every run) and bounded (`CASES` per operation), so CI gets
the same verdict in well under a minute.  Run through schemathesis's own command line,
the way its users run it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rag.cluster.process import ServerProcess

CASES = 100
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_the_server_does_what_its_openapi_document_says(cache_overrides, tmp_path):
    log = tmp_path / "server.log"
    # A small corpus, so the document must say that it (not k_max) caps k.
    with ServerProcess(["model=tiny", "corpus.max_docs=7", *cache_overrides], log_path=log) as srv:
        run = subprocess.run(
            [
                str(SCHEMATHESIS), "run", f"{srv.url}/openapi.json",
                "--checks", "all", "--mode", "all", "--phases", "examples,coverage,fuzzing",
                "--max-examples", str(CASES), "--generation-deterministic",
                "--workers", "1", "--request-timeout", "30", "--no-color",
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout
    assert "10 selected / 10 total" in run.stdout  # rag, ping, ready (GET and HEAD), v1, ...
    assert "Traceback" not in log.read_text()

"""The README's first command: start the batched server on the default models, ask it the
example question over HTTP, print the answer, stop the server.

`python -m rag.demo [overrides...]`, e.g. `python -m rag.demo model=tiny`.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

from rag.cluster.process import ServerProcess

QUERY = "Which animals can hover in the air?"


def ask(url: str, query: str, k: int = 2) -> dict:
    request = urllib.request.Request(
        f"{url}/rag",
        data=json.dumps({"query": query, "k": k}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    print("starting the batched server (the first start dequantises the model, ~20 s) ...")
    with ServerProcess(["variant=batched", *overrides]) as server:
        print(f"ready at {server.url} after {time.perf_counter() - started:.1f} s")
        answer = ask(server.url, QUERY)
    print(f"\nQ: {answer['query']}\nA: {answer['result']}\n")
    for doc in answer["docs"]:
        print(f"  [{doc['score']:.3f}] {doc['id']}: {doc['text'][:90]}...")
    timings = ", ".join(f"{name} {ms:.0f} ms" for name, ms in answer["timings"].items())
    print(f"\ntimings: {timings}; batch size {answer['batch_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m rag.serve [overrides...]`: start the variant the config names, the entry
point of every server the sweep starts (and of a server started by hand).

python -m rag.serve variant=batched port=8000 model=tiny
python -m rag.serve variant=scaling model=simulated   # balancer + autoscaler + replicas
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """A balancer is a torch-free process of its own; the other kinds are one server."""
    from rag.config import ServerKind, compose_from_argv

    args = sys.argv[1:] if argv is None else argv
    variant = compose_from_argv(args).variant
    if variant.kind is ServerKind.balancer:
        from rag.cluster.scaling import main as serve_scaling

        return serve_scaling(args)
    if variant.kind is ServerKind.external:
        sys.exit(f"config error: variant={variant.name} is a server ragbench does not start")
    from rag.service.server import main as serve_one

    return serve_one(args)


if __name__ == "__main__":
    sys.exit(main())

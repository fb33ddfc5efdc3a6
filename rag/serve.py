"""`python -m rag.serve [overrides...]`: start the variant the config names.

python -m rag.serve variant=batched port=8000 model=tiny
python -m rag.serve variant=scaling model=simulated   # balancer + autoscaler + replicas
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """The scaling variant is a torch-free balancer process; the others are one server."""
    from rag.config import compose_from_argv

    args = sys.argv[1:] if argv is None else argv
    if compose_from_argv(args).variant.name == "scaling":
        from rag.cluster.scaling import main as serve_scaling

        return serve_scaling(args)
    from rag.service.server import main as serve_one

    return serve_one(args)


if __name__ == "__main__":
    sys.exit(main())

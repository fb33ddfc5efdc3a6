"""`python -m rag.serve [overrides...]`: start the variant the config names.

python -m rag.serve variant=batched port=8000 model=tiny
"""

from __future__ import annotations

import sys

from rag.service.server import main

if __name__ == "__main__":
    sys.exit(main())

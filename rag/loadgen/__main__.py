"""`python -m rag.loadgen --help`."""

import sys

from rag.loadgen.cli import main

sys.exit(main())

#!/usr/bin/env python3
"""The server's load benchmark under the name the server issue gives it: the same as ``python -m benchmarks.serve``
(every benchmark lives in benchmarks/; see docs/benchmarks.md, "The server under load").

    python scripts/bench_serve.py [--small] [--only rates,burst,thread,peer] [--rates 2,4,8] [--out PATH]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve import main  # noqa: E402 (after the path)

if __name__ == "__main__":
    sys.exit(main())

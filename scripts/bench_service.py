#!/usr/bin/env python3
"""Load-test the HTTP service (same as `cosyapp bench service`; see its --help).

    .venv/bin/python scripts/bench_service.py --model-dir /work/shared/golden/cosyvoice2/tiny --device cpu
    .venv/bin/python scripts/bench_service.py --url http://127.0.0.1:50000 --levels 1,4,16 --poisson-rate 2
"""

import sys

from cosyapp.cli import main

if __name__ == "__main__":
    main(["bench", "service", *sys.argv[1:]], prog_name="bench_service.py")

#!/usr/bin/env python3
"""Benchmark one backend in-process: time to first chunk, real-time factor, per-stage times.

    .venv/bin/python scripts/bench_engine.py --size tiny          # random tiny model, made on the fly
    .venv/bin/python scripts/bench_engine.py --size full          # random model at CosyVoice2-0.5B sizes
    .venv/bin/python scripts/bench_engine.py --model-dir pretrained_models/CosyVoice2-0.5B --prompt-wav asset/zero_shot_prompt.wav
    .venv/bin/python scripts/bench_engine.py --size tiny --long-tokens 1100   # + flow/vocoder time per chunk
"""

import argparse
import json
from pathlib import Path

from cosyapp.bench import format_engine_report, run_engine_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="model directory (default: make a random one)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="size of the random model")
    parser.add_argument("--backend", default="cosyvoice2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt-wav", type=Path)
    parser.add_argument("--tokens", type=int, default=100, help="LM tokens per request (fixed length)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--long-tokens", type=int, default=0,
                        help="also profile one streaming request of this many LM tokens chunk by chunk; 0: off")
    parser.add_argument("--flow-left-chunks", type=int,
                        help="cosyvoice2 option flow_left_chunks (-1: all, exact; default: the backend's)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args()
    backend_options = {} if args.flow_left_chunks is None else {"flow_left_chunks": args.flow_left_chunks}
    report = run_engine_bench(args.model_dir, size=args.size, backend_name=args.backend, device=args.device,
                              dtype=args.dtype, prompt_wav=args.prompt_wav, tokens=args.tokens, runs=args.runs,
                              long_tokens=args.long_tokens, backend_options=backend_options)
    print(format_engine_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Long-running fuzzing of lora-ckpt's readers of untrusted files (hypothesis, coverage-blind).

    .venv/bin/python fuzz/fuzz_readers.py --minutes 10

Re-runs tests/test_fuzz.py (safetensors headers, the safe pickle index, JSON configs, PEFT
patterns, key parsing) with many more examples per round, new random seeds each round, until
the time is up. Every reader may only succeed or raise a lora_ckpt error; a failure is a finding
and stops the run with hypothesis' minimal example.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--examples", type=int, default=3000, help="examples per target per round")
    args = ap.parse_args()
    env = {**os.environ, "LORA_CKPT_FUZZ_EXAMPLES": str(args.examples)}
    deadline = time.monotonic() + 60 * args.minutes
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            "tests/test_fuzz.py", "--hypothesis-seed", str(rounds)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stdout[-4000:], p.stderr[-2000:])
            print(f"FINDING in round {rounds}")
            return 1
        print(f"round {rounds}: {p.stdout.strip().splitlines()[-1]}", flush=True)
    print(f"done: {rounds} rounds x {args.examples} examples per target, no finding")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench-compiled``: the routing core compiled by mypyc against the same sources interpreted.

Runs ``bench core``'s closed loop (64 workers, 1024 in flight, one credit per call and batched
64) in child interpreters, alternating ``CREDIT_ROUTER_INTERPRETED=1`` (sources) and ``=0`` (the
``make compile`` build), so both see the same machine load; prints the best of ``repeat`` runs
and the ratio. Exits 1 with one line if the compiled build is not in use (not built, or stale).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

__all__ = ["main"]

_CHILD = r"""
import json, sys
from loadgen.bench import core
import router_service.core.router as r
out = {"compiled": not r.__file__.endswith(".py")}
for kind in ("single_turn", "sticky_5_turn"):
    for batch in (1, 64):
        n = int(sys.argv[1]) * (4 if batch > 1 else 1)
        c = core._core(64, capacity=10240)
        credits = core._credits(kind, n, 1024)
        out[f"{kind} batch {batch}"] = n / core._closed_loop(c, credits, 1024, batch)
print(json.dumps(out))
"""


def _child(interpreted: bool, credits: int) -> dict[str, Any]:
    env = {**os.environ, "CREDIT_ROUTER_INTERPRETED": "1" if interpreted else "0"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(credits)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        build = "interpreted" if interpreted else "compiled"
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the {build} run failed: {last}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench.compiled", description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--credits", type=int, default=100_000, help="per one-per-call run")
    args = parser.parse_args(argv)
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for _ in range(args.repeat):
        for interpreted in (True, False):
            try:
                result = _child(interpreted, args.credits)
            except RuntimeError as exc:
                print(f"bench-compiled: {exc}")
                return 1
            if result.pop("compiled") == interpreted:
                print("bench-compiled: the compiled build is not in use (run `make compile`)")
                return 1
            runs[interpreted].append(result)
    print("decisions/s, best of runs; one run on a shared machine: read the ratios")
    for key in runs[True][0]:
        source = max(r[key] for r in runs[True])
        built = max(r[key] for r in runs[False])
        print(
            f"{key:<22} interpreted {source / 1000:6.0f}k/s  compiled {built / 1000:6.0f}k/s  "
            f"{built / source:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

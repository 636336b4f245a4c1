"""python -m benchmarks [--quick] [--out DIR] [--only NAME ...]: run, print each table, write.

Output: a full run (no --quick, --only or --out) writes benchmarks/results/latest.json and
docs/benchmarks.md. Any other run writes results.json and benchmarks.md into --out DIR
(default benchmarks/results/scratch/, not committed), so a quick or partial run never replaces the
published numbers. Exit status: 0 when every benchmark ran (or was skipped with a reason),
1 when any errored or was missing, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCHMARKS, RESULT_CONVENTION
from benchmarks.common import REPO_ROOT, machine_info, print_result, render_markdown, stop_everything

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DOC = REPO_ROOT / "docs" / "benchmarks.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="run every benchmark very briefly (checks they work; numbers mean nothing)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="directory for results.json and benchmarks.md")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=BENCHMARKS,
                   help=f"run only these: {', '.join(BENCHMARKS)}")
    return p


def _interrupted(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_one(name: str, quick: bool) -> dict[str, Any]:
    """Import ``benchmarks.<name>`` and run it; an absent module or an exception becomes an
    ``error`` in its result, so the others still run."""
    started = time.monotonic()
    load = round(os.getloadavg()[0], 2)
    try:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{name}":
                raise
            result: dict[str, Any] = {"name": name, "title": name,
                                      "error": f"benchmarks/{name}.py is missing\n"}
        else:
            result = dict(module.run(quick))
            result.setdefault("name", name)
            if quick:  # numbers from a quick run mean nothing: no target is judged on them
                for t in result.get("targets", []):
                    t["met"] = None
    except KeyboardInterrupt:
        raise
    except BaseException:
        result = {"name": name, "title": name, "error": traceback.format_exc()}
    finally:
        stop_everything()
    result["seconds"] = round(time.monotonic() - started, 1)
    result["load_average_at_start"] = load
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n for n in BENCHMARKS if args.only is None or n in args.only]
    full = not args.quick and args.only is None and args.out is None
    out_dir = args.out or (RESULTS_DIR if full else RESULTS_DIR / "scratch")
    json_path = out_dir / ("latest.json" if full else "results.json")
    md_path = DOC if full else out_dir / "benchmarks.md"

    signal.signal(signal.SIGTERM, _interrupted)
    command = "python -m benchmarks" + "".join(f" {shlex.quote(a)}" for a in
                                               (sys.argv[1:] if argv is None else argv))
    run: dict[str, Any] = {
        "convention": RESULT_CONVENTION,
        "command": command,
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "benchmarks": [],
    }
    started = time.monotonic()
    print(f"{command}: {', '.join(names)}", flush=True)
    try:
        for name in names:
            print(f"\n-- running {name}", flush=True)
            result = run_one(name, args.quick)
            run["benchmarks"].append(result)
            print_result(result)
            if result.get("error"):
                print(result["error"], file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; children stopped, nothing written", file=sys.stderr)
        return 130
    finally:
        stop_everything()
    run["seconds"] = round(time.monotonic() - started, 1)
    run["errors"] = [r["name"] for r in run["benchmarks"] if r.get("error")]

    out_dir.mkdir(parents=True, exist_ok=True)
    if args.out is None and not full:
        (out_dir / ".gitignore").write_text("*\n")  # scratch results are not committed
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=1, default=str) + "\n")
    tmp.replace(json_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(run))
    print(f"\nwrote {json_path} and {md_path} in {run['seconds']:.0f} s", flush=True)
    if run["errors"]:
        print(f"errors in: {', '.join(run['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

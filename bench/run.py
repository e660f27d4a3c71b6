"""`make bench`: every benchmark in one run. The training benchmark (bench/train.py) runs here;
the data-delivery benchmark (bench/data.py, when present) runs as its own process so its
timings are not disturbed by this one's memory; with --recipes N the configs/ recipes are
timed too (bench/recipes.py). One table is printed and one JSON file is
written to bench/results/ (git-ignored)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATASETS, REPO, as_dicts, format_table, machine, save_json
from bench.recipes import RECIPES, format_rows
from bench.recipes import measure as measure_recipe
from bench.train import CASES, run_cases

DATA_BENCH = REPO / "bench" / "data.py"


def run_data_bench(datasets: Path) -> dict[str, object]:
    """bench/data.py's own output, captured; absent or failing is recorded, not fatal."""
    if not DATA_BENCH.exists():
        return {"skipped": "bench/data.py not present"}
    env = {**os.environ, "DEEPFIT_DATASETS": str(datasets)}
    done = subprocess.run([sys.executable, str(DATA_BENCH)], capture_output=True, text=True, cwd=REPO, env=env)
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-4000:]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help=f"training cases, comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="folder with mnist/, fashion-mnist/, cifar10-jpg.zip")
    parser.add_argument("--epochs", type=int, default=None, help="override every training case's epochs")
    parser.add_argument("--no-data", action="store_true", help="skip the data-delivery benchmark")
    parser.add_argument("--recipes", type=int, default=0, metavar="N", help="also time each configs/ recipe N times (slow)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = {"skipped": "--no-data"} if args.no_data else run_data_bench(args.datasets)
    if data.get("stdout"):
        print("== data delivery (bench/data.py) ==")
        print(str(data["stdout"]).rstrip())
    elif "returncode" in data:
        print(f"bench/data.py failed (exit {data['returncode']}): {str(data['stderr']).strip().splitlines()[-1:]}")
    results, skipped = run_cases([n for n in args.cases.split(",") if n], args.datasets, epochs=args.epochs)
    print("== training: lessons' DataLoader loop vs deepfit.fit (same model, data, Adam, seed) ==")
    print(format_table(results))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    recipes = [measure_recipe(name, recipe, args.datasets, args.recipes) for name, recipe in RECIPES.items()] if args.recipes else []
    if recipes:
        print("== time to accuracy: whole `deepfit train` process, median of runs ==")
        print(format_rows(recipes))
    if not args.no_save:
        payload = {"machine": machine(), "train": as_dicts(results), "skipped": skipped, "data": data, "recipes": recipes}
        print(f"wrote {save_json(payload, 'bench')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the Custos benchmarks and write ``bench/out/report.{json,md}``.

    just bench [--quick] [--only SCENARIO ...] [--keep-work]
    python -m bench.run [...]

Every scenario measures Custos against its baseline in the same run,
alternating the two, and the table gives medians, the bad-tail p95 and the
ratio. ``--quick`` (under two minutes on two cores) skips the 500 MiB
provisioning case and runs fewer, shorter rounds; the report says so. Nothing
here is a test: a missed target is reported, not failed.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import pstats
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import _report
from bench._context import Bench, Settings
from bench._stats import Row
from bench._tls import make_tls
from bench.scenarios import SCENARIOS

OUT = Path(__file__).resolve().parent / "out"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds; no 500 MiB model")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SCENARIOS), metavar="SCENARIO", help="run only these scenarios"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="where the report goes (default bench/out)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the custodian and the enclaves under cProfile (slower: do not compare these numbers); "
        "profiles and their top functions go to OUT/profiles",
    )
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the work directory (logs, custodian data) for reading"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The client warns about the simulated platform on every connection; the benchmark knows.
    for name in ("client", "enclave"):
        logging.getLogger(name).setLevel(logging.ERROR)

    settings = Settings.quick_run() if args.quick else Settings.full()
    mode = "quick" if args.quick else "full"
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    begin = time.monotonic()
    info = _report.machine()
    work = Path(tempfile.mkdtemp(prefix="custos-bench-"))
    profiles = args.out / "profiles" if args.profile else None
    bench = Bench(settings=settings, work=work, out=args.out, tls=make_tls(work / "tls"), profiles=profiles)
    if profiles is not None:
        bench.notes.append(
            "Profiled run (cProfile in the custodian and enclaves): the numbers are not comparable."
        )
    if args.quick:
        bench.notes.append(
            "Quick mode: no 500 MiB provisioning case, "
            f"{settings.inference_rounds} inference rounds of {settings.throughput_seconds:g} s, "
            f"{settings.ledger_instances} simulated instances; run `just bench` for the full set."
        )
    rows: list[Row] = []
    failed: list[str] = []
    try:
        for name, scenario in SCENARIOS.items():
            if args.only and name not in args.only:
                continue
            bench.say(f"== {name}")
            try:
                rows += scenario(bench)
            except Exception as exc:
                traceback.print_exc()
                failed.append(name)
                bench.notes.append(f"Scenario {name} failed: {type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        bench.close()
        if args.keep_work:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if profiles is not None:
        _summarise_profiles(profiles)
    info["load_average_end"] = _report.machine()["load_average"]
    table = _report.write(
        args.out,
        rows,
        info,
        mode=mode,
        started=started,
        notes=bench.notes,
        settings=settings.to_json(),
        elapsed=time.monotonic() - begin,
    )
    print(table)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.json'} "
          f"in {time.monotonic() - begin:.0f} s", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def _summarise_profiles(directory: Path) -> None:
    """Next to each ``.prof``, a ``.txt`` with the functions that took the most time, inclusive and own."""
    for path in sorted(directory.glob("*.prof")):
        with path.with_suffix(".txt").open("w") as out:
            stats = pstats.Stats(str(path), stream=out).strip_dirs()
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(40)
        print(f"profile: {path} (summary {path.with_suffix('.txt')})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

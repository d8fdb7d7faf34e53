"""The benchmark report: machine description, the Markdown table, ``report.json``."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench._stats import Row, median


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "onnxruntime": _version("onnxruntime"),
        "grpcio": _version("grpcio"),
        "cryptography": _version("cryptography"),
        "numpy": _version("numpy"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu_model']}, {info['usable_cores']} cores, {info['memory_gib']} GiB, {info['os']}; "
        f"Python {info['python']}, onnxruntime {info['onnxruntime']}, grpcio {info['grpcio']}"
    )


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(row: Row, samples: Sequence[float]) -> str:
    return f"{_number(median(samples))} ({_number(row.tail(samples))})"


def _met(row: Row) -> str:
    met = row.met
    if met is None:
        return ""
    if row.target is not None and row.target.kind == "subject_p99_below":
        detail = f" (p99 {_number(row.subject_p99)})"
    elif row.target is not None and row.target.kind == "difference_at_most":
        detail = f" (adds {_number(row.difference)})"
    else:
        detail = ""
    return ("✅ met" if met else "❌ missed") + detail


def markdown(
    rows: Sequence[Row], info: dict[str, Any], *, mode: str, started: str, notes: Sequence[str]
) -> str:
    lines = [
        f"Machine: {machine_line(info)}. Mode: {mode}. Run: {started}.",
        "",
        "| scenario | measure | unit | baseline | baseline median (p95) | Custos median (p95) | ratio "
        "| target | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = row.target.describe(row.unit) if row.target else ""
        lines.append(
            f"| {row.scenario} | {row.measure} | {row.unit} | {row.baseline} | "
            f"{_cell(row, row.baseline_samples)} | {_cell(row, row.subject_samples)} | "
            f"{_number(row.ratio)} | {target} | {_met(row)} |"
        )
    lines += [
        "",
        "Ratio = Custos median / baseline median. p95 is the bad tail: the 95th percentile of a time, "
        "the 5th percentile of a rate. Baseline and Custos runs alternate (A B A B ...) in the same run.",
    ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def write(
    out: Path,
    rows: Sequence[Row],
    info: dict[str, Any],
    *,
    mode: str,
    started: str,
    notes: Sequence[str],
    settings: dict[str, Any],
    elapsed: float,
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, info, mode=mode, started=started, notes=notes)
    (out / "report.md").write_text(table)
    doc = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "started": started,
        "mode": mode,
        "elapsed_seconds": round(elapsed, 1),
        "machine": info,
        "settings": settings,
        "notes": list(notes),
        "rows": [row.to_json() for row in rows],
    }
    (out / "report.json").write_text(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")
    return table


def _clean(value: Any) -> Any:
    """JSON has no NaN: a value that could not be measured becomes null."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)

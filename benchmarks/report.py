"""Shared by the benchmarks: the table printer, a child-process runner that measures the child's own peak RSS,
a percentile, a free loopback port for the servers they start, and where the shared QA sets lie."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qa"  # ../shared/data/qa beside the checkout
QA_SETS = [QA / "xquad.en.json", QA / "xquad.zh.json", QA / "cmrc2018_trial.json"]  # English, Chinese, Chinese


def percentile(values: list[float], q: float, digits: int = 2) -> float:
    """The value at quantile `q` of `values` (nearest rank, the upper one), rounded; 0.0 when there is none."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], digits) if ordered else 0.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_sections(result: dict) -> None:
    """A two-column table of `section.measure value`, then the whole result as one JSON object."""
    print(f"{'measure':40} value")
    for section, values in result.items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            print(f"{section + ('.' + key if key else ''):40} {value}")
    print(json.dumps(result))


def run_child(cmd: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS in MB of this child alone, result): the child is reaped with wait4, whose
    resource usage is that process's own, not the largest of all children so far. `result.cpu_s` is the CPU
    time of the child and of the processes it waited for (its parsing workers): cpu_s / wall = cores used."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, **kw)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(), err.read().decode())
        result.cpu_s = usage.ru_utime + usage.ru_stime
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
    return wall, usage.ru_maxrss / 1024, result

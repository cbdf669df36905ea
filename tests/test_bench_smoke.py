"""Smoke test of the benchmark script: ``bench/bench.py --quick`` against direct beanstalkd and
the proxy (started through the ``serve`` CLI) must run to the end and print the ratio line.

It never asserts on speed: numbers depend on the machine and its load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_bench


@pytest.mark.integration
def test_bench_quick_direct_and_proxy(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = run_bench("--quick", "--targets", "direct,proxy", "--json", str(out_json))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"^ratio proxy/direct\s+\d+\.\d+", proc.stdout, re.M), output
    doc = json.loads(out_json.read_text())
    assert doc["results"]["direct"]["status"] == "ok"
    assert doc["results"]["proxy"]["status"] == "ok"
    assert set(doc["ratios"]["proxy"]) == {
        "puts_per_s",
        "cycles_per_s",
        "rtt_p50_us",
        "rtt_p99_us",
        "conns_per_s",
    }

"""The benchmark suite, run tiny: it starts node processes, runs the lecture workload on the
memory and Redis backends and writes its JSON lines, Markdown table and plots. The figures
themselves are never checked (they depend on the machine), only that they are there and sane."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .backends import require_tcp

REPO = Path(__file__).resolve().parent.parent


def test_lecture_tiny(tmp_path: Path) -> None:
    require_tcp("127.0.0.1", 6379, "Redis")
    out = tmp_path / "results"
    docs = tmp_path / "benchmarks.md"
    args = [
        "--workloads", "lecture", "--backends", "memory,redis", "--peers", "none",
        "--pacings", "concurrent", "--nodes", "2", "--rooms", "50", "--seconds", "0.5",
        "--repeats", "1", "--timeout", "15", "--out", str(out), "--docs", str(docs),
        "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (out / "latest.jsonl").read_text().splitlines()]
    info = lines[0]
    assert info["kind"] == "info" and info["machine"]["cores"] >= 1
    medians = [r for r in lines if r["kind"] == "median"]
    assert {(r["backend"], r["impl"]) for r in medians} == {
        ("memory", "roomrouter"),
        ("redis", "roomrouter"),
    }
    for row in medians:
        assert "error" not in row, row
        assert row["delivered_per_s"] > 0
        assert 0.0 <= row["irrelevant_share"] <= 1.0
        assert row["p50_ms"] is not None and row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"]
        assert row["versions"]["roomrouter"]
    table = (out / "latest.md").read_text()
    assert "| redis | roomrouter | concurrent |" in table
    assert "AMD" in table or "cores" in table
    assert "Latest results" in docs.read_text()
    assert (out / "lecture-throughput.png").stat().st_size > 0


def test_cli_bench_outside_a_checkout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from roomrouter import cli

    monkeypatch.setattr(cli, "_benchmarks_root", lambda: None)
    assert cli.main(["bench", "--workloads", "lecture"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("roomrouter: bench needs a roomrouter repo checkout")
    assert "\n" not in err


def test_storm_tiny() -> None:
    """benchmarks/storm.py runs (tiny: 100 members, 50 messages a room, once) on memory and on
    a redis-server of its own, and reports a sane storm."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    args = ["--backends", "memory,redis", "--members", "100", "--rooms", "4", "--cached", "120",
            "--repeats", "1", "--timeout", "60"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "storm.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["backend"] for r in runs] == ["memory", "redis"]
    for run in runs:
        assert run["errors"] == 0 and run["lost"] == 0 and run["rejoin_s"] > 0, run
    assert runs[1]["redis_reads"] > 0


def test_wakeup_tiny() -> None:
    """benchmarks/wakeup.py runs (200 members, one round) and reports both paths (the
    figures are the machine's: only their presence is checked)."""
    args = ["--members", "200", "--batches", "1,8", "--rounds", "1", "--loops", "asyncio"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "wakeup.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("asyncio")]
    assert len(rows) == 2
    assert all(float(cell) > 0 for row in rows for cell in row[-4:-2])  # µs per member


def test_batch_wait_tiny() -> None:
    """benchmarks/batch_wait.py runs (5 members, 20 publishes per delay) and reports a row per
    delay (the figures are the machine's: only their presence is checked)."""
    args = ["--members", "5", "--count", "20", "--delays", "0,0.002"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "batch_wait.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["0", "2"]
    assert all(float(cell) >= 0 for row in rows for cell in row[1:])

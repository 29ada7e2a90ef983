"""CI smoke for the atheris harnesses in fuzz/: each runs as a subprocess for a fixed number of
inputs (seeded from a copy of fuzz/corpus/<harness>/) and must exit 0. The "Done N runs" lines
libFuzzer prints must add up to at least 100 000 executions. Skipped only where atheris cannot be
imported (it is a Linux x86_64-only dev dependency)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import atheris  # noqa: F401
except ImportError as exc:  # pragma: no cover - non-x86_64 platforms
    pytest.skip(f"atheris cannot be imported here ({exc})", allow_module_level=True)

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
# Runs per harness: roughly proportional to speed (keyconfig is ~20x faster than the HPKE ones),
# ~10 s of CPU in all; the harnesses run in parallel.
RUNS = {
    "keyconfig": 50_000,
    "bhttp": 20_000,
    "sse": 20_000,
    "chunked": 10_000,
    "ohttp_request": 10_000,
}
MIN_TOTAL = 100_000
DONE = re.compile(rb"^Done (\d+) runs", re.MULTILINE)


def test_every_harness_is_smoked() -> None:
    assert {p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py")} == set(RUNS)


def test_fuzz_smoke(tmp_path: Path) -> None:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    start = time.monotonic()
    for harness, runs in RUNS.items():
        corpus = tmp_path / "corpus" / harness
        shutil.copytree(FUZZ / "corpus" / harness, corpus)
        artifacts = tmp_path / "crashes" / harness
        artifacts.mkdir(parents=True)
        procs[harness] = subprocess.Popen(
            [
                sys.executable,
                str(FUZZ / f"fuzz_{harness}.py"),
                f"-runs={runs}",
                "-seed=1",
                "-timeout=20",
                f"-artifact_prefix={artifacts}/",
                str(corpus),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    total = 0
    failures = []
    for harness, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        done = [int(n) for n in DONE.findall(out)]
        if proc.returncode != 0 or not done:
            failures.append(
                f"{harness}: exit {proc.returncode}\n{out.decode(errors='replace')[-3000:]}"
            )
        total += sum(done)
    elapsed = time.monotonic() - start
    assert not failures, "\n\n".join(failures)
    assert total >= MIN_TOTAL, f"only {total} executions in {elapsed:.1f}s"
    print(f"fuzz smoke: {total} executions across {len(RUNS)} harnesses in {elapsed:.1f}s")

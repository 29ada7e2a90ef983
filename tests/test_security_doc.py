"""SECURITY.md names tests as pytest node ids (``tests/test_x.py::test_name[param]``, or
``tests/test_x.py::TestClass::test_name``); every one must exist.

The ids are checked against pytest's own collection (one ``--collect-only`` subprocess over the
referenced files), so a renamed, removed or re-parametrised test fails here, exactly as pytest
would name it. An id without ``[...]`` may name a parametrised test as a whole (it matches when
any of its parametrisations exists).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "SECURITY.md"

# tests/<path>.py::<name>[::<name>...][<param id>]; a param id never holds whitespace, a backtick
# or a table bar here (ids that would are not cited).
NODE_ID = re.compile(r"tests/[A-Za-z0-9_/]+\.py(?:::[A-Za-z_][A-Za-z0-9_]*)+(?:\[[^\]\s`|]+\])?")


def referenced(text: str) -> list[str]:
    return sorted(set(NODE_ID.findall(text)))


def collect(files: list[str]) -> set[str]:
    """The node ids pytest collects from ``files`` (run from the repo root, like the suite)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"collection failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def exists(ref: str, ids: set[str]) -> bool:
    if ref in ids:
        return True
    if "[" in ref:  # a specific parametrisation must exist as written
        return False
    return any(i.startswith(ref + "[") or i.startswith(ref + "::") for i in ids)


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.is_file(), "SECURITY.md is missing at the repository root"
    return DOC.read_text(encoding="utf-8")


def test_every_referenced_test_exists(doc: str) -> None:
    refs = referenced(doc)
    assert len(refs) >= 40, f"only {len(refs)} test ids found: did the id pattern break?"
    files = sorted({r.split("::", 1)[0] for r in refs})
    missing_files = [f for f in files if not (ROOT / f).is_file()]
    assert not missing_files, f"SECURITY.md cites test files that do not exist: {missing_files}"
    ids = collect(files)
    missing = [r for r in refs if not exists(r, ids)]
    assert not missing, "SECURITY.md cites tests pytest does not collect:\n" + "\n".join(missing)


def test_no_machine_paths(doc: str) -> None:
    for marker in (f"/{d}/" for d in ("work", "root", "home", "tmp")):  # built, not literal
        assert marker not in doc, f"SECURITY.md contains an absolute machine path ({marker})"


def test_matching_rules() -> None:
    """The matcher itself: exact ids, parametrised wholes, classes; nothing looser."""
    ids = {
        "tests/test_a.py::test_x[one]",
        "tests/test_a.py::test_y",
        "tests/test_a.py::TestC::test_z",
    }
    assert exists("tests/test_a.py::test_x", ids)
    assert exists("tests/test_a.py::test_x[one]", ids)
    assert not exists("tests/test_a.py::test_x[two]", ids)
    assert not exists("tests/test_a.py::test_", ids)
    assert exists("tests/test_a.py::TestC::test_z", ids)
    assert exists("tests/test_a.py::TestC", ids)
    assert not exists("tests/test_a.py::test_y_renamed", ids)
    text = (
        "`tests/test_a.py::test_x[one]`, `tests/sub/test_b.py::TestC::test_z`"
        " and tests/test_a.py::test_y."
    )
    assert referenced(text) == [
        "tests/sub/test_b.py::TestC::test_z",
        "tests/test_a.py::test_x[one]",
        "tests/test_a.py::test_y",
    ]

"""scripts/audit.py: OSV evaluation, runtime/dev classification, ignore list, online merge.

Synthetic locks and advisories in tmp_path; the online source is a fake (no network). One test runs
the script on the repository's own uv.lock and committed snapshot, offline.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import re
import subprocess
import sys
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "audit.py"
TODAY = dt.date(2026, 1, 15)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


audit = _load("trio_gateway_audit_script", SCRIPT)
build_snapshot = _load(
    "trio_gateway_audit_build_snapshot", REPO / "scripts" / "audit" / "build_snapshot.py"
)

VULN_LINE = re.compile(
    r"^(VULN|IGNORED) (runtime|dev) [a-z0-9][a-z0-9-]*==\S+ \S+ aliases=\S+ fixed=\S+ "
    r"source=(snapshot|osv|snapshot\+osv)( until=\d{4}-\d{2}-\d{2})? :: .*$"
)
SUMMARY_LINE = re.compile(
    r"^audit: (\d+) locked packages \((\d+) runtime, (\d+) dev\); snapshot "
    r"pypa/advisory-database@[0-9a-f]{12} \d{4}-\d{2}-\d{2} \((\d+) advisories\); online OSV: "
    r"(checked|skipped); findings: (\d+) runtime, (\d+) dev.*, (\d+) ignored, (\d+) expired "
    r"ignores; [\d.]+s -> (OK|FAIL)$"
)


# --- synthetic data ------------------------------------------------------------------------------


def _edges(deps: Sequence[str]) -> str:
    """'name' or 'name[extra1,extra2]' -> uv.lock inline tables."""
    out = []
    for dep in deps:
        name, _, extras = dep.partition("[")
        if extras:
            quoted = ", ".join(f'"{e}"' for e in extras.rstrip("]").split(","))
            out.append(f'    {{ name = "{name}", extra = [{quoted}] }},')
        else:
            out.append(f'    {{ name = "{name}" }},')
    return "\n".join(out)


def write_lock(
    tmp: Path,
    runtime: Sequence[str],
    dev: Sequence[str],
    packages: dict[str, tuple[str, list[str], dict[str, list[str]]]],
) -> Path:
    """A uv.lock + pyproject.toml for project 'demo'; packages: name -> (version, deps, extras)."""
    parts = ["version = 1", "revision = 3", 'requires-python = ">=3.12"', ""]
    parts += [
        "[[package]]",
        'name = "demo"',
        'version = "0.1.0"',
        'source = { editable = "." }',
        f"dependencies = [\n{_edges(runtime)}\n]",
        "",
        "[package.dev-dependencies]",
        f"dev = [\n{_edges(dev)}\n]",
        "",
    ]
    for name, (version, deps, extras) in packages.items():
        parts += [
            "[[package]]",
            f'name = "{name}"',
            f'version = "{version}"',
            'source = { registry = "https://pypi.org/simple" }',
            f"dependencies = [\n{_edges(deps)}\n]",
            "",
        ]
        if extras:
            parts.append("[package.optional-dependencies]")
            parts += [f"{extra} = [\n{_edges(d)}\n]" for extra, d in extras.items()]
            parts.append("")
    (tmp / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0.1.0"\n')
    lock = tmp / "uv.lock"
    lock.write_text("\n".join(parts))
    return lock


def advisory(
    id_: str,
    package: str,
    events: list[dict[str, str]] | None = None,
    versions: list[str] | None = None,
    aliases: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    ranges = [{"type": "ECOSYSTEM", "events": events}] if events else []
    return {
        "id": id_,
        "aliases": aliases or [],
        "summary": f"{id_} summary",
        "affected": [{"package": package, "ranges": ranges, "versions": versions or []}],
        **extra,
    }


def write_snapshot(tmp: Path, advisories: list[dict[str, Any]], packages: list[str]) -> Path:
    snapshot = {
        "schema": 1,
        "source": {"commit": "ab" * 20, "commit_date": "2026-01-01T00:00:00+00:00"},
        "packages": packages,
        "advisories": advisories,
    }
    path = tmp / "advisories.json"
    path.write_text(json.dumps(snapshot))
    return path


def run(
    tmp: Path,
    lock: Path,
    snapshot: Path,
    *args: str,
    ignore: str = "",
    online: Any = None,
) -> tuple[int, list[str]]:
    (tmp / "ignore.txt").write_text(ignore)
    argv = ["--lock", str(lock), "--snapshot", str(snapshot), "--ignore", str(tmp / "ignore.txt")]
    if online is None:
        argv.append("--offline")
    out = io.StringIO()
    rc = audit.main([*argv, *args], online_query=online, today=TODAY, out=out)
    return rc, out.getvalue().splitlines()


def vuln_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("VULN", "IGNORED"))]


@pytest.fixture
def simple(tmp_path: Path) -> tuple[Path, Path]:
    """demo -> lib 1.4 (runtime); devtool 2.0 (dev); an advisory on lib fixed in 1.5."""
    lock = write_lock(
        tmp_path,
        runtime=["lib"],
        dev=["devtool"],
        packages={"lib": ("1.4", [], {}), "devtool": ("2.0", [], {})},
    )
    snap = write_snapshot(
        tmp_path,
        [
            advisory(
                "PYSEC-1",
                "lib",
                [{"introduced": "0"}, {"fixed": "1.5"}],
                aliases=["CVE-1", "GHSA-aaaa"],
            )
        ],
        ["devtool", "lib"],
    )
    return lock, snap


# --- OSV evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.9", False),
        ("1.0", True),
        ("1.4.9", True),
        ("1.5rc1", True),
        ("1.5", False),
        ("1.9", False),
        ("2.0", True),
        ("2.0.1", True),
        ("2.1", False),
        ("3", False),
    ],
)
def test_introduced_fixed_ranges(version: str, expected: bool) -> None:
    adv = advisory(
        "X",
        "pkg",
        # out of order on purpose: events are sorted before evaluation
        [{"introduced": "2.0"}, {"fixed": "2.1"}, {"introduced": "1.0"}, {"fixed": "1.5"}],
    )
    assert audit.affects(adv, "pkg", version) is expected


@pytest.mark.parametrize(("version", "expected"), [("1.4", True), ("1.5", True), ("2.0", False)])
def test_adjacent_ranges(version: str, expected: bool) -> None:
    """A range that ends where the next begins: the version is in the second one."""
    adv = advisory(
        "X",
        "pkg",
        [{"introduced": "1.5"}, {"fixed": "2.0"}, {"fixed": "1.5"}, {"introduced": "1.0"}],
    )
    assert audit.affects(adv, "pkg", version) is expected


@pytest.mark.parametrize(
    ("version", "expected"), [("0.1", True), ("3.2", True), ("3.2.0", True), ("3.2.1", False)]
)
def test_last_affected(version: str, expected: bool) -> None:
    adv = advisory("X", "pkg", [{"introduced": "0"}, {"last_affected": "3.2"}])
    assert audit.affects(adv, "pkg", version) is expected


@pytest.mark.parametrize(("version", "expected"), [("1.9", True), ("2.0", False), ("5", False)])
def test_limit(version: str, expected: bool) -> None:
    adv = advisory("X", "pkg", [{"introduced": "1.0"}, {"limit": "2.0"}])
    assert audit.affects(adv, "pkg", version) is expected


@pytest.mark.parametrize(
    ("version", "expected"), [("1.0", True), ("1.0.0", True), ("1.1", True), ("1.2", False)]
)
def test_explicit_versions(version: str, expected: bool) -> None:
    adv = advisory("X", "pkg", versions=["1.0", "1.1", "not a version"])
    assert audit.affects(adv, "pkg", version) is expected


def test_semver_range_and_osv_package_shape() -> None:
    adv = {
        "id": "GHSA-x",
        "affected": [
            {"package": {"name": "other", "ecosystem": "PyPI"}, "versions": ["1.0.0"]},
            {"package": {"name": "pkg", "ecosystem": "npm"}, "versions": ["1.0.0"]},
            {
                "package": {"name": "Pkg", "ecosystem": "PyPI"},
                "ranges": [{"type": "SEMVER", "events": [{"introduced": "1.0.0-rc.1"}]}],
            },
        ],
    }
    assert audit.affects(adv, "pkg", "1.0.0")
    assert not audit.affects(adv, "pkg", "0.9.0")
    git_only = {
        "id": "G",
        "affected": [
            {"package": "pkg", "ranges": [{"type": "GIT", "events": [{"introduced": "0"}]}]}
        ],
    }
    assert not audit.affects(git_only, "pkg", "1.0")


def test_withdrawn_is_ignored() -> None:
    adv = advisory("X", "pkg", [{"introduced": "0"}], withdrawn="2025-01-01T00:00:00Z")
    assert not audit.affects(adv, "pkg", "1.0")


def test_unparsable_advisory_version_is_a_data_error(tmp_path: Path) -> None:
    lock = write_lock(tmp_path, ["lib"], [], {"lib": ("1.0", [], {})})
    snap = write_snapshot(
        tmp_path, [advisory("BAD", "lib", [{"introduced": "0"}, {"fixed": "??"}])], ["lib"]
    )
    rc, _ = run(tmp_path, lock, snap)
    assert rc == 2


# --- whole runs ----------------------------------------------------------------------------------


def test_vulnerable_runtime_package_fails(simple: tuple[Path, Path], tmp_path: Path) -> None:
    rc, lines = run(tmp_path, *simple)
    assert rc == 1
    assert vuln_lines(lines) == [
        "VULN runtime lib==1.4 PYSEC-1 aliases=CVE-1,GHSA-aaaa fixed=1.5 source=snapshot "
        ":: PYSEC-1 summary"
    ]
    assert all(VULN_LINE.match(line) for line in vuln_lines(lines))
    summary = SUMMARY_LINE.match(lines[-1])
    assert summary is not None, lines[-1]
    assert summary.group(1, 2, 3, 4, 6, 7, 10) == ("2", "1", "1", "1", "1", "0", "FAIL")
    assert "OSV online check skipped: --offline" in lines


def test_fixed_version_is_not_flagged(tmp_path: Path) -> None:
    lock = write_lock(tmp_path, ["lib"], [], {"lib": ("1.5", [], {})})
    snap = write_snapshot(
        tmp_path, [advisory("PYSEC-1", "lib", [{"introduced": "0"}, {"fixed": "1.5"}])], ["lib"]
    )
    rc, lines = run(tmp_path, lock, snap)
    assert rc == 0
    assert vuln_lines(lines) == []
    assert lines[-1].endswith("-> OK")


def test_runtime_and_dev_through_transitive_edges_and_extras(tmp_path: Path) -> None:
    lock = write_lock(
        tmp_path,
        runtime=["app-lib[fast]"],
        dev=["pytest"],
        packages={
            "app-lib": ("1.0", ["base"], {"fast": ["speedup"], "unused": ["extra-only"]}),
            "base": ("1.0", [], {}),
            "speedup": ("1.0", ["deep"], {}),
            "deep": ("1.0", [], {}),
            "extra-only": ("1.0", [], {}),
            "pytest": ("9.0", ["base", "pluggy"], {}),
            "pluggy": ("1.0", [], {}),
        },
    )
    scopes = {p.name: p.scope for p in audit.load_lock(lock)}
    assert scopes == {
        "app-lib": "runtime",
        "base": "runtime",  # also reached from dev: runtime wins
        "speedup": "runtime",  # via the extra the project asks for
        "deep": "runtime",
        "extra-only": "dev",  # an extra nobody asks for
        "pytest": "dev",
        "pluggy": "dev",
    }


def test_dev_finding_fails_unless_runtime_only(simple: tuple[Path, Path], tmp_path: Path) -> None:
    lock, _ = simple
    snap = write_snapshot(
        tmp_path, [advisory("PYSEC-9", "devtool", [{"introduced": "1.0"}])], ["devtool", "lib"]
    )
    rc, lines = run(tmp_path, lock, snap)
    assert rc == 1
    assert [line.split(" ::")[0] for line in vuln_lines(lines)] == [
        "VULN dev devtool==2.0 PYSEC-9 aliases=- fixed=none source=snapshot"
    ]
    rc, lines = run(tmp_path, lock, snap, "--runtime-only")
    assert rc == 0
    assert len(vuln_lines(lines)) == 1  # still reported
    assert "(dev not failing: --runtime-only)" in lines[-1]


def test_name_normalisation(tmp_path: Path) -> None:
    lock = write_lock(
        tmp_path,
        runtime=["PyYAML", "zope.interface"],
        dev=[],
        packages={"PyYAML": ("5.3", [], {}), "zope.interface": ("5.0", [], {})},
    )
    snap = write_snapshot(
        tmp_path,
        [
            advisory("Y", "pyyaml", [{"introduced": "0"}, {"fixed": "5.4"}]),
            advisory("Z", "Zope_Interface", versions=["5.0"]),
        ],
        ["pyyaml", "zope-interface"],
    )
    rc, lines = run(tmp_path, lock, snap)
    assert rc == 1
    assert [line.split(" ")[2:4] for line in vuln_lines(lines)] == [
        ["pyyaml==5.3", "Y"],
        ["zope-interface==5.0", "Z"],
    ]
    assert audit.normalize("Foo__Bar.-baz") == "foo-bar-baz"


def test_ignore_entry_by_alias_with_reason(simple: tuple[Path, Path], tmp_path: Path) -> None:
    rc, lines = run(
        tmp_path,
        *simple,
        ignore="# header\n\nGHSA-aaaa 2026-01-15  not reachable: we never call it\n",
    )
    assert rc == 0, lines
    assert vuln_lines(lines) == [
        "IGNORED runtime lib==1.4 PYSEC-1 aliases=CVE-1,GHSA-aaaa fixed=1.5 source=snapshot "
        "until=2026-01-15 :: not reachable: we never call it"
    ]
    assert " 1 ignored, 0 expired ignores" in lines[-1]


def test_expired_ignore_entry_fails(simple: tuple[Path, Path], tmp_path: Path) -> None:
    rc, lines = run(tmp_path, *simple, ignore="PYSEC-1 2026-01-14 accepted until a fix ships\n")
    assert rc == 1
    assert "EXPIRED PYSEC-1 expired=2026-01-14 :: accepted until a fix ships" in lines
    assert vuln_lines(lines)[0].startswith("VULN runtime lib==1.4 PYSEC-1 ")
    # an expired entry fails even when nothing matches it any more
    lock = write_lock(tmp_path, ["lib"], [], {"lib": ("1.5", [], {})})
    rc, lines = run(tmp_path, lock, simple[1], ignore="PYSEC-1 2026-01-14 accepted\n")
    assert rc == 1
    assert vuln_lines(lines) == []


@pytest.mark.parametrize(
    "line", ["PYSEC-1 2027-01-01", "PYSEC-1 2027-01-01   ", "PYSEC-1 next-year reason", "PYSEC-1"]
)
def test_ignore_entry_needs_reason_and_date(
    simple: tuple[Path, Path], tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _ = run(tmp_path, *simple, ignore=line + "\n")
    assert rc == 2
    assert "ignore.txt:1" in capsys.readouterr().err


def test_online_merged_without_duplicates(simple: tuple[Path, Path], tmp_path: Path) -> None:
    asked: list[Sequence[tuple[str, str]]] = []

    def fake(queries: Sequence[tuple[str, str]]) -> list[list[dict[str, Any]]]:
        asked.append(queries)
        osv_same = {  # OSV's GHSA record of the snapshot's PYSEC-1
            "id": "GHSA-aaaa",
            "aliases": ["CVE-1"],
            "summary": "same bug",
            "affected": [
                {
                    "package": {"name": "lib", "ecosystem": "PyPI"},
                    "ranges": [
                        {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.4.1"}]}
                    ],
                }
            ],
        }
        osv_new = {"id": "GHSA-bbbb", "aliases": ["CVE-2"], "summary": "only online"}
        withdrawn = {"id": "GHSA-cccc", "withdrawn": "2025-01-01T00:00:00Z"}
        answers = {"lib": [osv_same, osv_new, withdrawn], "devtool": []}
        return [answers[name] for name, _ in queries]

    rc, lines = run(tmp_path, *simple, online=fake)
    assert asked == [[("devtool", "2.0"), ("lib", "1.4")]]
    assert rc == 1
    assert vuln_lines(lines) == [
        "VULN runtime lib==1.4 GHSA-bbbb aliases=CVE-2 fixed=none source=osv :: only online",
        "VULN runtime lib==1.4 PYSEC-1 aliases=CVE-1,GHSA-aaaa fixed=1.4.1,1.5 "
        "source=snapshot+osv :: PYSEC-1 summary",
    ]
    assert "OSV online check: 2 advisories reported for 2 packages" in lines
    assert "online OSV: checked; findings: 2 runtime, 0 dev" in lines[-1]


def test_online_unreachable_is_skipped(simple: tuple[Path, Path], tmp_path: Path) -> None:
    def down(queries: Sequence[tuple[str, str]]) -> list[list[dict[str, Any]]]:
        raise audit.OnlineUnavailable("no route to api.osv.dev")

    rc, lines = run(tmp_path, *simple, online=down)
    assert "OSV online check skipped: no route to api.osv.dev" in lines
    assert rc == 1  # the snapshot's finding still counts
    assert "online OSV: skipped" in lines[-1]


def test_osv_client_with_fake_urlopen() -> None:
    calls: list[tuple[str, Any]] = []

    class Response(io.BytesIO):
        def __enter__(self) -> Response:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def urlopen(req: Any, timeout: float) -> Response:
        body = json.loads(req.data) if req.data else None
        calls.append((req.full_url, body))
        if req.full_url.endswith("/v1/querybatch"):
            return Response(json.dumps({"results": [{"vulns": [{"id": "GHSA-1"}]}, {}]}).encode())
        return Response(json.dumps({"id": "GHSA-1", "aliases": ["CVE-9"]}).encode())

    answer = audit.osv_query([("a", "1.0"), ("b", "2.0")], base_url="https://osv", urlopen=urlopen)
    assert answer == [[{"id": "GHSA-1", "aliases": ["CVE-9"]}], []]
    assert calls[0][1]["queries"][1] == {
        "package": {"name": "b", "ecosystem": "PyPI"},
        "version": "2.0",
    }
    assert calls[1] == ("https://osv/v1/vulns/GHSA-1", None)

    def unreachable(req: Any, timeout: float) -> Response:
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(audit.OnlineUnavailable, match="Name or service not known"):
        audit.osv_query([("a", "1.0")], urlopen=unreachable)


def test_snapshot_not_covering_the_lock(simple: tuple[Path, Path], tmp_path: Path) -> None:
    lock, _ = simple
    snap = write_snapshot(tmp_path, [], ["lib"])  # devtool missing
    rc, lines = run(tmp_path, lock, snap)
    assert rc == 2  # offline: devtool was not checked at all
    rc, lines = run(tmp_path, lock, snap, online=lambda q: [[] for _ in q])
    assert rc == 0
    assert any(
        line.startswith("WARNING: 1 locked packages are not in the snapshot") for line in lines
    )


def test_build_snapshot_keeps_only_locked_packages() -> None:
    records = [
        {
            "id": "PYSEC-2",
            "aliases": ["GHSA-z", "CVE-3"],
            "details": "\n  First line\nof details.\n",
            "affected": [
                {
                    "package": {"name": "Py_YAML", "ecosystem": "PyPI"},
                    "ranges": [
                        {"type": "GIT", "repo": "x", "events": [{"introduced": "0"}]},
                        {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.0"}]},
                    ],
                    "versions": ["1.0"],
                },
                {"package": {"name": "unlocked", "ecosystem": "PyPI"}, "versions": ["1"]},
            ],
        },
        {"id": "PYSEC-1", "withdrawn": "2024", "affected": [{"package": {"name": "py-yaml"}}]},
        {"id": "PYSEC-3", "affected": [{"package": {"name": "unlocked", "ecosystem": "PyPI"}}]},
    ]
    snap = build_snapshot.build(records, ["py-yaml"], "c" * 40, "2024-10-10T17:35:05+00:00")
    assert snap["source"]["commit"] == "c" * 40
    assert snap["advisories"] == [
        {
            "id": "PYSEC-2",
            "aliases": ["CVE-3", "GHSA-z"],
            "summary": "First line",
            "modified": "",
            "affected": [
                {
                    "package": "py-yaml",
                    "ranges": [
                        {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.0"}]}
                    ],
                    "versions": ["1.0"],
                }
            ],
        }
    ]
    assert build_snapshot.dumps(snap) == build_snapshot.dumps(
        json.loads(build_snapshot.dumps(snap))
    )


# --- the real repository -------------------------------------------------------------------------


def test_committed_snapshot_flags_known_old_versions(tmp_path: Path) -> None:
    """The committed snapshot really contains usable advisories (not just a header)."""
    lock = write_lock(tmp_path, ["jinja2"], [], {"jinja2": ("2.7.1", [], {})})
    rc, lines = run(tmp_path, lock, audit.DEFAULT_SNAPSHOT)
    assert rc == 1
    assert any(
        line.startswith("VULN runtime jinja2==2.7.1 PYSEC-2014-8 ") for line in vuln_lines(lines)
    ), lines


def test_real_lock_and_committed_snapshot() -> None:
    snapshot = json.loads(audit.DEFAULT_SNAPSHOT.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", snapshot["source"]["commit"])
    dt.datetime.fromisoformat(snapshot["source"]["commit_date"])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--offline"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    summary = SUMMARY_LINE.match(lines[-1])
    assert summary is not None, lines
    total, runtime, dev = (int(summary.group(i)) for i in (1, 2, 3))
    assert total == runtime + dev > 0
    assert int(summary.group(4)) == len(snapshot["advisories"])
    for line in lines[:-1]:
        assert line.startswith(("OSV online check", "WARNING: advisory snapshot is", "NOTE:")) or (
            VULN_LINE.match(line) or line.startswith("EXPIRED ")
        ), line
    if proc.returncode == 1:
        assert summary.group(10) == "FAIL"
        assert vuln_lines(lines) or any(line.startswith("EXPIRED ") for line in lines)
    else:
        assert summary.group(10) == "OK"
        assert not any(line.startswith("VULN ") for line in lines)

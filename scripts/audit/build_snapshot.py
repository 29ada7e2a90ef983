#!/usr/bin/env python3
"""Regenerate ``scripts/audit/advisories.json`` from a copy of pypa/advisory-database.

Usage::

    uv run --no-project --with pyyaml python scripts/audit/build_snapshot.py PATH [--rev REV]

``PATH`` is either a checkout of https://github.com/pypa/advisory-database (a directory that has
``vulns/``) or a bare git directory of it (then ``--rev``, default ``HEAD``, picks the commit).
The advisories are OSV records in YAML; PyYAML is needed only here (the audit itself reads the
JSON snapshot), hence the ``uv run --with`` above rather than a project dependency.

Only advisories that name a package locked in ``uv.lock`` (names normalised per PEP 503) are
kept, and of each only what ``scripts/audit.py`` needs: id, aliases, a one-line summary,
modified, withdrawn (withdrawn records are dropped here anyway) and, per affected package, its
ranges and explicit versions. The header records the source commit and its commit date. The
output is deterministic (sorted, fixed formatting), so regenerating from the same commit and the
same lock gives the same bytes; a package added to ``uv.lock`` needs a regeneration, which the
audit reports (see ``packages`` in the header).

Standard library + PyYAML; Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_LOCK = HERE.parent.parent / "uv.lock"
DEFAULT_OUT = HERE / "advisories.json"
SOURCE_REPO = "https://github.com/pypa/advisory-database"
SUFFIXES = (".yaml", ".yml", ".json")
SUMMARY_MAX = 200


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_package_names(lock_path: Path) -> list[str]:
    """Normalised names of the locked packages that come from an index (not the project itself)."""
    with lock_path.open("rb") as fh:
        lock = tomllib.load(fh)
    names = set()
    for pkg in lock.get("package", []):
        source = pkg.get("source", {})
        if "editable" in source or "virtual" in source:
            continue
        names.add(normalize(pkg["name"]))
    return sorted(names)


def one_line_summary(record: dict[str, Any]) -> str:
    text = str(record.get("summary") or "").strip()
    if not text:
        for line in str(record.get("details") or "").splitlines():
            if line.strip():
                text = line.strip()
                break
    text = " ".join(text.split())
    if len(text) > SUMMARY_MAX:
        text = text[: SUMMARY_MAX - 3].rstrip() + "..."
    return text


def trim(record: dict[str, Any], wanted: set[str]) -> dict[str, Any] | None:
    """The fields the audit needs, restricted to affected packages in ``wanted``; None to drop."""
    if record.get("withdrawn"):
        return None
    affected = []
    for aff in record.get("affected") or []:
        pkg = aff.get("package") or {}
        if pkg.get("ecosystem") != "PyPI" or not pkg.get("name"):
            continue
        name = normalize(str(pkg["name"]))
        if name not in wanted:
            continue
        ranges = []
        for rng in aff.get("ranges") or []:
            if rng.get("type") not in ("ECOSYSTEM", "SEMVER"):
                continue  # GIT ranges are commit hashes; nothing to compare a version with
            events = [{str(k): str(v) for k, v in ev.items()} for ev in rng.get("events") or []]
            ranges.append({"type": rng["type"], "events": events})
        versions = [str(v) for v in aff.get("versions") or []]
        if ranges or versions:
            affected.append({"package": name, "ranges": ranges, "versions": versions})
    if not affected:
        return None
    return {
        "id": str(record["id"]),
        "aliases": sorted({str(a) for a in record.get("aliases") or []}),
        "summary": one_line_summary(record),
        "modified": str(record.get("modified") or ""),
        "affected": affected,
    }


def build(
    records: Iterable[dict[str, Any]], packages: list[str], commit: str, commit_date: str
) -> dict[str, Any]:
    wanted = set(packages)
    kept: dict[str, dict[str, Any]] = {}
    for record in records:
        trimmed = trim(record, wanted)
        if trimmed is not None:
            kept[trimmed["id"]] = trimmed
    return {
        "schema": 1,
        "source": {
            "repository": SOURCE_REPO,
            "commit": commit,
            "commit_date": commit_date,
            "generated_by": "scripts/audit/build_snapshot.py",
        },
        "packages": sorted(wanted),
        "advisories": [kept[k] for k in sorted(kept)],
    }


def dumps(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _git(git_args: list[str], *args: str) -> str:
    out = subprocess.run(["git", *git_args, *args], check=True, capture_output=True, text=True)
    return out.stdout


def _parse(name: str, text: str) -> dict[str, Any]:
    record: dict[str, Any]
    if name.endswith(".json"):
        record = json.loads(text)
    else:
        import yaml  # only the regeneration needs it

        # BaseLoader: every scalar stays a string ("2.0" must not become the float 2.0).
        record = yaml.load(text, Loader=yaml.BaseLoader)
    return record


def read_records(source: Path, rev: str) -> tuple[Iterator[dict[str, Any]], str, str]:
    """(records, commit, commit date) from a checkout or a bare git directory."""
    if (source / "vulns").is_dir():
        git_args = ["-C", str(source)]
        files = sorted(p for p in (source / "vulns").rglob("*") if p.suffix in SUFFIXES)

        def from_tree() -> Iterator[dict[str, Any]]:
            for path in files:
                yield _parse(path.name, path.read_text(encoding="utf-8"))

        records = from_tree()
        rev = "HEAD"
    else:
        git_args = [f"--git-dir={source}"]
        listing = _git(git_args, "ls-tree", "-r", "--name-only", rev, "--", "vulns")
        names = [n for n in listing.splitlines() if n.endswith(SUFFIXES)]
        commit = _git(git_args, "rev-parse", rev).strip()
        batch = "".join(f"{commit}:{n}\n" for n in names)
        raw = subprocess.run(
            ["git", *git_args, "cat-file", "--batch"],
            input=batch.encode(),
            check=True,
            capture_output=True,
        ).stdout

        def from_git() -> Iterator[dict[str, Any]]:
            pos = 0
            for name in names:
                header_end = raw.index(b"\n", pos)
                size = int(raw[pos:header_end].split()[2])
                body = raw[header_end + 1 : header_end + 1 + size]
                pos = header_end + 1 + size + 1
                yield _parse(name, body.decode("utf-8"))

        records = from_git()
    meta = _git(git_args, "log", "-1", "--format=%H %cI", rev).split()
    return records, meta[0], meta[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="checkout or bare git dir of pypa/advisory-database")
    ap.add_argument("--rev", default="HEAD", help="commit to read from a bare git dir")
    ap.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="uv.lock (default: repo's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="snapshot JSON to write")
    args = ap.parse_args(argv)
    try:
        packages = lock_package_names(args.lock)
        records, commit, commit_date = read_records(args.source, args.rev)
        snapshot = build(records, packages, commit, commit_date)
    except ModuleNotFoundError as exc:
        print(f"build_snapshot: {exc}; run it with `uv run --with pyyaml ...`", file=sys.stderr)
        return 2
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"build_snapshot: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(dumps(snapshot), encoding="utf-8")
    print(
        f"build_snapshot: {len(snapshot['advisories'])} advisories for {len(packages)} packages "
        f"from {SOURCE_REPO}@{commit[:12]} ({commit_date}) -> {args.out.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reproducibility checks that need no container builder. Standard library only.

``runtime`` (the default): install the locked runtime environment twice, from nothing, and compare.
Only ``pyproject.toml`` and ``uv.lock`` are copied into two fresh temporary directories; in each,
``uv sync --frozen --no-dev --no-install-project`` runs with its own empty ``UV_CACHE_DIR`` (so
nothing downloaded or built by one is reused by the other), ``SOURCE_DATE_EPOCH`` set, bytecode
compilation off and umask 022. Then every file under the environment's ``bin/`` and
``lib/python3.X/site-packages/`` is hashed (see ``tree_manifest``) and the two digests compared.
Exit 0 when they match, 1 with a listing of the first differing files when they do not, 2 when the
check could not run. The same digest is what ``measurements.txt`` records as
``RuntimeEnvironment.Digest``, so a third party can rerun this and compare.

``uv.lock`` is also scanned for packages that have no wheel usable on CPython 3.12 /
manylinux x86_64 (the image's platform): those would be built from an sdist, which is the usual
way a "locked" environment stops being byte-for-byte reproducible.

``pcrs FILE``: merge the ``Measurements`` of ``nitro-cli build-enclave`` / ``describe-eif`` /
``describe-enclaves`` JSON (FILE) into ``measurements.txt``. If the committed file has no PCRs yet
they are filled in; if it has them, they must be equal (exit 1 otherwise). Used by ``make eif``.

The Python 3.12 used for the environments is ``$UV_PYTHON`` if set, otherwise the one
``scripts/bootstrap.sh`` would pick (its ``find_python`` function is run, not copied).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_TOKEN = b"@VENV@"
DEFAULT_SOURCE_DATE_EPOCH = "1700006400"  # the Dockerfile's default; any fixed value works
# Hashed: bin/ and site-packages. Files there that embed the venv's absolute path (activate*,
# console-script shebangs) are kept, with the path normalised. pyvenv.cfg is deliberately left
# out: it records `home` (where the base interpreter lives on this machine) and the
# interpreter's patch version, properties of the machine rather than of the locked environment;
# both are printed (and recorded in measurements.txt) separately.
SKIP_DIR_NAMES = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")
# Top-level site-packages entries that several wheels install over each other: eth-abi, eth-rlp
# and hexbytes each ship their Sphinx `docs/` as a top-level package, with different contents.
# uv installs wheels in parallel, so which copy survives varies from run to run (found by this
# script). Nothing imports them; the Dockerfile deletes them right after `uv sync` and so does
# this check (keep the two lists equal: tests/test_deployment.py checks it).
PRUNE_SITE_PACKAGES = ("docs",)


# --------------------------------------------------------------------------- tree digest


def _normalise(data: bytes, prefixes: list[bytes]) -> bytes:
    for p in prefixes:  # longest first, so a resolved path does not leave a partial match
        data = data.replace(p, VENV_TOKEN)
    return data


def _normalise_record(data: bytes) -> bytes:
    """A RECORD's lines for console scripts in bin/ carry the hash of the script as installed,
    i.e. with this venv's absolute path in its shebang; blank those two fields (the scripts
    themselves are hashed, normalised, as bin/ entries)."""
    out = []
    for line in data.split(b"\n"):
        path = line.rsplit(b",", 2)[0] if line.count(b",") >= 2 else line
        if b"/bin/" in path and path.startswith(b"../"):
            line = path + b",,"
        out.append(line)
    return b"\n".join(out)


def fail(msg: str) -> SystemExit:
    """Exit 2: the check could not run (as opposed to 1: it ran and found a difference)."""
    print(f"verify-reproducible: {msg}", file=sys.stderr)
    return SystemExit(2)


def _venv_prefixes(venv: Path) -> list[bytes]:
    forms = {str(venv), str(venv.absolute()), os.path.realpath(venv)}
    return sorted((f.encode() for f in forms if f), key=len, reverse=True)


def _hashed_roots(venv: Path) -> list[Path]:
    roots = [venv / "bin"]
    roots += sorted(venv.glob("lib/python3.*/site-packages"))
    return [r for r in roots if r.is_dir()]


def tree_manifest(venv: Path, installed_at: str | None = None) -> dict[str, str]:
    """One line per entry under the venv's bin/ and site-packages, keyed by venv-relative path.

    Each value is ``<kind> <mode> <sha256>``: kind ``f`` (file) or ``l`` (symlink); mode is the
    permission bits in octal (files) or ``-`` (links); the hash is over the content with every
    occurrence of the venv's absolute path replaced by ``@VENV@`` (shebangs, activate scripts,
    RECORD files never contain it, but console-script shebangs do). A symlink's target is hashed
    instead: as written when relative, ``@VENV@/…`` when absolute inside the venv, and
    ``<base-interpreter>`` when absolute outside it (bin/python → wherever this machine keeps
    CPython 3.12). ``__pycache__`` and ``*.pyc`` are
    skipped (bytecode is not installed: UV_COMPILE_BYTECODE=0, PYTHONDONTWRITEBYTECODE=1).
    Modification times are not part of the digest.
    """
    venv = Path(venv)
    prefixes = _venv_prefixes(venv)
    if installed_at:  # a venv copied out of an image: its files name where it was installed
        prefixes = sorted({*prefixes, installed_at.rstrip("/").encode()}, key=len, reverse=True)
    real_venv = os.path.realpath(venv)
    out: dict[str, str] = {}
    for root in _hashed_roots(venv):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIR_NAMES)
            # os.walk lists symlinks to directories in dirnames; record them as links too
            entries = [
                *filenames,
                *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))),
            ]
            for name in sorted(entries):
                if name.endswith(SKIP_SUFFIXES):
                    continue
                path = Path(dirpath, name)
                rel = path.relative_to(venv).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(path)
                    resolved = os.path.realpath(path)
                    if os.path.isabs(target):
                        inside = resolved == real_venv or resolved.startswith(real_venv + os.sep)
                        target = (
                            "@VENV@/" + os.path.relpath(resolved, real_venv)
                            if inside
                            else "<base-interpreter>"
                        )
                    digest = hashlib.sha256(target.encode()).hexdigest()
                    out[rel] = f"l - {digest}"
                elif stat.S_ISREG(st.st_mode):
                    data = _normalise(path.read_bytes(), prefixes)
                    if name == "RECORD" and path.parent.name.endswith(".dist-info"):
                        data = _normalise_record(data)
                    mode = format(stat.S_IMODE(st.st_mode), "04o")
                    out[rel] = f"f {mode} {hashlib.sha256(data).hexdigest()}"
    return out


def manifest_digest(manifest: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(manifest):
        h.update(f"{manifest[rel]} {rel}\n".encode())
    return h.hexdigest()


def tree_digest(venv: Path, installed_at: str | None = None) -> tuple[str, int]:
    m = tree_manifest(venv, installed_at)
    return manifest_digest(m), len(m)


def diff_manifests(a: dict[str, str], b: dict[str, str], limit: int = 25) -> list[str]:
    lines = []
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            lines.append(f"  {rel}: {a.get(rel, '<missing>')}  !=  {b.get(rel, '<missing>')}")
            if len(lines) >= limit:
                lines.append("  …")
                break
    return lines


# --------------------------------------------------------------------------- sdist risk

_PLAT_ALIASES = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _plat_ok(plat: str, arch: str, glibc: tuple[int, int]) -> bool:
    if plat == "any":
        return True
    if not plat.endswith("_" + arch):
        return False
    base = plat[: -len(arch) - 1]
    if base in _PLAT_ALIASES:
        return _PLAT_ALIASES[base] <= glibc
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)", base)
    return m is not None and (int(m.group(1)), int(m.group(2))) <= glibc


def wheel_fits(
    filename: str,
    py: tuple[int, int] = (3, 12),
    arch: str = "x86_64",
    glibc: tuple[int, int] = (2, 36),
) -> bool:
    """Whether a wheel installs on CPython ``py``, manylinux ``arch`` with ``glibc`` (bookworm)."""
    parts = filename[: -len(".whl")].split("-")
    if len(parts) < 5:
        return False
    pytags, abis, plats = (t.split(".") for t in parts[-3:])
    cp = f"cp{py[0]}{py[1]}"
    for pt in pytags:
        for abi in abis:
            if abi == cp and pt == cp:
                pass
            elif abi == "abi3" and (m := re.fullmatch(r"cp(\d)(\d+)", pt)):
                if (int(m.group(1)), int(m.group(2))) > py:
                    continue
            elif abi == "none" and pt in {cp, f"py{py[0]}", f"py{py[0]}{py[1]}"}:
                pass
            else:
                continue
            if any(_plat_ok(p, arch, glibc) for p in plats):
                return True
    return False


def sdist_risks(lock_path: Path) -> list[dict[str, object]]:
    """Registry packages in uv.lock without a wheel for cp312 / manylinux x86_64."""
    import tomllib  # 3.11+; imported here so `pcrs` runs on an older python3 (e.g. the EC2 host)

    lock = tomllib.loads(lock_path.read_text())
    risks = []
    for pkg in lock.get("package", []):
        if "registry" not in pkg.get("source", {}):
            continue  # the project itself (editable / virtual)
        wheels = [w["url"].rsplit("/", 1)[-1] for w in pkg.get("wheels", [])]
        if not any(wheel_fits(w) for w in wheels):
            risks.append(
                {"name": pkg["name"], "version": pkg["version"], "has_sdist": "sdist" in pkg}
            )
    return risks


def prune(venv: Path) -> None:
    """The post-install step the Dockerfile runs too (see PRUNE_SITE_PACKAGES)."""
    for sp in venv.glob("lib/python3.*/site-packages"):
        for name in PRUNE_SITE_PACKAGES:
            shutil.rmtree(sp / name, ignore_errors=True)


def record_overlaps(venv: Path) -> dict[str, list[str]]:
    """Paths that more than one installed distribution's RECORD claims (outside the pruned
    ones): whichever wheel is unpacked last wins, and uv unpacks in parallel."""
    owners: dict[str, set[str]] = {}
    for sp in venv.glob("lib/python3.*/site-packages"):
        for rec in sp.glob("*.dist-info/RECORD"):
            dist = rec.parent.name[: -len(".dist-info")]
            for line in rec.read_text(errors="replace").splitlines():
                path = line.rsplit(",", 2)[0]
                if path and path.split("/", 1)[0] not in PRUNE_SITE_PACKAGES:
                    owners.setdefault(path, set()).add(dist)
    return {p: sorted(d) for p, d in sorted(owners.items()) if len(d) > 1}


def _installed_names(venv: Path) -> set[str]:
    names = set()
    for sp in venv.glob("lib/python3.*/site-packages"):
        for d in sp.glob("*.dist-info"):
            names.add(re.sub(r"[-_.]+", "-", d.name.rsplit("-", 1)[0]).lower())
    return names


# --------------------------------------------------------------------------- environment set-up


def find_python() -> str:
    if os.environ.get("UV_PYTHON"):
        return os.environ["UV_PYTHON"]
    # Run bootstrap.sh's own find_python (extracted, not duplicated), without the rest of it.
    script = (
        "set -euo pipefail; eval \"$(sed -n '/^find_python() {/,/^}/p' scripts/bootstrap.sh)\"; "
        "declare -F find_python >/dev/null "
        '|| { echo "no find_python in bootstrap.sh" >&2; exit 3; }; '
        "find_python"
    )
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise fail(
            "no Python 3.12 found (set UV_PYTHON, or see scripts/bootstrap.sh)"
            + (f"\n{r.stderr.strip()}" if r.stderr.strip() else "")
        )
    return r.stdout.strip().splitlines()[-1]


def find_uv() -> list[str]:
    if os.environ.get("UV"):
        return [os.environ["UV"]]
    uv = shutil.which("uv")
    if uv:
        return [uv]
    # scripts/bootstrap.sh may have pip-installed uv where PATH does not look; it then runs it
    # as `python -m uv`, and so do we
    r = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True)
    if r.returncode == 0:
        return [sys.executable, "-m", "uv"]
    raise fail("uv not found (run scripts/bootstrap.sh, or set UV=...)")


def dockerfile_uv_version() -> str | None:
    try:
        text = (ROOT / "Dockerfile").read_text()
    except OSError:
        return None
    m = re.search(r"^ARG UV_VERSION=(\S+)", text, re.M)
    return m.group(1) if m else None


def sync_once(workdir: Path, uv: list[str], python: str, epoch: str) -> tuple[Path, float]:
    proj = workdir / "env"  # same basename in both runs: uv derives the venv prompt from it
    proj.mkdir()
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy2(ROOT / name, proj / name)
    cache = workdir / "uv-cache"
    cache.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("UV_") and k not in {"VIRTUAL_ENV", "PYTHONPATH"}
    }
    env.update(
        UV_CACHE_DIR=str(cache),
        UV_PYTHON=python,
        UV_PYTHON_DOWNLOADS="never",
        UV_COMPILE_BYTECODE="0",
        UV_LINK_MODE="copy",
        PYTHONDONTWRITEBYTECODE="1",
        SOURCE_DATE_EPOCH=epoch,
    )
    t0 = time.monotonic()
    r = subprocess.run(
        [*uv, "sync", "--frozen", "--no-dev", "--no-install-project", "--quiet"],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise fail(f"uv sync failed in {proj}:\n{r.stderr}")
    prune(proj / ".venv")
    return proj / ".venv", time.monotonic() - t0


def cmd_runtime(args: argparse.Namespace) -> int:
    os.umask(0o022)
    python = find_python()
    uv = find_uv()
    uv_version = subprocess.run([*uv, "--version"], capture_output=True, text=True).stdout.strip()
    probe = "import platform,sys;print(platform.python_version(), sys.platform, platform.machine())"
    try:
        pyver = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise fail(f"cannot run the Python {python!r}: {exc}") from None
    if len(pyver) != 3 or not pyver[0].startswith("3.12."):
        raise fail(f"{python} is not CPython 3.12 ({' '.join(pyver)})")
    epoch = os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH)
    print(f"python: {python} ({' '.join(pyver)})")
    print(f"uv:     {uv_version}")
    pinned = dockerfile_uv_version()
    if pinned and pinned not in uv_version.split():
        print(
            f"note:   the Dockerfile pins uv {pinned}; a different uv may write different "
            "RECORD/launcher bytes, so compare digests made with the same uv"
        )
    t_start = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="trio-gw-repro-") as tmp:
        for label in ("a", "b"):
            work = Path(tmp, label)
            work.mkdir()
            venv, secs = sync_once(work, uv, python, epoch)
            manifest = tree_manifest(venv)
            digest = manifest_digest(manifest)
            results.append((label, venv, manifest, digest, secs))
            print(f"env {label}: sha256:{digest}  files={len(manifest)}  sync={secs:.1f}s")
        installed = _installed_names(results[0][1])
        overlaps = record_overlaps(results[0][1])
        if args.manifest_out:
            Path(args.manifest_out).write_text(
                "".join(f"{results[0][2][k]} {k}\n" for k in sorted(results[0][2]))
            )
    total = time.monotonic() - t_start
    risks = sdist_risks(ROOT / "uv.lock")
    runtime_risks = [r for r in risks if str(r["name"]) in installed]
    print(f"total:  {total:.1f}s")
    if risks:
        print(
            "uv.lock packages with no cp312 manylinux x86_64 wheel (built from sdist if installed):"
        )
        for r in risks:
            where = "RUNTIME" if r in runtime_risks else "not installed at runtime"
            sd = "sdist available" if r["has_sdist"] else "no sdist either"
            print(f"  {r['name']} {r['version']}: {sd}; {where}")
    else:
        print("uv.lock: every package has a cp312 manylinux x86_64 (or pure) wheel")
    if overlaps:
        print("files installed by more than one distribution (last unpacked wins: a risk):")
        for path, dists in list(overlaps.items())[:20]:
            print(f"  {path}: {', '.join(dists)}")
    (_, _, ma, da, _), (_, _, mb, db, _) = results
    if args.json:
        print(
            json.dumps(
                {
                    "Digest": f"sha256:{da}",
                    "Files": len(ma),
                    "Python": pyver[0],
                    "Platform": f"{pyver[1]}-{pyver[2]}",
                    "Uv": uv_version,
                    "SourceDateEpoch": int(epoch),
                    "SdistRuntimeRisks": [r["name"] for r in runtime_risks],
                }
            )
        )
    if da != db or ma != mb:
        print("MISMATCH: the two environments differ; first differing files:", file=sys.stderr)
        print("\n".join(diff_manifests(ma, mb)), file=sys.stderr)
        return 1
    print(f"OK: both environments hash to sha256:{da} ({len(ma)} files)")
    measured = {
        "Digest": f"sha256:{da}",
        "Files": len(ma),
        "UvLockSha256": hashlib.sha256((ROOT / "uv.lock").read_bytes()).hexdigest(),
        "MeasuredOn": {
            "Python": pyver[0],
            "Platform": f"{pyver[1]}-{pyver[2]}",
            "Uv": uv_version.split()[1] if len(uv_version.split()) > 1 else uv_version,
        },
    }
    return compare_with_recorded(measured, Path(args.measurements), record=args.record)


RUNTIME_NOTE = {
    "Scope": "bin/ and lib/python3.12/site-packages/ of the environment made by "
    "`uv sync --frozen --no-dev --no-install-project` from pyproject.toml + uv.lock alone "
    "(site-packages/docs removed, as in the Dockerfile); per file: venv-relative path, mode, "
    "sha256 of the content with the venv's absolute path replaced by @VENV@; RECORD hashes of "
    "bin/ scripts blanked; __pycache__ excluded; pyvenv.cfg not included",
    "HowToReproduce": "make verify-reproducible (or: python3 scripts/verify-reproducible.py); "
    "the image's /app/.venv, copied out with docker cp: python3 scripts/verify-reproducible.py "
    "digest DIR --installed-at /app/.venv",
}


def compare_with_recorded(measured: dict[str, object], target: Path, *, record: bool) -> int:
    doc = json.loads(target.read_text()) if target.exists() else {}
    if record:
        doc.setdefault("Measurements", {})
        doc["RuntimeEnvironment"] = {**measured, **RUNTIME_NOTE}
        target.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"recorded in {target}")
        return 0
    rec = doc.get("RuntimeEnvironment") if isinstance(doc, dict) else None
    if not isinstance(rec, dict) or not rec.get("Digest"):
        print(f"note:   {target} records no runtime digest (--record writes it)")
        return 0
    on, rec_on = measured["MeasuredOn"], rec.get("MeasuredOn", {})
    assert isinstance(on, dict)
    if rec.get("UvLockSha256") != measured["UvLockSha256"]:
        print(f"note:   {target} was measured for another uv.lock: re-record it (--record)")
    elif rec_on.get("Platform") != on["Platform"] or rec_on.get("Uv") != on["Uv"]:
        print(
            f"note:   {target} was measured on {rec_on.get('Platform')} with uv "
            f"{rec_on.get('Uv')}; not comparable here"
        )
    elif rec.get("Digest") != measured["Digest"]:
        print(
            f"MISMATCH: {target} records {rec.get('Digest')}, this machine made "
            f"{measured['Digest']} from the same uv.lock with the same uv",
            file=sys.stderr,
        )
        return 1
    else:
        print(f"OK: equal to the digest recorded in {target}")
    return 0


# --------------------------------------------------------------------------- PCRs


def _measurements_of(doc: object) -> dict[str, object]:
    if isinstance(doc, list):  # describe-enclaves: a list of enclaves
        if not doc:
            raise fail("no enclave in the describe output")
        doc = doc[0]
    if not isinstance(doc, dict) or not isinstance(doc.get("Measurements"), dict):
        raise fail("no 'Measurements' object in the nitro-cli output")
    m: dict[str, object] = doc["Measurements"]
    for k in ("PCR0", "PCR1", "PCR2"):
        v = m.get(k)
        if not (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{96}", v)):
            raise fail(f"{k} is not 96 hex digits in the nitro-cli output")
    return m


def cmd_pcrs(args: argparse.Namespace) -> int:
    try:
        new = _measurements_of(json.loads(Path(args.nitro_json).read_text()))
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read {args.nitro_json}: {exc}") from None
    target = Path(args.measurements)
    doc = json.loads(target.read_text()) if target.exists() else {"Measurements": {}}
    old = doc.setdefault("Measurements", {})
    keys = ("HashAlgorithm", "PCR0", "PCR1", "PCR2")
    if all(isinstance(old.get(k), str) for k in ("PCR0", "PCR1", "PCR2")):
        bad = [k for k in keys if old.get(k) != new.get(k)]
        if bad:
            print(f"MISMATCH with {target}:", file=sys.stderr)
            for k in bad:
                print(
                    f"  {k}: committed {old.get(k)}\n  {' ' * len(k)}  built     {new.get(k)}",
                    file=sys.stderr,
                )
            return 1
        print(f"OK: PCR0/1/2 equal the committed {target}")
        return 0
    for k in keys:
        old[k] = new.get(k)
    old.pop("Status", None)
    old.pop("HowToMeasure", None)
    old["MeasuredWith"] = args.tool or "nitro-cli build-enclave"
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{target}: PCRs filled in from {args.nitro_json}; review and commit it")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    venv = Path(args.venv)
    if not (venv / "bin").is_dir():
        print(
            f"verify-reproducible: {venv} has no bin/: not a virtual environment", file=sys.stderr
        )
        return 2
    digest, files = tree_digest(venv, args.installed_at)
    print(f"sha256:{digest}  files={files}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="verify-reproducible.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    rt = sub.add_parser("runtime", help="two clean installs of the locked runtime env (default)")
    rt.add_argument("--manifest-out", help="write the per-file manifest of env a here")
    rt.add_argument("--json", action="store_true", help="also print a JSON summary line")
    rt.add_argument(
        "--measurements",
        default=str(ROOT / "measurements.txt"),
        help="compare with (or, with --record, write) its RuntimeEnvironment",
    )
    rt.add_argument(
        "--record", action="store_true", help="write the digest into the measurements file"
    )
    pc = sub.add_parser("pcrs", help="fill in or compare measurements.txt from nitro-cli JSON")
    pc.add_argument("nitro_json")
    pc.add_argument("--measurements", default=str(ROOT / "measurements.txt"))
    pc.add_argument("--tool", help="what produced the JSON (recorded when filling in)")
    dg = sub.add_parser(
        "digest",
        help="digest of an existing venv (e.g. /app/.venv copied out "
        "of the image with `docker cp`)",
    )
    dg.add_argument("venv")
    dg.add_argument("--installed-at", help="absolute path the venv was installed at (/app/.venv)")
    args = p.parse_args(argv)
    if args.cmd == "digest":
        return cmd_digest(args)
    if args.cmd == "pcrs":
        return cmd_pcrs(args)
    if args.cmd is None:
        args = rt.parse_args([])
    return cmd_runtime(args)


if __name__ == "__main__":
    sys.exit(main())

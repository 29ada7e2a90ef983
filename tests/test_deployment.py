"""Deployment files: pins, start-up script behaviour, measurements, the runtime-tree digest.

Fast and offline. The two-environment reproducibility run itself (`make verify-reproducible`)
is not run here: it installs the locked environment twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
START = REPO / "scripts" / "start.sh"
RUN_ENCLAVE = REPO / "scripts" / "run-enclave.sh"
HEX64 = re.compile(r"[0-9a-f]{64}")
DEPLOY_FILES = [
    "Dockerfile",
    ".dockerignore",
    "scripts/start.sh",
    "scripts/run-enclave.sh",
    "scripts/verify-reproducible.py",
    "measurements.txt",
    "docs/deployment.md",
]


def _load_verify() -> ModuleType:
    path = REPO / "scripts" / "verify-reproducible.py"
    spec = importlib.util.spec_from_file_location("verify_reproducible", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vr = _load_verify()


def _dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [
        ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]


# --------------------------------------------------------------------------- Dockerfile


def test_every_base_image_is_pinned_by_tag_and_digest() -> None:
    froms = [ln for ln in _dockerfile_lines() if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage: nitriding builder + runtime"
    stages: set[str] = set()
    for ln in froms:
        words = [w for w in ln.split()[1:] if not w.startswith("--platform")]
        image = words[0]
        assert image not in stages, f"FROM an earlier stage is fine but unexpected here: {ln}"
        m = re.fullmatch(r"([^@\s:]+(?:/[^@\s:]+)*):([^@\s]+)@sha256:([0-9a-f]+)", image)
        assert m, f"not pinned as name:tag@sha256:<digest>: {ln}"
        assert HEX64.fullmatch(m.group(3)), f"digest is not 64 hex digits: {ln}"
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
    images = " ".join(froms)
    assert re.search(r"golang:1\.24\.\d+-bookworm@sha256:", images)
    assert re.search(r"python:3\.12\.\d+-slim[-\w]*@sha256:", images)
    # COPY --from must name a stage of this file, never a floating image
    for ln in _dockerfile_lines():
        m = re.match(r"COPY\s+.*--from=(\S+)", ln, re.I)
        if m:
            src = m.group(1)
            assert src in stages or "@sha256:" in src, f"COPY --from an unpinned image: {ln}"


def test_nitriding_is_built_from_a_full_commit_with_its_makefile() -> None:
    text = DOCKERFILE.read_text()
    m = re.search(r"^ARG NITRIDING_COMMIT=(\S+)$", text, re.M)
    assert m, "ARG NITRIDING_COMMIT=<commit> missing"
    commit = m.group(1)
    assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
    assert commit.startswith("2b7dfefa"), "the reference's nitriding pin"
    assert re.search(r'test "\$\(git (-C \S+ )?rev-parse HEAD\)" = "\$NITRIDING_COMMIT"', text)
    assert re.search(r"make (-C \S+ )?nitriding", text)


def test_uv_sync_is_frozen_without_dev_and_uv_itself_is_pinned() -> None:
    lines = _dockerfile_lines()
    syncs = [ln for ln in lines if "uv sync" in ln]
    assert syncs, "no uv sync in the Dockerfile"
    for ln in syncs:
        for flag in ("--frozen", "--no-dev", "--no-install-project"):
            assert flag in ln, f"uv sync without {flag}"
        assert "UV_COMPILE_BYTECODE=0" in ln
        assert "--no-cache" in ln
    text = DOCKERFILE.read_text()
    version = re.search(r"^ARG UV_VERSION=(\S+)$", text, re.M)
    sha = re.search(r"^ARG UV_SHA256=(\S+)$", text, re.M)
    assert version and re.fullmatch(r"\d+\.\d+\.\d+", version.group(1))
    assert sha and HEX64.fullmatch(sha.group(1))
    assert "--require-hashes" in text
    assert re.search(r"^ENV PYTHONDONTWRITEBYTECODE=1", text, re.M)
    assert re.search(r"^ARG SOURCE_DATE_EPOCH=\d+$", text, re.M), "fixed default epoch"


def test_no_unpinned_apt_and_entrypoint_and_ports() -> None:
    text = DOCKERFILE.read_text()
    lines = _dockerfile_lines()
    if re.search(r"\bapt(-get)?\s+install\b", " ".join(lines)):
        assert "snapshot.debian.org" in text, "apt installs must come from a snapshot date"
    expose = [ln for ln in lines if ln.startswith("EXPOSE")]
    assert expose and set(expose[0].split()[1:]) == {"443", "8000", "8001", "8080"}
    assert any(ln.startswith("CMD") and "start.sh" in ln for ln in lines)
    assert "COPY scripts/start.sh" in text and "COPY trio_gateway" in text


def test_dockerfile_prunes_what_the_runtime_check_prunes() -> None:
    text = DOCKERFILE.read_text()
    for name in vr.PRUNE_SITE_PACKAGES:
        assert f"/app/.venv/lib/python3.12/site-packages/{name}" in text


def test_dockerignore_keeps_secrets_and_noise_out() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") :].count("*") == 1
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "uv.lock", "trio_gateway/", "scripts/start.sh"}
    for must in (".env", ".git", ".venv", "tests", "measurements.txt", "scripts/run-enclave.sh"):
        assert must in lines
    assert "**/__pycache__" in lines


# --------------------------------------------------------------------------- scripts


def test_every_shell_script_parses() -> None:
    scripts = sorted((REPO / "scripts").glob("*.sh"))
    assert START in scripts and RUN_ENCLAVE in scripts
    for path in scripts:
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name}: {r.stderr}"
        head = path.read_text().splitlines()[:30]
        if path in (START, RUN_ENCLAVE):
            assert "set -euo pipefail" in head


def test_start_sh_execs_the_gateway_with_the_reference_nitriding_flags() -> None:
    text = START.read_text()
    assert re.search(
        r"^exec python -m trio_gateway --host \S+ --port \S+ \\\n"
        r"\s+--operator-host 0\.0\.0\.0 --operator-port \S+$",
        text,
        re.M,
    )
    for flag in ("-fqdn", "-ext-pub-port 443", "-intport", "-wait-for-app", "-appwebsrv"):
        assert flag in text
    assert "NITRIDING_FQDN:-localhost" in text
    assert "-acme" in text
    assert "sleep 1\n" not in text, "a bounded poll, not a blind sleep"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAKE_NITRIDING = """#!{py}
import os, socket, sys, time
args = sys.argv[1:]
open(os.environ["FAKE_DIR"] + "/nitriding.args", "w").write("\\n".join(args))
if os.environ.get("FAKE_MODE") == "die":
    sys.exit(7)
port = int(args[args.index("-intport") + 1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen()
flag = os.environ["FAKE_DIR"] + "/gateway.started"
for _ in range(200):  # exit once the gateway runs: the watchdog must then stop it
    if os.path.exists(flag):
        break
    time.sleep(0.05)
"""

FAKE_PYTHON = """#!{py}
import os, signal, sys, time
d = os.environ["FAKE_DIR"]
open(d + "/gateway.args", "w").write("\\n".join(sys.argv[1:]))
def on_term(signum, frame):
    open(d + "/gateway.sigterm", "w").write("1")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(d + "/gateway.started", "w").write(str(os.getpid()))
time.sleep(15)
sys.exit(5)
"""


def _run_start(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("nitriding", FAKE_NITRIDING), ("python", FAKE_PYTHON)):
        p = bindir / name
        p.write_text(body.format(py=sys.executable))
        p.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "FAKE_MODE": mode,
        "APP_DIR": str(tmp_path),
        "NITRIDING_INTPORT": str(_free_port()),
        "NITRIDING_WAIT_SECONDS": "5",
        "NITRIDING_LOST_KILL_AFTER": "1",
    }
    return subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.socket
def test_start_sh_gateway_is_stopped_when_nitriding_dies(tmp_path: Path) -> None:
    r = _run_start(tmp_path, "ok")
    args = (tmp_path / "nitriding.args").read_text().split("\n")
    assert args[:2] == ["-fqdn", "localhost"]
    assert "-appwebsrv" in args and args[args.index("-appwebsrv") + 1] == "http://127.0.0.1:8000"
    assert args[args.index("-ext-pub-port") + 1] == "443"
    assert "-wait-for-app" in args and "-acme" not in args
    gw = (tmp_path / "gateway.args").read_text().split("\n")
    assert gw == [
        "-m",
        "trio_gateway",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--operator-host",
        "0.0.0.0",
        "--operator-port",
        "8001",
    ]
    # exec: the gateway kept the script's PID, so the watchdog's SIGTERM reached it
    assert (tmp_path / "gateway.sigterm").exists(), r.stderr
    assert "FATAL: nitriding exited" in r.stderr
    assert r.returncode == 0  # the gateway's own status after a clean drain


@pytest.mark.socket
def test_start_sh_fails_when_nitriding_dies_during_startup(tmp_path: Path) -> None:
    r = _run_start(tmp_path, "die")
    assert r.returncode == 1, r.stderr
    assert "nitriding exited during start-up" in r.stderr
    assert not (tmp_path / "gateway.args").exists(), "the gateway must not start"


def test_run_enclave_help_and_missing_tools(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(RUN_ENCLAVE), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage:" in r.stdout and "EIF_PATH" in r.stdout
    eif = tmp_path / "x.eif"
    eif.write_bytes(b"")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "basename", "cat", "stat"):
        found = shutil.which(tool)
        assert found
        (bindir / tool).symlink_to(found)
    r = subprocess.run(
        ["bash", str(RUN_ENCLAVE), str(eif)],
        env={"PATH": str(bindir)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "nitro-cli not found" in r.stderr
    r = subprocess.run(["bash", str(RUN_ENCLAVE)], capture_output=True, text=True)
    assert r.returncode == 1 and "EIF_PATH is required" in r.stderr
    text = RUN_ENCLAVE.read_text()
    for field in (
        "openai_api_key", "anthropic_api_key", "google_api_key", "xai_api_key",
        "bytedance_api_key", "nous_api_key", "facilitator_url", "pay_to_address", "network",
        "heartbeat_contract_address", "tee_heartbeat_interval", "tee_heartbeat_buffer",
    ):  # fmt: skip
        assert f'"{field}"' in text
    assert "terminate-enclave --all" in text and "192.168.127.2:443" in text


def test_makefile_has_the_deployment_targets() -> None:
    text = (REPO / "Makefile").read_text()
    for target in ("image", "eif", "run-enclave", "verify-reproducible"):
        assert re.search(rf"^{re.escape(target)}:", text, re.M), target
    assert "rewrite-timestamp=true" in text and "SOURCE_DATE_EPOCH" in text
    assert "nitro-cli build-enclave" in text


def test_no_machine_paths_in_deployment_files() -> None:
    for rel in DEPLOY_FILES:
        text = (REPO / rel).read_text()
        for bad in (f"/{d}/" for d in ("work", "root", "home")):  # built: this file is checked too
            assert bad not in text, f"{rel} mentions {bad}"


# --------------------------------------------------------------------------- measurements


def test_measurements_txt_shape() -> None:
    doc = json.loads((REPO / "measurements.txt").read_text())
    m = doc["Measurements"]
    assert {"HashAlgorithm", "PCR0", "PCR1", "PCR2"} <= set(m)
    pcrs = [m[k] for k in ("PCR0", "PCR1", "PCR2")]
    if all(p is None for p in pcrs):
        assert "NOT MEASURED" in m["Status"] and "make eif" in m["HowToMeasure"]
    else:
        assert all(isinstance(p, str) and re.fullmatch(r"[0-9a-f]{96}", p) for p in pcrs)
    rt = doc["RuntimeEnvironment"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", rt["Digest"])
    assert rt["Files"] > 0 and HEX64.fullmatch(rt["UvLockSha256"])
    assert {"Python", "Platform", "Uv"} <= set(rt["MeasuredOn"])


def test_pcrs_fill_in_then_must_match(tmp_path: Path) -> None:
    target = tmp_path / "measurements.txt"
    shutil.copy(REPO / "measurements.txt", target)
    doc = json.loads(target.read_text())
    doc["Measurements"] = {k: None for k in ("HashAlgorithm", "PCR0", "PCR1", "PCR2")}
    target.write_text(json.dumps(doc))
    built = {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": "a" * 96,
        "PCR1": "b" * 96,
        "PCR2": "c" * 96,
    }
    nitro = tmp_path / "nitro.json"
    nitro.write_text(json.dumps({"Measurements": built}))
    assert vr.main(["pcrs", str(nitro), "--measurements", str(target)]) == 0
    filled = json.loads(target.read_text())
    assert filled["Measurements"]["PCR0"] == "a" * 96
    assert filled["RuntimeEnvironment"] == doc["RuntimeEnvironment"]
    assert vr.main(["pcrs", str(nitro), "--measurements", str(target)]) == 0
    # the describe-enclaves shape (a list), with a PCR that differs from the committed one
    nitro.write_text(json.dumps([{"Measurements": {**built, "PCR2": "d" * 96}}]))
    assert vr.main(["pcrs", str(nitro), "--measurements", str(target)]) == 1


# --------------------------------------------------------------------------- tree digest


def _fake_venv(root: Path, base_python: str) -> Path:
    venv = root / "env" / ".venv"
    sp = venv / "lib" / "python3.12" / "site-packages"
    (venv / "bin").mkdir(parents=True)
    sp.mkdir(parents=True)
    script = f"#!{venv}/bin/python\nimport sys\nfrom hypercorn.__main__ import main\nmain()\n"
    (venv / "bin" / "hypercorn").write_text(script)
    (venv / "bin" / "hypercorn").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'VIRTUAL_ENV="{venv}"\nexport VIRTUAL_ENV\n')
    (venv / "bin" / "python").symlink_to(base_python)
    (venv / "bin" / "python3").symlink_to("python")
    (sp / "pkg").mkdir()
    (sp / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (sp / "pkg" / "__pycache__").mkdir()
    (sp / "pkg" / "__pycache__" / "__init__.cpython-312.pyc").write_bytes(os.urandom(16))
    info = sp / "pkg-1.0.dist-info"
    info.mkdir()
    digest = hashlib.sha256(script.encode()).hexdigest()
    (info / "RECORD").write_text(
        f"../../../bin/hypercorn,sha256={digest},{len(script)}\n"
        "pkg/__init__.py,sha256=abc,10\npkg-1.0.dist-info/RECORD,,\n"
    )
    (venv / "pyvenv.cfg").write_text(f"home = {Path(base_python).parent}\n")
    return venv


def test_tree_digest_ignores_where_the_venv_lives(tmp_path: Path) -> None:
    a = _fake_venv(tmp_path / "first-location", "/usr/local/bin/python3.12")
    b = _fake_venv(tmp_path / "second" / "deeper", "/opt/python/3.12.1/bin/python3.12")
    da, na = vr.tree_digest(a)
    db, nb = vr.tree_digest(b)
    assert (da, na) == (db, nb)
    assert na == 6  # hypercorn, activate, python, python3, pkg/__init__.py, RECORD
    assert not any("__pycache__" in p for p in vr.tree_manifest(a))


def test_tree_digest_sees_a_one_byte_change_and_a_mode_change(tmp_path: Path) -> None:
    a = _fake_venv(tmp_path / "a", "/usr/bin/python3.12")
    b = _fake_venv(tmp_path / "b", "/usr/bin/python3.12")
    init = b / "lib" / "python3.12" / "site-packages" / "pkg" / "__init__.py"
    init.write_text("VALUE = 2\n")
    assert vr.tree_digest(a)[0] != vr.tree_digest(b)[0]
    diff = vr.diff_manifests(vr.tree_manifest(a), vr.tree_manifest(b))
    assert len(diff) == 1 and "pkg/__init__.py" in diff[0]
    init.write_text("VALUE = 1\n")
    assert vr.tree_digest(a)[0] == vr.tree_digest(b)[0]
    init.chmod(init.stat().st_mode | stat.S_IXUSR)
    assert vr.tree_digest(a)[0] != vr.tree_digest(b)[0]


def test_tree_digest_of_a_copied_out_venv(tmp_path: Path) -> None:
    """A venv copied out of the image keeps /app/.venv in its files: --installed-at says so."""
    here = _fake_venv(tmp_path / "here", "/usr/local/bin/python3.12")
    copied = tmp_path / "copied"
    shutil.copytree(here, copied, symlinks=True)
    for p in (copied / "bin" / "hypercorn", copied / "bin" / "activate"):
        p.write_text(p.read_text().replace(str(here), "/app/.venv"))
    assert vr.tree_digest(copied, "/app/.venv")[0] == vr.tree_digest(here)[0]
    assert vr.tree_digest(copied)[0] != vr.tree_digest(here)[0]


def test_wheel_tags_for_the_image_platform() -> None:
    fits = vr.wheel_fits
    assert fits("cryptography-46.0.0-cp311-abi3-manylinux_2_34_x86_64.whl")
    assert fits("pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert fits("trio-0.35.0-py3-none-any.whl")
    assert not fits("pywin32-312-cp312-cp312-win_amd64.whl")
    assert not fits("x-1.0-cp312-cp312-manylinux_2_39_x86_64.whl")  # newer glibc than bookworm
    assert not fits("x-1.0-cp313-cp313-manylinux_2_17_x86_64.whl")
    assert not fits("x-1.0-cp312-cp312-musllinux_1_2_x86_64.whl")
    assert not fits("x-1.0-cp312-cp312-manylinux_2_17_aarch64.whl")

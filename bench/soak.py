"""`make soak`: a long paid run with random client disconnects; asserts nothing leaks and the money
balances. Not part of CI's default run (30 minutes by default).

Processes (loopback only): ../shared/bench/mock_upstream.py as the provider, bench/paid_setup.py's
loopback x402 facilitator (the test suite's: real Permit2 signatures over an in-memory chain), and
the gateway (`python -m trio_gateway --dev --payments`, pinned to CPU 0; everything else on CPU 1).
A few x402 sessions are opened with the SDK client, then ``--concurrency`` client tasks loop for
``--minutes``: each request is a paid stream (10 % non-streamed) through one of the sessions, its
token count, pace and TTFT chosen at random and carried to the mock in the bench knobs; about a
third of the clients hang up at a random point (during TTFT or after k chunks, FIN or RST).

Phases: warm-up (1 minute of load) → idle 40 s → baseline sample → the soak → idle 40 s → final
sample → SIGTERM (graceful shutdown settles every session) → checks:

* RSS flat: the final idle RSS is within 15 % (+16 MiB) of the baseline idle RSS, and the slope of
  RSS under load over the second half of the run is below 1 MiB/minute;
* fds flat: the final idle fd count is within 16 of the baseline idle count (upstream keep-alive
  pool variance), and never above 3 x concurrency + 64 under load;
* every request the relay saw was metered once (meter: no duplicates, no unmetered, no errors);
* the ledger balances to the unit: total charged == settled on the chain (facilitator) after the
  shutdown, nothing reserved, nothing unsettled, nothing lost; the gateway exits 0;
* the provider saw every upstream connection closed (no stream and no connection still open at
  the mock once the gateway has exited).

Figures go to bench/results/soak.jsonl (one sample per 10 s) and bench/results/soak-summary.json.
Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = "gpt-4.1"
PAYEE = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
MiB = 1 << 20


# -- processes -----------------------------------------------------------------------------------


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def get_json_any_status(url: str) -> Any:
    try:
        return get_json(url)
    except urllib.error.HTTPError as e:  # /health answers 503 while draining
        return json.loads(e.read())


def wait_http(url: str, limit: float = 30) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            get_json_any_status(url)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"not up: {url}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_sample(pid: int) -> dict[str, int]:
    rss = 0
    threads = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Counts:
    sent: int = 0
    completed: int = 0  # stream ended with [DONE] / non-stream 200 body
    aborted: int = 0  # we hung up on purpose
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


@dataclass(frozen=True)
class Pace:
    """Per request, uniformly at random: tokens, ms between tokens, ms to the first token."""

    tokens: tuple[int, int] = (5, 80)
    delay_ms: tuple[int, int] = (20, 120)
    ttft_ms: tuple[int, int] = (20, 600)


def span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def build_request(
    port: int, session: str, rng: random.Random, seq: int, pace: Pace = Pace()
) -> tuple[bytes, bool]:
    stream = rng.random() >= 0.10
    tokens = rng.randint(*pace.tokens)
    knobs = (
        f"bench-id=soak-{seq} bench-tokens={tokens} "
        f"bench-delay_ms={rng.randint(*pace.delay_ms)} bench-ttft_ms={rng.randint(*pace.ttft_ms)}"
    )
    body: dict[str, Any] = {
        "model": MODEL,
        "stream": stream,
        "max_tokens": 128,
        "messages": [{"role": "user", "content": knobs}],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
        f"x-upto-session: {session}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + data, stream


async def one_request(
    port: int, session: str, rng: random.Random, seq: int, counts: Counts, pace: Pace
) -> None:
    req, stream = build_request(port, session, rng, seq, pace)
    abort = rng.random() < 0.33
    abort_after = rng.randint(0, 20) if abort else -1  # data events before hanging up (0: TTFT)
    rst = rng.random() < 0.5
    sock = trio.socket.socket()
    counts.sent += 1
    try:
        with trio.fail_after(120):
            await sock.connect(("127.0.0.1", port))
            await sock.send(req)
            buf = bytearray()
            if abort and abort_after == 0:
                await trio.sleep(rng.uniform(0.005, 0.3))
                counts.aborted += 1
                return
            while True:
                chunk = await sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if abort and buf.count(b"\ndata: ") + buf.startswith(b"data: ") >= abort_after:
                    counts.aborted += 1
                    return
        status = bytes(buf[9:12])
        if status != b"200":
            counts.error(f"http_{status.decode(errors='replace')}")
        elif stream and b"data: [DONE]" not in buf:
            counts.error("stream_without_done")
        elif not stream and b'"tee_signature"' not in buf:
            counts.error("body_without_signature")
        else:
            counts.completed += 1
    except trio.TooSlowError:
        counts.error("client_timeout")
    except OSError as e:
        counts.error(f"os_{type(e).__name__}")
    finally:
        if rst:  # RST instead of FIN
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        sock.close()


async def load(
    port: int,
    sessions: list[str],
    concurrency: int,
    seconds: float,
    counts: Counts,
    seed: int,
    pace: Pace,
) -> None:
    seq = 0

    async def worker(i: int) -> None:
        nonlocal seq
        rng = random.Random(seed * 100_003 + i)
        await trio.sleep(rng.uniform(0, 2))  # ramp
        while True:
            seq += 1
            await one_request(port, sessions[i % len(sessions)], rng, seq, counts, pace)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(worker, i)


async def sampler(
    pid: int, gw: str, out: Path, t0: float, phase: list[str], rows: list[dict[str, Any]]
) -> None:
    with out.open("a") as fh:
        while True:
            row: dict[str, Any] = {"t": round(time.monotonic() - t0, 1), "phase": phase[0]}
            row.update(proc_sample(pid))
            try:  # an overloaded gateway may not answer in time: record that, go on
                h = await trio.to_thread.run_sync(get_json_any_status, f"{gw}/health")
            except OSError as exc:
                row["health_error"] = type(exc).__name__
            else:
                row["in_flight"] = h.get("in_flight")
                led = h["payments"]["ledger"]
                row["charged"] = led["total_charged"]
                row["reserved"] = led["reserved"]
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            await trio.sleep(10)


async def wait_idle(gw: str, limit: float = 120) -> dict[str, Any]:
    """Until the gateway has nothing in flight and nothing reserved."""
    end = trio.current_time() + limit
    while True:
        h = await trio.to_thread.run_sync(get_json_any_status, f"{gw}/health")
        p = h["payments"]
        if h["in_flight"] == 0 and p["meter"]["in_flight"] == 0 and p["ledger"]["reserved"] == 0:
            return dict(h)
        if trio.current_time() > end:
            raise SystemExit(
                "gateway never went idle: "
                + json.dumps(
                    {"in_flight": h["in_flight"], "meter": p["meter"], "ledger": p["ledger"]}
                )
            )
        await trio.sleep(0.5)


def print_growth(before: Path, after: Path, top: int = 25) -> None:
    import tracemalloc

    a = tracemalloc.Snapshot.load(str(before))
    b = tracemalloc.Snapshot.load(str(after))
    total = sum(s.size for s in b.statistics("filename")) - sum(
        s.size for s in a.statistics("filename")
    )
    print(f"traced Python memory grew by {total / MiB:.2f} MiB between the idle samples")
    for stat in b.compare_to(a, "traceback")[:top]:
        print(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks")
        for line in stat.traceback.format(limit=6):
            print("      " + line)


def slope_mib_per_min(rows: list[dict[str, Any]]) -> float:
    if len(rows) < 3:
        return 0.0
    xs = [r["t"] / 60 for r in rows]
    ys = [r["rss"] / MiB for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def soak(a: argparse.Namespace) -> int:
    bench = Path(a.bench_dir)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    samples = results / "soak.jsonl"
    samples.unlink(missing_ok=True)
    mock_port, fac_port, gw_port = free_port(), free_port(), free_port()
    mock_url, fac_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{fac_port}"
    gw = f"http://127.0.0.1:{gw_port}"
    logs = {n: (results / f"soak-{n}.log").open("wb") for n in ("mock", "facilitator", "gateway")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    procs["mock"] = subprocess.Popen(  # noqa: ASYNC220 - start-up, before any load
        pinned(1, [PY, str(bench / "mock_upstream.py"), "--port", str(mock_port),
                   "--parent-pid", str(os.getpid()), "--max-records", "2000000"]),
        stdout=logs["mock"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs["facilitator"] = subprocess.Popen(  # noqa: ASYNC220
        pinned(1, [PY, str(ROOT / "bench" / "paid_setup.py"), "facilitator",
                   "--port", str(fac_port)]),
        stdout=logs["facilitator"], stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    env = {
        **os.environ,
        "OPENAI_BASE_URL": f"{mock_url}/v1",
        "OPENAI_API_KEY": "sk-soak",
        "TRIO_GATEWAY_PAYMENT_SESSION_CAP": str(10**30),
    }
    try:
        wait_http(f"{mock_url}/health")
        wait_http(f"{fac_url}/supported")
        launcher = (
            [str(ROOT / "bench" / "memtrace_gateway.py"), str(results / "soak-mem")]
            if a.memtrace
            else ["-m", "trio_gateway"]
        )
        procs["gateway"] = subprocess.Popen(  # noqa: ASYNC220
            pinned(0, [PY, *launcher, "--dev", "--port", str(gw_port),
                       "--log-level", "WARNING", "--payments", "--facilitator-url", fac_url,
                       "--pay-to-address", PAYEE, "--payment-network", "eip155:8453",
                       "--price-feed-url", f"{fac_url}/price", "--shutdown-grace", "30"]),
            stdout=logs["gateway"], stderr=subprocess.STDOUT, cwd=ROOT, env=env,
        )  # fmt: skip
        gpid = procs["gateway"].pid
        if Path(f"/proc/{gpid}/comm").read_text().strip() == "taskset":  # noqa: ASYNC240
            await trio.sleep(0.5)  # taskset execs the gateway: same pid
        wait_http(f"{gw}/health")
        for _ in range(100):
            if get_json(f"{gw}/health")["payments"]["price_feed"].get("price_usd"):
                break
            await trio.sleep(0.1)

        def open_sessions() -> list[str]:
            out = []
            for _ in range(a.sessions):
                r = subprocess.run(
                    pinned(1, [PY, str(ROOT / "bench" / "paid_setup.py"), "session", "--url", gw,
                               "--model", MODEL]),
                    capture_output=True, cwd=ROOT, check=True,
                )  # fmt: skip
                out.append(r.stdout.decode().strip())
            return out

        sessions = open_sessions()
        print(f"{len(sessions)} x402 sessions open; gateway pid {gpid}", flush=True)

        counts = Counts()
        rows: list[dict[str, Any]] = []
        phase = ["warmup"]
        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler, gpid, gw, samples, t0, phase, rows)
            pace = Pace(span(a.tokens), span(a.delay_ms), span(a.ttft_ms))
            await load(gw_port, sessions, a.concurrency, a.warmup, counts, a.seed, pace)
            phase[0] = "idle-baseline"
            await wait_idle(gw)
            await trio.sleep(a.idle)
            base = proc_sample(gpid)
            print(f"baseline idle: {base}", flush=True)
            if a.memtrace:
                os.kill(gpid, signal.SIGUSR1)  # snapshot 0
            phase[0] = "soak"
            # idle sessions were settled and closed during the idle phase: a client opens new ones
            sessions = await trio.to_thread.run_sync(open_sessions)
            t_soak = time.monotonic()
            await load(gw_port, sessions, a.concurrency, a.minutes * 60, counts, a.seed + 1, pace)
            t_end = time.monotonic()
            phase[0] = "idle-final"
            health = await wait_idle(gw)
            await trio.sleep(a.idle)
            final = proc_sample(gpid)
            if a.memtrace:
                os.kill(gpid, signal.SIGUSR1)  # snapshot 1
                await trio.sleep(5)
            health = await trio.to_thread.run_sync(get_json_any_status, f"{gw}/health")
            nursery.cancel_scope.cancel()
        print(f"final idle: {final}", flush=True)

        procs["gateway"].send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(lambda: procs["gateway"].wait(120))
        chain = get_json(f"{fac_url}/_stats")
        mock = get_json(f"{mock_url}/_bench/stats?id=-")["state"]  # counters only

        under_load = [r for r in rows if r["phase"] == "soak"]
        second_half = [r for r in under_load if r["t"] >= (t_soak - t0) + (t_end - t_soak) / 2]
        pay = health["payments"]
        led, meter = pay["ledger"], pay["meter"]
        checks = {
            "rss_flat": final["rss"] <= base["rss"] * 1.15 + 16 * MiB,
            "rss_slope_below_1MiB_per_min": slope_mib_per_min(second_half) < 1.0,
            "fds_flat": final["fds"] <= base["fds"] + 16,
            "fds_bounded_under_load": max((r["fds"] for r in under_load), default=0)
            <= 3 * a.concurrency + 64,
            "metered_once": meter["duplicates"] == 0
            and meter["unmetered"] == 0
            and meter["errors"] == 0,
            "nothing_reserved_or_lost": led["reserved"] == 0
            and led["total_lost"] == 0
            and led["total_late_unbilled"] == 0,
            "ledger_balances_on_chain": int(chain["settled_units"])
            == int(led["total_charged"])
            == int(meter["charged_total"]),
            "gateway_exit_0": code == 0,
            "no_client_errors": not counts.errors,
            # (the stats request itself is the one connection the mock may still count)
            "upstream_all_closed": mock.get("active_streams", 0) == 0
            and mock.get("conns_open", 0) <= 1,
        }
        summary = {
            "commit": subprocess.run(  # noqa: ASYNC221 - after the load
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, cwd=ROOT, text=True
            ).stdout.strip(),
            "pace": {"tokens": a.tokens, "delay_ms": a.delay_ms, "ttft_ms": a.ttft_ms},
            "minutes": a.minutes,
            "concurrency": a.concurrency,
            "sessions": len(sessions),
            "requests": {
                "sent": counts.sent,
                "completed": counts.completed,
                "aborted": counts.aborted,
                "errors": counts.errors,
            },
            "rate_rps": round(counts.sent / max(1e-9, (t_end - t_soak) + a.warmup), 1),
            "baseline_idle": base,
            "final_idle": final,
            "rss_mib_under_load": {
                "min": round(min(r["rss"] for r in under_load) / MiB, 1) if under_load else None,
                "max": round(max(r["rss"] for r in under_load) / MiB, 1) if under_load else None,
                "slope_second_half_mib_per_min": round(slope_mib_per_min(second_half), 3),
            },
            "fds_under_load_max": max((r["fds"] for r in under_load), default=None),
            "ledger": led,
            "meter": meter,
            "usage": health.get("usage"),
            "chain": chain,
            "mock": mock,
            "gateway_exit": code,
            "checks": checks,
        }
        (results / "soak-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        if a.memtrace:
            print_growth(results / "soak-mem.0.snap", results / "soak-mem.1.snap")
        failed = [k for k, ok in checks.items() if not ok]
        print("SOAK " + ("FAILED: " + ", ".join(failed) if failed else "PASSED"), flush=True)
        return 1 if failed else 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for fh in logs.values():
            fh.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 30)))
    ap.add_argument("--concurrency", type=int, default=int(os.environ.get("SOAK_CONCURRENCY", 200)))
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds of load before baseline")
    ap.add_argument("--idle", type=float, default=40.0, help="idle seconds before each sample")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--memtrace",
        action="store_true",
        help="run the gateway under tracemalloc (bench/memtrace_gateway.py) and print what "
        "grew between the two idle samples (slow: for finding a leak, not for figures)",
    )
    ap.add_argument("--tokens", default="5:80", help="tokens per answer, LO:HI")
    ap.add_argument("--delay-ms", default="20:120", help="ms between tokens, LO:HI")
    ap.add_argument("--ttft-ms", default="20:600", help="ms to the first token, LO:HI")
    ap.add_argument("--bench-dir", default=str(ROOT.parent / "shared" / "bench"))
    sys.exit(trio.run(soak, ap.parse_args()))


if __name__ == "__main__":
    main()

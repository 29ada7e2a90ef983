"""The gateway under tracemalloc, for the soak's ``--memtrace`` (bench only, never production).

``python bench/memtrace_gateway.py DUMP_PREFIX <gateway args>``: imports the gateway, starts
tracemalloc (12 frames), then runs ``python -m trio_gateway <gateway args>``. Each SIGUSR1
writes a snapshot to ``DUMP_PREFIX.<n>.snap`` (a plain Python signal handler: it runs between
two bytecodes of the main thread, where trio runs, so the heap is consistent).
"""

from __future__ import annotations

import gc
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    prefix, args = sys.argv[1], sys.argv[2:]
    from trio_gateway.__main__ import main as gateway_main  # imports first: tracing them is slow

    tracemalloc.start(12)
    count = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal count
        gc.collect()
        tracemalloc.take_snapshot().dump(f"{prefix}.{count}.snap")
        count += 1

    signal.signal(signal.SIGUSR1, dump)
    return gateway_main(args)


if __name__ == "__main__":
    sys.exit(main())

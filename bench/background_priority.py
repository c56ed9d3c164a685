"""How much CPU a niced background job takes from the foreground, by how it is started.

The test suite trains its session model in a niced background process while the other tests run (tests/conftest.py,
``BackgroundModel``). Linux's autogroup scheduler (``/proc/sys/kernel/sched_autogroup_enabled``) shares the CPU fairly
between *sessions* first, so a nice value only counts against processes of the same session: a background job started
with ``setsid`` takes a fair share whatever its nice value. This measures the foreground's throughput (one busy
process per core) alone, then beside one busy background process per core started each way, as a ratio to alone.

    python bench/background_priority.py [--seconds 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BUSY = "import time, sys\nt = time.time(); n = 0\nwhile time.time() - t < {s}: n += 1\nprint(n)"
STARTS = {
    "alone": None,
    "own session, nice 10": dict(start_new_session=True, preexec_fn=lambda: os.nice(10)),
    "same session, nice 10": dict(process_group=0, preexec_fn=lambda: os.nice(10)),
    "same session, nice 19": dict(process_group=0, preexec_fn=lambda: os.nice(19)),
}


def foreground_work(seconds: float, start: dict | None, cores: int) -> int:
    background = []
    if start is not None:
        spin = [sys.executable, "-c", BUSY.format(s=seconds + 4)]
        background = [subprocess.Popen(spin, stdout=subprocess.DEVNULL, **start) for _ in range(cores)]
        time.sleep(1)
    busy = [sys.executable, "-c", BUSY.format(s=seconds)]
    workers = [subprocess.Popen(busy, stdout=subprocess.PIPE, text=True) for _ in range(cores)]
    total = sum(int(w.communicate()[0]) for w in workers)
    for proc in background:
        proc.kill()
        proc.wait()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every setting")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    print(f"cores {cores}, autogroup {autogroup}, load average {os.getloadavg()}")
    for round_ in range(args.rounds):
        alone = foreground_work(args.seconds, None, cores)
        for name, start in STARTS.items():
            work = alone if start is None else foreground_work(args.seconds, start, cores)
            print(f"round {round_ + 1}  {name:24s} foreground {work / alone:5.2f}x of alone")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()

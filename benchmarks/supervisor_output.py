"""Cost of the supervisor copying a job's output into the run's log, against the job writing its log itself.

Each case runs the same job (with PYTHONUNBUFFERED=1, as every target runs a script) twice per round,
alternating: with its stdout and stderr straight into a file (the baseline), and under the supervisor
(`targets/supervisor.py`) with the supervisor's stdout into a file, as a target starts a run. Cases:
  bulk: ~200 MB to stdout in 64 KB writes of 128-byte lines,
  stdout_lines: 1M short lines printed to stdout,
  stderr_lines: 1M short lines printed to stderr (each one marked in the log),
  dots_and_lines: 20,000 progress dots to stderr, each followed by a 1 KB line to stdout: the stderr line is
    left open all along, so the supervisor holds the stdout output once (at most HOLD_SECONDS), then cuts
    the dots' line and never holds for it again.
Prints one JSON object per case: the median wall time of each (`supervised_median_s`, `baseline_median_s`),
their `ratio`, and the log's size in each (the supervised one holds the stderr marks).

    python benchmarks/supervisor_output.py [--rounds 3] [--cases bulk,stdout_lines,stderr_lines]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from airflow_amlrun.targets import supervisor

JOBS = {
    "bulk": "import sys\nchunk = (b'x' * 127 + b'\\n') * 512\nfor _ in range(3200):\n    sys.stdout.buffer.write(chunk)\n",
    "stdout_lines": "for i in range(1_000_000):\n    print('step', i, 'loss 0.25')\n",
    "stderr_lines": "import sys\nfor i in range(1_000_000):\n    print('step', i, 'loss 0.25', file=sys.stderr)\n",
    "dots_and_lines": "import sys\nline = 'x' * 1023\nfor i in range(20_000):\n"
    "    print('.', end='', file=sys.stderr, flush=True)\n    print(line)\n",
}


def run_once(job: str, supervised: bool, folder: Path) -> tuple[float, int]:
    """Wall time of the job, written straight into a log file or under the supervisor, and the log's size."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-c", job]
    log_path = folder / "log"
    with open(log_path, "wb") as log:
        began = time.perf_counter()
        if supervised:
            process = subprocess.Popen(
                [sys.executable, supervisor.__file__, str(folder)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            process.communicate(json.dumps({"argv": argv}).encode())
        else:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            process.wait()
        elapsed = time.perf_counter() - began
    if process.returncode != 0:
        raise SystemExit(f"the job failed ({process.returncode}): {log_path.read_bytes()[-500:]!r}")
    size = log_path.stat().st_size
    log_path.unlink()
    return elapsed, size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(JOBS))
    args = parser.parse_args()
    for case in args.cases.split(","):
        job = JOBS[case]
        times: dict[bool, list[float]] = {False: [], True: []}
        sizes: dict[bool, int] = {}
        with tempfile.TemporaryDirectory(prefix="amlrun-bench-") as tmp:
            folder = Path(tmp)
            run_once(job, True, folder)  # warm-up: the page cache, the interpreter's files
            for _ in range(args.rounds):
                for supervised in (False, True):
                    elapsed, sizes[supervised] = run_once(job, supervised, folder)
                    times[supervised].append(elapsed)
        baseline, supervised_s = statistics.median(times[False]), statistics.median(times[True])
        print(
            json.dumps(
                {
                    "case": case,
                    "rounds": args.rounds,
                    "supervised_median_s": round(supervised_s, 3),
                    "baseline_median_s": round(baseline, 3),
                    "ratio": round(supervised_s / baseline, 2),
                    "supervised_log_bytes": sizes[True],
                    "baseline_log_bytes": sizes[False],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

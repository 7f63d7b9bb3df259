"""Snapshot cost beside `cp` and `tar` of the same files: cold, no-change and one-file-change snapshots.

Generates a realistic source tree in a temporary directory (many small .py/.json files, some MB-sized
data files, nested .gitignore files with ignored files, a .git directory and a virtualenv that must be
left out), measures every variant several times in the same run and prints one JSON object of medians.
Nothing is dropped from the page cache: all variants read warm files, as a resubmission would. Runs
are interleaved and each starts after ``os.sync()``, so no variant pays for another's writeback.

    python benchmarks/snapshot.py [--files 2000] [--total-mb 300] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from airflow_amlrun.snapshot import BlobStore, scan_tree, take_snapshot

SMALL_SUFFIXES = (".py", ".py", ".py", ".json", ".yaml", ".md", ".txt")


def generate_tree(root: Path, files: int, total_mb: float, rng: random.Random) -> set[str]:
    """Write the tree; returns the relative paths a snapshot must include (exactly ``files`` of them)."""
    total = int(total_mb * 1024 * 1024)
    included: set[str] = set()

    def write(rel: str, data: bytes, *, include: bool = True) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if include:
            included.add(rel)

    # Nested .gitignore files (they are included files themselves) and the files they exclude.
    gitignores = {
        ".gitignore": "*.tmp\nbuild/\n",
        "pkg0/.gitignore": "*.log\n!keep.log\n",
        "pkg1/sub0/.gitignore": "/scratch/\n",
    }
    for rel, text in gitignores.items():
        write(rel, text.encode())
    write("pkg0/keep.log", b"kept by a negation\n")
    for i in range(20):
        write(f"pkg0/run{i}.log", rng.randbytes(2000), include=False)
        write(f"pkg1/sub0/scratch/s{i}.bin", rng.randbytes(4000), include=False)
        write(f"build/lib/b{i}.py", rng.randbytes(2000), include=False)
        write(f"tmp{i}.tmp", rng.randbytes(1000), include=False)
    # A .git directory and a virtualenv: large, many files, never snapshotted.
    for i in range(60):
        write(f".git/objects/{i:02x}/{rng.getrandbits(64):016x}", rng.randbytes(50_000), include=False)
    write(".venv/pyvenv.cfg", b"home = /usr/bin\n", include=False)
    for i in range(300):
        write(f".venv/lib/python3.11/site-packages/dep{i % 15}/m{i}.py", rng.randbytes(8000), include=False)

    remaining_files = files - len(included)
    n_data = max(1, remaining_files // 40)
    n_small = remaining_files - n_data
    small_sizes = [int(rng.triangular(200, 24_000, 3_000)) for _ in range(n_small)]
    data_budget = max(n_data, total - sum(small_sizes) - sum(len(t) for t in gitignores.values()) - 19)
    weights = [rng.uniform(0.5, 1.5) for _ in range(n_data)]
    data_sizes = [int(data_budget * w / sum(weights)) for w in weights]
    for i, size in enumerate(small_sizes):
        rel = f"pkg{i % 8}/sub{(i // 8) % 6}/mod{i}{SMALL_SUFFIXES[i % len(SMALL_SUFFIXES)]}"
        write(rel, _text(rng, size))
    for i, size in enumerate(data_sizes):
        write(f"data/part{i % 4}/shard{i}.bin", rng.randbytes(size))
    return included


def _text(rng: random.Random, size: int) -> bytes:
    words = b"def return import self model train loss batch epoch tensor = ( ) : \n".split(b" ")
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="included files (default 2000)")
    parser.add_argument("--total-mb", type=float, default=300, help="total size of included files in MB")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="amlrun-bench-") as tmp:
        work = Path(tmp)
        src = work / "src"
        expected = generate_tree(src, args.files, args.total_mb, rng)
        scan = scan_tree(src)
        included = sorted(f.path for f in scan.files)
        if set(included) != expected:
            raise SystemExit(f"ignore rules disagree with the generator: {set(included) ^ expected}")
        total_bytes = scan.total_bytes
        file_list = work / "included.list"
        file_list.write_bytes(b"\0".join(p.encode() for p in included) + b"\0")
        limits = {"max_total_bytes": 2 * total_bytes, "max_files": 2 * len(included)}

        def cp_once() -> float:
            dest = work / "cp-dest"
            dest.mkdir()
            cmd = f"xargs -0 cp --parents -t {dest} < {file_list}"
            seconds, _ = timed(lambda: subprocess.run(cmd, shell=True, cwd=src, check=True))
            return seconds

        def tar_once() -> float:
            out = work / "out.tar"
            seconds, _ = timed(
                lambda: subprocess.run(
                    ["tar", "-cf", str(out), "--null", "-T", str(file_list)], cwd=src, check=True
                )
            )
            out.unlink()
            return seconds

        # Interleaved, so that the baselines and the snapshot see the same machine load; each timed
        # step starts after the previous one's writes and deletes are flushed (os.sync flushes dirty
        # pages, it does not drop the page cache: every variant reads warm files).
        cp_times, tar_times, cold_times = [], [], []
        for i in range(args.reps):
            os.sync()
            cp_times.append(cp_once())
            shutil.rmtree(work / "cp-dest")
            os.sync()
            tar_times.append(tar_once())
            os.sync()
            store_dir, cache = work / f"store{i}", work / f"cache{i}.sqlite"
            store = BlobStore(str(store_dir))
            seconds, _ = timed(lambda: take_snapshot(src, store, stat_cache_path=cache, **limits))  # noqa: B023
            cold_times.append(seconds)
            if i < args.reps - 1:
                shutil.rmtree(store_dir)
                cache.unlink()
        os.sync()
        store = BlobStore(str(store_dir))

        nochange_times, nochange_written = [], []
        for _ in range(args.reps):
            seconds, result = timed(lambda: take_snapshot(src, store, stat_cache_path=cache, **limits))
            nochange_times.append(seconds)
            nochange_written.append(result.bytes_written)  # type: ignore[attr-defined]

        changed = src / next(p for p in included if p.endswith(".py") and "/sub" in p)
        onechange_times, onechange_written, manifest_bytes, blobs, sizes = [], [], [], [], []
        for i in range(args.reps):
            changed.write_bytes(changed.read_bytes() + f"\n# edit {i}\n".encode())
            sizes.append(changed.stat().st_size)
            seconds, result = timed(lambda: take_snapshot(src, store, stat_cache_path=cache, **limits))
            onechange_times.append(seconds)
            onechange_written.append(result.bytes_written)  # type: ignore[attr-defined]
            manifest_bytes.append(result.manifest_bytes)  # type: ignore[attr-defined]
            blobs.append(result.blobs_written)  # type: ignore[attr-defined]

    med = statistics.median
    cold_s, cp_s, tar_s, nochange_s = med(cold_times), med(cp_times), med(tar_times), med(nochange_times)
    print(
        json.dumps(
            {
                "files": len(included),
                "total_mb": round(total_bytes / 1024 / 1024, 1),
                "reps": args.reps,
                "cpu_count": os.cpu_count(),
                "cp_s": round(cp_s, 4),
                "tar_s": round(tar_s, 4),
                "cold_s": round(cold_s, 4),
                "cold_vs_cp": round(cold_s / cp_s, 3),
                "cold_vs_cp_median_of_pairs": round(
                    med(c / p for c, p in zip(cold_times, cp_times, strict=True)), 3
                ),
                "cold_vs_tar": round(cold_s / tar_s, 3),
                "nochange_s": round(nochange_s, 4),
                "nochange_vs_cold": round(nochange_s / cold_s, 4),
                "nochange_bytes_written": max(nochange_written),
                "onechange_s": round(med(onechange_times), 4),
                "onechange_bytes_written": onechange_written[-1],
                "onechange_blobs_written": blobs[-1],
                "changed_file_bytes": sizes[-1],
                "manifest_bytes": manifest_bytes[-1],
                "onechange_is_file_plus_manifest": all(
                    b == 1 and w == size + m
                    for b, w, size, m in zip(blobs, onechange_written, sizes, manifest_bytes, strict=True)
                ),
            }
        )
    )


if __name__ == "__main__":
    main()

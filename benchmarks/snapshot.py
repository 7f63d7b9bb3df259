"""Snapshot cost beside `cp` and `tar` of the same files: cold, no-change and one-file-change snapshots.

Generates a realistic source tree in a temporary directory (many small .py/.json files, some MB-sized
data files, nested .gitignore files with ignored files, a .git directory and a virtualenv that must be
left out), measures every variant several times in the same run and prints one JSON object of medians,
with the spread (min, max) of each, and the file system written to (and whether it shares data: reflinks).
Nothing is dropped from the page cache: all variants read warm files, as a resubmission would. Runs are
interleaved and each starts after ``os.sync()``, so no variant pays for another's writeback; each is timed
until what it wrote is durable (a ``syncfs`` of the file system inside the timed step), for the snapshot,
the materialized run directory and the ``cp`` / ``tar`` baselines alike. Without that, a copy only fills
the page cache, and the figure follows the shared machine's I/O of the moment.

Beside materialize it times the least any run directory of these files costs on this file system
(``floor_s``): a bare loop that only creates each file and clones (or, where it cannot, copies in the
kernel) its data from the source, in the same threads. Where files share data
(``reflinks``), creating the files is most of both, so ``floor_vs_cp`` is as low as ``materialize_vs_cp``
can get there.

    python benchmarks/snapshot.py [--files 2000] [--total-mb 300] [--reps 7] [--warmup 1]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from airflow_amlrun.snapshot import BlobStore, materialize, scan_tree, take_snapshot
from airflow_amlrun.snapshot.diskio import clone_file
from airflow_amlrun.snapshot.snapshot import default_workers

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


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush everything dirty on the file system holding ``path`` (``sync -f``), down to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def durable(fn: Callable[[], object], where: Path) -> tuple[float, object]:
    """Time ``fn`` up to its writes being on disk: the syncfs of what it wrote is inside the timed step.

    Without it a copy only fills the page cache and its figure follows the machine's I/O of the moment.
    Everything pending before the step is flushed first, outside the timing, so no step pays for another.
    """
    os.sync()
    start = time.perf_counter()
    result = fn()
    syncfs(where)
    return time.perf_counter() - start, result


def file_system(where: Path) -> dict[str, object]:
    """The type of the file system the benchmark writes to, and whether it shares data (reflinks) there:
    materialize clones files where it does, and copies them where it does not."""
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(where)], capture_output=True, text=True
    )
    kind = found.stdout.strip() if found.returncode == 0 else ""
    source, clone = where / "reflink-probe", where / "reflink-probe-clone"
    source.write_bytes(b"probe")
    try:
        with open(source, "rb") as src, open(clone, "wb") as dst:
            shared = clone_file(src.fileno(), dst.fileno())
    finally:
        source.unlink()
        clone.unlink(missing_ok=True)
    return {"file_system": kind or "unknown", "reflinks": shared}


def bare_tree(src: Path, files: list[str], dest: Path) -> None:
    """Only what any run directory of ``files`` needs: each folder, each file created in it and its data
    cloned (else copied in the kernel) from ``src``, in materialize's threads."""
    by_folder: dict[str, list[str]] = {}
    for path in files:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    for folder in sorted(by_folder):
        (dest / folder).mkdir(parents=True, exist_ok=True)

    def write(files: tuple[str, list[str]]) -> bool:
        """Write a folder's files; whether each was a clone."""
        folder, names = files
        cloned = True
        source = os.open(src / folder, os.O_RDONLY | os.O_DIRECTORY)
        target = os.open(dest / folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:
                s = os.open(name, os.O_RDONLY, dir_fd=source)
                d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=target)
                try:
                    if not clone_file(s, d):
                        cloned = False
                        size = os.fstat(s).st_size
                        while size > 0:
                            size -= os.copy_file_range(s, d, size)
                finally:
                    os.close(d)
                    os.close(s)
        finally:
            os.close(target)
            os.close(source)
        return cloned

    # As materialize does: the first file tells whether files are cloned; then this thread writes the rest if
    # they are, else the folders are shared out among the threads.
    (folder, names), *rest = by_folder.items()
    cloned = write((folder, names[:1]))
    rest.insert(0, (folder, names[1:]))
    if cloned:
        for files in rest:
            write(files)
    else:
        with ThreadPoolExecutor(min(len(rest), default_workers())) as pool:
            list(pool.map(write, rest))


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """Median, min and max: the figure, and how far a run of it strays on a shared machine."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="included files (default 2000)")
    parser.add_argument("--total-mb", type=float, default=300, help="total size of included files in MB")
    parser.add_argument("--reps", type=int, default=7, help="repetitions per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds before the timed ones")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to work (default: the system temp folder)")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="amlrun-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        src = work / "src"
        where = file_system(work)
        expected = generate_tree(src, args.files, args.total_mb, rng)
        scan = scan_tree(src)
        included = sorted(f.path for f in scan.files)
        if set(included) != expected:
            raise SystemExit(f"ignore rules disagree with the generator: {set(included) ^ expected}")
        total_bytes = scan.total_bytes
        file_list = work / "included.list"
        file_list.write_bytes(b"\0".join(p.encode() for p in included) + b"\0")
        limits = {"max_total_bytes": 2 * total_bytes, "max_files": 2 * len(included)}

        def cp() -> None:
            dest = work / "cp-dest"
            dest.mkdir()
            # A copy of the data: where the file system can share extents, cp would clone them instead.
            cmd = f"xargs -0 cp --reflink=never --parents -t {dest} < {file_list}"
            subprocess.run(cmd, shell=True, cwd=src, check=True)

        def tar() -> None:
            subprocess.run(
                ["tar", "-cf", str(work / "out.tar"), "--null", "-T", str(file_list)], cwd=src, check=True
            )

        # Interleaved, so that the baselines and the snapshot see the same machine load; every variant
        # reads warm files (a sync flushes dirty pages, it does not drop the page cache), as a
        # resubmission would, and is timed until what it wrote is durable.
        cp_times, tar_times, cold_times, mat_times, floor_times = [], [], [], [], []
        store_dir = cache = Path()
        for i in range(-args.warmup, args.reps):
            # The warm-up rounds are not counted: in a VM, the first touch of guest memory costs the host a
            # page fault, so whichever variant first grows the page cache would pay for all of them.
            counted = i >= 0
            seconds, _ = durable(cp, work)
            cp_times += [seconds] * counted
            shutil.rmtree(work / "cp-dest")
            seconds, _ = durable(tar, work)
            tar_times += [seconds] * counted
            (work / "out.tar").unlink()
            if store_dir != Path():
                shutil.rmtree(store_dir)
                cache.unlink()
            store_dir, cache = work / f"store{i}", work / f"cache{i}.sqlite"
            store = BlobStore(str(store_dir))
            seconds, result = durable(
                lambda: take_snapshot(src, store, stat_cache_path=cache, **limits),  # noqa: B023
                work,
            )
            cold_times += [seconds] * counted
            snapshot = result.snapshot  # type: ignore[attr-defined]
            run_dir = work / "run"
            seconds, _ = durable(lambda: materialize(store, snapshot, run_dir), work)  # noqa: B023
            mat_times += [seconds] * counted
            shutil.rmtree(run_dir)
            seconds, _ = durable(lambda: bare_tree(src, included, run_dir), work)  # noqa: B023
            floor_times += [seconds] * counted
            shutil.rmtree(run_dir)
        store = BlobStore(str(store_dir))

        nochange_times, nochange_written = [], []
        for _ in range(args.reps):
            seconds, result = durable(
                lambda: take_snapshot(src, store, stat_cache_path=cache, **limits), work
            )
            nochange_times.append(seconds)
            nochange_written.append(result.bytes_written)  # type: ignore[attr-defined]

        changed = src / next(p for p in included if p.endswith(".py") and "/sub" in p)
        onechange_times, onechange_written, manifest_bytes, blobs, sizes = [], [], [], [], []
        for i in range(args.reps):
            changed.write_bytes(changed.read_bytes() + f"\n# edit {i}\n".encode())
            sizes.append(changed.stat().st_size)
            seconds, result = durable(
                lambda: take_snapshot(src, store, stat_cache_path=cache, **limits), work
            )
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
                **where,
                "durability": "each timed step ends with a syncfs of the file system it wrote to",
                "cp_s": spread(cp_times),
                "tar_s": spread(tar_times),
                "cold_s": spread(cold_times),
                "materialize_s": spread(mat_times),
                "cold_vs_cp": round(cold_s / cp_s, 3),
                # The ratio of each interleaved pair: its spread is how much one run of the figure can stray.
                "cold_vs_cp_pairs": spread([c / p for c, p in zip(cold_times, cp_times, strict=True)]),
                "cold_vs_tar": round(cold_s / tar_s, 3),
                "materialize_vs_cp": round(med(mat_times) / cp_s, 3),
                "materialize_vs_cp_pairs": spread([m / p for m, p in zip(mat_times, cp_times, strict=True)]),
                "floor_s": spread(floor_times),
                "floor_vs_cp": round(med(floor_times) / cp_s, 3),
                "materialize_vs_floor": round(med(mat_times) / med(floor_times), 3),
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

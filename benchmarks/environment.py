"""Environment builds: a cold build of a locked scikit-learn + pandas environment against venv + pip.

Both sides install the same lock (exact versions, hashes) into a new virtualenv, in the same run:
- ours: ``build_venv`` (``uv venv --relocatable`` + ``uv pip sync --require-hashes``, then the rename);
- baseline: ``python -m venv`` + ``pip install --require-hashes -r lock``.

Fairness of the package caches (``--caches``):
- ``cold`` (default): a fresh, empty uv cache and a fresh, empty pip cache for each side: both download
  every wheel from PyPI, as on a new worker.
- ``warm``: each tool's cache is filled by one untimed install of the lock first, then each side builds a
  new environment that is not in the build cache: the cold build a worker does most often (a new
  environment version, packages downloaded before), with the network left out.
pip runs with the machine's pip configuration switched off (PIP_CONFIG_FILE=/dev/null), so both sides use
the same index (PyPI) and no local wheel folders.

Warm is the cache hit of ``ensure_local_python`` on the built key (the per-run cost), averaged.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from airflow_amlrun.environment import Environment, PythonSection, ResolvedEnvironment, ensure_local_python
from airflow_amlrun.environment.build_venv import build_venv, local_build_key
from airflow_amlrun.environment.lock import resolve_lock

REQUIREMENTS = ["scikit-learn", "pandas"]


def pip_environment(pip_cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        {
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_CACHE_DIR": str(pip_cache),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
        }
    )
    return env


def pip_build(base_python: str, lock_file: Path, target: Path, pip_cache: Path) -> float:
    started = time.perf_counter()
    subprocess.run([base_python, "-m", "venv", str(target)], check=True, capture_output=True)
    subprocess.run(
        [
            str(target / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--require-hashes",
            "-r",
            str(lock_file),
        ],
        check=True,
        env=pip_environment(pip_cache),
    )
    return time.perf_counter() - started


def our_build(spec: Environment, lock: str, cache_dir: Path, uv_cache: Path) -> float:
    key = local_build_key(spec, lock)
    started = time.perf_counter()
    build_venv(spec, lock, key, cache_dir, uv_cache_dir=uv_cache)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--caches", choices=["warm", "cold"], default="cold")
    parser.add_argument("--warm-calls", type=int, default=2000)
    args = parser.parse_args()

    base_python = str(getattr(sys, "_base_executable", None) or sys.executable)
    with tempfile.TemporaryDirectory(prefix="amlrun-bench-env-") as scratch:
        root = Path(scratch)
        spec = Environment(name="bench-sklearn", python=PythonSection(pip_requirements=list(REQUIREMENTS)))
        started = time.perf_counter()
        lock = resolve_lock(spec, uv_cache_dir=root / "uv-resolve")
        assert lock is not None
        resolve_s = time.perf_counter() - started
        lock_file = root / "lock.txt"
        lock_file.write_text(lock)

        uv_cache, pip_cache = root / "uv-cache", root / "pip-cache"
        if args.caches == "warm":
            # Untimed: fill both caches with the same packages, each by its own tool.
            our_build(spec, lock, root / "prime", uv_cache)
            pip_build(base_python, lock_file, root / "prime-pip", pip_cache)
            shutil.rmtree(root / "prime")
            shutil.rmtree(root / "prime-pip")

        cold_s = our_build(spec, lock, root / "cache", uv_cache)
        pip_s = pip_build(base_python, lock_file, root / "pip-venv", pip_cache)

        resolved = ResolvedEnvironment(
            spec=spec,
            name=spec.name,
            version="1",
            lock=lock,
            build_key=local_build_key(spec, lock),
            user_managed=False,
        )
        python = ensure_local_python(resolved, root / "cache")
        check = subprocess.run(
            [python, "-c", "import sklearn, pandas; print(sklearn.__version__, pandas.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        started = time.perf_counter()
        for _ in range(args.warm_calls):
            ensure_local_python(resolved, root / "cache")
        warm_s = (time.perf_counter() - started) / args.warm_calls

    print(
        json.dumps(
            {
                "cold_s": round(cold_s, 3),
                "pip_s": round(pip_s, 3),
                "cold_vs_pip": round(cold_s / pip_s, 4),
                "warm_s": round(warm_s, 7),
                "warm_vs_cold": round(warm_s / cold_s, 7),
                "caches": args.caches,
                "fairness": (
                    "both package caches filled by one untimed install of the same lock first"
                    if args.caches == "warm"
                    else "fresh empty uv cache and fresh empty pip cache"
                )
                + "; pip config off (PIP_CONFIG_FILE=/dev/null), both from PyPI; both into a new venv",
                "requirements": REQUIREMENTS,
                "locked_packages": lock.count("=="),
                "resolve_s": round(resolve_s, 3),
                "sklearn_pandas": check,
                "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            }
        )
    )


if __name__ == "__main__":
    main()

"""Wheel and sdist build hook: the UI's pages (ui/) go into the package built, so no Node runs where Airflow does.

`make install` builds the bundle before installing; a build from a checkout without it builds it here (npm ci
from ui/package-lock.json, then esbuild), and an sdist carries it built, so a wheel made from the sdist needs
no Node either. The Dockerfile copies the package with its bundle built (and no ui/), after installing the
dependencies from a stand-in package without the plugin, for which there is nothing to build.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BUNDLE = "airflow_amlrun/plugin/static/amlrun-ui.js"


class UiBundleHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        if not (root / "airflow_amlrun" / "plugin").is_dir():
            return
        if not (root / BUNDLE).is_file():
            npm = shutil.which("npm")
            if npm is None or not (root / "ui" / "package.json").is_file():
                raise RuntimeError(
                    f"The UI bundle {BUNDLE} is not built, and there is no npm (or no ui/ folder) to build it: "
                    "install Node.js 18 or later and build again, or build from the project's sdist, which "
                    "carries the bundle."
                )
            quiet = ["--no-audit", "--no-fund", "--loglevel=error"]
            subprocess.run([npm, "ci", *quiet], cwd=root / "ui", check=True)
            subprocess.run([npm, "run", "--silent", "build"], cwd=root / "ui", check=True)
        # Built, hence ignored by git, but part of the package.
        build_data["artifacts"].append(f"/{BUNDLE}")

"""The pages' bundle ships in the wheel: an Airflow that installs the package serves the pages with no Node."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from airflow_amlrun.plugin import BUNDLE, NAV_APP, STATIC, TASK_APP
from tests.conftest import REPO

# What the pages may weigh, minified (the Airflow UI's own bundle is some 7 MB): uPlot, highlight.js, the pages.
BUNDLE_LIMIT = 200 * 1024


def test_the_wheel_carries_the_built_bundle_of_the_pages(tmp_path):
    uv = Path(sys.executable).parent / "uv"
    subprocess.run(
        [str(uv), "build", "--quiet", "--wheel", "--out-dir", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("airflow_amlrun-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read(f"airflow_amlrun/plugin/static/{BUNDLE}")
    assert shipped == (STATIC / BUNDLE).read_bytes()
    assert len(shipped) < BUNDLE_LIMIT, f"the bundle grew to {len(shipped) // 1024} KiB"
    # The bundle registers itself under the names of both React apps the plugin declares, and uses the
    # Airflow UI's React and router rather than copies of its own.
    text = shipped.decode()
    assert f'["{NAV_APP}","{TASK_APP}"]' in text and ".AirflowPlugin=" in text
    assert "globalThis.React" in text and "globalThis.ReactRouterDOM" in text
    assert "react.development" not in text and "useSyncExternalStore" not in text

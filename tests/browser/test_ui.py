"""The training-run pages in the Airflow UI, in headless Chromium, against a real Airflow: its api-server,
scheduler and the example DAG's runs (tests/browser/ui_cluster.py, one cluster for the module).

Each test opens the pages as a user does, from the navigation or a link, and checks what they show of the
runs' recorded data. Screenshots go to $AMLRUN_UI_SCREENSHOTS (`make screenshots`: docs/screenshots/, which
the README shows), else to the test session's temporary folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import httpx
import pytest

from tests.browser.ui_cluster import EXAMPLE_DAG, UiCluster, run_examples, ui_cluster
from tests.conftest import commit_all

if TYPE_CHECKING:
    from airflow_amlrun.history import RunRecord

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
LIST = "/plugin/amlrun_runs"
# An assertion waits as long as a page's own actions may (page.set_default_timeout below): on a loaded machine
# the Airflow UI and its plugin's page take longer than expect's own 5 s to draw.
playwright.expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiCluster]:
    home = tmp_path_factory.mktemp("ui")
    with ui_cluster(home) as cluster:
        yield run_examples(cluster, home)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"No Chromium at {CHROMIUM}: `make services` installs it (apt-get install chromium).")
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("AMLRUN_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def contexts(ui: UiCluster, browser) -> Iterator[dict[tuple[str, str], object]]:
    """A browser context per user and theme, kept for the module: the Airflow UI's own scripts load once."""
    opened: dict[tuple[str, str], object] = {}
    yield opened
    for context in opened.values():
        context.close()


@pytest.fixture
def open_as(ui: UiCluster, browser, contexts) -> Iterator[Callable[..., object]]:
    """A page signed in as a user (by the cookie the Airflow UI's sign-in sets), in a light or dark browser."""
    pages = []

    def open_page(user: str, path: str, scheme: str = "light", height: int = 1000):
        if (user, scheme) not in contexts:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, color_scheme=scheme)
            context.add_cookies([{"name": "_token", "value": ui.token(user), "url": ui.url}])
            contexts[user, scheme] = context
        page = contexts[user, scheme].new_page()
        pages.append(page)
        page.set_viewport_size({"width": 1400, "height": height})
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{ui.url}{path}")
        page.errors = errors  # type: ignore[attr-defined]
        return page

    yield open_page
    for page in pages:
        page.close()


def _expect():
    return playwright.expect


def test_a_running_run_s_log_follows_it_on_its_page_without_a_reload(ui, open_as, screenshots):
    page = open_as("admin", f"{LIST}/runs/{ui.runs['live']}", height=1300)
    log = page.get_by_label("Run log")
    _expect()(log).to_contain_text("epoch 0: waiting for more data")
    _expect()(page.locator("[data-page=run-detail]")).to_have_attribute("data-status", "Running")
    _expect()(page.locator("[data-log-state]")).to_have_attribute("data-log-state", "following")
    page.screenshot(path=screenshots / "live-log.png")
    assert "the data arrived" not in log.inner_text()

    page.evaluate("window.amlrunMarker = 'not reloaded'")
    ui.gate.touch()
    _expect()(log).to_contain_text("epoch 1: the data arrived", timeout=60_000)
    _expect()(page.locator("[data-page=run-detail]")).to_have_attribute(
        "data-status", "Completed", timeout=60_000
    )
    _expect()(page.locator("[data-log-state]")).to_have_attribute("data-log-state", "ended")
    # The same document all along: the log grew in place.
    assert page.evaluate("window.amlrunMarker") == "not reloaded"
    assert page.errors == []


def test_the_navigation_leads_to_the_runs_with_their_metrics(ui, open_as, screenshots):
    page = open_as("admin", "/")
    page.get_by_role("link", name=re.compile("Training runs")).click()
    runs = page.get_by_role("table", name="Runs")
    first, second = ui.runs["first"], ui.runs["second"]
    _expect()(runs.locator(f"tr[data-run-id='{first}']")).to_be_visible()
    _expect()(runs.locator(f"tr[data-run-id='{second}']")).to_be_visible()
    # A column per metric, with each run's latest value.
    row = runs.locator(f"tr[data-run-id='{first}']")
    _expect()(row.locator("td[data-metric=alpha]")).to_have_text("0.5")
    _expect()(runs.locator(f"tr[data-run-id='{second}'] td[data-metric=alpha]")).to_have_text("2")
    mse_first = float(row.locator("td[data-metric=mse]").inner_text())
    assert 3000 < mse_first < 3300
    page.screenshot(path=screenshots / "runs-list.png")

    # Filtered to the example's experiment, sorted by mse, best first.
    page.get_by_label("Experiment").select_option("diabetes_ridge")
    page.get_by_role("button", name="Apply").click()
    _expect()(runs.locator(f"tr[data-run-id='{ui.runs['live']}']")).to_have_count(0)
    page.get_by_role("button", name=re.compile("^mse")).click()
    _expect()(runs.locator("tbody tr")).to_have_count(2)
    _expect()(runs.locator("tbody tr").first).to_have_attribute("data-run-id", first)
    assert "sort=metrics.mse" in page.url and "experiment=diabetes_ridge" in page.url
    assert page.errors == []


def test_the_run_page_shows_its_charts_arguments_log_outputs_and_code(ui, open_as, screenshots):
    run = ui.runs["first"]
    page = open_as("admin", f"{LIST}/runs/{run}", height=2600)
    chart = page.locator("figure[aria-label=fold_mse]")
    _expect()(chart.locator("canvas").first).to_be_visible()
    _expect()(chart).to_have_attribute("data-points", "5")
    _expect()(page.get_by_role("table", name="Values")).to_contain_text("mse")
    _expect()(page.get_by_role("table", name="Parameters")).to_contain_text("0.5")
    # What the page says of its environment is what was recorded.
    recorded = ui.cluster.history().get_run(run).environment
    assert recorded is not None and recorded["name"]
    _expect()(page.get_by_role("table", name="Environment")).to_contain_text(recorded["name"])
    _expect()(page.get_by_label("Status timeline")).to_contain_text("Running")
    _expect()(page.get_by_label("Run log")).to_contain_text("fold 4: mse=")
    # The snapshot's script, highlighted as Python.
    code = page.locator("pre[data-language=python]")
    _expect()(code).to_contain_text("def main() -> None:")
    _expect()(code.locator(".hljs-keyword", has_text="def").first).to_be_visible()
    page.screenshot(path=screenshots / "run-detail.png")

    outputs = page.get_by_role("list", name="Outputs")
    _expect()(outputs).to_contain_text("model.pkl")
    with page.expect_download() as download:
        outputs.get_by_role("link", name="metrics.json").click()
    saved = Path(download.value.path()).read_text()
    assert '"alpha": 0.5' in saved and download.value.suggested_filename == "metrics.json"
    assert page.errors == []


def test_compare_charts_the_selected_runs_together_and_marks_what_differs(ui, open_as, screenshots):
    first, second = ui.runs["first"], ui.runs["second"]
    page = open_as("admin", f"{LIST}?experiment=diabetes_ridge", height=1500)
    page.get_by_label(f"Select {first}").check()
    page.get_by_label(f"Select {second}").check()
    page.get_by_role("button", name="Compare").click()
    chart = page.locator("figure[aria-label='fold_mse of 2 runs']")
    _expect()(chart.locator("canvas").first).to_be_visible()
    # Five folds, then four: every step of either run is on the one chart.
    _expect()(chart).to_have_attribute("data-points", "5")
    values = page.get_by_role("table", name="Parameters and final metrics")
    alpha = values.locator("tbody tr", has_text="parameter").filter(has_text="alpha")
    _expect()(alpha).to_have_attribute("data-differs", "true")
    _expect()(alpha.locator("td")).to_have_text(["0.5", "2.0"])
    _expect()(page.locator("figure[aria-label='fold_mse by alpha']")).to_be_visible()
    page.screenshot(path=screenshots / "compare.png")

    # The two runs' code: the second had one fold less.
    page.get_by_role("link", name="Diff their code").click()
    diff = page.get_by_label("Unified diff")
    _expect()(diff.locator("[data-line=del]")).to_contain_text('"--folds", type=int, default=5')
    _expect()(diff.locator("[data-line=add]")).to_contain_text('"--folds", type=int, default=4')
    _expect()(page.get_by_role("list", name="Files that differ")).to_contain_text("train.py")
    assert page.errors == []


def test_the_diff_page_in_the_dark_theme(ui, open_as, screenshots):
    page = open_as("admin", f"{LIST}/diff?a={ui.runs['first']}&b={ui.runs['second']}", scheme="dark")
    _expect()(page.get_by_label("Unified diff").locator("[data-line=add]")).to_be_visible()
    # The pages take the Airflow UI's colours: light text on its dark background.
    assert page.evaluate("document.documentElement.classList.contains('dark')")
    color = page.evaluate("getComputedStyle(document.querySelector('.amlrun-root')).color")
    assert _luminance(color) > 0.5, color
    page.screenshot(path=screenshots / "diff-dark.png")


_SWEEP_SCRIPT = """\
import argparse

from airflow_amlrun.run_context import Run

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float)
parser.add_argument("--epochs", type=int)
args = parser.parse_args()
Run.get_context().log("loss", (args.alpha - 0.5) ** 2)
print(f"trained with alpha={args.alpha} for {args.epochs} epochs", flush=True)
"""

_SWEEP_DAG = """
from airflow.sdk import DAG

from airflow_amlrun import ScriptRunConfig
from airflow_amlrun.hyperdrive import GridParameterSampling, HyperDriveConfig, choice
from airflow_amlrun.operators.hyperdrive import HyperDriveOperator

with DAG("DAG_ID", schedule=None):
    HyperDriveOperator(
        task_id="tune",
        config=HyperDriveConfig(
            run_config=ScriptRunConfig(
                source_directory="sweep_training",
                script="train.py",
                arguments=["--epochs", "2"],
                compute_target="local",
            ),
            hyperparameter_sampling=GridParameterSampling({"--alpha": choice(0.1, 0.5)}),
            primary_metric_name="loss",
            primary_metric_goal="minimize",
            max_total_runs=2,
            max_concurrent_runs=2,
            max_duration_minutes=30,
        ),
    )
"""


@dataclass(frozen=True)
class SweepRuns:
    """A sweep that ran to its end: its parent run, its runs in the order it started them, and the commit of its
    code."""

    parent: RunRecord
    first: RunRecord
    best: RunRecord
    commit: str


@pytest.fixture(scope="module")
def sweep(ui: UiCluster) -> SweepRuns:
    """A two-run grid sweep (--alpha 0.1, then 0.5, the best) of code committed on branch `tuning`, run by a
    HyperDriveOperator task of the module's Airflow."""
    code = ui.cluster.dags / "sweep_training"
    code.mkdir()
    (code / "train.py").write_text(_SWEEP_SCRIPT)
    commit = commit_all(code, "tuning", "the alpha sweep")
    dag_id = ui.cluster.write_dag(_SWEEP_DAG)
    dag_run = ui.cluster.trigger(dag_id)
    assert ui.cluster.wait_for_dag_run(dag_id, dag_run) == "success", ui.cluster.component_logs()
    history = ui.cluster.history()
    [parent] = [r for r in history.list_runs(dag_id=dag_id) if r.target == "hyperdrive"]
    first, best = history.child_runs(parent.id)
    assert parent.tags["best_run_id"] == best.id
    return SweepRuns(parent, first, best, commit)


def test_a_sweep_s_page_says_its_code_is_its_runs_and_leads_to_them(ui, open_as, sweep):
    first, best = sweep.first, sweep.best
    # The sweep itself records no snapshot; each of its runs does.
    assert sweep.parent.snapshot_id is None and first.snapshot_id is not None

    page = open_as("admin", f"{LIST}/runs/{sweep.parent.id}", height=1800)
    code = page.get_by_role("region", name="Code")
    _expect()(code).to_contain_text(
        "A sweep runs no code of its own, so it has no snapshot: each of its runs ran the code of a snapshot "
        "of its own, shown on that run's page."
    )
    _expect()(code).not_to_contain_text("did not start")
    facts = code.get_by_label("Code of the sweep's runs")
    _expect()(facts.get_by_role("link")).to_have_text([first.id, best.id])
    _expect()(facts).to_contain_text("2, under Sweep runs above")
    _expect()(page.get_by_role("table", name="Sweep runs").locator("tbody tr")).to_have_count(2)

    # The first run's page shows the code it ran.
    facts.get_by_role("link", name=first.id).click()
    _expect()(page.locator(f"[data-page=run-detail][data-run-id='{first.id}']")).to_be_visible()
    _expect()(page.locator("pre[data-language=python]")).to_contain_text('parser.add_argument("--alpha"')
    assert page.errors == []


def test_a_sweep_s_log_section_says_it_has_none_and_leads_to_its_runs_logs(ui, open_as, sweep):
    page = open_as("admin", f"{LIST}/runs/{sweep.parent.id}", height=1800)
    log = page.get_by_role("region", name="Log")
    _expect()(log).to_contain_text(
        "A sweep runs no code of its own, so it has no log: each of its runs has its log, shown on that run's page."
    )
    runs = log.get_by_label("Logs of the sweep's runs")
    _expect()(runs.get_by_role("link")).to_have_text([sweep.first.id, sweep.best.id])
    # Said as what it is, not as an error.
    _expect()(log.get_by_role("alert")).to_have_count(0)
    _expect()(log).not_to_contain_text("no stored log")

    # The best run's page shows its log.
    runs.get_by_role("link", name=sweep.best.id).click()
    _expect()(page.locator(f"[data-page=run-detail][data-run-id='{sweep.best.id}']")).to_be_visible()
    _expect()(page.get_by_label("Run log")).to_contain_text("trained with alpha=0.5 for 2 epochs")
    assert page.errors == []


def test_a_sweep_s_git_section_says_it_has_none_and_leads_to_its_runs_git_state(ui, open_as, sweep):
    # The sweep itself records no git state; each of its runs does, the same for both.
    assert sweep.parent.git is None and sweep.best.git is not None and sweep.best.git == sweep.first.git

    page = open_as("admin", f"{LIST}/runs/{sweep.parent.id}", height=1800)
    git = page.get_by_role("region", name="Git")
    _expect()(git).to_contain_text(
        "A sweep runs no code of its own, so it has no git state: each of its runs records that of its code, "
        "shown on that run's page. All of them ran this code:"
    )
    _expect()(git.get_by_role("table", name="Git").locator("td")).to_have_text(["—", "tuning", sweep.commit])
    _expect()(git).not_to_contain_text("not in a git checkout")
    runs = git.get_by_label("Git state of the sweep's runs")
    _expect()(runs.get_by_role("link")).to_have_text([sweep.first.id, sweep.best.id])
    _expect()(runs).to_contain_text("2, under Sweep runs above")

    # The best run's page shows the branch and commit of its code.
    runs.get_by_role("link", name=sweep.best.id).click()
    _expect()(page.locator(f"[data-page=run-detail][data-run-id='{sweep.best.id}']")).to_be_visible()
    table = page.get_by_role("region", name="Git").get_by_role("table", name="Git")
    _expect()(table.locator("td")).to_have_text(["—", "tuning", sweep.commit])
    assert page.errors == []


def test_a_sweep_s_arguments_are_its_runs_command_and_how_it_drew_their_values(ui, open_as, sweep):
    page = open_as("admin", f"{LIST}/runs/{sweep.parent.id}", height=1800)
    arguments = page.get_by_role("region", name="Arguments")
    _expect()(arguments).to_contain_text(
        "A sweep runs no command of its own. Each of its runs runs this one, with a value it drew for each "
        "parameter of the search space below; a run's page shows its values."
    )
    _expect()(arguments.get_by_label("Each run's command")).to_have_text(
        "python train.py --epochs 2 --alpha <value>"
    )
    space = arguments.get_by_role("table", name="Search space")
    _expect()(space.locator("tbody td")).to_have_text(["--alpha", "choice(0.1, 0.5)"])
    searched = arguments.get_by_label("How the sweep searched")
    _expect()(searched.locator("dd")).to_have_text(
        [
            "grid",
            "loss, minimize",
            "none: every run goes on to its end",
            "at most 2, 2 at a time",
            "30 minutes",
        ]
    )

    # A run's page shows the command it ran, with the value it drew.
    page.get_by_role("table", name="Sweep runs").get_by_role("link", name=sweep.first.id).click()
    _expect()(page.locator(f"[data-page=run-detail][data-run-id='{sweep.first.id}']")).to_be_visible()
    _expect()(page.get_by_role("region", name="Arguments").locator(".amlrun-command")).to_have_text(
        "python train.py --epochs 2 --alpha 0.1"
    )
    assert page.errors == []


def test_the_task_instance_leads_to_its_run_by_its_tab_and_its_extra_link(ui, open_as):
    dag_run = quote(ui.dag_runs["first"], safe="")
    page = open_as("admin", f"/dags/{EXAMPLE_DAG}/runs/{dag_run}/tasks/train/plugin/amlrun_task_run")
    detail = page.locator(f"[data-page=run-detail][data-run-id='{ui.runs['first']}']")
    _expect()(detail.locator("figure[aria-label=fold_mse] canvas").first).to_be_visible()
    # One bundle serves both apps: the navigation's loads from the module already imported.
    page.get_by_role("link", name=re.compile("Training runs")).click()
    _expect()(
        page.get_by_role("table", name="Runs").locator(f"tr[data-run-id='{ui.runs['second']}']")
    ).to_be_visible()
    assert page.errors == []

    # The operator's extra link, as Airflow recorded it for the task instance, opens the run's page.
    links = httpx.get(
        f"{ui.url}/api/v2/dags/{EXAMPLE_DAG}/dagRuns/{dag_run}/taskInstances/train/links",
        headers={"Authorization": f"Bearer {ui.token('admin')}"},
        timeout=30,
    )
    assert links.status_code == 200, links.text
    page.goto(links.json()["extra_links"]["AML Run"])
    assert page.url.endswith(f"{LIST}/runs/{ui.runs['first']}")
    _expect()(page.locator(f"[data-page=run-detail][data-run-id='{ui.runs['second']}']")).to_have_count(0)
    _expect()(page.locator(f"[data-page=run-detail][data-run-id='{ui.runs['first']}']")).to_be_visible()


_NO_RUN_DAG = """
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

with DAG("DAG_ID", schedule=None):
    EmptyOperator(task_id="prepare")
"""


def test_the_tab_of_a_task_that_ended_without_a_run_says_so_and_asks_for_no_runs(ui, open_as):
    dag_id = ui.cluster.write_dag(_NO_RUN_DAG)
    dag_run = ui.cluster.trigger(dag_id)
    assert ui.cluster.wait_for_dag_run(dag_id, dag_run) == "success"

    page = open_as(
        "admin", f"/dags/{dag_id}/runs/{quote(dag_run, safe='')}/tasks/prepare/plugin/amlrun_task_run"
    )
    _expect()(
        page.get_by_text("This task instance ended (success) without recording a training run.")
    ).to_be_visible(timeout=30_000)
    asked: list[str] = []
    page.on(
        "request",
        lambda request: asked.append(request.url) if "/amlrun/api/task-runs" in request.url else None,
    )
    # Three turns of the tab's 3 s polling: it asks for no runs (only Airflow, every 15 s, whether the task
    # instance was cleared to run again).
    page.wait_for_timeout(9_000)
    assert asked == []
    assert page.errors == []


_QUICK_DAG = """
from airflow.sdk import DAG

from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("DAG_ID", schedule=None):
    ScriptRunOperator(
        task_id="train",
        experiment="quick_training",
        config=ScriptRunConfig(source_directory="quick_training", script="train.py", compute_target="local"),
    )
"""


def test_the_task_tab_shows_the_run_of_a_cleared_task_s_new_try_without_a_reload(ui, open_as):
    (ui.cluster.dags / "quick_training").mkdir()
    (ui.cluster.dags / "quick_training" / "train.py").write_text('print("trained", flush=True)\n')
    dag_id = ui.cluster.write_dag(_QUICK_DAG)
    dag_run = ui.cluster.trigger(dag_id)
    assert ui.cluster.wait_for_dag_run(dag_id, dag_run) == "success", ui.cluster.component_logs()
    history = ui.cluster.history()
    [first] = history.list_runs(dag_id=dag_id, airflow_run_id=dag_run)

    page = open_as(
        "admin", f"/dags/{dag_id}/runs/{quote(dag_run, safe='')}/tasks/train/plugin/amlrun_task_run"
    )
    tab = page.locator(".amlrun-task-run")
    _expect()(tab.locator(f"[data-page=run-detail][data-run-id='{first.id}']")).to_be_visible()
    _expect()(tab).to_have_attribute("data-task-state", "success")
    page.evaluate("window.amlrunMarker = 'not reloaded'")
    # At rest on an ended task, the tab asks Airflow whether it runs again, slowly, and asks for no runs.
    asked: list[str] = []
    page.on(
        "request",
        lambda request: (
            asked.append(request.url)
            if "/amlrun/api/task-runs" in request.url or request.url.endswith("/taskInstances/train")
            else None
        ),
    )
    page.wait_for_timeout(9_000)
    assert [url for url in asked if "/amlrun/api/task-runs" in url] == []
    assert len(asked) <= 1, asked

    ui.cluster.clear_task(dag_id, dag_run, "train")
    assert ui.cluster.wait_for_dag_run(dag_id, dag_run) == "success", ui.cluster.component_logs()
    [second] = [r for r in history.list_runs(dag_id=dag_id, airflow_run_id=dag_run) if r.id != first.id]
    assert second.try_number == 2

    # The same page, left open: the new try's run appears, the first one's a choice away.
    _expect()(tab.locator(f"[data-page=run-detail][data-run-id='{second.id}']")).to_be_visible(timeout=60_000)
    _expect()(tab.get_by_label("Run of try").locator("option")).to_have_count(2)
    assert page.evaluate("window.amlrunMarker") == "not reloaded"
    assert page.errors == []


def test_a_user_without_the_dag_sees_none_of_its_runs(ui, open_as, screenshots):
    # ann may read the live DAG only.
    page = open_as("ann", LIST)
    runs = page.get_by_role("table", name="Runs")
    _expect()(runs.locator(f"tr[data-run-id='{ui.runs['live']}']")).to_be_visible()
    _expect()(runs.locator("tbody tr")).to_have_count(1)
    assert ui.runs["first"] not in page.content()

    page = open_as("ann", f"{LIST}/runs/{ui.runs['first']}")
    _expect()(page.get_by_role("alert")).to_contain_text("Access denied")
    assert "fold_mse" not in page.content() and "diabetes" not in page.inner_text("body")
    page.screenshot(path=screenshots / "access-denied.png")
    page = open_as("ann", f"{LIST}/compare?run={ui.runs['live']}&run={ui.runs['first']}")
    _expect()(page.get_by_role("alert")).to_contain_text("Access denied")


def _luminance(css_color: str) -> float:
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255

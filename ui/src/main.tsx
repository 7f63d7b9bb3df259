// The bundle the Airflow UI imports for the plugin's React apps (airflow_amlrun/plugin/__init__.py). It renders
// inside the UI, with the UI's own React and router (globals the UI sets for its plugins), so the pages share
// its sign-in, navigation and theme. The UI looks a loaded app up on globalThis by the app's name, else as
// `AirflowPlugin`: one module serves both apps, so it registers itself under both names.
import uPlotCss from "uplot/dist/uPlot.min.css";
import { useLocation } from "react-router-dom";

import { Compare } from "./pages/Compare";
import { Diff } from "./pages/Diff";
import { RunDetail } from "./pages/RunDetail";
import { RunsList } from "./pages/RunsList";
import { TaskRun } from "./pages/TaskRun";
import { parsePage } from "./routes";
import css from "./styles.css";

const APP_NAMES = ["Training runs", "Training run"];

interface PluginProps {
  dagId?: string;
  runId?: string;
  taskId?: string;
  mapIndex?: string | number;
}

function injectStyles(): void {
  if (document.getElementById("amlrun-ui-styles") !== null) return;
  const style = document.createElement("style");
  style.id = "amlrun-ui-styles";
  style.textContent = `${uPlotCss}\n${css}`;
  document.head.appendChild(style);
}

function Pages() {
  const location = useLocation();
  const page = parsePage(location.pathname, location.search);
  switch (page.kind) {
    case "run":
      return <RunDetail runId={page.runId} />;
    case "compare":
      return <Compare runIds={page.runIds} />;
    case "diff":
      return <Diff runA={page.runA} runB={page.runB} />;
    default:
      return <RunsList />;
  }
}

/** The plugin: on a task instance's tab (the UI passes its ids), that task's run; in the navigation, the pages. */
export default function AmlRunPages({ dagId, runId, taskId, mapIndex }: PluginProps) {
  injectStyles();
  return (
    <div className="amlrun-root">
      {dagId && runId && taskId ? <TaskRun dagId={dagId} runId={runId} taskId={taskId} mapIndex={mapIndex} /> : <Pages />}
    </div>
  );
}

const registry = globalThis as unknown as Record<string, unknown>;
for (const name of APP_NAMES) registry[name] = AmlRunPages;
registry.AirflowPlugin = AmlRunPages;

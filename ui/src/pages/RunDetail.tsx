import { useEffect, useMemo, useRef } from "react";
import { Link } from "react-router-dom";

import { enc, FINISHED, type Run, type RunDetail as Detail, type Series, SWEEP_TARGET } from "../api";
import { alignLines, Chart } from "../components/Chart";
import { ErrorBox, formatDuration, formatValue, Loading, RunLink, Section, StatusBadge, taskInstancePath, Time, ValuesTable } from "../components/common";
import { useApi, useInterval, useWidth } from "../hooks";
import { pagePath } from "../routes";
import { ArgumentsSection, EnvironmentSection, GitSection, OutputsSection } from "./RunSections";
import { LogViewer } from "./LogViewer";
import { SnapshotBrowser } from "./SnapshotBrowser";
import { SweepArguments, SweepCode, SweepGit, SweepLog, SweepRuns } from "./Sweep";

// How often an unfinished run's page asks for its status and metrics again.
const REFRESH_MS = 3000;

/** One run: its outcome, timeline, metrics as charts, arguments, environment, git, live log, outputs and code. */
export function RunDetail({ runId, embedded = false }: { runId: string; embedded?: boolean }) {
  const detail = useApi<Detail>(`runs/${enc(runId)}`);
  const run = detail.data?.run_id === runId ? detail.data : undefined;
  const running = run !== undefined && !FINISHED.has(run.status);
  // A run that is no sweep's run may be a sweep: its runs, for their table and for where its code is.
  const children = useApi<Run[]>(run?.parent_run_id === null ? `runs/${enc(runId)}/children` : null);
  // A running sweep records more runs as it goes: they are read again with it.
  const refresh = () => {
    detail.reload();
    if (run?.parent_run_id === null) children.reload();
  };
  useInterval(refresh, REFRESH_MS, running);
  // Not another run's, kept while this one's are on their way.
  const sweepRuns = children.loading ? undefined : children.data;

  if (detail.error) {
    return (
      <div className="amlrun-page">
        <ErrorBox error={detail.error} />
        {!embedded && (
          <Link className="amlrun-link" to={pagePath.list()}>
            All training runs
          </Link>
        )}
      </div>
    );
  }
  if (run === undefined) return <Loading />;
  // A sweep's parent run runs no code of its own: its log, arguments, git and code sections lead to its runs.
  const sweep = run.target === SWEEP_TARGET;
  return (
    <div className="amlrun-page" data-page="run-detail" data-run-id={run.run_id} data-status={run.status}>
      <header className="amlrun-page-header">
        <h2>
          {embedded ? <RunLink runId={run.run_id} /> : <span className="amlrun-mono">{run.run_id}</span>} <StatusBadge status={run.status} />
        </h2>
        <div className="amlrun-actions">
          {!embedded && (
            <Link className="amlrun-button" to={pagePath.list(new URLSearchParams({ experiment: run.experiment }))}>
              Runs of {run.experiment}
            </Link>
          )}
        </div>
      </header>
      <Facts run={run} />
      {run.error && (
        <pre className="amlrun-error" role="alert">
          {run.error}
        </pre>
      )}
      <Timeline run={run} />
      <Metrics run={run} />
      {run.parent_run_id === null && <SweepRuns runs={sweepRuns ?? []} />}
      {sweep ? <SweepLog run={run} runs={sweepRuns} /> : <LogViewer runId={run.run_id} />}
      {sweep ? <SweepArguments run={run} /> : <ArgumentsSection run={run} />}
      <EnvironmentSection run={run} />
      {sweep ? <SweepGit run={run} runs={sweepRuns} /> : <GitSection git={run.git} />}
      <OutputsSection run={run} />
      {sweep ? (
        <SweepCode run={run} runs={sweepRuns} />
      ) : (
        <SnapshotBrowser runId={run.run_id} hasSnapshot={run.snapshot_id !== null} />
      )}
    </div>
  );
}

function Facts({ run }: { run: Detail }) {
  const a = run.airflow;
  const facts: [string, React.ReactNode][] = [
    ["Experiment", run.experiment],
    ["Target", run.target],
    [
      "Task",
      a.dag_id && a.run_id && a.task_id ? (
        <Link className="amlrun-link" to={taskInstancePath(a.dag_id, a.run_id, a.task_id, a.map_index)}>
          {a.dag_id} › {a.run_id} › {a.task_id}
          {a.map_index !== null && a.map_index >= 0 ? ` [${a.map_index}]` : ""}
          {a.try_number !== null ? ` (try ${a.try_number})` : ""}
        </Link>
      ) : (
        <span className="amlrun-muted">recorded outside any DAG</span>
      ),
    ],
    ["Duration", formatDuration(run.duration_seconds)],
  ];
  if (run.parent_run_id) facts.push(["Sweep", <RunLink runId={run.parent_run_id} key="p" />]);
  if (run.rerun_of) facts.push(["Re-run of", <RunLink runId={run.rerun_of} key="r" />]);
  for (const [key, value] of Object.entries(run.tags)) facts.push([`tag ${key}`, formatValue(value)]);
  return (
    <dl className="amlrun-facts">
      {facts.map(([k, v]) => (
        <div key={k}>
          <dt>{k}</dt>
          <dd>{v}</dd>
        </div>
      ))}
    </dl>
  );
}

/** The run's life as a bar: waiting (queued, preparing, starting) until it started, running until it ended. */
function Timeline({ run }: { run: Detail }) {
  const created = Date.parse(run.created_at);
  const start = run.start ? Date.parse(run.start) : null;
  const end = run.end ? Date.parse(run.end) : null;
  const now = end ?? (FINISHED.has(run.status) ? (start ?? created) : Date.now());
  const total = Math.max(now - created, 1);
  const waited = (start ?? now) - created;
  const ran = start === null ? 0 : now - start;
  const segment = (label: string, ms: number, kind: string) =>
    ms > 0 || kind === "wait" ? (
      <div className={`amlrun-timeline-${kind}`} style={{ flexGrow: Math.max(ms / total, 0.02) }} title={`${label}: ${formatDuration(ms / 1000)}`}>
        {label} · {formatDuration(ms / 1000)}
      </div>
    ) : null;
  return (
    <Section title="Timeline">
      <div className="amlrun-timeline" aria-label="Status timeline">
        {segment(start === null ? run.status : "Queued → Starting", waited, "wait")}
        {start !== null && segment(end === null ? run.status : "Running", ran, end === null ? "run" : `done-${run.status.toLowerCase()}`)}
      </div>
      <div className="amlrun-timeline-times">
        <span>
          created <Time value={run.created_at} />
        </span>
        <span>
          started <Time value={run.start} />
        </span>
        <span>
          ended <Time value={run.end} />
        </span>
        {run.heartbeat_at && !FINISHED.has(run.status) && (
          <span>
            last heard <Time value={run.heartbeat_at} />
          </span>
        )}
      </div>
    </Section>
  );
}

/** A line chart per numeric metric, from the downsampled series (every slice's minimum and maximum kept). */
function Metrics({ run }: { run: Detail }) {
  const [box, width] = useWidth<HTMLDivElement>();
  // A series of one number is a value, not a chart.
  const numeric = run.metric_summaries.filter((m) => m.numeric_count > 1);
  const others = run.metric_summaries.filter((m) => m.numeric_count <= 1);
  // Asked again when a running run logs more points; about two points per pixel of a half-width chart.
  const version = numeric.map((m) => m.count).join(",");
  const points = String(Math.min(4000, Math.max(200, width)));
  const query = useMemo(() => {
    const q = new URLSearchParams({ points });
    for (const m of numeric) q.append("name", m.name);
    return q;
    // The names are those of `version`.
  }, [points, numeric.map((m) => m.name).join("\n")]);
  const series = useApi<Series[]>(numeric.length > 0 && width > 0 ? `runs/${enc(run.run_id)}/metrics` : null, query);
  const { reload } = series;
  const seen = useRef(version);
  useEffect(() => {
    // The first series are read as the chart appears; more points logged since are read again.
    if (seen.current !== version) reload();
    seen.current = version;
  }, [version, reload]);

  return (
    <Section title="Metrics">
      <div ref={box}>
        {run.metric_summaries.length === 0 && <div className="amlrun-muted">No metrics logged.</div>}
        <ErrorBox error={series.error} />
        <div className="amlrun-charts">
          {(series.data ?? []).map((s) => (
            <MetricChart key={s.name} series={s} />
          ))}
        </div>
        {others.length > 0 && (
          <ValuesTable label="Values" entries={others.map((m) => [m.name, m.last])} mono={false} />
        )}
      </div>
    </Section>
  );
}

function MetricChart({ series }: { series: Series }) {
  const data = useMemo(() => alignLines([series]), [series]);
  const lines = useMemo(() => [{ label: series.name }], [series.name]);
  const note = series.sampled
    ? `${series.x.length.toLocaleString()} of ${series.points.toLocaleString()} points drawn, every slice's minimum and maximum kept`
    : `${series.points.toLocaleString()} points`;
  return <Chart title={series.name} data={data} lines={lines} xLabel="step" note={note} />;
}

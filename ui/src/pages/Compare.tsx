import { useMemo, useState } from "react";
import { Link } from "react-router-dom";

import type { Comparison, Json } from "../api";
import { alignLines, Chart } from "../components/Chart";
import { ErrorBox, formatValue, Loading, RunLink, Section, StatusBadge } from "../components/common";
import { useApi } from "../hooks";
import { pagePath } from "../routes";

/** Runs side by side: a metric of every run on one chart, parameters and final metrics with their differences
 * marked, and a parameter against a final metric, one point per run (a sweep's story). */
export function Compare({ runIds }: { runIds: string[] }) {
  const query = useMemo(() => {
    const q = new URLSearchParams(runIds.map((r) => ["run_id", r]));
    q.set("points", "500");
    return q;
  }, [runIds]);
  const compared = useApi<Comparison>(runIds.length > 0 ? "compare" : null, query);
  const data = compared.data;

  if (runIds.length === 0) return <div className="amlrun-muted">Choose runs to compare in the list of runs.</div>;
  if (compared.error) return <ErrorBox error={compared.error} />;
  if (data === undefined) return <Loading />;
  return (
    <div className="amlrun-page" data-page="compare">
      <header className="amlrun-page-header">
        <h2>Comparing {data.runs.length} runs</h2>
        <div className="amlrun-actions">
          {runIds.length === 2 && (
            <Link className="amlrun-button" to={pagePath.diff(runIds[0]!, runIds[1]!)}>
              Diff their code
            </Link>
          )}
          <Link className="amlrun-button" to={pagePath.list()}>
            All runs
          </Link>
        </div>
      </header>
      <MetricsChart data={data} />
      <Scatter data={data} />
      <ValuesTable data={data} />
    </div>
  );
}

function metricNames(data: Comparison): string[] {
  return [...new Set(data.series.flatMap((r) => r.series.map((s) => s.name)))].sort();
}

function MetricsChart({ data }: { data: Comparison }) {
  const names = metricNames(data);
  const [chosen, setChosen] = useState<string | null>(null);
  // The metric with the longest series first: a curve says more than a point.
  const longest = (m: string) => Math.max(0, ...data.series.map((r) => r.series.find((s) => s.name === m)?.x.length ?? 0));
  const metric = chosen ?? [...names].sort((a, b) => longest(b) - longest(a))[0] ?? null;
  const { aligned, lines } = useMemo(() => {
    const tables: { x: number[]; values: number[] }[] = [];
    const lines: { label: string }[] = [];
    for (const run of data.series) {
      const series = run.series.find((s) => s.name === metric);
      if (series === undefined) continue;
      tables.push(series);
      lines.push({ label: run.run_id });
    }
    return { aligned: alignLines(tables), lines };
  }, [data, metric]);
  if (metric === null) return <Section title="Metrics">{<div className="amlrun-muted">The runs logged no metric series.</div>}</Section>;
  return (
    <Section
      title="Metrics"
      actions={
        <label className="amlrun-muted">
          metric{" "}
          <select value={metric} onChange={(e) => setChosen(e.target.value)} aria-label="Metric to chart">
            {names.map((n) => (
              <option key={n}>{n}</option>
            ))}
          </select>
        </label>
      }
    >
      <Chart title={`${metric} of ${lines.length} runs`} data={aligned} lines={lines} xLabel="step" height={300} />
    </Section>
  );
}

function isNumber(value: Json | undefined): value is number {
  return typeof value === "number" || (typeof value === "string" && value.trim() !== "" && !Number.isNaN(Number(value)));
}

/** One final metric against one parameter, a point per run: numbers on a linear axis, other values as categories. */
function Scatter({ data }: { data: Comparison }) {
  const parameters = [...new Set(data.runs.flatMap((r) => Object.keys(r.parameters)))].sort();
  const metrics = [...new Set(data.runs.flatMap((r) => Object.keys(r.metrics)))].filter((m) => data.runs.some((r) => typeof r.metrics[m] === "number")).sort();
  const [x, setX] = useState<string | null>(null);
  const [y, setY] = useState<string | null>(null);
  const param = x ?? data.differing_parameters[0] ?? parameters[0] ?? null;
  // A metric other than the parameter itself (a script often logs its parameters too).
  const outcomes = metrics.filter((m) => !parameters.includes(m));
  const metric = y ?? outcomes.find((m) => data.differing_metrics.includes(m)) ?? outcomes[0] ?? metrics[0] ?? null;

  const plotted = useMemo(() => {
    if (param === null || metric === null) return null;
    const points = data.runs
      .filter((r) => typeof r.metrics[metric] === "number" && r.parameters[param] !== undefined)
      .map((r) => ({ x: r.parameters[param]!, y: r.metrics[metric] as number }));
    if (points.length === 0) return null;
    const numeric = points.every((p) => isNumber(p.x));
    const names = numeric ? undefined : [...new Set(points.map((p) => String(p.x)))].sort();
    const xs = points.map((p) => (numeric ? Number(p.x) : names!.indexOf(String(p.x))));
    const order = xs.map((_, i) => i).sort((a, b) => xs[a]! - xs[b]!);
    return {
      data: [order.map((i) => xs[i]!), order.map((i) => points[i]!.y)] as [number[], number[]],
      names,
    };
  }, [data, param, metric]);
  const lines = useMemo(() => [{ label: metric ?? "" }], [metric]);

  if (parameters.length === 0 || metrics.length === 0) return null;
  return (
    <Section
      title="Parameter against metric"
      actions={
        <span className="amlrun-actions">
          <label className="amlrun-muted">
            x{" "}
            <select value={param ?? ""} onChange={(e) => setX(e.target.value)} aria-label="Parameter">
              {parameters.map((p) => (
                <option key={p}>{p}</option>
              ))}
            </select>
          </label>
          <label className="amlrun-muted">
            y{" "}
            <select value={metric ?? ""} onChange={(e) => setY(e.target.value)} aria-label="Final metric">
              {metrics.map((m) => (
                <option key={m}>{m}</option>
              ))}
            </select>
          </label>
        </span>
      }
    >
      {plotted === null ? (
        <div className="amlrun-muted">No run has both.</div>
      ) : (
        <Chart title={`${metric} by ${param}`} data={plotted.data} lines={lines} xLabel={param ?? ""} xNames={plotted.names} scatter />
      )}
    </Section>
  );
}

function ValuesTable({ data }: { data: Comparison }) {
  const [onlyDifferent, setOnlyDifferent] = useState(false);
  const parameters = [...new Set(data.runs.flatMap((r) => Object.keys(r.parameters)))].sort();
  const metrics = [...new Set(data.runs.flatMap((r) => Object.keys(r.metrics)))].sort();
  const differing = new Set([...data.differing_parameters.map((p) => `p:${p}`), ...data.differing_metrics.map((m) => `m:${m}`)]);
  const rows: { key: string; label: string; kind: string; values: (Json | undefined)[] }[] = [
    ...parameters.map((p) => ({ key: `p:${p}`, label: p, kind: "parameter", values: data.runs.map((r) => r.parameters[p]) })),
    ...metrics.map((m) => ({ key: `m:${m}`, label: m, kind: "metric", values: data.runs.map((r) => r.metrics[m]) })),
  ].filter((row) => !onlyDifferent || differing.has(row.key));
  return (
    <Section
      title="Parameters and final metrics"
      actions={
        <label className="amlrun-muted">
          <input type="checkbox" checked={onlyDifferent} onChange={(e) => setOnlyDifferent(e.target.checked)} /> only what differs
        </label>
      }
    >
      <div className="amlrun-table-wrap">
        <table className="amlrun-table" aria-label="Parameters and final metrics">
          <thead>
            <tr>
              <th />
              {data.runs.map((r) => (
                <th key={r.run_id}>
                  <RunLink runId={r.run_id} /> <StatusBadge status={r.status} />
                </th>
              ))}
            </tr>
          </thead>
          <tbody>
            {rows.map((row) => (
              <tr key={row.key} className={differing.has(row.key) ? "amlrun-differs" : undefined} data-differs={differing.has(row.key)}>
                <th>
                  {row.label} <span className="amlrun-muted">{row.kind}</span>
                </th>
                {row.values.map((v, i) => (
                  <td key={i} className="amlrun-number">
                    {formatValue(v)}
                  </td>
                ))}
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </Section>
  );
}

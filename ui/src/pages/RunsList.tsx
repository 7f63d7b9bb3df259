import { type FormEvent, useMemo, useState } from "react";
import { Link, useLocation, useNavigate } from "react-router-dom";

import type { Experiment, RunPage } from "../api";
import { ErrorBox, formatDuration, formatValue, RunLink, StatusBadge, taskInstancePath, Time } from "../components/common";
import { useApi } from "../hooks";
import { pagePath } from "../routes";

const STATUSES = ["Queued", "Preparing", "Starting", "Running", "Finalizing", "Completed", "Failed", "Canceled"];
const PAGE_SIZE = "50";
// Most metric columns shown; the others are in each run's page.
const METRIC_COLUMNS = 8;
const FILTER_FIELDS = ["experiment", "target", "dag_id", "tag", "metric", "created_after", "created_before"] as const;

type FilterField = (typeof FILTER_FIELDS)[number];

const COLUMNS: { label: string; sort?: string }[] = [
  { label: "Run", sort: "id" },
  { label: "Experiment", sort: "experiment" },
  { label: "Status", sort: "status" },
  { label: "Target", sort: "target" },
  { label: "DAG / task", sort: "dag_id" },
  { label: "Created", sort: "created_at" },
  { label: "Duration" },
];

/** Every run the user may see: filtered, sorted by any column or metric, paged by cursor; pick runs to compare. */
export function RunsList() {
  const location = useLocation();
  const navigate = useNavigate();
  const query = useMemo(() => new URLSearchParams(location.search), [location.search]);
  const sort = query.get("sort") ?? "-created_at";
  const apiQuery = useMemo(() => {
    const q = new URLSearchParams(query);
    q.set("limit", PAGE_SIZE);
    return q;
  }, [query]);

  const experiments = useApi<Experiment[]>("experiments");
  const page = useApi<RunPage>("runs", apiQuery);
  const [selected, setSelected] = useState<string[]>([]);
  // The cursors of the pages before this one, to go back (a cursor only leads forward).
  const [previous, setPrevious] = useState<(string | null)[]>([]);

  const go = (change: (q: URLSearchParams) => void, keepPages = false) => {
    const next = new URLSearchParams(query);
    change(next);
    if (!keepPages) {
      next.delete("cursor");
      setPrevious([]);
    }
    navigate(pagePath.list(next));
  };

  const runs = page.data?.runs ?? [];
  const metricNames = useMemo(() => {
    const counts = new Map<string, number>();
    for (const run of runs) for (const name of Object.keys(run.metrics)) counts.set(name, (counts.get(name) ?? 0) + 1);
    const sortedBy = sort.replace(/^-/, "");
    const names = [...counts.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).map(([n]) => n);
    const shown = names.slice(0, METRIC_COLUMNS);
    // The metric the list is sorted by is always a column.
    if (sortedBy.startsWith("metrics.") && !shown.includes(sortedBy.slice(8))) shown.push(sortedBy.slice(8));
    return shown;
  }, [runs, sort]);

  const toggle = (runId: string) =>
    setSelected((now) => (now.includes(runId) ? now.filter((r) => r !== runId) : [...now, runId]));

  const sortBy = (key: string) =>
    go((q) => q.set("sort", sort === `-${key}` ? key : sort === key ? `-${key}` : key.startsWith("metrics.") ? key : `-${key}`));

  const header = (label: string, key: string | undefined) => {
    const arrow = key === undefined ? "" : sort === key ? " ▲" : sort === `-${key}` ? " ▼" : "";
    return (
      <th key={label} aria-sort={arrow === " ▲" ? "ascending" : arrow === " ▼" ? "descending" : undefined}>
        {key === undefined ? (
          label
        ) : (
          <button type="button" className="amlrun-th-button" onClick={() => sortBy(key)}>
            {label}
            {arrow}
          </button>
        )}
      </th>
    );
  };

  return (
    <div className="amlrun-page" data-page="runs-list">
      <header className="amlrun-page-header">
        <h2>Training runs</h2>
        <div className="amlrun-actions">
          <span className="amlrun-muted">{selected.length} selected</span>
          <button
            type="button"
            className="amlrun-button amlrun-primary"
            disabled={selected.length < 2 || selected.length > 100}
            onClick={() => navigate(pagePath.compare(selected))}
          >
            Compare
          </button>
          <button
            type="button"
            className="amlrun-button"
            disabled={selected.length !== 2}
            onClick={() => navigate(pagePath.diff(selected[0]!, selected[1]!))}
          >
            Diff code
          </button>
          {selected.length > 0 && (
            <button type="button" className="amlrun-button amlrun-ghost" onClick={() => setSelected([])}>
              Clear
            </button>
          )}
        </div>
      </header>

      <Filters
        key={location.search}
        query={query}
        experiments={experiments.data ?? []}
        apply={(values) =>
          go((q) => {
            for (const field of FILTER_FIELDS) {
              q.delete(field);
              for (const value of values[field]) q.append(field, value);
            }
          })
        }
      />
      <div className="amlrun-chips" role="group" aria-label="Status">
        {STATUSES.map((status) => {
          const on = query.getAll("status").includes(status);
          return (
            <button
              type="button"
              key={status}
              aria-pressed={on}
              className={`amlrun-chip${on ? " amlrun-chip-on" : ""}`}
              onClick={() =>
                go((q) => {
                  const now = q.getAll("status");
                  q.delete("status");
                  for (const s of on ? now.filter((x) => x !== status) : [...now, status]) q.append("status", s);
                })
              }
            >
              {status}
            </button>
          );
        })}
      </div>

      <ErrorBox error={page.error} />
      <div className="amlrun-table-wrap">
        <table className="amlrun-table" aria-label="Runs" aria-busy={page.loading}>
          <thead>
            <tr>
              <th aria-label="Select" />
              {COLUMNS.map((c) => header(c.label, c.sort))}
              {metricNames.map((name) => header(name, `metrics.${name}`))}
              <th>Parameters</th>
            </tr>
          </thead>
          <tbody>
            {runs.map((run) => (
              <tr key={run.run_id} data-run-id={run.run_id} className={selected.includes(run.run_id) ? "amlrun-selected" : undefined}>
                <td>
                  <input
                    type="checkbox"
                    aria-label={`Select ${run.run_id}`}
                    checked={selected.includes(run.run_id)}
                    onChange={() => toggle(run.run_id)}
                  />
                </td>
                <td>
                  <RunLink runId={run.run_id} />
                </td>
                <td>{run.experiment}</td>
                <td>
                  <StatusBadge status={run.status} />
                </td>
                <td>{run.target}</td>
                <td>
                  {run.airflow.dag_id && run.airflow.run_id && run.airflow.task_id ? (
                    <Link
                      className="amlrun-link"
                      to={taskInstancePath(run.airflow.dag_id, run.airflow.run_id, run.airflow.task_id, run.airflow.map_index)}
                    >
                      {run.airflow.dag_id}.{run.airflow.task_id}
                    </Link>
                  ) : (
                    <span className="amlrun-muted">{run.airflow.dag_id ?? "—"}</span>
                  )}
                </td>
                <td>
                  <Time value={run.created_at} />
                </td>
                <td className="amlrun-number">{formatDuration(run.duration_seconds)}</td>
                {metricNames.map((name) => (
                  <td key={name} className="amlrun-number" data-metric={name}>
                    {formatValue(run.metrics[name])}
                  </td>
                ))}
                <td className="amlrun-params">
                  {Object.entries(run.parameters)
                    .map(([k, v]) => `${k}=${formatValue(v)}`)
                    .join(" ")}
                </td>
              </tr>
            ))}
            {!page.loading && runs.length === 0 && (
              <tr>
                <td colSpan={COLUMNS.length + metricNames.length + 2} className="amlrun-muted">
                  No runs match.
                </td>
              </tr>
            )}
          </tbody>
        </table>
      </div>
      <nav className="amlrun-pager" aria-label="Pages">
        <button
          type="button"
          className="amlrun-button"
          disabled={previous.length === 0}
          onClick={() => {
            const back = previous[previous.length - 1] ?? null;
            setPrevious(previous.slice(0, -1));
            go((q) => (back === null ? q.delete("cursor") : q.set("cursor", back)), true);
          }}
        >
          Previous page
        </button>
        <button
          type="button"
          className="amlrun-button"
          disabled={!page.data?.next_cursor}
          onClick={() => {
            setPrevious([...previous, query.get("cursor")]);
            go((q) => q.set("cursor", page.data!.next_cursor!), true);
          }}
        >
          Next page
        </button>
      </nav>
    </div>
  );
}

function Filters({
  query,
  experiments,
  apply,
}: {
  query: URLSearchParams;
  experiments: Experiment[];
  apply: (values: Record<FilterField, string[]>) => void;
}) {
  const [values, setValues] = useState<Record<FilterField, string>>(() => {
    const start = {} as Record<FilterField, string>;
    for (const field of FILTER_FIELDS) start[field] = query.getAll(field).join(field === "tag" || field === "metric" ? ", " : "");
    return start;
  });
  const set = (field: FilterField) => (e: { target: { value: string } }) => setValues({ ...values, [field]: e.target.value });
  const submit = (e: FormEvent) => {
    e.preventDefault();
    const out = {} as Record<FilterField, string[]>;
    for (const field of FILTER_FIELDS) {
      const value = values[field].trim();
      out[field] =
        field === "tag" || field === "metric" ? value.split(",").map((v) => v.trim()).filter(Boolean) : value ? [value] : [];
    }
    apply(out);
  };
  return (
    <form className="amlrun-filters" onSubmit={submit} aria-label="Filters">
      <label>
        Experiment
        <select value={values.experiment} onChange={set("experiment")}>
          <option value="">All</option>
          {experiments.map((e) => (
            <option key={e.name} value={e.name}>
              {e.name} ({e.runs})
            </option>
          ))}
        </select>
      </label>
      <label>
        Target
        <input value={values.target} onChange={set("target")} placeholder="local" />
      </label>
      <label>
        DAG
        <input value={values.dag_id} onChange={set("dag_id")} placeholder="dag id" />
      </label>
      <label>
        Tags
        <input value={values.tag} onChange={set("tag")} placeholder="team=fraud, …" />
      </label>
      <label>
        Metric range
        <input value={values.metric} onChange={set("metric")} placeholder="accuracy:0.9:, loss::0.5" />
      </label>
      <label>
        Created after
        <input type="datetime-local" value={toLocalInput(values.created_after)} onChange={(e) => setValues({ ...values, created_after: fromLocalInput(e.target.value) })} />
      </label>
      <label>
        Created before
        <input type="datetime-local" value={toLocalInput(values.created_before)} onChange={(e) => setValues({ ...values, created_before: fromLocalInput(e.target.value) })} />
      </label>
      <button type="submit" className="amlrun-button amlrun-primary">
        Apply
      </button>
    </form>
  );
}

// The API takes ISO 8601 times; the browser's picker shows local time.
function toLocalInput(iso: string): string {
  if (!iso) return "";
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return "";
  return new Date(when.getTime() - when.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

function fromLocalInput(local: string): string {
  return local ? new Date(local).toISOString() : "";
}

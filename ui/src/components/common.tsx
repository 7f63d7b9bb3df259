import type { ReactNode } from "react";
import { Link } from "react-router-dom";

import { ApiError, type Json } from "../api";
import { pagePath } from "../routes";

const STATUS_CLASS: Record<string, string> = {
  Completed: "success",
  Failed: "failed",
  Canceled: "canceled",
  Running: "running",
  Finalizing: "running",
  Queued: "queued",
  Preparing: "queued",
  Starting: "queued",
};

export function StatusBadge({ status }: { status: string }) {
  return (
    <span className={`amlrun-status amlrun-status-${STATUS_CLASS[status] ?? "queued"}`} data-status={status}>
      {status}
    </span>
  );
}

export function RunLink({ runId }: { runId: string }) {
  return (
    <Link className="amlrun-link amlrun-mono" to={pagePath.run(runId)}>
      {runId}
    </Link>
  );
}

export function ErrorBox({ error }: { error: Error | undefined }) {
  if (error === undefined) return null;
  const status = error instanceof ApiError ? error.status : undefined;
  const says =
    status === 403
      ? `Access denied: ${error.message === "Forbidden" ? "this run belongs to a DAG you may not read." : error.message}`
      : status === 401
        ? "Your sign-in has expired: reload the page to sign in again."
        : error.message;
  return (
    <div className="amlrun-error" role="alert" data-status={status}>
      {says}
    </div>
  );
}

export function Section({ title, children, actions }: { title: string; children: ReactNode; actions?: ReactNode }) {
  return (
    <section className="amlrun-section" aria-label={title}>
      <header>
        <h3>{title}</h3>
        {actions}
      </header>
      {children}
    </section>
  );
}

export function Loading() {
  return <div className="amlrun-muted">Loading…</div>;
}

/** A time as the browser's locale writes it, with its ISO form on hover. */
export function Time({ value }: { value: string | null | undefined }) {
  if (!value) return <span className="amlrun-muted">—</span>;
  const when = new Date(value);
  return <time dateTime={value} title={value}>{when.toLocaleString()}</time>;
}

export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** A metric or parameter value, numbers to 4 significant digits. */
export function formatValue(value: Json | undefined): string {
  if (value === undefined || value === null) return "—";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) >= 1e5 || Math.abs(value) < 1e-3 ? value.toExponential(3) : String(Number(value.toPrecision(4)));
  }
  if (typeof value === "string" || typeof value === "boolean") return String(value);
  return JSON.stringify(value);
}

/** Names and their values, a row each: a run's parameters, environment or last metric values. */
export function ValuesTable({ label, entries, mono = true }: { label: string; entries: [string, Json | undefined][]; mono?: boolean }) {
  return (
    <table className="amlrun-table amlrun-compact" aria-label={label}>
      <tbody>
        {entries.map(([name, value]) => (
          <tr key={name}>
            <th>{name}</th>
            <td className={mono ? "amlrun-mono" : undefined}>{formatValue(value)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function formatBytes(size: number): string {
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KiB`;
  return `${(size / 1024 / 1024).toFixed(1)} MiB`;
}

/** The page of a task instance in the Airflow UI. */
export function taskInstancePath(dagId: string, runId: string, taskId: string, mapIndex: number | null): string {
  const base = `/dags/${encodeURIComponent(dagId)}/runs/${encodeURIComponent(runId)}/tasks/${encodeURIComponent(taskId)}`;
  return mapIndex !== null && mapIndex >= 0 ? `${base}/mapped/${mapIndex}` : base;
}

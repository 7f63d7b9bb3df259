// The pages' addresses inside the Airflow UI: its router serves the plugin at /plugin/<url_route>/*, and the
// rest of the path and the query say which page (so that a page can be linked, bookmarked and gone back to).

export const ROUTE = "/plugin/amlrun_runs";

export type Page =
  | { kind: "list" }
  | { kind: "run"; runId: string }
  | { kind: "compare"; runIds: string[] }
  | { kind: "diff"; runA: string; runB: string };

export function parsePage(pathname: string, search: string): Page {
  const at = pathname.indexOf(ROUTE);
  const rest = at < 0 ? "" : pathname.slice(at + ROUTE.length).replace(/^\/+|\/+$/g, "");
  const query = new URLSearchParams(search);
  if (rest.startsWith("runs/")) return { kind: "run", runId: decodeURIComponent(rest.slice("runs/".length)) };
  if (rest === "compare") return { kind: "compare", runIds: query.getAll("run") };
  if (rest === "diff") return { kind: "diff", runA: query.get("a") ?? "", runB: query.get("b") ?? "" };
  return { kind: "list" };
}

export const pagePath = {
  list: (query?: URLSearchParams) => `${ROUTE}${query && query.size > 0 ? `?${query.toString()}` : ""}`,
  run: (runId: string) => `${ROUTE}/runs/${encodeURIComponent(runId)}`,
  compare: (runIds: string[]) => `${ROUTE}/compare?${new URLSearchParams(runIds.map((r) => ["run", r])).toString()}`,
  diff: (runA: string, runB: string) => `${ROUTE}/diff?${new URLSearchParams({ a: runA, b: runB }).toString()}`,
};

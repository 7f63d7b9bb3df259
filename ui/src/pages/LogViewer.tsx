import { useEffect, useRef, useState } from "react";

import { enc, getJson, type LogChunk } from "../api";
import { ErrorBox, Section } from "../components/common";

// How often the log of a running run is read on; the API answers from the byte offsets it gave last.
const FOLLOW_MS = 1000;
// Lines kept on the page: a long log shows its end.
const MAX_LINES = 20000;

/** The run's log, read on from where it stopped until the run ended: it grows as a running run writes it. */
export function LogViewer({ runId }: { runId: string }) {
  const [lines, setLines] = useState<string[]>([]);
  const [dropped, setDropped] = useState(0);
  const [state, setState] = useState<{ ended: boolean; status?: string; error?: Error }>({ ended: false });
  const [follow, setFollow] = useState(true);
  const box = useRef<HTMLPreElement>(null);

  useEffect(() => {
    let stopped = false;
    let timer: number | undefined;
    const offsets = { target_offset: "0", store_offset: "0" };
    setLines([]);
    setDropped(0);
    setState({ ended: false });
    const read = async () => {
      try {
        const chunk = await getJson<LogChunk>(`runs/${enc(runId)}/log`, new URLSearchParams(offsets));
        if (stopped) return;
        offsets.target_offset = String(chunk.target_offset);
        offsets.store_offset = String(chunk.store_offset);
        if (chunk.lines.length > 0) {
          setLines((now) => {
            const all = now.concat(chunk.lines);
            if (all.length <= MAX_LINES) return all;
            setDropped((d) => d + all.length - MAX_LINES);
            return all.slice(all.length - MAX_LINES);
          });
        }
        setState({ ended: chunk.ended, status: chunk.status });
        if (!chunk.ended) timer = window.setTimeout(read, FOLLOW_MS);
      } catch (error) {
        if (!stopped) {
          setState({ ended: true, error: error instanceof Error ? error : new Error(String(error)) });
        }
      }
    };
    void read();
    return () => {
      stopped = true;
      window.clearTimeout(timer);
    };
  }, [runId]);

  useEffect(() => {
    const element = box.current;
    if (follow && element !== null) element.scrollTop = element.scrollHeight;
  }, [lines, follow]);

  return (
    <Section
      title="Log"
      actions={
        <span className="amlrun-actions">
          <span className="amlrun-muted" data-log-state={state.ended ? "ended" : "following"}>
            {`${state.ended ? "" : "following · "}${lines.length} ${lines.length === 1 ? "line" : "lines"}`}
          </span>
          <label className="amlrun-muted">
            <input type="checkbox" checked={follow} onChange={(e) => setFollow(e.target.checked)} /> scroll to the end
          </label>
        </span>
      }
    >
      <ErrorBox error={state.error} />
      <pre className="amlrun-log" ref={box} aria-label="Run log" tabIndex={0}>
        {dropped > 0 && <span className="amlrun-muted">… {dropped} earlier lines not shown{"\n"}</span>}
        {lines.join("\n")}
      </pre>
    </Section>
  );
}

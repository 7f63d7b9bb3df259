import { type RefObject, useCallback, useEffect, useRef, useState } from "react";

import { getJson } from "./api";

export interface Loaded<T> {
  data: T | undefined;
  error: Error | undefined;
  loading: boolean;
  /** A question is on its way: the first, or one `reload` asked. */
  pending: boolean;
  reload: () => void;
}

/** A GET of the API, again whenever `key` (the path and query) changes; `reload` asks again. */
export function useApi<T>(path: string | null, query?: URLSearchParams): Loaded<T> {
  const key = path === null ? null : `${path}?${query?.toString() ?? ""}`;
  const [state, setState] = useState<{ key: string | null; generation?: number; data?: T; error?: Error }>({
    key: null,
  });
  const [generation, setGeneration] = useState(0);
  const reload = useCallback(() => setGeneration((g) => g + 1), []);

  useEffect(() => {
    if (path === null) return;
    const abort = new AbortController();
    getJson<T>(path, query, abort.signal).then(
      (data) => setState({ key, generation, data }),
      (error: unknown) => {
        if (!abort.signal.aborted)
          setState({ key, generation, error: error instanceof Error ? error : new Error(String(error)) });
      },
    );
    return () => abort.abort();
    // `key` stands for path and query.
  }, [key, generation]);

  const current = state.key === key;
  return {
    // Kept while the next answer is on its way, so that a refreshing page does not flicker.
    data: state.data,
    error: current ? state.error : undefined,
    loading: !current,
    pending: !current || state.generation !== generation,
    reload,
  };
}

/** Calls `tick` every `ms` milliseconds while `active` (the first call `ms` after it became active). */
export function useInterval(tick: () => void, ms: number, active: boolean): void {
  const latest = useRef(tick);
  latest.current = tick;
  useEffect(() => {
    if (!active) return;
    const timer = window.setInterval(() => latest.current(), ms);
    return () => window.clearInterval(timer);
  }, [ms, active]);
}

/** Calls `tick` every `ms` milliseconds while `active` and the page is shown (the first call `ms` after it became
 * active); a page shown again calls it at once. A hidden page (another browser tab, a minimised window) asks
 * nothing, as TanStack Query's refetchInterval does by default: what it would learn is asked the moment it is seen. */
export function useShownInterval(tick: () => void, ms: number, active: boolean): void {
  const latest = useRef(tick);
  latest.current = tick;
  useEffect(() => {
    if (!active) return;
    let timer: number | undefined;
    const follow = () => {
      window.clearInterval(timer);
      timer = undefined;
      if (document.visibilityState === "hidden") return;
      timer = window.setInterval(() => latest.current(), ms);
    };
    const shown = () => {
      if (document.visibilityState !== "hidden") latest.current();
      follow();
    };
    follow();
    document.addEventListener("visibilitychange", shown);
    return () => {
      window.clearInterval(timer);
      document.removeEventListener("visibilitychange", shown);
    };
  }, [ms, active]);
}

/** The width of an element, followed as it resizes. */
export function useWidth<E extends HTMLElement>(): [RefObject<E | null>, number] {
  const ref = useRef<E>(null);
  const [width, setWidth] = useState(0);
  useEffect(() => {
    const element = ref.current;
    if (element === null) return;
    const observer = new ResizeObserver(([entry]) => {
      if (entry !== undefined) setWidth(Math.floor(entry.contentRect.width));
    });
    observer.observe(element);
    return () => observer.disconnect();
  }, []);
  return [ref, width];
}

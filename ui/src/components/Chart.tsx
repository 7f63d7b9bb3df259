import { useEffect, useRef } from "react";
import uPlot from "uplot";

import { useWidth } from "../hooks";
import { chartColors, useColorMode } from "../theme";

export interface ChartLine {
  label: string;
  color?: string;
}

interface ChartProps {
  /** What the chart shows, for its heading and accessible name. */
  title: string;
  /** uPlot's data: the x values, then one array of y values per line (null: no point there). */
  data: uPlot.AlignedData;
  lines: ChartLine[];
  xLabel: string;
  /** Points only, no lines: a scatter plot (x sorted ascending). */
  scatter?: boolean;
  /** Labels of the x axis' values (a categorical axis). */
  xNames?: string[];
  height?: number;
  /** A note under the title (e.g. how the series was sampled). */
  note?: string;
}

/** A uPlot chart sized to its container and drawn in the Airflow UI's colours (again on a change of mode). */
export function Chart({ title, data, lines, xLabel, scatter = false, xNames, height = 220, note }: ChartProps) {
  const [box, width] = useWidth<HTMLDivElement>();
  const target = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const mode = useColorMode();

  useEffect(() => {
    const element = target.current;
    if (element === null || width === 0) return;
    const colors = chartColors(mode);
    const axis = {
      stroke: colors.text,
      grid: { stroke: colors.grid, width: 1 },
      ticks: { stroke: colors.grid, width: 1 },
    };
    const options: uPlot.Options = {
      width,
      height,
      legend: { show: lines.length <= 12 },
      cursor: { drag: { x: true, y: false } },
      scales: {
        // A scatter's outermost points off the frame's edge.
        x: scatter ? { time: false, range: (_u, min, max) => padded(min, max) } : { time: false },
      },
      axes: [
        {
          ...axis,
          label: xLabel,
          // Steps and categories are whole numbers.
          ...(!scatter || xNames ? { incrs: WHOLE_STEPS } : {}),
          ...(xNames ? { values: (_u: uPlot, ticks: number[]) => ticks.map((t) => xNames[t] ?? "") } : {}),
        },
        { ...axis, size: 60 },
      ],
      series: [
        { label: xLabel },
        ...lines.map((line, i) => {
          const stroke = line.color ?? colors.series[i % colors.series.length] ?? "#888";
          return scatter
            ? { label: line.label, stroke, paths: () => null, points: { show: true, size: 8, fill: stroke } }
            : { label: line.label, stroke, width: 1.5, spanGaps: true, points: { show: data[0].length <= 60 } };
        }),
      ],
    };
    plot.current?.destroy();
    plot.current = new uPlot(options, data, element);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
    // Redrawn whole for new data or another mode; a new width only resizes (below).
  }, [data, lines, mode, scatter, xLabel, xNames, height, width === 0]);

  useEffect(() => {
    if (width > 0) plot.current?.setSize({ width, height });
  }, [width, height]);

  return (
    <figure className="amlrun-chart" aria-label={title} data-points={data[0].length}>
      <figcaption>
        <span className="amlrun-chart-title">{title}</span>
        {note && <span className="amlrun-muted"> {note}</span>}
      </figcaption>
      <div ref={box}>
        <div ref={target} />
      </div>
    </figure>
  );
}

const WHOLE_STEPS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2.5e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7];

function padded(min: number | null, max: number | null): uPlot.Range.MinMax {
  if (min === null || max === null) return [0, 1];
  const pad = min === max ? Math.abs(min) * 0.1 || 1 : (max - min) * 0.05;
  return [min - pad, max + pad];
}

/** One line per (x, y) table, aligned on the union of their x values as uPlot wants them (ascending x). */
export function alignLines(tables: { x: number[]; values: number[] }[]): uPlot.AlignedData {
  const sorted = tables.map(ascending);
  if (sorted.length === 0) return [[]];
  if (sorted.length === 1) return sorted[0]!;
  return uPlot.join(sorted);
}

function ascending({ x, values }: { x: number[]; values: number[] }): uPlot.AlignedData {
  // A script may log steps out of order: the points are drawn in the order of their steps.
  if (x.every((v, i) => i === 0 || x[i - 1]! <= v)) return [x, values];
  const order = x.map((_, i) => i).sort((a, b) => x[a]! - x[b]! || a - b);
  return [order.map((i) => x[i]!), order.map((i) => values[i]!)];
}

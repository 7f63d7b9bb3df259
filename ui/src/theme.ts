// The Airflow UI's light and dark themes, as the pages follow them: its Chakra UI tokens are CSS variables
// (styles.css uses them), and its colour mode is the class "dark" or "light" on <html>. A chart draws on a
// canvas, so it reads the variables' values and draws again when the mode changes.
import { useEffect, useState } from "react";

export type ColorMode = "light" | "dark";

function currentMode(): ColorMode {
  return document.documentElement.classList.contains("dark") ? "dark" : "light";
}

export function useColorMode(): ColorMode {
  const [mode, setMode] = useState<ColorMode>(currentMode);
  useEffect(() => {
    const observer = new MutationObserver(() => setMode(currentMode()));
    observer.observe(document.documentElement, { attributes: true, attributeFilter: ["class", "style"] });
    return () => observer.disconnect();
  }, []);
  return mode;
}

/** The value of one of the UI's CSS variables, or `fallback` outside the Airflow UI. */
export function cssVar(name: string, fallback: string): string {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value === "" ? fallback : value;
}

export interface ChartColors {
  text: string;
  grid: string;
  series: string[];
}

// Distinguishable on a light and on a dark background (Tableau 10, brightened for dark).
const LIGHT_SERIES = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#7f7f7f"];
const DARK_SERIES = ["#79a8e0", "#ffab57", "#ff7b7d", "#7fcf74", "#d5a0c8", "#8fd8d2", "#f5d96b", "#ffbcc3", "#c59c82", "#b0b0b0"];

export function chartColors(mode: ColorMode): ChartColors {
  return {
    text: cssVar("--chakra-colors-fg-muted", mode === "dark" ? "#a1a1aa" : "#52525b"),
    grid: cssVar("--chakra-colors-border", mode === "dark" ? "#27272a" : "#e4e4e7"),
    series: mode === "dark" ? DARK_SERIES : LIGHT_SERIES,
  };
}

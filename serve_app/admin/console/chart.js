// The spend charts: one SVG line per series over the days, with axes, gridlines and a legend. Drawn with DOM calls
// (no library, no innerHTML); `el` and `usd` come from console.js, loaded after this file.
"use strict";

const PALETTE = ["#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// A 10-based step giving about `count` ticks over [0, max].
function niceStep(max, count) {
  const raw = max / count, power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
}

// One line per series (model or account) over the days, with axes, gridlines and a legend.
function drawChart(chart, legend, days, rows, field) {
  const W = 560, H = 240, L = 56, R = 24, T = 12, B = 40;
  const series = new Map();
  for (const row of rows) {
    const name = row[field] ?? "(none)", i = days.indexOf(row.day);
    if (i < 0) continue;
    if (!series.has(name)) series.set(name, new Array(days.length).fill(0));
    series.get(name)[i] += Number(row.cost_usd);
  }
  const names = [...series.keys()].sort();
  const max = Math.max(0, ...[...series.values()].flat());
  const step = max > 0 ? niceStep(max, 4) : 1, top = max > 0 ? Math.ceil(max / step) * step : 1;
  const x = (i) => L + (i * (W - L - R)) / (days.length - 1), y = (v) => H - B - (v / top) * (H - T - B);
  const digits = Math.max(2, (String(+step.toPrecision(2)).split(".")[1] || "").length);  // as precise as the step

  chart.replaceChildren();
  for (let v = 0; v <= top + step / 2; v += step) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: L - 6, y: y(v) + 4, class: "tick y" }, "$" + v.toFixed(digits)));
  }
  days.forEach((d, i) => {
    if ((days.length - 1 - i) % 7 === 0) {
      chart.append(svg("text", { x: x(i), y: H - B + 16, class: "tick x" }, d.slice(5)));
    }
  });
  chart.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
    svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
    svg("text", { x: (L + W - R) / 2, y: H - 4, class: "label" }, "day (UTC)"),
    svg("text", { x: 12, y: (T + H - B) / 2, class: "label", transform: `rotate(-90 12 ${(T + H - B) / 2})` },
      "USD"));
  if (!names.length) chart.append(svg("text", { x: (L + W) / 2, y: H / 2, class: "empty" }, "no spend yet"));

  legend.replaceChildren();
  names.forEach((name, n) => {
    const color = PALETTE[n % PALETTE.length], values = series.get(name);
    const d = values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
    const total = values.reduce((a, b) => a + b, 0);
    const path = svg("path", { d, stroke: color, class: "series", "data-series": name });
    path.append(svg("title", {}, `${name}: $${total.toFixed(6)} in ${days.length} days`));
    chart.append(path);
    values.forEach((v, i) => {
      if (v > 0) chart.append(svg("circle", { cx: x(i), cy: y(v), r: 2.5, fill: color, "data-series": name }));
    });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = color;  // CSSOM, not a style attribute: allowed under the CSP
    legend.append(el("li", { "data-series": name }, swatch, name, el("span", { class: "total" }, usd(total.toFixed(6)))));
  });
}

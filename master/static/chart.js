// A small SVG line chart: several series against one x axis (the step), nice ticks, hover read-out.
// window.InfraChart.draw(container, title, {name: [[x, y], ...]}) replaces the container's content.
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLOURS = ["#2f6fdf", "#e0672b", "#2f9e63", "#9b4dca", "#c7a200", "#d6336c", "#0f9aa8"];
  const W = 420, H = 220, PAD = { left: 52, right: 12, top: 10, bottom: 26 };

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  // Round tick steps (1, 2, 5 x 10^n) covering [lo, hi] with about `count` ticks.
  function ticks(lo, hi, count) {
    if (hi === lo) { hi = lo + 1; lo = lo - 1; }
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
    return +v.toPrecision(4) + "";
  }

  function extent(values) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
    return [lo, hi];
  }

  function draw(container, title, series) {
    const names = Object.keys(series).filter((n) => series[n].length > 0);
    container.textContent = "";
    if (names.length === 0) return null;
    const all = names.flatMap((n) => series[n]);
    const [x0, x1] = extent(all.map((p) => p[0]));
    let [y0, y1] = extent(all.map((p) => p[1]));
    const margin = (y1 - y0) * 0.05 || Math.abs(y0) * 0.05 || 1;
    y0 -= margin; y1 += margin;
    const iw = W - PAD.left - PAD.right, ih = H - PAD.top - PAD.bottom;
    const sx = (x) => PAD.left + (x1 === x0 ? iw / 2 : ((x - x0) / (x1 - x0)) * iw);
    const sy = (y) => PAD.top + ih - ((y - y0) / (y1 - y0)) * ih;

    const fig = document.createElement("figure");
    fig.className = "chart";
    fig.dataset.series = names.join(",");
    const cap = document.createElement("figcaption");
    cap.textContent = title;
    fig.appendChild(cap);
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title }, fig);

    for (const t of ticks(y0, y1, 5)) {
      el("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), stroke: "#edf0f4" }, svg);
      el("text", { x: PAD.left - 6, y: sy(t) + 3, "text-anchor": "end" }, svg).textContent = fmt(t);
    }
    for (const t of ticks(x0, x1, 6)) {
      if (t < x0 || t > x1) continue;
      el("line", { x1: sx(t), x2: sx(t), y1: PAD.top + ih, y2: PAD.top + ih + 4, stroke: "#9aa3b2" }, svg);
      el("text", { x: sx(t), y: H - 8, "text-anchor": "middle" }, svg).textContent = fmt(t);
    }
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: PAD.top + ih, y2: PAD.top + ih, stroke: "#9aa3b2" }, svg);

    names.forEach((name, i) => {
      const colour = COLOURS[i % COLOURS.length];
      const pts = series[name];
      const d = pts.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join("");
      el("path", { d, fill: "none", stroke: colour, "stroke-width": 1.6, class: "series", "data-name": name,
        "data-points": pts.length }, svg);
      if (pts.length < 40) {
        for (const p of pts) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: colour, class: "point" }, svg);
      }
      const lx = PAD.left + 8 + i * 110;
      el("rect", { x: lx, y: PAD.top + 2, width: 10, height: 3, fill: colour }, svg);
      el("text", { x: lx + 14, y: PAD.top + 7 }, svg).textContent = name;
    });

    // Hover: the nearest step's values of every series.
    const cursor = el("line", { y1: PAD.top, y2: PAD.top + ih, stroke: "#9aa3b2", "stroke-dasharray": "3,3",
      visibility: "hidden" }, svg);
    const label = el("text", { y: PAD.top + 20, visibility: "hidden" }, svg);
    svg.addEventListener("mousemove", (ev) => {
      const box = svg.getBoundingClientRect();
      const x = x0 + ((ev.clientX - box.left - PAD.left) / iw) * (x1 - x0);
      const parts = names.map((n) => {
        let best = series[n][0];
        for (const p of series[n]) if (Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
        return [n, best];
      });
      const step = parts[0][1][0];
      cursor.setAttribute("x1", sx(step)); cursor.setAttribute("x2", sx(step));
      label.setAttribute("x", Math.min(sx(step) + 4, W - 150));
      label.textContent = "step " + fmt(step) + ": " + parts.map(([n, p]) => n + " " + fmt(p[1])).join(", ");
      cursor.setAttribute("visibility", "visible"); label.setAttribute("visibility", "visible");
    });
    svg.addEventListener("mouseleave", () => {
      cursor.setAttribute("visibility", "hidden"); label.setAttribute("visibility", "hidden");
    });
    container.appendChild(fig);
    return fig;
  }

  // Losses share a chart (train and validation compare on one scale); every other metric gets its own.
  function group(series) {
    const groups = {};
    for (const [name, pts] of Object.entries(series)) {
      const key = /loss$/.test(name) ? "loss" : name;
      (groups[key] = groups[key] || {})[name] = pts;
    }
    return groups;
  }

  window.InfraChart = { draw, group, ticks, fmt };
})();

// The experiment page: metric charts per stage (redrawn while the experiment runs) and live logs over
// server-sent events, one stage at a time.
"use strict";

const MAX_LOG_LINES = 5000;
let source = null;

async function loadCharts() {
  const root = document.getElementById("charts");
  let any = false;
  for (const box of root.querySelectorAll(".stage-charts")) {
    try {
      const resp = await fetch(box.dataset.src, { credentials: "same-origin" });
      if (!resp.ok) continue;
      const data = await resp.json();
      box.textContent = "";
      // A metric reported once (a stage's summary: counts, timings) is a value, not a curve.
      const curves = {}, values = {};
      for (const [name, points] of Object.entries(data.series)) (points.length > 1 ? curves : values)[name] = points;
      for (const [name, series] of Object.entries(window.InfraChart.group(curves))) {
        const holder = document.createElement("div");
        holder.style.display = "contents";
        box.appendChild(holder);
        if (window.InfraChart.draw(holder, data.stage + " · " + name, series)) any = true;
      }
      if (Object.keys(values).length) {
        box.appendChild(summary(data.stage, values));
        any = true;
      }
    } catch (e) { /* shown as missing; the next refresh tries again */ }
  }
  document.getElementById("no-metrics").hidden = any;
  if (root.dataset.running === "true") setTimeout(loadCharts, 10000);
}

function summary(stage, values) {
  const fig = document.createElement("figure");
  fig.className = "chart summary";
  const cap = document.createElement("figcaption");
  cap.textContent = stage + " · reported once";
  fig.appendChild(cap);
  const table = document.createElement("table");
  for (const [name, points] of Object.entries(values)) {
    const row = table.insertRow();
    row.insertCell().textContent = name;
    const cell = row.insertCell();
    cell.className = "num";
    cell.textContent = window.InfraChart.fmt(points[0][1]);
  }
  fig.appendChild(table);
  return fig;
}

function appendLine(log, text, cls) {
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  const span = document.createElement("span");
  if (cls) span.className = cls;
  span.textContent = text + "\n";
  log.appendChild(span);
  while (log.childNodes.length > MAX_LOG_LINES) log.removeChild(log.firstChild);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function follow(button) {
  for (const b of document.querySelectorAll("#log-tabs .tab")) b.classList.toggle("active", b === button);
  const log = document.getElementById("log");
  log.textContent = "";
  log.dataset.stage = button.dataset.stage;
  if (source) source.close();
  source = new EventSource(button.dataset.src);
  source.addEventListener("attempt", (ev) => appendLine(log, "── attempt " + ev.data + " ──", "marker"));
  source.addEventListener("line", (ev) => {
    const line = JSON.parse(ev.data);
    appendLine(log, line.text, line.stream === "stdout" ? "" : line.stream);
  });
  source.addEventListener("end", (ev) => {
    appendLine(log, "── stage " + ev.data + " ──", "marker");
    source.close();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  loadCharts();
  const tabs = [...document.querySelectorAll("#log-tabs .tab")];
  for (const b of tabs) b.addEventListener("click", () => follow(b));
  // Start with the stage that runs now, else the last one that ran.
  const rows = [...document.querySelectorAll("#stages tr[data-stage]")];
  const pick = rows.find((r) => r.querySelector(".st-running")) ||
    rows.reverse().find((r) => !r.querySelector(".st-pending, .st-ready")) || rows[rows.length - 1];
  const first = tabs.find((b) => pick && b.dataset.stage === pick.dataset.stage) || tabs[0];
  if (first) follow(first);
});

// Every page: relative times kept current, and pages that ask for it refreshed in place.
"use strict";

function ago(seconds) {
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

function tick() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll("time[data-t]")) {
    el.textContent = ago(Math.max(0, now - parseFloat(el.dataset.t)));
  }
}

async function refresh() {
  // The same page fetched again; its live parts ([data-live] elements, by id) swapped in, the rest kept.
  try {
    const resp = await fetch(location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" });
    if (!resp.ok || resp.redirected) return;
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    for (const part of document.querySelectorAll("[data-live]")) {
      const fresh = doc.getElementById(part.id);
      if (fresh) part.replaceWith(fresh);
    }
    tick();
  } catch (e) { /* the master may be restarting: try again next time */ }
}

document.addEventListener("DOMContentLoaded", () => {
  tick();
  setInterval(tick, 1000);
  const every = document.querySelector('meta[name="infra-refresh"]');
  if (every) setInterval(refresh, 1000 * parseFloat(every.content));
  // delegated: a refresh replaces the form
  document.addEventListener("submit", (ev) => {
    if (ev.target.id === "cancel-form" && !confirm("Cancel this experiment? Its running stages are stopped.")) {
      ev.preventDefault();
    }
  });
});

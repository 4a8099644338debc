// Draws the dashboard's time series (GET /v1/dashboard, the session cookie authenticates it)
// with the vendored uPlot, and the funnels' bars. No inline script: the page's CSP forbids it.
"use strict";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"];
const EVENT_COLORS = {
  canary_started: "#ff7f0e",
  promoted: "#2ca02c",
  rolled_back: "#d62728",
  restored: "#9467bd",
};
const DAY = 86400;

function dayStart(iso) {
  return Date.parse(iso + "T00:00:00Z") / 1000;
}

// One x value per day that any series has; one y series per adapter version (null: no data).
function chartData(series, metric) {
  const days = [...new Set(series.flatMap((s) => s.points.map((p) => dayStart(p.day))))];
  days.sort((a, b) => a - b);
  const ys = series.map((s) => {
    const byDay = new Map(s.points.map((p) => [dayStart(p.day), p[metric]]));
    return days.map((d) => {
      const v = byDay.get(d);
      return v === undefined || v === null ? null : v;
    });
  });
  return [days, ...ys];
}

function eventsPlugin(events) {
  return {
    hooks: {
      draw: [
        (u) => {
          const ctx = u.ctx;
          const { top, height } = u.bbox;
          ctx.save();
          ctx.font = `${Math.round(10 * devicePixelRatio)}px sans-serif`;
          events.forEach((e, i) => {
            const x = u.valToPos(Date.parse(e.at) / 1000, "x", true);
            if (!Number.isFinite(x)) return;
            ctx.strokeStyle = EVENT_COLORS[e.kind] || "#666";
            ctx.lineWidth = 2 * devicePixelRatio;
            ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
            ctx.fillStyle = ctx.strokeStyle;
            // Staggered, so events close in time keep readable labels.
            // Right of its line, or left of it near the right edge.
            const y = top + (4 + 12 * (i % 4)) * devicePixelRatio;
            const right = x > u.bbox.left + u.bbox.width * 0.7;
            ctx.textAlign = right ? "right" : "left";
            ctx.textBaseline = "top";
            ctx.fillText(`${e.kind.replace("_", " ")} ${e.adapter}`, right ? x - 4 : x + 4, y);
          });
          ctx.restore();
        },
      ],
    },
  };
}

function drawChart(el, overview) {
  const metric = el.dataset.metric;
  const data = chartData(overview.series, metric);
  const since = Date.parse(overview.since) / 1000;
  const until = Date.parse(overview.until) / 1000;
  const opts = {
    title: el.dataset.title,
    width: Math.max(480, el.clientWidth || 900),
    height: 280,
    scales: {
      x: { time: true, range: () => [since, Math.max(until, since + DAY)] },
      y: { range: [0, 1] },
    },
    axes: [{}, { values: (u, vals) => vals.map((v) => `${Math.round(v * 100)}%`) }],
    series: [
      {},
      ...overview.series.map((s, i) => ({
        label: s.label,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        spanGaps: true,
        points: { show: true, size: 7 },
        value: (u, v) => (v === null ? "–" : `${(v * 100).toFixed(1)}%`),
      })),
    ],
    plugins: [eventsPlugin(overview.events)],
  };
  const chart = new uPlot(opts, data, el);
  const points = data.slice(1).reduce((n, ys) => n + ys.filter((v) => v !== null).length, 0);
  el.dataset.points = String(points);
  el.dataset.series = String(overview.series.length);
  el.dataset.events = String(overview.events.length);
  return chart;
}

function drawBars() {
  for (const bar of document.querySelectorAll(".bar")) {
    const share = Number(bar.dataset.count) / Math.max(1, Number(bar.dataset.max));
    bar.style.width = `${Math.round(Math.min(1, share) * 100)}%`;
  }
}

async function main() {
  drawBars();
  const status = document.getElementById("charts-status");
  const days = document.body.dataset.days || "30";
  const response = await fetch(`/v1/dashboard?days=${encodeURIComponent(days)}`, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (!response.ok) {
    status.textContent = `could not load the data: HTTP ${response.status}`;
    return;
  }
  const overview = await response.json();
  window.kaizenCharts = {};
  for (const el of document.querySelectorAll(".chart")) {
    window.kaizenCharts[el.dataset.metric] = drawChart(el, overview);
  }
  status.textContent = overview.series.length ? "" : "no served completions in this window";
  document.body.dataset.ready = "true";
}

main().catch((err) => {
  document.getElementById("charts-status").textContent = `chart error: ${err}`;
  document.body.dataset.error = String(err);
});

// What both pages share: DOM lookup, number formats, uPlot charts, and polling a JSON endpoint.
"use strict";
const $ = (id) => document.getElementById(id);
// `digits` decimals; a small non-zero value keeps two significant digits instead of showing as 0 (0.00012 kWh)
const fmt = (x, digits) => (x === null || x === undefined ? "–"
  : x !== 0 && Math.abs(x) < 10 ** -digits ? Number(x).toPrecision(2) : Number(x).toFixed(digits));
const tick = (u, values) => values.map((v) => (v !== 0 && Math.abs(v) < 0.01 ? Number(v).toExponential(1) : v));  // fits the axis
const width = () => Math.min(document.body.clientWidth, 1300) - 20;
const charts = {};
const CHART_HEIGHT = 210;

// series: [label, color, scale (optional: a second axis on the right)]; columns: [x (unix s), ...one per series]
function chart(id, series, columns) {
  const right = series.find((s) => s[2]);
  const opts = { width: width(), height: CHART_HEIGHT, scales: { x: { time: true } },
                 series: [{}, ...series.map(([label, stroke, scale]) => ({ label, stroke, scale: scale || "y" }))],
                 axes: [{}, { scale: "y", values: tick, size: 64 }, ...(right ? [{ scale: right[2], side: 1, values: tick, size: 64 }] : [])] };
  if (!charts[id]) charts[id] = new uPlot(opts, columns, $(id));
  else charts[id].setData(columns);
}

// a table body of rows, each [text, class name or ""] per cell; every value goes in as text, never as HTML
function fillTable(id, rows, columns, empty) {
  const body = $(id);
  body.replaceChildren();
  if (!rows.length) { const cell = body.insertRow().insertCell(); cell.textContent = empty; cell.colSpan = columns; return; }
  for (const cells of rows) {
    const row = body.insertRow();
    for (const [text, cls, title] of cells) {
      const td = row.insertCell();
      td.textContent = text;
      if (cls) td.className = cls;
      if (title) td.title = title;
    }
  }
}

// ask `url` every `every_ms` and hand the JSON to `show`; say so under the title when the server stops answering
function poll(url, show, every_ms) {
  const once = async () => {
    try {
      const reply = await fetch(url, { cache: "no-store" });
      if (reply.ok) show(await reply.json());
    } catch (err) {
      $("sub").textContent = "the dashboard server is not answering";
      $("sub").className = "sub stale";
    }
    setTimeout(once, every_ms);
  };
  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.setSize({ width: width(), height: CHART_HEIGHT })));
  once();
}

// The dashboard page: polls /api/status every 2 s; every value goes in as text (never as HTML).
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const width = () => Math.min(1100, document.body.clientWidth) - 20;
const charts = {};
const bytes = (x) => (x === null || x === undefined ? "–" : x >= 1e9 ? `${fmt(x / 1e9, 2)} GB` : x >= 1e6 ? `${fmt(x / 1e6, 1)} MB` : `${fmt(x / 1e3, 0)} kB`);

function roundsTable(rounds) {
  const body = $("rounds-table");
  body.replaceChildren();
  const cell = (row, text, cls) => { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; };
  if (!rounds.length) { const row = body.insertRow(); cell(row, "none yet"); row.cells[0].colSpan = 7; return; }
  for (const r of [...rounds].reverse()) {
    const row = body.insertRow();
    cell(row, new Date(r.at * 1000).toLocaleTimeString());
    cell(row, r.step ?? "–");
    cell(row, r.ok ? "ok" : `failed: ${r.reason}`, r.ok ? "" : "failed");
    cell(row, r.peers ?? "–");
    cell(row, r.codec || "–");
    cell(row, bytes(r.bytes));
    cell(row, fmt(r.seconds, 2));
  }
}

function chart(id, series, columns) {
  const opts = { width: width(), height: 220, scales: { x: { time: true } },
                 series: [{}, ...series.map(([label, stroke, scale]) => ({ label, stroke, scale: scale || "y" }))],
                 axes: [{}, { scale: "y" }, ...(series.some((s) => s[2]) ? [{ scale: series.find((s) => s[2])[2], side: 1 }] : [])] };
  if (!charts[id]) charts[id] = new uPlot(opts, columns, $(id));
  else charts[id].setData(columns);
}

function show(data) {
  const s = data.status || {};
  $("title").textContent = s.run_id ? `${s.run_id} (${s.model || "?"})` : "p2ptrain";
  const age = s.updated_at ? data.now - s.updated_at : null;
  const sub = $("sub");
  sub.textContent = s.peer_id ? `peer ${s.peer_id}` + (age !== null ? ` · updated ${Math.round(age)} s ago` : "") : "no peer has run in this data directory yet";
  sub.className = "sub" + (age !== null && age > 60 ? " stale" : "");
  $("state").textContent = s.state || "–";
  $("epoch").textContent = s.epoch ?? "–";
  $("loss").textContent = `${fmt(s.loss, 3)} / ${fmt(s.val_loss, 3)}`;
  $("rate").textContent = fmt(s.samples_per_s, 1);
  $("peers").textContent = s.peers ?? "–";
  const c = s.connections || {};
  $("connections").textContent = Object.keys(c).length ? Object.entries(c).map(([k, v]) => `${v} ${k}`).join(", ") : "–";
  const r = s.rounds || {};
  const failed = Object.values(r.failed || {}).reduce((a, b) => a + b, 0);
  $("rounds").textContent = r.ok === undefined ? "–" : `${r.ok} / ${failed}`;
  $("rounds").title = Object.entries(r.failed || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  $("bytes").textContent = s.bytes_sent ? `${bytes(s.bytes_sent)} / ${bytes(s.bytes_received)}` : "–";
  roundsTable(s.last_rounds || []);
  const e = data.energy;
  $("energy").textContent = e ? `${fmt(e.kwh, 4)} kWh` : "–";
  $("co2").textContent = e ? `${fmt(e.g_co2e, 1)} g CO2e` : "–";
  $("network").textContent = [s.reachability, s.network_role].filter(Boolean).join(" · ") || "–";
  $("paused").textContent = (s.paused_reasons || []).join("; ") || "not paused";
  const h = data.history || [];
  const col = (i) => h.map((p) => p[i]);
  if (h.length) {
    chart("chart-loss", [["training loss", "#1f77b4"], ["held-out loss", "#d62728"]], [col(0), col(2), col(3)]);
    chart("chart-rate", [["samples / s", "#2ca02c"]], [col(0), col(4)]);
    chart("chart-energy", [["kWh", "#9467bd"], ["g CO2e", "#8c564b", "co2"]], [col(0), col(5), col(6)]);
  }
}

async function poll() {
  try {
    const reply = await fetch("/api/status", { cache: "no-store" });
    if (reply.ok) show(await reply.json());
  } catch (err) {
    $("sub").textContent = "the dashboard server is not answering";
    $("sub").className = "sub stale";
  }
  setTimeout(poll, 2000);
}
window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.setSize({ width: width(), height: 220 })));
poll();

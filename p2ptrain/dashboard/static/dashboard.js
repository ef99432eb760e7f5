// The dashboard page: polls /api/status every second (common.js); every value goes in as text (never as HTML).
"use strict";
const bytes = (x) => (x === null || x === undefined ? "–" : x >= 1e9 ? `${fmt(x / 1e9, 2)} GB` : x >= 1e6 ? `${fmt(x / 1e6, 1)} MB` : `${fmt(x / 1e3, 0)} kB`);

function roundsTable(rounds) {
  fillTable("rounds-table", [...rounds].reverse().map((r) => [
    [new Date(r.at * 1000).toLocaleTimeString()],
    [r.step ?? "–"],
    [r.ok ? "ok" : `failed: ${r.reason}`, r.ok ? "" : "failed", r.detail],
    [r.peers ?? "–"],
    [r.codec || "–"],
    [bytes(r.bytes)],
    [fmt(r.seconds, 2)],
  ]), 7, "none yet");
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
  if (h.length >= 2) {  // one point makes no curve (uPlot would stretch its time axis over years)
    chart("chart-loss", [["training loss", "#1f77b4"], ["held-out loss", "#d62728"]], [col(0), col(2), col(3)]);
    chart("chart-rate", [["samples / s", "#2ca02c"]], [col(0), col(4)]);
    chart("chart-energy", [["kWh", "#9467bd"], ["g CO2e", "#8c564b", "co2"]], [col(0), col(5), col(6)]);
  }
}

// the owner's buttons: only on a page opened with the token `p2ptrain dashboard --control` printed
const token = new URLSearchParams(window.location.search).get("token");
async function send(command) {
  const said = $("control-said");
  try {
    const reply = await fetch(`/api/${command}`, { method: "POST", headers: { "X-P2PTrain-Token": token } });
    const body = await reply.json();
    said.textContent = body.ok ? `${command}d` : body.error;
  } catch (err) {
    said.textContent = "the dashboard server is not answering";
  }
}
if (token) {
  $("control").hidden = false;
  $("pause").addEventListener("click", () => send("pause"));
  $("resume").addEventListener("click", () => send("resume"));
}

poll("/api/status", show, 1000);  // a pause shows within 2 s

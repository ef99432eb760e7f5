// The swarm's health page: polls /api/swarm every 5 s (common.js); every value goes in as text (never as HTML).
"use strict";
const big = (x) => (x === null || x === undefined ? "–" : x >= 1e9 ? `${fmt(x / 1e9, 2)} G` : x >= 1e6 ? `${fmt(x / 1e6, 2)} M` : x >= 1e3 ? `${fmt(x / 1e3, 1)} k` : `${x}`);
const reachClass = (r) => (r.startsWith("direct") ? "direct" : r.startsWith("client") ? "client" : "quiet");

function peersTable(peers) {
  fillTable("peers", peers.map((p) => [
    [p.peer.length > 20 ? `${p.peer.slice(0, 8)}…${p.peer.slice(-6)}` : p.peer, "peer", p.peer],
    [p.reachability, reachClass(p.reachability)],
    [p.global_step ?? "–"],
    [fmt(p.samples_per_s, 1)],
    [p.seen_s_ago === null ? "–" : `${Math.round(p.seen_s_ago)} s ago`, p.seen_s_ago > 120 ? "quiet" : ""],
    [p.held_out_loss === null || p.held_out_loss === undefined ? "–" : `${fmt(p.held_out_loss, 3)} (step ${p.loss_step})`],
    [big(p.tokens)],
    [fmt(p.device_hours, 2)],
    [fmt(p.kwh, 4)],
    [fmt(p.g_co2e, 1)],
    [p.country || (p.kwh !== null ? "world avg." : "–")],
    [p.nearest_ms === null ? "–" : `${fmt(p.nearest_ms, 1)} ms (${p.neighbours} measured)`],
  ]), 12, "no peer has published a record yet");
}

function show(data) {
  const t = data.totals || {};
  $("title").textContent = `swarm ${data.run_id}`;
  const age = data.read_at ? data.now - data.read_at : null;
  $("sub").textContent = age === null ? "reading the swarm's records from the DHT…" : `read from the DHT ${Math.round(age)} s ago` + ((data.refused || []).length ? ` · refused ${data.refused.length} forged ledger record(s)` : "");
  $("sub").className = "sub" + (age !== null && age > 60 ? " stale" : "");
  $("members").textContent = t.members ?? "–";
  $("training").textContent = t.training ?? "–";
  $("direct").textContent = t.reachable_directly ?? "–";
  $("step").textContent = t.global_step ?? "–";
  $("rate").textContent = fmt(t.samples_per_s, 1);
  $("loss").textContent = fmt(t.held_out_loss, 3);
  $("tokens").textContent = big(t.tokens);
  $("energy").textContent = t.kwh === undefined ? "–" : `${fmt(t.kwh, 3)} kWh`;
  $("co2").textContent = t.g_co2e === undefined ? "–" : `${fmt(t.g_co2e, 1)} g CO2e`;
  peersTable(data.peers || []);
  const h = data.history || [];
  const col = (i) => h.map((p) => p[i]);
  if (h.length >= 2) {  // one point makes no curve (uPlot would stretch its time axis over years)
    chart("chart-rate", [["samples / s", "#2ca02c"], ["peers training", "#1f77b4", "peers"]], [col(0), col(2), col(1)]);
    chart("chart-energy", [["kWh", "#9467bd"], ["g CO2e", "#8c564b", "co2"]], [col(0), col(3), col(4)]);
    chart("chart-loss", [["held-out loss", "#d62728"]], [col(0), col(5)]);
  }
}

poll("/api/swarm", show, 5000);

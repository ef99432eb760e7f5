// Runs a dashboard page's script (common.js + argv[2]) under node with a stubbed DOM, uPlot and fetch answering
// the JSON in argv[3]; prints the text of the elements named in argv[4..], the tables' rows and the charts made.
const fs = require("fs");
const path = require("path");
const STATIC = path.join(__dirname, "..", "p2ptrain", "dashboard", "static");
const els = {};
function el(id) {
  if (!els[id]) els[id] = { id, textContent: "", className: "", title: "", rows: [],
    replaceChildren() { this.rows = []; },
    insertRow() { const row = { cells: [], insertCell() { const c = { textContent: "", className: "", colSpan: 1, title: "" }; this.cells.push(c); return c; } }; this.rows.push(row); return row; } };
  return els[id];
}
global.document = { getElementById: el, body: { clientWidth: 1000 } };
global.window = { addEventListener() {}, location: { search: "" } };
let made = 0;
global.uPlot = function () { made++; return { setData() {}, setSize() {} }; };
const page = process.argv[2];
const reply = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
global.fetch = async () => ({ ok: true, json: async () => reply });
global.setTimeout = () => {};
const src = fs.readFileSync(path.join(STATIC, "common.js"), "utf8") + "\n" + fs.readFileSync(path.join(STATIC, page), "utf8");
eval(src);
setImmediate(() => {
  for (const id of process.argv.slice(4)) console.log(id, "=", JSON.stringify(String(el(id).textContent)))  // the DOM keeps text;
  for (const t of ["rounds-table", "peers"]) for (const r of (els[t] || { rows: [] }).rows) console.log(t, r.cells.map((c) => c.textContent + (c.className ? `[${c.className}]` : "")).join(" ; "));
  console.log("charts", made);
});

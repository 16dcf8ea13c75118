// The operator's alarm page: a snapshot, then changes pushed as server-sent events.
// Plain JavaScript, no libraries. The table is virtualised: only the rows in view are
// in the DOM, so 10,000 active alarms render as fast as 100.
"use strict";

const PRI = { P1_LIFE: 1, P2_PROPERTY: 2, P3_PRODUCTIVITY: 3, P4_DIAGNOSTIC: 4 };
const PRI_LABEL = { P1_LIFE: "P1 life", P2_PROPERTY: "P2 prop.", P3_PRODUCTIVITY: "P3 prod.", P4_DIAGNOSTIC: "P4 diag." };
const SEV_RANK = { INVALID: 3, MAJOR: 2, MINOR: 1, NO_ALARM: 0 };
const ROW_H = 30;
const S = {
  rows: new Map(), locations: {}, tree: {}, status: null, kpi: null, selected: null, connected: false,
  filter: { location: "", category: "", priority: "", state: "", text: "" },
  sorted: [], lastMessage: 0, readOnly: false,
};
// For tests and the benchmark: when each alarm's latest change reached the DOM.
window.__page = { seen: {}, received: {}, sent: {}, renders: 0, lastRenderMs: 0, snapshotMs: 0, firstFullRender: null };

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pad = (n) => String(n).padStart(2, "0");
function fmtTime(ms) {
  if (!ms) return "-";
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
// In the table: the time alone for today, the date and minutes before.
function fmtSince(ms) {
  if (!ms) return "-";
  const d = new Date(ms), now = new Date();
  if (d.toDateString() === now.toDateString()) return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return `${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
// The location tree is alarm-locations (location -> parent), as the engine's summaries and
// `ack --location` read it: a location selects itself and every location under it.
function ancestors(loc) {
  const chain = [], seen = new Set();
  for (let c = loc; c != null && !seen.has(c); c = S.tree[c]) { chain.push(c); seen.add(c); }
  return chain;
}
function inLocation(loc, wanted) { return !wanted || loc === wanted || ancestors(loc).includes(wanted); }

// --- data ------------------------------------------------------------------------------
function compare(a, b) {
  return (PRI[a.priority] || 9) - (PRI[b.priority] || 9) || (b.since || 0) - (a.since || 0) || (a.name < b.name ? -1 : 1);
}
function matches(r, f, skip) {
  return (skip === "location" || inLocation(r.location || "", f.location))
    && (skip === "category" || !f.category || r.category === f.category)
    && (skip === "priority" || !f.priority || r.priority === f.priority)
    && (skip === "state" || !f.state || r.state === f.state)
    && (!f.text || (r.name + " " + (r.message || "")).toLowerCase().includes(f.text.toLowerCase()));
}

// needSort: rebuild the sorted, filtered list (snapshot, filter change). A pushed change is
// applied to that list in place (binary search), and the table redrawn in the next frame; the
// summaries (counts, filters, tree) are recomputed at most every SUMMARY_MS, since at 10,000
// alarms they cost more than a frame.
const SUMMARY_MS = 400;
let dirty = new Set(), scheduled = false, needSort = true, summariesDirty = false, lastSummary = 0, summaryTimer = null;
function schedule() {
  if (!scheduled) { scheduled = true; requestAnimationFrame(render); }
}
function lowerBound(arr, row) {
  let lo = 0, hi = arr.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (compare(arr[mid], row) < 0) lo = mid + 1; else hi = mid; }
  return lo;
}
function applyRows(rows) {
  for (const r of rows) {
    const old = S.rows.get(r.name);
    if (!needSort && old) {
      const i = lowerBound(S.sorted, old);
      if (i < S.sorted.length && S.sorted[i].name === r.name) S.sorted.splice(i, 1);
    }
    if (r.removed) S.rows.delete(r.name); else S.rows.set(r.name, r);
    if (!needSort && !r.removed && matches(r, S.filter)) S.sorted.splice(lowerBound(S.sorted, r), 0, r);
    dirty.add(r.name);
  }
  summariesDirty = true;
  schedule();
}
function renderSummaries() {
  S.all = Array.from(S.rows.values());
  renderFilters();
  renderTree();
  renderCounts();
  summariesDirty = false;
  lastSummary = performance.now();
}

// --- rendering -------------------------------------------------------------------------
function render() {
  scheduled = false;
  const t0 = performance.now();
  if (needSort) {
    S.sorted = Array.from(S.rows.values()).filter((r) => matches(r, S.filter)).sort(compare);
    renderSummaries();
    needSort = false;
  } else if (summariesDirty) {
    const wait = SUMMARY_MS - (performance.now() - lastSummary);
    if (wait <= 0) renderSummaries();
    else if (!summaryTimer) summaryTimer = setTimeout(() => { summaryTimer = null; schedule(); }, wait);
  }
  renderRows();
  renderBanner();
  const now = Date.now();
  for (const n of dirty) window.__page.seen[n] = now;
  dirty.clear();
  window.__page.renders++;
  window.__page.lastRenderMs = performance.now() - t0;
  if (window.__page.firstFullRender === null && S.snapshotLoaded) {
    window.__page.firstFullRender = { rows: S.rows.size, atMs: performance.now(), renderMs: window.__page.lastRenderMs };
  }
}

function renderRows() {
  const sc = $("scroller"), body = $("rows");
  const total = S.sorted.length;
  const first = Math.max(0, Math.floor(sc.scrollTop / ROW_H) - 10);
  const count = Math.ceil(sc.clientHeight / ROW_H) + 20;
  const last = Math.min(total, first + count);
  // Only the rows in view are in the DOM: a tall spacer gives the scroll bar its length.
  $("spacer").style.height = `${total * ROW_H}px`;
  $("alarms").style.top = `${first * ROW_H}px`;
  let html = "";
  for (let i = first; i < last; i++) {
    const r = S.sorted[i];
    const known = r.state === "ACTIVE" || r.state === "SHELVED" || r.state === "DISABLED";
    const ack = r.ackState === "UNACK" ? " unack" : r.ackState === "RTN_UNACK" ? " rtn-unack" : "";
    html += `<tr class="alarm sev-${esc(r.severity)} state-${esc(r.state)}${ack}${r.name === S.selected ? " sel" : ""}" data-name="${esc(r.name)}">`
      + `<td><span class="pri ${esc(r.priority)}" title="${esc(r.priority)}">${esc(PRI_LABEL[r.priority] || r.priority)}</span></td>`
      + `<td><span class="sev ${esc(r.severity)}">${esc(r.severity)}</span></td>`
      + `<td><span class="state ${known ? esc(r.state) : "other"}">${esc(r.state)}</span>${r.ackState && r.ackState !== "ACK" ? ` <span class="ack" title="not acknowledged">${r.ackState === "RTN_UNACK" ? "RTN UNACK" : "UNACK"}</span>` : ""}</td>`
      + `<td title="${esc(r.name)}">${esc(r.name)}</td>`
      + `<td title="${esc(r.location)}">${esc(r.location)}</td>`
      + `<td title="${fmtTime(r.since)}">${fmtSince(r.since)}</td>`
      + `<td title="${esc(r.message)}">${esc(r.message)}</td>`
      + `<td>${esc(r.by || r.ackedBy || "")}</td></tr>`;
  }
  body.innerHTML = html;
  $("empty").hidden = total > 0 || !S.snapshotLoaded;
  $("shown-count").textContent = `${total} of ${S.rows.size} active alarm${S.rows.size === 1 ? "" : "s"} shown`;
}

function countBy(field, skip) {
  const c = {};
  for (const r of S.all) if (matches(r, S.filter, skip)) c[r[field] || ""] = (c[r[field] || ""] || 0) + 1;
  return c;
}
function fillSelect(id, field, values, label) {
  const sel = $(id), cur = S.filter[field], counts = countBy(field, field);
  const all = new Set([...values, ...Object.keys(counts)]);
  if (cur) all.add(cur);
  const opts = [`<option value="">all (${Object.values(counts).reduce((a, b) => a + b, 0)})</option>`];
  for (const v of [...all].sort((a, b) => (PRI[a] || 0) - (PRI[b] || 0) || (a < b ? -1 : 1))) {
    opts.push(`<option value="${esc(v)}"${v === cur ? " selected" : ""}>${esc(label ? label(v) : v || "(none)")} (${counts[v] || 0})</option>`);
  }
  sel.innerHTML = opts.join("");
}
function renderFilters() {
  const cats = new Set(S.all.map((r) => r.category));
  fillSelect("f-location", "location", [...new Set([...Object.keys(S.locations), ...Object.keys(S.tree)])], null);
  fillSelect("f-category", "category", cats, null);
  fillSelect("f-priority", "priority", Object.keys(PRI), (v) => PRI_LABEL[v] || v);
  fillSelect("f-state", "state", ["ACTIVE", "SHELVED", "DISABLED", "SUPPRESSED", "MASKED"], null);
}

function renderCounts() {
  const bySev = {}, byState = {};
  for (const r of S.all) { bySev[r.severity] = (bySev[r.severity] || 0) + 1; byState[r.state] = (byState[r.state] || 0) + 1; }
  let html = `<span class="chip${!S.filter.state ? " on" : ""}" data-state=""><b>${S.all.length}</b> alarms</span>`;
  for (const st of Object.keys(byState).sort()) {
    html += `<span class="chip${S.filter.state === st ? " on" : ""}" data-state="${esc(st)}"><b>${byState[st]}</b> ${esc(st.toLowerCase())}</span>`;
  }
  for (const sev of ["INVALID", "MAJOR", "MINOR"]) {
    if (bySev[sev]) html += `<span class="chip sev-${sev}" title="severity"><b>${bySev[sev]}</b> ${sev.toLowerCase()}</span>`;
  }
  $("counts").innerHTML = html;
}

// Phoebus' roll-up order (alarm_engine/summaries.py): any unacknowledged severity outranks every
// acknowledged one; only alarms shown ACTIVE raise a location.
const LEVELS = ["OK", "MINOR_ACK", "MAJOR_ACK", "INVALID_ACK", "MINOR", "MAJOR", "INVALID"];
function level(r) {
  if (r.state !== "ACTIVE" || !SEV_RANK[r.severity]) return 0;
  return LEVELS.indexOf(r.severity + (r.ackState === "ACK" ? "_ACK" : ""));
}
function buildTree() {
  const nodes = new Map();
  const node = (path) => {
    let n = nodes.get(path);
    if (!n) {
      const parent = path ? S.tree[path] : null;
      const name = !path ? "(no location)" : parent && path.startsWith(parent + "/") ? path.slice(parent.length + 1) : path;
      n = { name, path, children: new Map(), defined: 0, active: 0, level: 0 };
      nodes.set(path, n);
    }
    return n;
  };
  const root = { children: new Map() };
  for (const loc of new Set([...Object.keys(S.tree), ...Object.keys(S.locations)])) node(loc);
  for (const r of S.all) node(r.location || "");
  for (const [path, n] of nodes) {
    const up = path ? S.tree[path] : null;  // a cycle (refused by the CLI, but on the topic) hangs from the top
    (up != null && nodes.has(up) && !ancestors(up).includes(path) ? nodes.get(up) : root).children.set(path, n);
  }
  for (const [loc, count] of Object.entries(S.locations)) for (const a of ancestors(loc)) node(a).defined += count;
  for (const r of S.all) {
    const lv = level(r);
    for (const a of ancestors(r.location || "")) { const n = node(a); n.active++; n.level = Math.max(n.level, lv); }
  }
  return root;
}
function renderTree() {
  const mark = (lv) => (lv ? `sev-${LEVELS[lv].replace("_ACK", "")}${LEVELS[lv].endsWith("_ACK") ? " acked" : ""}` : "sev-none");
  const html = (n) => [...n.children.values()].sort((a, b) => (a.name < b.name ? -1 : 1)).map((c) =>
    `<li><div class="node${S.filter.location === c.path && c.path ? " on" : ""}" data-path="${esc(c.path)}" title="${esc(c.path || "(no location)")}: ${c.active} shown of ${c.defined} defined, ${LEVELS[c.level]}">`
    + `<span>${esc(c.name)}</span><span class="n ${c.active ? mark(c.level) : "sev-none"}">${c.active}</span></div>`
    + (c.children.size ? `<ul>${html(c)}</ul>` : "") + `</li>`).join("");
  const tree = buildTree();
  $("tree").innerHTML = `<li><div class="node${!S.filter.location ? " on" : ""}" data-path=""><span>All</span><span class="n ${S.all.length ? mark(S.all.reduce((m, r) => Math.max(m, level(r)), 0)) : "sev-none"}">${S.all.length}</span></div></li>` + html(tree);
}

function renderBanner() {
  const b = $("banner");
  const st = S.status;
  let reasons = [];
  if (!S.connected) reasons.push("web server unreachable: reconnecting (showing the last known state)");
  else if (Date.now() - S.lastMessage > 25000) reasons.push("no word from the web server for 25 s");
  if (st && st.stale) reasons = reasons.concat(st.reasons);
  if (reasons.length) {
    b.className = "stale";
    b.textContent = "ENGINE DOWN OR DATA STALE \u2014 " + reasons.join("; ")
      + (st && st.lastContactMs ? ` (last contact with Kafka ${fmtTime(st.lastContactMs)})` : "");
  } else {
    b.className = "live";
    b.textContent = `Live: Kafka ${st ? st.bootstrap : ""}, updated ${fmtTime(Date.now())}`;
  }
}

function renderKpi() {
  const k = S.kpi;
  if (!k || !k.recent) { $("kpi").innerHTML = ""; return; }
  const r = k.recent, h = k.lastHour;
  const pp = h.priority_percent;
  $("kpi").innerHTML =
    `<span class="kpi${r.flood ? " flood" : ""}" id="flood" title="activations in the last 10 minutes; flood above ${r.threshold}">`
    + (r.flood ? "ALARM FLOOD: " : "") + `<b>${r.activations}</b> / 10 min</span>`
    + `<span class="kpi" title="alarms per 10 minutes over the last hour">1 h: avg <b>${h.rate_per_bucket.average.toFixed(1)}</b> peak <b>${h.rate_per_bucket.peak}</b></span>`
    + `<span class="kpi" title="alarms with 3 or more activations within a minute (last hour)">chattering <b>${Object.keys(h.chattering).length}</b></span>`
    + `<span class="kpi" title="priority distribution of the last hour's activations (guide: 80/15/5)">low/med/high <b>${pp.low.toFixed(0)}/${pp.medium.toFixed(0)}/${pp.high.toFixed(0)}</b> %</span>`;
  const top = h.top.slice(0, 10).map((t) => `<tr><td>${esc(t.alarm)}</td><td>${t.activations}</td></tr>`).join("");
  $("kpi-more").innerHTML = `<h3>Last hour</h3><table>`
    + `<tr><td>activations</td><td>${h.activations}</td></tr>`
    + `<tr><td>flooded locations (last 10 min)</td><td>${esc(r.flooded_locations.join(", ") || "none")}</td></tr>`
    + `<tr><td>fleeting</td><td>${Object.keys(h.fleeting).length}</td></tr>`
    + `<tr><td>stale (&gt; 24 h)</td><td>${Object.keys(h.stale).length}</td></tr>`
    + `<tr><td>shelve actions</td><td>${h.shelving.actions}</td></tr></table>`
    + (top ? `<h3>Top alarms (last hour)</h3><table>${top}</table>` : "");
}

// --- detail and actions ------------------------------------------------------------------
async function showDetail(name) {
  S.selected = name;
  schedule();
  $("detail-none").hidden = true;
  $("detail-body").hidden = false;
  $("d-name").textContent = name;
  let d;
  try {
    const resp = await fetch(`/api/v1/alarms/${encodeURIComponent(name)}`, { headers: { "X-Requested-With": "page" } });
    d = await resp.json();
    if (!resp.ok) { $("d-shown").textContent = d.error; $("d-def").innerHTML = ""; $("d-history").innerHTML = ""; return; }
  } catch (e) { $("d-shown").textContent = "cannot reach the web server"; return; }
  if (S.selected !== name) return;
  const a = d.active;
  $("d-shown").innerHTML = a
    ? `<span class="sev ${esc(a.severity)}">${esc(a.severity)}</span> <span class="state">${esc(a.state)}</span>${a.ackState ? " " + esc(a.ackState) : ""} since ${fmtTime(a.since)}: ${esc(a.message)}`
      + (a.ack && a.ackState === "ACK" ? `<br>acknowledged by ${esc(a.ack.user)} ${fmtTime(a.ack.time)}${a.ack.comment ? ": " + esc(a.ack.comment) : ""}` : "")
      + (a.disabled ? `<br>disabled by ${esc(a.disabled.user)}${a.disabled.reason ? ": " + esc(a.disabled.reason) : ""}${a.disabled.until ? " until " + fmtTime(a.disabled.until) : ""}` : "")
      + (a.shelving ? `<br>shelved (${esc(a.shelving.kind)}) by ${esc(a.shelving.user)}${a.shelving.reason ? ": " + esc(a.shelving.reason) : ""}${a.shelving.expiration ? " until " + fmtTime(a.shelving.expiration) : ""}` : "")
    : "not active (normal)";
  const def = d.definition;
  const rows = def ? [["producer", def.producerText], ["priority", def.priority], ["location", def.location], ["category", def.category],
    ["guidance", def.description], ["display", def.edmPath], ["documentation", def.docUrl ? `<a href="${esc(def.docUrl)}" target="_blank" rel="noopener">${esc(def.docUrl)}</a>` : ""]] : [["definition", "none"]];
  const g = (def && def.guidance) || {};
  if (def) rows.push(["rationale", g.rationale], ["consequence", g.consequence], ["corrective action", g.correctiveAction],
    ["respond within", g.responseTimeSeconds ? `${g.responseTimeSeconds} s` : ""],
    ["latching", def.latching ? "yes" : ""], ["on-delay", def.delaySeconds ? `${def.delaySeconds} s` + (def.count ? ` (or ${def.count} times)` : "") : ""],
    ["off-delay", def.offDelaySeconds ? `${def.offDelaySeconds} s` : ""], ["filter", def.filter], ["masked by", def.maskedBy]);
  // Display links were checked by the engine's records (http(s) or relative paths): shown as links, never run.
  const links = ((def && def.displays) || []).map((x) => `<a href="${esc(x.url)}" target="_blank" rel="noopener">${esc(x.title)}</a>`).join(" \u00b7 ");
  if (links) rows.push(["displays", links]);
  $("d-def").innerHTML = rows.filter((r) => r[1]).map(([k, v]) => `<dt>${k}</dt><dd>${k === "documentation" || k === "displays" ? v : esc(v)}</dd>`).join("")
    + (d.shelving ? `<dt>shelving</dt><dd>${esc(d.shelving.user)}${d.shelving.reason ? ": " + esc(d.shelving.reason) : ""}${d.shelving.oneshot ? " (one-shot)" : ""}${d.shelving.expiration ? " until " + fmtTime(d.shelving.expiration) : ""}</dd>` : "");
  $("d-history").innerHTML = d.history.slice().reverse().map((e) => `<li><time>${fmtTime(e.time)}</time>${esc(e.text)}</li>`).join("") || "<li>no history in the last 24 h</li>";
}

async function act(kind) {
  const name = S.selected;
  if (!name) return;
  const out = $("act-result");
  const user = $("act-user").value.trim(), pw = $("act-password").value;
  const headers = { "Content-Type": "application/json", "X-Requested-With": "page" };
  if (user) headers.Authorization = "Basic " + btoa(unescape(encodeURIComponent(user + ":" + pw)));
  let body = {};
  if (kind === "shelve") {
    const dur = $("act-duration").value;
    body = { reason: $("act-reason").value };
    if (dur === "oneshot") body.oneshot = true; else if (dur) body.duration = dur;
  }
  out.className = ""; out.textContent = "sending\u2026";
  try {
    const resp = await fetch(`/api/v1/alarms/${encodeURIComponent(name)}/${kind}`, { method: "POST", headers, body: JSON.stringify(body) });
    const d = await resp.json();
    if (resp.ok) { out.className = "ok"; out.textContent = `${{ shelve: "shelved", unshelve: "unshelved", ack: "acknowledged", unack: "unacknowledged" }[kind]} by ${d.user}`; }
    else { out.className = "err"; out.textContent = `refused (${resp.status}): ${d.error}`; }
  } catch (e) { out.className = "err"; out.textContent = "cannot reach the web server"; }
}

// --- events --------------------------------------------------------------------------------
function connect() {
  const es = new EventSource("/api/v1/events");
  es.addEventListener("snapshot", (ev) => {
    const d = JSON.parse(ev.data);
    S.connected = true; S.lastMessage = Date.now();
    window.__page.snapshotMs = performance.now();
    S.rows = new Map(d.alarms.map((r) => [r.name, r]));
    for (const r of d.alarms) dirty.add(r.name);
    S.locations = d.locations; S.tree = d.tree || {}; S.status = d.status; S.kpi = d.kpi; S.readOnly = d.readOnly;
    S.snapshotLoaded = true;
    if (d.shelveReasons) $("act-reason").innerHTML = d.shelveReasons.map((r) => `<option>${esc(r)}</option>`).join("");
    $("server").textContent = `web server ${d.server}` + (d.readOnly ? " \u00b7 read-only" : "");
    needSort = true; renderKpi(); schedule();
  });
  es.addEventListener("changes", (ev) => {
    const d = JSON.parse(ev.data);
    S.connected = true; S.lastMessage = Date.now();
    if (d.status) S.status = d.status;
    if (d.locations) { S.locations = d.locations; needSort = true; }
    if (d.tree) { S.tree = d.tree; needSort = true; }
    if (d.kpi) { S.kpi = d.kpi; renderKpi(); }
    if (d.rows) {
      const now = Date.now();
      for (const r of d.rows) { window.__page.received[r.name] = now; window.__page.sent[r.name] = d.sentMs; }
      applyRows(d.rows);
    }
    if (S.selected && ((d.history && d.history.includes(S.selected)) || (d.rows && d.rows.some((r) => r.name === S.selected)))) showDetail(S.selected);
    schedule();
  });
  es.onopen = () => { S.connected = true; S.lastMessage = Date.now(); schedule(); };
  es.onerror = () => { S.connected = es.readyState === EventSource.OPEN; schedule(); };
}

function setFilter(field, value) { S.filter[field] = value; needSort = true; $("scroller").scrollTop = 0; schedule(); }
for (const f of ["location", "category", "priority", "state"]) $("f-" + f).addEventListener("change", (e) => setFilter(f, e.target.value));
$("f-text").addEventListener("input", (e) => setFilter("text", e.target.value));
$("f-clear").addEventListener("click", () => { S.filter = { location: "", category: "", priority: "", state: "", text: "" }; $("f-text").value = ""; needSort = true; schedule(); });
$("scroller").addEventListener("scroll", () => schedule(), { passive: true });
window.addEventListener("resize", () => schedule());
$("rows").addEventListener("click", (e) => { const tr = e.target.closest("tr.alarm"); if (tr) showDetail(tr.dataset.name); });
$("tree").addEventListener("click", (e) => { const n = e.target.closest(".node"); if (n) setFilter("location", n.dataset.path); });
$("counts").addEventListener("click", (e) => { const c = e.target.closest(".chip[data-state]"); if (c) setFilter("state", c.dataset.state); });
$("shelve-btn").addEventListener("click", () => act("shelve"));
$("unshelve-btn").addEventListener("click", () => act("unshelve"));
$("ack-btn").addEventListener("click", () => act("ack"));
setInterval(renderBanner, 2000);
connect();

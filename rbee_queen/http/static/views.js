// Rendering of the cluster's state into the page's tables and lists. Each
// function redraws one part from the state alone (the server is the only
// source of truth; nothing here is edited by hand).

import { bytes, clock, duration, el, show, usage } from "./format.js";

const $ = (id) => document.getElementById(id);

// Each cell carries its column's name, so a phone shows rows as labelled cards (style.css).
function label(tbody) {
  const names = [...tbody.closest("table").querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of tbody.rows) [...row.cells].forEach((cell, i) => { cell.dataset.label = names[i] || ""; });
}

export function renderNodes(state) {
  const rows = state.nodes.map((n) => {
    const r = n.resources;
    const gpus = r && r.gpus.length
      ? r.gpus.map((g) => el("div", { class: "sub", text: `GPU ${g.index} ${g.name}: ${usage(g.vram_used, g.vram_total)} VRAM` }))
      : [];
    const backends = Object.entries(n.backends || {}).map(([b, count]) => `${b} ×${count}`).join(", ") || "–";
    return el("tr", { "data-node": n.name },
      el("th", { scope: "row", text: n.name }),
      el("td", {}, el("div", {}, el("span", { class: `state state-${n.state.replace(" ", "-")}`, text: n.state }),
        n.last_error && n.state !== "up" ? el("div", { class: "sub error", text: n.last_error }) : null)),
      el("td", {}, el("div", {}, n.where, el("div", { class: "sub", text: `hive ${n.hive_address}` }))),
      el("td", { text: n.tls ? "on" : "off" }),
      el("td", { text: backends }),
      el("td", {}, el("div", {}, r ? usage(r.ram_used, r.ram_total) : "–", gpus)),
      el("td", { text: r ? usage(r.disk_used, r.disk_total) : "–" }),
      el("td", { text: n.hive_version || "–" }));
  });
  $("nodes").replaceChildren(...rows);
  label($("nodes"));
  show($("nodes-empty"), !state.nodes.length);
  for (const id of ["download-node", "logs-node"]) fillSelect($(id), state.nodes.map((n) => [n.name, n.name]));
}

// How long an idle worker has before its hive stops it (the hive's idle timeout
// from its last request); "–" while it works or loads.
function keepAlive(state, w, now) {
  if (w.state !== "idle" || !w.last_activity_unix_ms) return "–";
  const node = state.nodes.find((n) => n.name === w.node);
  const idle = now - w.last_activity_unix_ms;
  if (!node || !node.idle_timeout_ms) return `idle ${duration(idle)}`;
  return `${duration(Math.max(0, node.idle_timeout_ms - idle))} left`;
}

export function renderWorkers(state, onStop) {
  const now = Date.now() + state.offset;
  const rows = state.workers.map((w) => {
    const stop = state.canAct
      ? el("button", { type: "button", class: "small danger", "data-stop": w.id, "aria-label": `Stop worker ${w.id}`,
          text: state.stopping.has(w.id) ? "Stopping…" : "Stop", disabled: state.stopping.has(w.id),
          onclick: () => onStop(w) })
      : null;
    return el("tr", { "data-worker": w.id, "data-state": w.state },
      el("th", { scope: "row" }, el("code", { text: w.id })),
      el("td", { class: "node", text: w.node }),
      el("td", { class: "model", text: w.model }),
      el("td", {}, el("span", { class: `state state-${w.state}`, text: w.state })),
      el("td", { class: "slots", text: `${w.slots_busy}/${w.slots_total}` }),
      el("td", { class: "waiting", text: w.waiting ?? "–" }),
      el("td", { class: "tps", text: w.tokens_per_s ?? "–" }),
      el("td", { class: "age", text: w.started_unix_ms ? duration(now - w.started_unix_ms) : "–" }),
      el("td", { class: "idle", text: keepAlive(state, w, now) }),
      el("td", {}, stop));
  });
  $("worker-rows").replaceChildren(...rows);
  label($("worker-rows"));
  show($("workers-empty"), !state.workers.length);
  const sources = [["rbee-hive", "hive log"], ...state.workers.filter((w) => w.node === $("logs-node").value).map((w) => [w.id, `worker ${w.id}`])];
  fillSelect($("logs-source"), sources);
}

export function renderModels(state) {
  const rows = [];
  const choices = new Map();
  for (const [node, listing] of Object.entries(state.models).sort()) {
    for (const m of listing.models) {
      const loaded = state.workers.filter((w) => w.node === node && w.model === m.model).map((w) => `${w.id} (${w.state})`);
      rows.push(el("tr", { "data-node": node, "data-model": m.model },
        el("td", { text: node }), el("th", { scope: "row", text: m.model }), el("td", { text: bytes(m.size) }),
        el("td", { text: m.weights_format }), el("td", { text: loaded.join(", ") || "–" })));
      choices.set(m.model, m.model);
    }
    if (listing.unavailable) {
      rows.push(el("tr", { "data-node": node }, el("td", { text: node }), el("td", { colSpan: 4, class: "sub", text: `(${listing.unavailable})` })));
    }
  }
  $("model-rows").replaceChildren(...rows);
  label($("model-rows"));
  // The playground offers what is loaded first, then what is on disk.
  const warm = state.workers.filter((w) => w.state === "idle" || w.state === "busy").map((w) => w.model);
  const ordered = [...new Set([...warm, ...choices.keys()])];
  fillSelect($("play-model"), ordered.map((m) => [m, warm.includes(m) ? `${m} (loaded)` : m]));
}

export function renderDownloads(state) {
  const items = [...state.activity.values()].filter((e) => e.kind === "download" && e.state === "running").map((e) => {
    const p = e.progress;
    const pct = p && p.total ? Math.floor((100 * p.done) / p.total) : null;
    const label = p ? (p.total ? `${pct}% · ${bytes(p.done)} / ${bytes(p.total)} · ${bytes(p.rate)}/s` : `${bytes(p.done)}`) : "starting…";
    return el("div", { class: "download", "data-download": e.id },
      el("label", { for: `dl-${e.id}`, text: `${e.model} on ${e.node}` }),
      el("progress", { id: `dl-${e.id}`, max: p && p.total ? p.total : null, value: p && p.total ? p.done : null }),
      el("span", { class: "sub figures", text: label }));
  });
  $("downloads").replaceChildren(...items);
}

// Entries a person opened or closed keep that choice across redraws.
const folded = new Map();

function entryView(e) {
  const summary = el("summary", {},
    el("span", { class: `state state-${e.state}`, text: e.state }), " ",
    el("strong", { text: e.title }), " ", el("span", { class: "sub", text: clock(e.started_unix_ms) }),
    e.outcome ? el("span", { class: "sub", text: ` · ${e.outcome}` }) : null);
  const lines = el("pre", { class: "lines" }, e.lines.map((l) => el("span", { class: `line level-${l.level}`, text: `${l.text}\n` })));
  const error = e.error
    ? el("div", { class: "failure", role: "note" },
      el("div", {}, el("code", { class: "code", text: e.error.code }), " ", e.error.message),
      e.error.suggestions.length ? el("ul", {}, e.error.suggestions.map((s) => el("li", { text: s }))) : null)
    : null;
  const open = folded.has(e.id) ? folded.get(e.id) : e.state !== "done";
  const details = el("details", { open }, summary, error, lines);
  summary.addEventListener("click", () => folded.set(e.id, !details.open));
  return el("li", { "data-entry": e.id, "data-state": e.state, "data-kind": e.kind }, details);
}

export function renderActivity(state) {
  const entries = [...state.activity.values()].sort((a, b) => b.id - a.id);
  $("activity-list").replaceChildren(...entries.map(entryView));
  show($("activity-empty"), !entries.length);
  renderDownloads(state);
}

export function fillSelect(select, options) {
  const current = select.value;
  const same = select.options.length === options.length && options.every(([v], i) => select.options[i].value === v);
  if (same) return;
  select.replaceChildren(...options.map(([value, label]) => el("option", { value, text: label })));
  if (options.some(([v]) => v === current)) select.value = current;
}

// Ages and idle times move with the clock between server events: only those cells change.
export function updateAges(state) {
  const now = Date.now() + state.offset;
  for (const w of state.workers) {
    const row = document.querySelector(`tr[data-worker="${CSS.escape(w.id)}"]`);
    if (!row) continue;
    row.querySelector(".age").textContent = w.started_unix_ms ? duration(now - w.started_unix_ms) : "–";
    row.querySelector(".idle").textContent = keepAlive(state, w, now);
  }
}

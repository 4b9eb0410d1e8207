// The page: log in with a key, then follow the cluster through one event
// stream (/api/web/events). The stream reconnects after a drop; nothing is
// polled. Admin actions go to the queen, which checks the key's scope again.

import { ApiError, getJson, key, postJson, stream } from "./api.js";
import { followLogs, stopLogs } from "./logs.js";
import { clearChat, send, stopAnswer } from "./playground.js";
import { renderActivity, renderDownloads, renderModels, renderNodes, renderWorkers, updateAges } from "./views.js";

const $ = (id) => document.getElementById(id);

const state = {
  scope: "", canAct: false, nodes: [], workers: [], models: {}, activity: new Map(),
  offset: 0, stopping: new Set(),
};
let feed = null;

function showError(id, err) {
  const box = $(id);
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  const hints = err.suggestions && err.suggestions.length ? ` (${err.suggestions.join("; ")})` : "";
  box.textContent = `${err.code ? `${err.code}: ` : ""}${err.message}${hints}`;
  box.hidden = false;
}

function setLive(text, ok) {
  $("live").textContent = text;
  $("live").classList.toggle("ok", ok);
}

function renderAll() {
  renderNodes(state);
  renderWorkers(state, stopWorker);
  renderModels(state);
  renderActivity(state);
}

function apply(event, data) {
  switch (event) {
    case "snapshot":
      state.nodes = data.nodes;
      state.workers = data.workers;
      state.models = data.models;
      state.activity = new Map(data.activity.map((e) => [e.id, e]));
      if (data.workers.length) state.offset = data.workers[0].now_unix_ms - Date.now();
      renderAll();
      break;
    case "workers":
      state.workers = data;
      if (data.length) state.offset = data[0].now_unix_ms - Date.now();
      for (const id of [...state.stopping]) if (!data.some((w) => w.id === id)) state.stopping.delete(id);
      renderWorkers(state, stopWorker);
      renderModels(state);
      break;
    case "nodes":
      state.nodes = data;
      renderNodes(state);
      break;
    case "models":
      state.models[data.node] = { models: data.models, unavailable: data.unavailable };
      renderModels(state);
      break;
    case "entry":
      state.activity.set(data.id, data);
      renderActivity(state);
      break;
    case "line": {
      const entry = state.activity.get(data.id);
      if (entry) { entry.lines.push(data.line); renderActivity(state); }
      break;
    }
    case "progress": {
      const entry = state.activity.get(data.id);
      if (entry) { entry.progress = data.progress; renderDownloads(state); }
      break;
    }
    default:
      break;
  }
}

async function follow() {
  const control = new AbortController();
  feed = control;
  let delay = 1000;
  while (!control.signal.aborted) {
    try {
      setLive("connecting…", false);
      for await (const { event, data } of stream("/api/web/events", control.signal)) {
        if (event === "snapshot") { setLive("live", true); delay = 1000; }
        apply(event, data);
      }
    } catch (err) {
      if (control.signal.aborted) return;
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) { logout(err); return; }
    }
    if (control.signal.aborted) return;
    setLive(`reconnecting in ${delay / 1000}s`, false);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

async function stopWorker(worker) {
  state.stopping.add(worker.id);
  renderWorkers(state, stopWorker);
  showError("workers-error", null);
  try {
    await postJson("/api/web/workers/stop", { node: worker.node, worker_id: worker.id });
  } catch (err) {
    state.stopping.delete(worker.id);
    renderWorkers(state, stopWorker);
    showError("workers-error", err);
  }
}

async function login(value) {
  key.set(value);
  try {
    const me = await getJson("/api/web/me");
    state.scope = me.scope;
    state.canAct = me.can_act;
  } catch (err) {
    key.clear();
    throw err;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("scope").textContent = state.canAct ? "admin" : `${state.scope} (read only)`;
  document.body.classList.toggle("read-only", !state.canAct);
  follow();
}

function logout(err) {
  if (feed) feed.abort();
  feed = null;
  stopLogs();
  clearChat();
  key.clear();
  $("app").hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  showError("login-error", err || null);
}

function tick() {
  updateAges(state);
}

function wire() {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("login-error", null);
    try {
      await login($("login-key").value.trim());
      $("login-key").value = "";
    } catch (err) {
      showError("login-error", err.status === 401 ? { message: "Wrong key: the queen refused it" } : err);
    }
  });
  $("logout").addEventListener("click", () => logout());
  $("download-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("download-error", null);
    try {
      await postJson("/api/web/models/download", { node: $("download-node").value, model: $("download-model").value.trim() });
    } catch (err) {
      showError("download-error", err);
    }
  });
  $("logs-node").addEventListener("change", () => renderWorkers(state, stopWorker));
  $("logs-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if ($("logs-node").value) followLogs($("logs-node").value, $("logs-source").value || "rbee-hive");
  });
  $("logs-stop").addEventListener("click", () => stopLogs());
  $("play-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const prompt = $("play-prompt").value.trim();
    if (!prompt || !$("play-model").value) return;
    $("play-prompt").value = "";
    send($("play-model").value, prompt, Number($("play-max").value) || 128);
  });
  $("play-stop").addEventListener("click", () => stopAnswer());
  $("play-clear").addEventListener("click", () => clearChat());
  setInterval(tick, 1000);
  if (key.get()) login(key.get()).catch((err) => logout(err));
}

wire();

// Following one log (a node's hive log or one worker's) live: history first,
// then new lines as the hive writes them, until Stop or another log is chosen.

import { stream } from "./api.js";

const $ = (id) => document.getElementById(id);
const MAX_LINES = 2000;
let current = null;

function append(output, text) {
  const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
  output.append(document.createTextNode(text));
  while (output.childNodes.length > MAX_LINES) output.firstChild.remove();
  if (atBottom) output.scrollTop = output.scrollHeight;
}

export function stopLogs() {
  if (current) current.abort();
  current = null;
  $("logs-stop").disabled = true;
}

export async function followLogs(node, source) {
  stopLogs();
  const output = $("logs-output");
  output.replaceChildren();
  const control = new AbortController();
  current = control;
  $("logs-stop").disabled = false;
  const query = new URLSearchParams({ node, worker: source === "rbee-hive" ? "" : source });
  try {
    for await (const { event, data } of stream(`/api/web/logs?${query}`, control.signal)) {
      if (event === "line") append(output, `${data.source} | ${data.line}\n`);
      else if (event === "failed") append(output, `❌ ${data.code}: ${data.message}\n`);
    }
    if (!control.signal.aborted) append(output, "— the log stream ended —\n");
  } catch (err) {
    if (!control.signal.aborted) append(output, `❌ ${err.code ? `${err.code}: ` : ""}${err.message}\n`);
  } finally {
    if (current === control) stopLogs();
  }
}

// The queen's HTTP API as the page uses it: the key (kept in this tab's
// session storage, sent as a bearer header), JSON calls, and server-sent
// events read from an authenticated fetch (EventSource cannot send a header).

const KEY = "rbee.key";

export const key = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = (error.rbee && error.rbee.code) || error.code || "";
    this.suggestions = (error.rbee && error.rbee.suggestions) || [];
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${key.get()}`, ...extra };
}

async function failure(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  return new ApiError(res.status, body);
}

export async function getJson(path) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw await failure(res);
  return res.json();
}

export async function postJson(path, body, signal) {
  const res = await fetch(path, {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body), signal,
  });
  if (!res.ok) throw await failure(res);
  return res;
}

// Yields {event, data, comment} for each server-sent event of a response.
export async function* readEvents(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      let comment = null;
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) comment = line.slice(1).trim();
        else if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      yield { event, data: data.join("\n"), comment };
    }
  }
}

// An event stream on a GET route; ends when the server ends it or `signal` aborts.
export async function* stream(path, signal) {
  const res = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!res.ok) throw await failure(res);
  for await (const item of readEvents(res)) {
    if (item.comment !== null && !item.data) continue;
    yield { event: item.event, data: JSON.parse(item.data) };
  }
}

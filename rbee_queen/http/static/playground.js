// A chat with one model through the queen's OpenAI-compatible route
// (POST /v1/chat/completions, streaming). Under each answer: time to first
// token and tokens per second, measured here from what arrived.

import { postJson, readEvents } from "./api.js";
import { el } from "./format.js";

const $ = (id) => document.getElementById(id);
let messages = [];
let running = null;

function bubble(role, text) {
  const body = el("div", { class: "text", text });
  const node = el("div", { class: `msg ${role}`, "data-role": role }, el("div", { class: "who", text: role === "user" ? "you" : "model" }), body);
  $("play-transcript").append(node);
  node.scrollIntoView({ block: "nearest" });
  return { node, body };
}

export function clearChat() {
  if (running) running.abort();
  messages = [];
  $("play-transcript").replaceChildren();
}

export function stopAnswer() {
  if (running) running.abort();
}

export async function send(model, prompt, maxTokens) {
  messages.push({ role: "user", content: prompt });
  bubble("user", prompt);
  const answer = bubble("assistant", "");
  answer.node.classList.add("streaming");
  const status = el("div", { class: "sub status", role: "status" });
  const figures = el("div", { class: "sub figures" });
  answer.node.append(status, figures);
  const control = new AbortController();
  running = control;
  $("play-send").disabled = true;
  $("play-stop").disabled = false;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let text = "";
  try {
    const res = await postJson("/v1/chat/completions", {
      model, messages, stream: true, max_tokens: maxTokens, stream_options: { include_usage: true },
    }, control.signal);
    for await (const item of readEvents(res)) {
      if (item.comment && !item.data) { status.textContent = item.comment; continue; }
      if (item.data === "[DONE]") break;
      if (!item.data) continue;
      const chunk = JSON.parse(item.data);
      if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) { first = performance.now(); status.textContent = ""; }
        chunks += 1;
        text += delta.content;
        answer.body.textContent = text;
      }
    }
    messages.push({ role: "assistant", content: text });
  } catch (err) {
    if (!control.signal.aborted) {
      answer.node.classList.add("failed");
      status.textContent = `❌ ${err.code ? `${err.code}: ` : ""}${err.message}`;
    } else {
      status.textContent = "stopped";
    }
  } finally {
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const ttft = first === null ? null : first - started;
    const rate = first !== null && end > first && tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : null;
    figures.textContent = [
      ttft === null ? "no tokens" : `TTFT ${Math.round(ttft)} ms`,
      rate === null ? null : `${rate.toFixed(1)} tokens/s`,
      `${tokens} tokens`,
    ].filter(Boolean).join(" · ");
    figures.dataset.ttftMs = ttft === null ? "" : String(Math.round(ttft));
    figures.dataset.tokens = String(tokens);
    answer.node.classList.remove("streaming");
    answer.node.dataset.done = "1";
    running = null;
    $("play-send").disabled = false;
    $("play-stop").disabled = true;
  }
}

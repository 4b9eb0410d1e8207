// Small formatting helpers and a DOM builder (text only: nothing from the
// server is ever parsed as HTML).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("data-") || name.startsWith("aria-") || ["type", "title", "value", "max", "id", "for", "role"].includes(name)) node.setAttribute(name, value === true ? "" : value);
    else node[name] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const UNITS = ["B", "kB", "MB", "GB", "TB"];

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  let i = 0;
  let v = Number(n);
  while (v >= 1000 && i < UNITS.length - 1) { v /= 1000; i += 1; }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${UNITS[i]}`;
}

export function usage(used, total) {
  if (!total) return "–";
  return `${bytes(used)} / ${bytes(total)} (${Math.round((100 * used) / total)}%)`;
}

export function duration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "–";
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${m % 60}m`;
}

export function clock(unixMs) {
  return unixMs ? new Date(unixMs).toLocaleTimeString() : "";
}

export function show(node, visible) {
  node.hidden = !visible;
}

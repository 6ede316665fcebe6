// Tiny DOM and text helpers. Text always goes in as text (textContent / text nodes), never as HTML.

export const $ = (sel, root = document) => root.querySelector(sel);

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function formatTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

// A chat's title from its first message: one line (spaces and control characters, which a
// title may not hold, made one space), at most `max` characters, cut at a word boundary with an
// ellipsis (mid-word only when the first word alone is longer).
export function titleFrom(text, max = 60) {
  const flat = text.replace(/[\p{Cc}\s]+/gu, " ").trim();
  const chars = [...flat]; // code points: an emoji is not cut in half
  if (chars.length <= max) return flat;
  const head = chars.slice(0, max - 1).join(""); // room for the ellipsis
  const space = chars[max - 1] === " " ? head.length : head.lastIndexOf(" ");
  const cut = space > 0 ? head.slice(0, space) : head;
  return `${cut.replace(/[\s.,;:!?–—-]+$/, "")}…`;
}

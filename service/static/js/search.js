// Search of one's chats (GET /api/search), in the sidebar: results replace the chat list while
// the box holds a query; each shows its chat, a snippet with the matches marked, and opens the
// chat at that message.

import { api } from "./api.js";
import { formatTime, h } from "./dom.js";

const DEBOUNCE_MS = 250;

// The snippet as text nodes with <mark> around each [start, end) (offsets in code points).
export function markedSnippet(snippet, highlights) {
  const chars = [...snippet];
  const parts = [];
  let at = 0;
  for (const [start, end] of highlights) {
    if (start < at || end <= start) continue;
    parts.push(chars.slice(at, start).join(""), h("mark", {}, chars.slice(start, end).join("")));
    at = end;
  }
  parts.push(chars.slice(at).join(""));
  return parts.filter((p) => p !== "");
}

export class Search {
  // els: {input, results, list (the chat list, hidden meanwhile), status}; onOpen(chatId,
  // messageId) opens a result; onError(exc) reports a failure.
  constructor(els, { onOpen, onError }) {
    this.els = els;
    this.onOpen = onOpen;
    this.onError = onError;
    this.timer = 0;
    this.seq = 0; // the latest search: answers to older ones are dropped
    els.input.addEventListener("input", () => this.schedule());
    els.input.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") {
        ev.preventDefault();
        this.clear();
      } else if (ev.key === "Enter") {
        ev.preventDefault();
        this.run();
      }
    });
  }

  get active() {
    return this.els.input.value.trim() !== "";
  }

  schedule() {
    clearTimeout(this.timer);
    if (!this.active) return this.show(false);
    this.timer = setTimeout(() => this.run(), DEBOUNCE_MS);
  }

  clear() {
    clearTimeout(this.timer);
    this.seq++;
    this.els.input.value = "";
    this.show(false);
  }

  show(searching) {
    this.els.results.hidden = !searching;
    this.els.list.hidden = searching;
    if (!searching) {
      this.els.results.replaceChildren();
      this.els.status.textContent = "";
    }
  }

  async run(cursor = null) {
    clearTimeout(this.timer);
    const q = this.els.input.value.trim();
    if (!q) return this.show(false);
    const seq = ++this.seq;
    const params = new URLSearchParams({ q, limit: "20" });
    if (cursor) params.set("cursor", cursor);
    let body;
    try {
      body = await api("GET", `/api/search?${params}`);
    } catch (exc) {
      if (seq === this.seq) this.onError(exc);
      return;
    }
    if (seq !== this.seq) return;
    this.show(true);
    if (!cursor) this.els.results.replaceChildren();
    this.els.results.querySelector(".search-more")?.remove();
    this.els.results.append(...body.results.map((r) => this.resultEl(r)));
    const count = this.els.results.querySelectorAll(".search-hit").length;
    this.els.status.textContent = count
      ? `${count}${body.next_cursor ? "+" : ""} result${count === 1 ? "" : "s"} for “${body.query}”`
      : `Nothing found for “${body.query}”.`;
    if (body.next_cursor) {
      const more = h("button", { class: "link-btn", type: "button", onclick: () => this.run(body.next_cursor) }, "More results");
      this.els.results.append(h("li", { class: "search-more" }, more));
    }
  }

  resultEl(r) {
    const where = r.kind === "chat" ? "title" : r.role === "user" ? "you" : "answer";
    return h(
      "li",
      { class: "search-hit" },
      h(
        "button",
        {
          class: "search-open",
          type: "button",
          dataset: { chatId: r.chat_id, messageId: r.message_id || "" },
          onclick: () => this.onOpen(r.chat_id, r.message_id || null),
        },
        h("span", { class: "search-chat" }, r.chat_title || "Untitled chat"),
        h("span", { class: "search-snippet" }, ...markedSnippet(r.snippet, r.highlights)),
        h("span", { class: "search-meta" }, `${where} · ${formatTime(r.created_at)}`),
      ),
    );
  }
}

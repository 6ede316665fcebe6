// One message on the page: its head (who, when, status, which version), its text, and for an
// answer the rendered Markdown, the "Thinking" fold, the copy buttons, Regenerate and the
// rating; for a question, Edit.
//
// An answer's raw text is `.msg-body` (hidden: one text node the transports append to; copied
// by "Copy Markdown"); what is shown is `.msg-md`, derived from it (markdown.js). A question is
// shown as the text it is.

import { describeEnd } from "./errors.js";
import { formatTime, h } from "./dom.js";
import { MarkdownView } from "./markdown.js";
import { formatMoney } from "./money.js";

const STATUS_LABELS = {
  pending: "waiting…",
  streaming: "streaming…",
  reconnecting: "reconnecting…",
  cancelled: "stopped — partial answer",
  failed: "failed",
  interrupted: "interrupted — partial answer",
  partial: "partial answer",
  not_sent: "not sent",
};
const RUNNING = new Set(["pending", "streaming", "reconnecting"]);

const views = new WeakMap(); // answer element -> its MarkdownView
const renderedListeners = [];

// Called after an answer's view changed (the page keeps the newest text in sight).
export function onRendered(fn) {
  renderedListeners.push(fn);
}
const rendered = () => renderedListeners.forEach((fn) => fn());

export function setStatus(msgEl, status) {
  msgEl.dataset.status = status;
  const badge = msgEl.querySelector(".msg-status");
  const label = STATUS_LABELS[status];
  badge.textContent = label || "";
  badge.hidden = !label;
  const running = RUNNING.has(status);
  msgEl.setAttribute("aria-busy", running ? "true" : "false");
  const actions = msgEl.querySelector(".msg-actions");
  if (!actions) return;
  // An answer that failed before any text can still be regenerated; there is nothing to copy.
  // A question not sent is not in the history: there is nothing to edit.
  actions.hidden = running || status === "not_sent";
  const empty = !rawText(msgEl);
  for (const button of actions.querySelectorAll("button:not(.msg-branch)")) button.hidden = empty;
}

export function rawText(msgEl) {
  return msgEl.querySelector(".msg-body").textContent;
}

function timeEl(iso) {
  const at = iso ? new Date(iso) : new Date();
  return h("time", { class: "msg-time", datetime: at.toISOString(), title: at.toLocaleString() }, formatTime(at.toISOString()));
}

function actionsEl(feedback) {
  const rate = (rating, label, sign) =>
    h(
      "button",
      {
        class: `icon-btn msg-rate rate-${rating}`,
        type: "button",
        dataset: { action: "rate", rating },
        "aria-label": label,
        "aria-pressed": feedback?.rating === rating ? "true" : "false",
        title: label,
      },
      sign,
    );
  return h(
    "div",
    { class: "msg-actions", role: "group", "aria-label": "Answer actions" },
    h("button", { class: "icon-btn", type: "button", dataset: { action: "copy" }, title: "Copy the answer as text" }, "Copy"),
    h("button", { class: "icon-btn", type: "button", dataset: { action: "copy-md" }, title: "Copy the answer as Markdown" }, "Copy Markdown"),
    h("button", { class: "icon-btn msg-branch", type: "button", dataset: { action: "regenerate" }, title: "Write a new answer to this question (this one is kept as an earlier version)" }, "Regenerate"),
    rate("up", "Good answer", "Good"),
    rate("down", "Bad answer", "Bad"),
    h("span", { class: "msg-note", role: "status" }),
  );
}

function questionActionsEl() {
  return h(
    "div",
    { class: "msg-actions", role: "group", "aria-label": "Question actions" },
    h("button", { class: "icon-btn msg-branch", type: "button", dataset: { action: "edit" }, title: "Change this question and ask it again (what followed is kept as an earlier version)" }, "Edit"),
  );
}

// "2 of 2": this message has earlier versions (a regenerated answer, an edited question); the
// history always shows the newest. A click lists the earlier ones.
export function setVersion(msgEl, version) {
  let button = msgEl.querySelector(".msg-version");
  if (!version || version < 2) {
    button?.remove();
    return;
  }
  if (!button) {
    button = h("button", { class: "link-btn msg-version", type: "button", dataset: { action: "versions" }, "aria-expanded": "false" });
    msgEl.querySelector(".msg-status").before(button);
  }
  button.textContent = `${version} of ${version}`;
  button.title = "Show the earlier versions";
  button.setAttribute("aria-label", `Version ${version} of ${version}: show the earlier versions`);
}

// An ended answer's tokens and, for a priced model's, its cost: "412 tokens · $0.000123". From
// the history's message or the final event (both carry `tokens`, and `cost` + `currency` only
// when the model has a price: an unpriced answer shows no cost).
export function setMeta(msgEl, { tokens, cost, currency } = {}) {
  const meta = msgEl.querySelector(".msg-meta");
  if (!meta) return;
  const total = tokens && Number.isFinite(tokens.total) ? tokens.total : null;
  const money = formatMoney(cost, currency);
  const parts = [];
  if (total !== null) parts.push(`${total.toLocaleString()} ${total === 1 ? "token" : "tokens"}`);
  if (money) parts.push(money);
  meta.textContent = parts.join(" · ");
  meta.hidden = !parts.length;
  if (money) {
    meta.dataset.cost = cost;
    meta.dataset.currency = currency;
    meta.title = `This answer cost ${money} (${cost} ${currency})`;
  } else {
    delete meta.dataset.cost;
    delete meta.dataset.currency;
    meta.removeAttribute("title");
  }
}

export function messageEl({ role, content, status, message_id: messageId, error, reasoning, created_at: createdAt, feedback, version, tokens, cost, currency }) {
  const answer = role === "assistant";
  const body = h("div", { class: "msg-body", hidden: answer });
  body.append(document.createTextNode(content || "")); // one text node; deltas append to it
  const li = h(
    "li",
    { class: `msg ${role}`, dataset: messageId ? { role, messageId } : { role } },
    h(
      "div",
      { class: "msg-head" },
      h("span", { class: "msg-role" }, role === "user" ? "You" : "Assistant"),
      timeEl(createdAt),
      h("span", { class: "msg-status" }),
      answer ? h("span", { class: "msg-meta", hidden: true }) : null,
    ),
    body,
  );
  if (answer) {
    const md = h("div", { class: "msg-md", "aria-live": "polite" });
    body.after(md);
    const view = new MarkdownView(md, rendered);
    views.set(li, view);
    if (content) view.flush(content);
    li.append(actionsEl(feedback));
  } else if (role === "user") {
    li.append(questionActionsEl());
  }
  setVersion(li, version);
  setStatus(li, status || "complete");
  if (answer) setMeta(li, { tokens, cost, currency });
  if (reasoning) appendReasoning(li, reasoning);
  if (error && (error.message || error.code)) {
    li.append(h("div", { class: "msg-error" }, describeEnd(error)));
  }
  return li;
}

// A question the server refused (or that was stopped before it went out): it is not in the
// history. Marked "not sent" with the reason, and that its text is back in the message box;
// Dismiss removes it (so does the next send).
export function setNotSent(msgEl, why) {
  setStatus(msgEl, "not_sent");
  msgEl.querySelector(".msg-error")?.remove();
  msgEl.querySelector(".msg-unsent")?.remove();
  msgEl.append(
    h("div", { class: "msg-error" }, `${why} Your text is back in the message box.`),
    h(
      "div",
      { class: "msg-unsent", role: "group", "aria-label": "Message not sent" },
      h("button", { class: "icon-btn", type: "button", dataset: { action: "dismiss" }, "aria-label": "Dismiss the message not sent", title: "Remove this message: it was not sent" }, "Dismiss"),
    ),
  );
}

// A reasoning model's thinking: folded away above the answer, open on a click.
export function appendReasoning(msgEl, text) {
  let box = msgEl.querySelector(".msg-reasoning");
  if (!box) {
    box = h("details", { class: "msg-reasoning" }, h("summary", {}, "Thinking"), h("div", {}));
    box.lastChild.append(document.createTextNode(""));
    msgEl.querySelector(".msg-body").before(box);
  }
  box.lastChild.firstChild.appendData(text);
}

// More of the answer: the raw text grows at once, the rendered view on the next frame.
export function appendText(msgEl, text) {
  const node = msgEl.querySelector(".msg-body").firstChild;
  node.appendData(text);
  views.get(msgEl)?.update(node.data);
}

// The stored answer is shorter than what the page was sent (a terminal event's `unsaved`: its
// replica died before saving the rest): keep its first `length` characters (code points).
export function cutText(msgEl, length) {
  const node = msgEl.querySelector(".msg-body").firstChild;
  node.data = [...node.data].slice(0, length).join("");
  views.get(msgEl)?.update(node.data);
}

// The answer has ended (or stopped): render it whole, exactly.
export function settle(msgEl) {
  views.get(msgEl)?.flush(rawText(msgEl));
  setStatus(msgEl, msgEl.dataset.status);
}

export function viewOf(msgEl) {
  return views.get(msgEl);
}

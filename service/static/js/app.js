// The chat page: chat list, history, streaming answers over SSE or WebSocket, usage, errors.

import { ApiError, api, auth, devToken, listModels, onUnauthorized, randomId } from "./api.js";
import { $, formatTime, h } from "./dom.js";
import { codePoints } from "./resume.js";
import { sseResume, sseTurn } from "./sse.js";
import { WsTransport } from "./ws.js";

const PREFS = { model: "chat-gateway.model", ws: "chat-gateway.ws" };

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

const state = {
  chats: [],
  chatId: null,
  turn: null, // the running turn (sent, or followed after a reload): {cancel, stopping}
  ws: new WsTransport(),
};

const el = {
  app: $("#app"),
  chatList: $("#chat-list"),
  chatListEmpty: $("#chat-list-empty"),
  newChat: $("#new-chat"),
  sidebar: $("#sidebar"),
  toggleSidebar: $("#toggle-sidebar"),
  login: $("#login"),
  loginForm: $("#login-form"),
  tokenInput: $("#token-input"),
  chat: $("#chat"),
  chatTitle: $("#chat-title"),
  messages: $("#messages"),
  emptyChat: $("#empty-chat"),
  composer: $("#composer"),
  input: $("#input"),
  send: $("#send"),
  stop: $("#stop"),
  model: $("#model"),
  useWs: $("#use-ws"),
  usageMeter: $("#usage-meter"),
  usageText: $("#usage-text"),
  whoami: $("#whoami"),
  signOut: $("#sign-out"),
  error: $("#error"),
  errorText: $("#error-text"),
  errorClose: $("#error-close"),
};

// ------------------------------------------------------------------------------------ errors
function describe(err) {
  const d = err.details || {};
  const code = err.code || "";
  if (code === "budget_exceeded") {
    const left = d.limit != null ? ` (${d.remaining ?? 0} of ${d.limit} tokens left)` : "";
    return `Your monthly token budget is used up${left}. It renews at the start of next month.`;
  }
  if (code === "rate_limited") {
    const wait = err.retryAfter != null ? Math.max(1, Math.ceil(err.retryAfter)) : null;
    return `You are sending messages too quickly.${wait ? ` Try again in ${wait} s.` : ""}`;
  }
  if (code.startsWith("upstream_")) {
    return `The model provider failed (${code}): ${err.message}. Please try again in a moment.`;
  }
  if (code === "chat_not_found") return "This chat no longer exists (was it deleted elsewhere?).";
  if (code === "invalid_message" || code === "validation_error") return err.message;
  if (code === "unauthorized") return "Your token was refused. Please sign in again.";
  if (["network_error", "stream_interrupted", "stop_unconfirmed"].includes(code)) return err.message;
  return `${err.message}${code ? ` (${code})` : ""}`;
}

function showError(text) {
  el.errorText.textContent = text;
  el.error.hidden = false;
}

function hideError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

function report(exc) {
  if (exc instanceof ApiError) showError(describe(exc));
  else {
    console.error(exc);
    showError(`Something went wrong: ${exc.message || exc}`);
  }
}

// ------------------------------------------------------------------------------------ auth
function setSignedIn(signedIn) {
  el.login.hidden = signedIn;
  el.chat.hidden = !signedIn;
  el.signOut.hidden = !signedIn;
  el.whoami.textContent = signedIn && auth.user ? auth.user : "";
  el.app.dataset.state = signedIn ? "loading" : "login";
  if (!signedIn) el.tokenInput.focus();
}

async function ensureToken() {
  if (auth.token) return true;
  const user = new URLSearchParams(location.search).get("user") || "dev";
  try {
    const token = await devToken(user);
    if (token) {
      auth.token = token;
      return true;
    }
  } catch (exc) {
    report(exc);
  }
  return false;
}

onUnauthorized(() => {
  auth.token = null;
  state.ws.close();
  setSignedIn(false);
});

// ------------------------------------------------------------------------------------ usage, models
async function refreshUsage() {
  try {
    const u = await api("GET", "/api/usage");
    el.usageMeter.value = Math.min(100, u.percent);
    el.usageText.textContent = `${u.used.toLocaleString()} / ${u.limit.toLocaleString()} tokens`;
    el.usageText.parentElement.title = `${u.percent}% of this month's budget used, ${u.remaining.toLocaleString()} tokens left`;
    el.usageText.parentElement.dataset.used = String(u.used);
  } catch (exc) {
    if (exc.status !== 401) el.usageText.textContent = "usage unavailable";
  }
}

async function loadModels() {
  const { models, default: fallback } = await listModels();
  const saved = localStorage.getItem(PREFS.model);
  el.model.replaceChildren(...models.map((name) => h("option", { value: name }, name)));
  const pick = models.includes(saved) ? saved : models.includes(fallback) ? fallback : models[0];
  if (pick) el.model.value = pick;
}

// ------------------------------------------------------------------------------------ chat list
function chatLabel(chat) {
  return chat.title || `Chat of ${formatTime(chat.created_at)}`;
}

function renderChats() {
  el.chatListEmpty.hidden = state.chats.length > 0;
  el.chatList.replaceChildren(
    ...state.chats.map((chat) => {
      const li = h("li", { class: "chat-item", dataset: { chatId: chat.chat_id } });
      const showNormal = () => {
        li.replaceChildren(
          h(
            "button",
            {
              class: "chat-open",
              type: "button",
              "aria-current": chat.chat_id === state.chatId ? "page" : null,
              onclick: () => openChat(chat.chat_id),
            },
            h("span", { class: "chat-name" }, chatLabel(chat)),
            h("span", { class: "chat-time" }, formatTime(chat.updated_at)),
          ),
          h(
            "button",
            {
              class: "chat-delete icon-btn",
              type: "button",
              "aria-label": `Delete ${chatLabel(chat)}`,
              title: "Delete chat",
              onclick: showConfirm,
            },
            "×",
          ),
        );
      };
      const showConfirm = () => {
        const cancel = h("button", { class: "confirm-no", type: "button", onclick: showNormal }, "Cancel");
        li.replaceChildren(
          h(
            "div",
            {
              class: "confirm",
              role: "group",
              "aria-label": "Confirm deletion",
              onkeydown: (ev) => ev.key === "Escape" && showNormal(),
            },
            h("span", {}, "Delete this chat?"),
            h(
              "button",
              { class: "confirm-yes danger", type: "button", onclick: () => deleteChat(chat.chat_id) },
              "Delete",
            ),
            cancel,
          ),
        );
        cancel.focus();
      };
      showNormal();
      return li;
    }),
  );
}

async function loadChats() {
  const body = await api("GET", "/api/chat?limit=100");
  state.chats = body.chats;
  renderChats();
}

async function deleteChat(chatId) {
  try {
    await api("DELETE", `/api/chat/${chatId}`);
  } catch (exc) {
    if (exc.code !== "chat_not_found") return report(exc);
  }
  state.chats = state.chats.filter((c) => c.chat_id !== chatId);
  if (state.chatId === chatId) newChat();
  renderChats();
}

function newChat() {
  if (state.turn) return;
  state.chatId = null;
  history.replaceState(null, "", location.pathname + location.search);
  el.chatTitle.textContent = "New chat";
  el.messages.replaceChildren();
  el.emptyChat.hidden = false;
  renderChats();
  closeSidebar();
  el.input.focus();
}

// ------------------------------------------------------------------------------------ messages
function setStatus(msgEl, status) {
  msgEl.dataset.status = status;
  const badge = msgEl.querySelector(".msg-status");
  const label = STATUS_LABELS[status];
  badge.textContent = label || "";
  badge.hidden = !label;
  const busy = status === "streaming" || status === "pending" || status === "reconnecting";
  msgEl.setAttribute("aria-busy", busy ? "true" : "false");
}

function messageEl({ role, content, status, message_id: messageId, error, reasoning }) {
  const body = h("div", { class: "msg-body" });
  body.append(document.createTextNode(content || "")); // one text node; deltas append to it
  const li = h(
    "li",
    { class: `msg ${role}`, dataset: { role, messageId } },
    h("div", { class: "msg-head" }, h("span", { class: "msg-role" }, role === "user" ? "You" : "Assistant"), h("span", { class: "msg-status" })),
    body,
  );
  setStatus(li, status || "complete");
  if (reasoning) appendReasoning(li, reasoning);
  if (error && (error.message || error.code)) {
    li.append(h("div", { class: "msg-error" }, error.message || error.code));
  }
  return li;
}

function nearBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function appendMessage(msg) {
  const stick = nearBottom();
  const li = messageEl(msg);
  el.messages.append(li);
  el.emptyChat.hidden = true;
  if (stick) el.messages.scrollTop = el.messages.scrollHeight;
  return li;
}

// A reasoning model's thinking: folded away above the answer, open on a click.
function appendReasoning(msgEl, text) {
  let box = msgEl.querySelector(".msg-reasoning");
  if (!box) {
    box = h("details", { class: "msg-reasoning" }, h("summary", {}, "Thinking"), h("div", {}));
    box.lastChild.append(document.createTextNode(""));
    msgEl.querySelector(".msg-body").before(box);
  }
  box.lastChild.firstChild.appendData(text);
}

function appendText(msgEl, text) {
  const stick = nearBottom();
  msgEl.querySelector(".msg-body").firstChild.appendData(text);
  if (stick) el.messages.scrollTop = el.messages.scrollHeight;
}

async function openChat(chatId) {
  if (state.turn) return;
  hideError();
  state.chatId = chatId;
  history.replaceState(null, "", `#/chat/${chatId}`);
  renderChats();
  closeSidebar();
  const chat = state.chats.find((c) => c.chat_id === chatId);
  el.chatTitle.textContent = chat ? chatLabel(chat) : "";
  el.messages.replaceChildren();
  el.messages.setAttribute("aria-busy", "true");
  try {
    const messages = [];
    let after = -1;
    for (let page = 0; page < 20; page++) {
      const body = await api("GET", `/api/chat/${chatId}?limit=500&after=${after}`);
      if (state.chatId !== chatId) return; // another chat was opened meanwhile
      el.chatTitle.textContent = chatLabel(body);
      messages.push(...body.messages);
      if (body.next_after == null) break;
      after = body.next_after;
    }
    el.messages.replaceChildren(...messages.map(messageEl));
    el.emptyChat.hidden = messages.length > 0;
    el.messages.scrollTop = el.messages.scrollHeight;
    const last = messages[messages.length - 1];
    if (last && last.role === "assistant" && last.status === "streaming") {
      followRunning(chatId, last, el.messages.lastElementChild); // not awaited: the page is ready now
    }
  } catch (exc) {
    if (exc.code === "chat_not_found") {
      state.chats = state.chats.filter((c) => c.chat_id !== chatId);
      newChat();
    }
    report(exc);
  } finally {
    el.messages.setAttribute("aria-busy", "false");
  }
}

// ------------------------------------------------------------------------------------ sending
function setBusy(busy) {
  el.app.dataset.busy = busy ? "true" : "false";
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  el.stop.disabled = false;
  el.newChat.disabled = busy;
}

async function ensureChat(text) {
  if (state.chatId) return state.chatId;
  const title = text.trim().replace(/\s+/g, " ").slice(0, 60);
  const chat = await api("POST", "/api/chat", { title, model: el.model.value || undefined });
  state.chats.unshift(chat);
  state.chatId = chat.chat_id;
  history.replaceState(null, "", `#/chat/${chat.chat_id}`);
  el.chatTitle.textContent = chatLabel(chat);
  renderChats();
  return chat.chat_id;
}

async function send() {
  const text = el.input.value;
  if (!text.trim() || state.turn) return;
  hideError();
  setBusy(true);
  state.turn = { cancel: null, stopping: false };
  let userEl = null;
  let botEl = null;
  let started = false;
  try {
    const chatId = await ensureChat(text);
    el.input.value = "";
    userEl = appendMessage({ role: "user", content: text, status: "complete" });
    botEl = appendMessage({ role: "assistant", content: "", status: "pending" });
    const handlers = answerHandlers(botEl, () => {
      started = true;
    });
    // One key per message: a retry of this send (after a network failure) joins its turn.
    const params = { chatId, message: text, model: el.model.value || null, key: randomId() };
    const turn = el.useWs.checked ? state.ws.turn(params, handlers) : sseTurn(params, handlers);
    state.turn.cancel = turn.cancel;
    if (state.turn.stopping) turn.cancel(); // Stop was pressed while the chat was being created
    await turn.finished;
  } catch (exc) {
    const stopped = exc.name === "AbortError" || (state.turn.stopping && exc.code !== "stop_unconfirmed");
    if (botEl && stopped) {
      setStatus(botEl, started ? "cancelled" : "not_sent");
      if (!started) botEl.remove();
    } else if (botEl && started) {
      setStatus(botEl, "interrupted");
      report(exc);
    } else {
      // refused before the stream started (budget, rate limit, validation...): nothing was saved
      if (botEl) botEl.remove();
      if (userEl) setStatus(userEl, "not_sent");
      if (!el.input.value) el.input.value = text;
      if (exc instanceof ApiError && exc.code === "chat_not_found") loadChats().catch(report);
      if (!stopped) report(exc);
    }
  } finally {
    state.turn = null;
    setBusy(false);
    bumpChat(state.chatId);
    refreshUsage();
    el.input.focus();
  }
}

// What a turn's events do to its bubble (a sent turn, or one followed after a reload).
function answerHandlers(botEl, onStarted = () => {}) {
  return {
    onStarted(data) {
      onStarted();
      botEl.dataset.messageId = data.message_id;
      setStatus(botEl, "streaming");
    },
    onDelta(chunk) {
      appendText(botEl, chunk);
    },
    onReasoning(text) {
      appendReasoning(botEl, text);
    },
    onReconnecting() {
      setStatus(botEl, "reconnecting");
    },
    onResumed() {
      setStatus(botEl, "streaming");
    },
    onEnd(kind, data) {
      setStatus(botEl, data.status || (kind === "done" ? "complete" : "failed"));
      if (kind === "error") {
        const msg = data.message || data.reason || "the answer failed";
        botEl.append(h("div", { class: "msg-error" }, msg));
        showError(`The answer failed: ${msg}${data.code ? ` (${data.code})` : ""}`);
      }
    },
  };
}

// Follow an answer that was running when the chat was opened (the page was reloaded, or the
// answer was sent from another tab): its stored text is on the page; the rest comes from the
// offset after it (code points, as the server counts). The composer is busy meanwhile, as for
// a send, and Stop stops it.
async function followRunning(chatId, msg, botEl) {
  if (state.turn) return;
  setBusy(true);
  state.turn = { cancel: null, stopping: false };
  try {
    const params = { chatId, messageId: msg.message_id, after: codePoints(msg.content || "") };
    const handlers = answerHandlers(botEl);
    const turn = el.useWs.checked ? state.ws.resume(params, handlers) : sseResume(params, handlers);
    state.turn.cancel = turn.cancel;
    await turn.finished;
  } catch (exc) {
    if (exc.name === "AbortError" || (state.turn.stopping && exc.code !== "stop_unconfirmed")) {
      setStatus(botEl, "cancelled");
    }
    else {
      setStatus(botEl, "interrupted");
      report(exc);
    }
  } finally {
    state.turn = null;
    setBusy(false);
    refreshUsage();
  }
}

function bumpChat(chatId) {
  const i = state.chats.findIndex((c) => c.chat_id === chatId);
  if (i <= 0) return;
  const [chat] = state.chats.splice(i, 1);
  chat.updated_at = new Date().toISOString();
  state.chats.unshift(chat);
  renderChats();
}

async function stop() {
  const turn = state.turn;
  if (!turn || turn.stopping) return;
  turn.stopping = true;
  el.stop.disabled = true;
  if (turn.cancel) await turn.cancel();
}

// ------------------------------------------------------------------------------------ layout
function closeSidebar() {
  el.app.classList.remove("sidebar-open");
  el.toggleSidebar.setAttribute("aria-expanded", "false");
}

function bind() {
  el.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  el.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    } else if (ev.key === "Escape" && state.turn) {
      ev.preventDefault();
      stop();
    }
  });
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);
  el.errorClose.addEventListener("click", hideError);
  el.model.addEventListener("change", () => localStorage.setItem(PREFS.model, el.model.value));
  el.useWs.checked = localStorage.getItem(PREFS.ws) === "1";
  el.useWs.addEventListener("change", () => {
    localStorage.setItem(PREFS.ws, el.useWs.checked ? "1" : "0");
    if (!el.useWs.checked) state.ws.close();
  });
  el.toggleSidebar.addEventListener("click", () => {
    const open = el.app.classList.toggle("sidebar-open");
    el.toggleSidebar.setAttribute("aria-expanded", String(open));
  });
  el.signOut.addEventListener("click", () => {
    auth.token = null;
    state.ws.close();
    setSignedIn(false);
  });
  el.loginForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = el.tokenInput.value.trim().replace(/^Bearer\s+/i, "");
    if (!token) return;
    auth.token = token;
    el.tokenInput.value = "";
    start();
  });
}

async function start() {
  hideError();
  if (!(await ensureToken())) {
    setSignedIn(false);
    return;
  }
  setSignedIn(true);
  try {
    await Promise.all([loadModels(), loadChats(), refreshUsage()]);
  } catch (exc) {
    report(exc);
    if (exc.status === 401) return;
  }
  const match = location.hash.match(/^#\/chat\/([0-9a-f-]{36})$/);
  if (match) await openChat(match[1]);
  else if (state.chats.length) await openChat(state.chats[0].chat_id);
  else newChat();
  el.app.dataset.state = "ready";
  el.input.focus();
}

bind();
start();

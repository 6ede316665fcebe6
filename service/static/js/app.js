// The chat page: chat list, history, streaming answers over SSE or WebSocket, usage, errors.

import { ApiError, api, auth, devToken, listModels, onUnauthorized, randomId } from "./api.js";
import { $, formatTime, h, titleFrom } from "./dom.js";
import { describe, describeEnd, setBudgetUnit } from "./errors.js";
import { copyText } from "./markdown.js";
import { KeysDialog } from "./keys.js";
import { appendReasoning, appendText, cutText, messageEl, onRendered, rawText, setMeta, setNotSent, setStatus, setVersion, settle } from "./messages.js";
import { formatMoney, isMoneyUnit } from "./money.js";
import { codePoints } from "./resume.js";
import { Search } from "./search.js";
import { sseBranch, sseResume, sseTurn } from "./sse.js";
import { WsTransport } from "./ws.js";

const PREFS = { model: "chat-gateway.model", ws: "chat-gateway.ws" };

const CHAT_PAGE = 100; // chats a page of the list (the API's largest)

const state = {
  chats: [], // the list's chats loaded so far, newest activity first
  chatsCursor: null, // the list's next page ("More chats"), null when every chat is loaded
  chatId: null,
  current: null, // the open chat as its history came (it may be beyond the list's pages)
  unsent: new Map(), // chat id ("" for a new chat) -> its questions refused after it was left
  deleted: new Set(), // the chats deleted on this page (a send still on its way there goes with them)
  turn: null, // the running turn (sent, or followed after a reload): {cancel, stopping, detach}
  ws: new WsTransport(),
  budgetUnit: "tokens", // what the month's budget counts: tokens, or a currency's code
  stick: true, // the messages were scrolled to the bottom: keep them there as an answer grows
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
  rename: $("#rename"),
  renameForm: $("#rename-form"),
  renameInput: $("#rename-input"),
  renameCancel: $("#rename-cancel"),
  search: $("#search"),
  searchResults: $("#search-results"),
  searchStatus: $("#search-status"),
  announce: $("#announce"),
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
  usage: $("#usage"),
  keysOpen: $("#keys-open"),
  whoami: $("#whoami"),
  controls: $(".controls"),
  signOut: $("#sign-out"),
  error: $("#error"),
  errorText: $("#error-text"),
  errorClose: $("#error-close"),
};

const keys = new KeysDialog({ budgetUnit: () => state.budgetUnit });

const search = new Search(
  { input: el.search, results: el.searchResults, list: el.chatList, status: el.searchStatus },
  { onOpen: (chatId, messageId) => openChat(chatId, messageId), onError: (exc) => report(exc) },
);

// ------------------------------------------------------------------------------------ errors
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
    showError("Something went wrong on this page. Reload it and try again.");
  }
}

// Said to screen readers (the streaming answer itself is busy until it ends).
function announce(text) {
  el.announce.textContent = text;
}

// ------------------------------------------------------------------------------------ auth
// Signed out, the page is only the sign-in: no chat list, model picker, usage or New chat.
function setSignedIn(signedIn) {
  el.login.hidden = signedIn;
  el.chat.hidden = !signedIn;
  el.sidebar.hidden = !signedIn;
  el.controls.hidden = !signedIn;
  el.toggleSidebar.hidden = !signedIn;
  el.signOut.hidden = !signedIn;
  el.whoami.textContent = signedIn && auth.user ? auth.user : "";
  el.app.dataset.state = signedIn ? "loading" : "login";
  if (!signedIn) {
    state.chats = [];
    state.chatsCursor = null;
    state.chatId = null;
    state.current = null;
    state.unsent.clear();
    el.chatList.replaceChildren();
    el.messages.replaceChildren();
    el.model.replaceChildren();
    search.clear();
    el.tokenInput.focus();
  }
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
  keys.close();
  auth.token = null;
  state.ws.close();
  setSignedIn(false);
});

// ------------------------------------------------------------------------------------ usage, models
// The month's budget (tokens, or money when BUDGET_UNIT=currency) and what it has cost so far.
async function refreshUsage() {
  try {
    const u = await api("GET", "/api/usage");
    state.budgetUnit = u.unit;
    setBudgetUnit(u.unit);
    showUsage(u);
  } catch (exc) {
    if (exc.status !== 401) el.usageText.textContent = "usage unavailable";
  }
}

function showUsage(u) {
  const money = isMoneyUnit(u.unit);
  const amount = (value) => (money ? formatMoney(value, u.unit) : `${Number(value).toLocaleString()} tokens`);
  const spend = formatMoney(u.cost, u.currency);
  // In tokens, the spend is shown once something priced ran (an unpriced month has none to show).
  const spent = spend && (money || Number(u.cost) > 0);
  el.usageMeter.value = Math.min(100, u.percent);
  el.usageText.textContent = money
    ? `${amount(u.used)} / ${amount(u.limit)}`
    : `${Number(u.used).toLocaleString()} / ${amount(u.limit)}${spent ? ` · ${spend}` : ""}`;
  const title = `${u.percent}% of this month's budget used, ${amount(u.remaining)} left`;
  el.usage.title = spent ? `${title}. Spent this month: ${spend}.` : `${title}.`;
  el.usage.dataset.unit = u.unit;
  el.usage.dataset.used = String(u.used);
  el.usage.dataset.cost = String(u.cost);
  el.usage.dataset.currency = String(u.currency);
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
  el.chatListEmpty.hidden = state.chats.length > 0 || search.active;
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
  if (state.chatsCursor) {
    const more = h("button", { class: "link-btn", type: "button", onclick: () => loadMoreChats(more) }, "More chats");
    el.chatList.append(h("li", { class: "chat-more" }, more));
  }
}

async function loadChats() {
  const body = await api("GET", `/api/chat?limit=${CHAT_PAGE}`);
  state.chats = body.chats;
  state.chatsCursor = body.next_cursor;
  renderChats();
}

// The list's next page, after the chats shown (a chat already there, moved up by a send
// meanwhile, is not shown twice); focus goes to the first one it adds.
async function loadMoreChats(button) {
  const cursor = state.chatsCursor;
  if (!cursor || button.disabled) return;
  button.disabled = true;
  let body;
  try {
    body = await api("GET", `/api/chat?limit=${CHAT_PAGE}&cursor=${encodeURIComponent(cursor)}`);
  } catch (exc) {
    button.disabled = false;
    return report(exc);
  }
  if (state.chatsCursor !== cursor) return; // the list was loaded again meanwhile
  const known = new Set(state.chats.map((c) => c.chat_id));
  const added = body.chats.filter((c) => !known.has(c.chat_id));
  state.chats.push(...added);
  state.chatsCursor = body.next_cursor;
  renderChats();
  const first = added.length ? `.chat-item[data-chat-id="${CSS.escape(added[0].chat_id)}"] .chat-open` : ".chat-more button";
  el.chatList.querySelector(first)?.focus();
  announce(`${added.length} more ${added.length === 1 ? "chat" : "chats"}${state.chatsCursor ? "" : ": every chat is shown"}.`);
}

async function deleteChat(chatId) {
  try {
    await api("DELETE", `/api/chat/${chatId}`);
  } catch (exc) {
    if (exc.code !== "chat_not_found") return report(exc);
  }
  state.chats = state.chats.filter((c) => c.chat_id !== chatId);
  state.unsent.delete(chatId);
  state.deleted.add(chatId);
  if (state.chatId === chatId) newChat();
  renderChats();
}

function newChat() {
  leaveTurn();
  asNewChat();
  el.messages.replaceChildren();
  el.emptyChat.hidden = false;
  showUnsent("");
  renderChats();
  closeSidebar();
  el.input.focus();
}

// The page is a new chat, what it shows kept: the next send creates a chat of its own.
function asNewChat() {
  state.chatId = null;
  history.replaceState(null, "", location.pathname + location.search);
  cancelRename();
  showTitle(null);
}

// A chat created for a send refused before its answer started goes again: it stayed in the list
// (and after a reload), titled with a question never sent. Only while it holds nothing: a refusal
// by the model's provider keeps the question and its failed answer, and another send may have
// gone in meanwhile (another tab's, or this page's once back in it: none may be on its way).
// Best effort, out of sight: a chat that could not be deleted is only an empty chat left over.
async function dropEmptyChat(chatId) {
  let messages;
  try {
    ({ messages } = await api("GET", `/api/chat/${chatId}?limit=1`));
  } catch (exc) {
    if (exc.code === "chat_not_found") forgetChat(chatId); // deleted elsewhere meanwhile
    else console.warn("The chat of a refused send was not deleted:", exc);
    return;
  }
  if (messages.length || (state.turn && state.chatId === chatId)) return;
  forgetChat(chatId);
  try {
    await api("DELETE", `/api/chat/${chatId}`);
  } catch (exc) {
    if (exc.code !== "chat_not_found") console.warn("The chat of a refused send was not deleted:", exc);
  }
}

// A chat gone leaves the list. Open, the page becomes a new chat, keeping the question not sent
// and its text in the box; another chat opened meanwhile stays as it is. Its questions refused
// out of sight go with the new chat: they were asked there.
function forgetChat(chatId) {
  state.chats = state.chats.filter((c) => c.chat_id !== chatId);
  state.deleted.add(chatId);
  if (state.chatId === chatId) asNewChat();
  renderChats();
  const unsent = state.unsent.get(chatId);
  state.unsent.delete(chatId);
  if (unsent) keepUnsent("", unsent);
}

// ------------------------------------------------------------------------------------ messages
function nearBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

// `toEnd`: the user's own question (a send, an edit): the page goes down to it, scrolled up or
// not, and keeps the answer after it in view.
function appendMessage(msg, toEnd = false) {
  const stick = toEnd || nearBottom();
  const li = messageEl(msg);
  el.messages.append(li);
  el.emptyChat.hidden = true;
  if (stick) el.messages.scrollTop = el.messages.scrollHeight;
  if (toEnd) state.stick = true;
  return li;
}

// Open a chat (at `messageId`, a search result, when given).
async function openChat(chatId, messageId = null) {
  if (state.turn && chatId === state.chatId) {
    closeSidebar(); // the chat whose answer is running: it is on the page already
    if (messageId) showMessage(messageId);
    return;
  }
  leaveTurn();
  hideError();
  cancelRename();
  state.chatId = chatId;
  history.replaceState(null, "", `#/chat/${chatId}`);
  renderChats();
  closeSidebar();
  const chat = state.chats.find((c) => c.chat_id === chatId);
  showTitle(chat);
  el.messages.replaceChildren();
  el.messages.setAttribute("aria-busy", "true");
  try {
    const history = await fetchMessages(chatId);
    if (state.chatId !== chatId) return; // another chat was opened meanwhile
    showHistory(chatId, history, messageId);
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

// The open chat's history on the page, as it came (fetchMessages); an answer still running is
// followed.
function showHistory(chatId, { chat, messages }, messageId = null) {
  showTitle(chat);
  el.messages.replaceChildren(...messages.map(messageEl));
  el.emptyChat.hidden = messages.length > 0;
  el.messages.scrollTop = el.messages.scrollHeight;
  if (messageId) showMessage(messageId);
  const last = messages[messages.length - 1];
  if (last && last.role === "assistant" && last.status === "streaming") {
    followRunning(chatId, last, el.messages.lastElementChild); // not awaited: the page is ready now
  }
  showUnsent(chatId);
}

// The chat and its history (the chosen versions), every page of it.
async function fetchMessages(chatId) {
  const messages = [];
  let after = -1;
  let chat = null;
  for (let page = 0; page < 20; page++) {
    chat = await api("GET", `/api/chat/${chatId}?limit=500&after=${after}`);
    messages.push(...chat.messages);
    if (chat.next_after == null) break;
    after = chat.next_after;
  }
  return { chat, messages };
}

// ------------------------------------------------------------------------------------ sending
function setBusy(busy) {
  el.app.dataset.busy = busy ? "true" : "false";
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  el.stop.disabled = false;
}

// A new turn: the running one, until it ends or another chat is opened (leaveTurn). `retried`:
// its connection dropped and was tried again (before "started", the send went out again).
function startTurn() {
  setBusy(true);
  state.turn = { cancel: null, stopping: false, detach: null, detached: false, retried: false };
  return state.turn;
}

// The turn has ended (or was left): the composer is free again.
function endTurn(turn) {
  if (state.turn !== turn) return;
  state.turn = null;
  setBusy(false);
}

// Another chat (or New chat) is opened mid-turn: it opens at once, and the page stops following
// the turn without stopping it (the answer goes on on the server, and its chat follows it again
// when opened). A turn not started yet (its request on its way, or sent again after a network
// failure) is not cut off, which could lose it: it goes on out of sight, its events touching
// nothing on the page, and is let go once it starts (startedAway); a send refused meanwhile is
// shown in its chat (sendRefusedAway).
function leaveTurn() {
  const turn = state.turn;
  if (!turn) return;
  turn.detached = true;
  turn.detach?.();
  endTurn(turn);
}

// A turn left before it started has started: let it go. When its chat is open again (opened
// meanwhile, its history read before the turn was in it), it is read again, and followed.
function startedAway(turn, chatId) {
  turn.detach();
  // not over an edit, a comment or a rename being typed: the chat follows it when opened again
  const typing = el.messages.querySelector(".msg-edit, .msg-comment") || !el.renameForm.hidden;
  if (state.chatId === chatId && !state.turn && !typing) openChat(chatId);
}

// A send refused after its chat was left: the chat shows it "not sent" (with its text back in
// the box) when opened again, or at once if it is open again already (and its history shown).
function sendRefusedAway(chatId, userEl, why, said = `Your message in ${chatName(chatId)} was not sent. ${why}`) {
  showError(said);
  keepUnsent(chatId || "", [userEl]);
}

// Questions not sent, kept for their chat ("" a new chat) until it is opened again, or shown at
// once if it is open (and its history shown).
function keepUnsent(key, userEls) {
  state.unsent.set(key, [...(state.unsent.get(key) || []), ...userEls]);
  const shown = (state.chatId || "") === key && el.messages.getAttribute("aria-busy") !== "true";
  if (shown && !state.turn) showUnsent(key);
}

function showUnsent(key) {
  const userEls = state.unsent.get(key);
  if (!userEls) return;
  state.unsent.delete(key);
  el.messages.querySelector(":scope > .msg[data-status=not_sent]")?.remove(); // its text is in the box
  el.messages.append(...userEls);
  el.emptyChat.hidden = true;
  for (const userEl of [...userEls].reverse()) offerBack(rawText(userEl)); // in the order sent
  announce(`${userEls.length === 1 ? "A message" : "Messages"} you sent in this chat ${userEls.length === 1 ? "was" : "were"} not sent: the text is back in the message box.`);
}

// The chat to send in: the open one, or a new one, created now (the page goes to it, unless
// another chat was opened meanwhile).
async function ensureChat(chatId, text, running) {
  if (chatId) return chatId;
  const title = titleFrom(text);
  const chat = await api("POST", "/api/chat", {
    title: title || undefined, // nothing left to show: the server names it
    model: el.model.value || undefined,
  });
  state.chats.unshift(chat);
  if (!running.detached) {
    state.chatId = chat.chat_id;
    history.replaceState(null, "", `#/chat/${chat.chat_id}`);
    showTitle(chat);
  }
  renderChats();
  return chat.chat_id;
}

// The server refused the send as it came (budget, rate limit, validation...): not stopped, not
// lost on the network, not sent again (the first attempt, cut off, may have started the turn).
function refusedOutright(exc, stopped, running) {
  return !stopped && exc instanceof ApiError && exc.status > 0 && !running.retried;
}

// The model's provider refused the turn before its answer started (the service answered the
// request with its error): the service had saved the turn's records by then.
function refusedUpstream(exc, stopped) {
  return !stopped && exc instanceof ApiError && exc.code.startsWith("upstream_");
}

// The chat's history (fetchMessages) when it ends with this send's question (as the service
// keeps it: trimmed) and an answer that did not complete: the send was saved. Else (its
// records could not be written, the history could not be read) null: it was not sent.
async function savedTurn(chatId, text) {
  let history;
  try {
    history = await fetchMessages(chatId);
  } catch {
    return null;
  }
  const { messages } = history;
  const question = messages.findLast((m) => m.role === "user");
  const last = messages[messages.length - 1];
  const saved = question?.content === text.trim() && last !== question && last.status !== "complete";
  return saved ? history : null;
}

// What the page says of a send that did not go out (the error's sentence, or the user's Stop).
function notSentReason(exc, stopped) {
  if (stopped) return "You stopped it before it was sent.";
  return exc instanceof ApiError ? describe(exc) : "Something went wrong on this page.";
}

// A refused message's text goes back in the message box, before anything typed since (never
// lost: the bubble saying "not sent" goes with the next send).
function offerBack(text) {
  const now = el.input.value;
  if (!now.trim()) el.input.value = text;
  else if (!now.includes(text)) el.input.value = `${text}\n\n${now}`;
}

// The questions not sent leave the page: the user sends again (their text was in the box) or
// dismisses one.
function clearNotSent(only = null) {
  for (const li of only ? [only] : el.messages.querySelectorAll(":scope > .msg[data-status=not_sent]")) {
    const why = li.querySelector(".msg-error")?.textContent || "";
    if (!el.error.hidden && why.startsWith(el.errorText.textContent)) hideError(); // its refusal
    li.remove();
  }
  el.emptyChat.hidden = el.messages.children.length > 0;
}

function dismissNotSent(msgEl) {
  clearNotSent(msgEl);
  el.input.focus();
  announce("The message that was not sent was removed.");
}

async function send() {
  const text = el.input.value;
  if (!text.trim() || state.turn) return;
  hideError();
  clearNotSent();
  const running = startTurn();
  let chatId = state.chatId;
  const fresh = !chatId; // its chat is created for it (ensureChat)
  const sentIn = currentChat(); // beyond the list's pages, it joins the list's top (bumpChat)
  el.input.value = "";
  const userEl = appendMessage({ role: "user", content: text, status: "complete" }, true);
  const botEl = appendMessage({ role: "assistant", content: "", status: "pending" });
  let started = false;
  try {
    chatId = await ensureChat(chatId, text, running);
    let turn = null;
    const handlers = answerHandlers(botEl, running, () => {
      started = true;
      running.detach = turn.detach;
      if (running.detached) startedAway(turn, chatId);
    });
    // One key per message: a retry of this send (after a network failure) joins its turn.
    const params = { chatId, message: text, model: el.model.value || null, key: randomId() };
    turn = el.useWs.checked ? state.ws.turn(params, handlers) : sseTurn(params, handlers);
    running.cancel = turn.cancel;
    if (running.stopping) turn.cancel(); // Stop was pressed while the chat was being created
    await turn.finished;
  } catch (exc) {
    const stopped = exc.name === "AbortError" || (running.stopping && exc.code !== "stop_unconfirmed");
    if (started) {
      if (running.detached) return; // another chat was opened: the answer goes on without the page
      setStatus(botEl, stopped ? "cancelled" : "interrupted");
      settle(botEl);
      if (!stopped) report(exc);
    } else {
      // refused by the model's provider: the service saved the question and its failed answer
      // (unless its database failed too), as the chat's history says
      const saved = refusedUpstream(exc, stopped) && chatId ? await savedTurn(chatId, text) : null;
      if (saved && !running.detached && state.chatId === chatId) {
        endTurn(running); // the chat as opened: a retry is its answer's Regenerate
        showHistory(chatId, saved);
        report(exc);
        announce("The answer failed.");
        return;
      }
      if (saved) return showError(`In ${chatName(chatId)}, the answer failed. ${describe(exc)}`);
      // refused before the stream started (budget, rate limit, validation...), or stopped
      // before it went out (the network was down): nothing was saved, the text goes back
      botEl.remove();
      const why = notSentReason(exc, stopped);
      setNotSent(userEl, why);
      const gone = exc instanceof ApiError && exc.code === "chat_not_found";
      if (gone && state.deleted.has(chatId)) return; // the user deleted its chat meanwhile
      if (gone) loadChats().catch(report);
      if (running.detached) sendRefusedAway(chatId, userEl, why);
      else {
        offerBack(text);
        if (!stopped) report(exc);
      }
      if (fresh && chatId && refusedOutright(exc, stopped, running)) dropEmptyChat(chatId);
    }
  } finally {
    endTurn(running);
    bumpChat(chatId, sentIn);
    refreshUsage();
    if (!running.detached) el.input.focus();
  }
}

// What a turn's events do to its bubble (a sent turn, or one followed after a reload); nothing
// once the turn was left (another chat is on the page).
function answerHandlers(botEl, running, onStarted = () => {}) {
  const live = (fn) => (...args) => (running.detached ? undefined : fn(...args));
  return {
    onStarted(data) {
      onStarted();
      if (running.detached) return;
      botEl.dataset.messageId = data.message_id;
      setStatus(botEl, "streaming");
    },
    onDelta: live((chunk) => appendText(botEl, chunk)),
    onReasoning: live((text) => appendReasoning(botEl, text)),
    onReconnecting() {
      running.retried = true;
      if (!running.detached) setStatus(botEl, "reconnecting");
    },
    onResumed: live(() => setStatus(botEl, "streaming")),
    onEnd: live((kind, data) => {
      setStatus(botEl, data.status || (kind === "done" ? "complete" : "failed"));
      if (Array.isArray(data.unsaved)) cutText(botEl, data.unsaved[0]);
      settle(botEl);
      setMeta(botEl, data);
      if (kind === "error") {
        const why = describeEnd(data);
        botEl.append(h("div", { class: "msg-error" }, why));
        showError(`The answer failed. ${why}`);
        announce("The answer failed.");
      } else {
        announce(data.status === "cancelled" ? "The answer was stopped." : "The answer is complete.");
      }
    }),
  };
}

// Follow an answer that was running when the chat was opened (the page was reloaded, or the
// answer was sent from another tab): its stored text is on the page; the rest comes from the
// offset after it (code points, as the server counts). The composer is busy meanwhile, as for
// a send, and Stop stops it.
async function followRunning(chatId, msg, botEl) {
  if (state.turn) return;
  const running = startTurn();
  try {
    const params = { chatId, messageId: msg.message_id, after: codePoints(msg.content || "") };
    const handlers = answerHandlers(botEl, running);
    const turn = el.useWs.checked ? state.ws.resume(params, handlers) : sseResume(params, handlers);
    running.cancel = turn.cancel;
    running.detach = turn.detach;
    await turn.finished;
  } catch (exc) {
    if (running.detached) return; // another chat was opened: the answer goes on without the page
    if (exc.name === "AbortError" || (running.stopping && exc.code !== "stop_unconfirmed")) {
      setStatus(botEl, "cancelled");
    } else {
      setStatus(botEl, "interrupted");
      report(exc);
    }
    settle(botEl);
  } finally {
    endTurn(running);
    refreshUsage();
  }
}

// A chat with new activity goes to the top of the list; one beyond the list's pages (opened from
// a search result or a link) joins it there (no later page has it now).
function bumpChat(chatId, sentIn = null) {
  const i = state.chats.findIndex((c) => c.chat_id === chatId);
  if (i === 0 || state.deleted.has(chatId)) return;
  const beyond = [sentIn, state.current].find((c) => c?.chat_id === chatId) || null;
  const chat = i > 0 ? state.chats.splice(i, 1)[0] : beyond;
  if (!chat) return;
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

// ------------------------------------------------------------------------------------ title, rename
// The open chat: the list's, or as its history came when it is beyond the list's pages.
function currentChat() {
  return currentChatOf(state.chatId);
}

function currentChatOf(chatId) {
  const listed = state.chats.find((c) => c.chat_id === chatId);
  return listed || (state.current?.chat_id === chatId ? state.current : null);
}

// "“Its title”", for a sentence about a chat that is not the one open.
function chatName(chatId) {
  const chat = chatId ? currentChatOf(chatId) : null;
  return chat ? `“${chatLabel(chat)}”` : chatId ? "another chat" : "a new chat";
}

function showTitle(chat) {
  const { chat_id, title, model, created_at, updated_at } = chat || {}; // not its messages
  state.current = chat ? { chat_id, title, model, created_at, updated_at } : null;
  el.chatTitle.textContent = chat ? chatLabel(chat) : "New chat";
  el.rename.hidden = !chat;
}

function startRename() {
  const chat = currentChat();
  if (!chat) return;
  el.renameInput.value = chat.title || "";
  el.renameForm.hidden = false;
  el.chatTitle.hidden = true;
  el.rename.hidden = true;
  el.renameInput.focus();
  el.renameInput.select();
}

function cancelRename() {
  const was = !el.renameForm.hidden;
  el.renameForm.hidden = true;
  el.chatTitle.hidden = false;
  el.rename.hidden = !state.chatId;
  if (was) el.rename.focus();
}

async function saveRename() {
  const chatId = state.chatId;
  const title = el.renameInput.value.trim();
  if (!chatId || !title) return;
  try {
    const chat = await api("PATCH", `/api/chat/${chatId}`, { title });
    for (const known of [state.chats.find((c) => c.chat_id === chatId), state.current]) {
      if (known?.chat_id === chatId) known.title = chat.title;
    }
    if (state.chatId === chatId) showTitle(chat);
    renderChats();
    cancelRename();
    announce(`Chat renamed to ${chat.title}.`);
  } catch (exc) {
    report(exc);
  }
}

// ------------------------------------------------------------------------------------ answer actions
// Copy, copy as Markdown, a code block's copy, and the rating: one listener for every bubble.
async function onMessagesClick(ev) {
  const button = ev.target.closest("button");
  if (!button || !el.messages.contains(button)) return;
  const msgEl = button.closest(".msg");
  if (button.classList.contains("code-copy")) {
    const code = button.closest(".code-block").querySelector("pre code");
    return copied(button, code ? code.textContent : "");
  }
  const action = button.dataset.action;
  if (action === "copy") return copied(button, renderedText(msgEl));
  if (action === "copy-md") return copied(button, rawText(msgEl));
  if (action === "rate") return rate(msgEl, button.dataset.rating);
  if (action === "comment-cancel") return closeComment(msgEl);
  if (action === "regenerate") return branch("regenerate", msgEl);
  if (action === "edit") return startEdit(msgEl);
  if (action === "edit-cancel") return cancelEdit(msgEl);
  if (action === "versions") return toggleVersions(msgEl);
  if (action === "dismiss") return dismissNotSent(msgEl);
}

// ------------------------------------------------------------------------------------ versions
// Regenerate an answer, or ask a question again with new text: the message and everything after
// it leave the page (the server keeps them as earlier versions) and the new turn streams in at
// the end, as a send does (over the WebSocket when it is switched on). Refused before it
// started: the page is put back as it was.
async function branch(kind, msgEl, text = null) {
  const messageId = msgEl.dataset.messageId;
  if (state.turn || !messageId) return;
  hideError();
  const running = startTurn();
  const chatId = state.chatId;
  const sentIn = currentChat();
  const gone = [];
  for (let n = msgEl; n; n = n.nextElementSibling) gone.push(n);
  gone.forEach((n) => n.remove());
  const userEl = kind === "edit" ? appendMessage({ role: "user", content: text, status: "complete" }, true) : null;
  const botEl = appendMessage({ role: "assistant", content: "", status: "pending" }, true);
  let started = false;
  try {
    const params = { chatId, messageId, kind, message: text, model: el.model.value || null, key: randomId() };
    let turn = null;
    const handlers = answerHandlers(botEl, running, () => {
      started = true;
      running.detach = turn.detach;
      if (running.detached) startedAway(turn, chatId);
    });
    turn = el.useWs.checked ? state.ws.branch(params, handlers) : sseBranch(params, handlers);
    running.cancel = turn.cancel;
    if (running.stopping) turn.cancel();
    await turn.finished;
  } catch (exc) {
    if (running.detached) {
      // another chat was opened: the answer goes on without the page; refused, nothing changed
      // in its chat (the messages that left the page are still its history)
      const what = kind === "edit" ? "the question was not asked again" : "no new answer was written";
      const why = notSentReason(exc, false);
      const said = `In ${chatName(chatId)}, ${what}. ${why}`;
      if (started) return;
      if (userEl) {
        setNotSent(userEl, why); // its new text: back in the box when the chat is opened again
        sendRefusedAway(chatId, userEl, why, said);
      } else showError(said);
      return;
    }
    const stopped = exc.name === "AbortError" || (running.stopping && exc.code !== "stop_unconfirmed");
    if (started) {
      setStatus(botEl, stopped ? "cancelled" : "interrupted");
      settle(botEl);
    } else {
      userEl?.remove();
      botEl.remove();
      el.messages.append(...gone);
    }
    if (!stopped) report(exc);
  } finally {
    endTurn(running);
    bumpChat(chatId, sentIn);
    refreshUsage();
    // the Regenerate or Save pressed left with its message: focus goes to the message box
    const lost = !document.activeElement || document.activeElement === document.body;
    if (lost && !running.detached) el.input.focus();
  }
  if (started && !running.detached) await syncIds(chatId).catch(report);
}

// The ids and versions of the messages on the page, from the history (a sent question's id is
// known only from there): matched by position, when the page shows the history as it is (but
// for the questions not sent, which the history does not have).
async function syncIds(chatId) {
  const { messages } = await fetchMessages(chatId);
  const shown = [...el.messages.querySelectorAll(":scope > .msg:not([data-status=not_sent])")];
  if (state.chatId !== chatId || shown.length !== messages.length) return;
  if (shown.some((li, i) => li.dataset.role !== messages[i].role)) return;
  shown.forEach((li, i) => {
    li.dataset.messageId = messages[i].message_id;
    setVersion(li, messages[i].version);
  });
}

// Edit a question in place: its text in a box; Save asks it again (branch), Cancel puts it back.
async function startEdit(msgEl) {
  if (state.turn || msgEl.querySelector(".msg-edit")) return;
  if (!msgEl.dataset.messageId) await syncIds(state.chatId).catch(report);
  if (!msgEl.dataset.messageId) return;
  const body = msgEl.querySelector(".msg-body");
  const input = h("textarea", { rows: "3", class: "edit-input", "aria-label": "The question's new text" });
  input.value = body.textContent;
  const form = h(
    "form",
    { class: "msg-edit", "aria-label": "Edit the question" },
    input,
    h("div", { class: "comment-actions" }, h("button", { class: "primary", type: "submit" }, "Save"), h("button", { type: "button", dataset: { action: "edit-cancel" } }, "Cancel")),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value.trim()) branch("edit", msgEl, input.value);
  });
  form.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      ev.preventDefault();
      cancelEdit(msgEl);
    } else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  body.hidden = true;
  msgEl.querySelector(".msg-actions").hidden = true;
  body.after(form);
  input.focus();
}

function cancelEdit(msgEl) {
  msgEl.querySelector(".msg-edit")?.remove();
  msgEl.querySelector(".msg-body").hidden = false;
  const actions = msgEl.querySelector(".msg-actions");
  actions.hidden = false;
  actions.querySelector("[data-action=edit]").focus();
}

// "2 of 2": list (or hide) the message's earlier versions.
async function toggleVersions(msgEl) {
  const button = msgEl.querySelector(".msg-version");
  const shown = msgEl.querySelector(".msg-versions");
  if (shown) {
    shown.remove();
    button.setAttribute("aria-expanded", "false");
    return;
  }
  try {
    const body = await api("GET", `/api/chat/${state.chatId}/messages/${msgEl.dataset.messageId}/versions`);
    const earlier = body.versions.filter((v) => v.message_id !== msgEl.dataset.messageId);
    const list = h(
      "ol",
      { class: "msg-versions", "aria-label": "Earlier versions" },
      earlier.map((v) =>
        h(
          "li",
          { class: "msg-version-item", dataset: { messageId: v.message_id } },
          h("span", { class: "msg-version-label" }, `Version ${v.version || 1} of ${body.versions.length}`),
          h("div", { class: "msg-version-text" }, v.content || "(empty)"),
        ),
      ),
    );
    msgEl.querySelector(".msg-actions").before(list);
    button.setAttribute("aria-expanded", "true");
  } catch (exc) {
    report(exc);
  }
}

// The answer as a reader sees it (innerText keeps its lines), without the code blocks' heads.
function renderedText(msgEl) {
  const md = msgEl.querySelector(".msg-md");
  md.classList.add("copying");
  const text = md.innerText.trim();
  md.classList.remove("copying");
  return text;
}

async function copied(button, text) {
  const label = button.textContent;
  try {
    await copyText(text);
    button.textContent = "Copied";
    announce("Copied to the clipboard.");
  } catch {
    button.textContent = "Copy failed";
    announce("Could not copy: the browser refused.");
  }
  setTimeout(() => {
    button.textContent = label;
  }, 1500);
}

function feedbackUrl(msgEl) {
  return `/api/chat/${state.chatId}/messages/${msgEl.dataset.messageId}/feedback`;
}

function showRating(msgEl, rating) {
  for (const b of msgEl.querySelectorAll(".msg-rate")) {
    b.setAttribute("aria-pressed", b.dataset.rating === rating ? "true" : "false");
  }
}

// A thumb: rate (or, pressed again, take the rating back), then offer a comment.
async function rate(msgEl, rating) {
  const pressed = msgEl.querySelector(`.msg-rate[data-rating="${rating}"]`).getAttribute("aria-pressed") === "true";
  const note = msgEl.querySelector(".msg-note");
  try {
    if (pressed) {
      await api("DELETE", feedbackUrl(msgEl));
      showRating(msgEl, null);
      closeComment(msgEl);
      note.textContent = "Rating removed.";
      return;
    }
    await api("PUT", feedbackUrl(msgEl), { rating });
    showRating(msgEl, rating);
    note.textContent = "Thanks!";
    openComment(msgEl, rating);
  } catch (exc) {
    report(exc);
  }
}

function openComment(msgEl, rating) {
  closeComment(msgEl);
  const input = h("textarea", { rows: "2", maxlength: "2000", class: "comment-input", "aria-label": "Comment (optional)", placeholder: rating === "down" ? "What was wrong? (optional)" : "What was good? (optional)" });
  const form = h(
    "form",
    { class: "msg-comment", "aria-label": "Comment on this answer" },
    input,
    h("div", { class: "comment-actions" }, h("button", { class: "primary", type: "submit" }, "Send comment"), h("button", { type: "button", dataset: { action: "comment-cancel" } }, "No comment")),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const comment = input.value.trim();
    if (!comment) return closeComment(msgEl);
    try {
      await api("PUT", feedbackUrl(msgEl), { rating, comment });
      closeComment(msgEl);
      msgEl.querySelector(".msg-note").textContent = "Thanks for the comment!";
    } catch (exc) {
      report(exc);
    }
  });
  form.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      ev.preventDefault();
      closeComment(msgEl);
    }
  });
  msgEl.querySelector(".msg-actions").after(form);
  input.focus();
}

function closeComment(msgEl) {
  const form = msgEl.querySelector(".msg-comment");
  if (!form) return;
  const hadFocus = form.contains(document.activeElement);
  form.remove();
  if (hadFocus) msgEl.querySelector(".msg-rate[aria-pressed=true], .msg-rate")?.focus();
}

// A search result's message: in view and marked for a moment.
function showMessage(messageId) {
  const target = el.messages.querySelector(`.msg[data-message-id="${CSS.escape(messageId)}"]`);
  if (!target) return;
  target.scrollIntoView({ block: "center" });
  target.classList.add("found");
  target.setAttribute("tabindex", "-1");
  target.focus({ preventScroll: true });
  setTimeout(() => target.classList.remove("found"), 2000);
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
  el.messages.addEventListener("click", onMessagesClick);
  el.messages.addEventListener("scroll", () => (state.stick = nearBottom()), { passive: true });
  onRendered(() => {
    if (state.stick) el.messages.scrollTop = el.messages.scrollHeight;
  });
  el.rename.addEventListener("click", startRename);
  el.renameCancel.addEventListener("click", cancelRename);
  el.renameForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    saveRename();
  });
  el.renameInput.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      ev.preventDefault();
      cancelRename();
    }
  });
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
  el.keysOpen.addEventListener("click", () => keys.open(el.keysOpen));
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

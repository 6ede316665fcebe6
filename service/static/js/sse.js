// The SSE transport: POST /api/chat/{id}/message and read its event stream with fetch; when the
// connection drops mid-answer, follow the answer again from the last offset the page has
// (GET /api/chat/{id}/messages/{message_id}/stream?after=N), by itself, with backoff. A send that
// fails on the network before "started" is sent again the same way, with the same
// Idempotency-Key: the server joins it to the turn the first attempt may have started.
//
// Frames are "id: N\nevent: <name>\ndata: <json>\n\n"; lines starting with ":" are heartbeats.
// N is an offset: the characters (code points) of the answer up to the end of the event's text.
// EventSource cannot POST or send an Authorization header, hence fetch + ReadableStream.

import { ApiError, api, authHeaders, errorFrom } from "./api.js";
import { AnswerOffset, Retry, delay, reconnectFailed, retriable, stopUnconfirmed } from "./resume.js";

// Parse one frame ("field: value" lines) into {event, id, data}; null for comment-only frames.
export function parseFrame(block) {
  let event = "message";
  let id = null;
  const data = [];
  let seen = false;
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue; // heartbeat / comment
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
    else continue;
    seen = true;
  }
  if (!seen || !data.length) return null;
  return { event, id, data: JSON.parse(data.join("\n")) };
}

// Yield parsed events from a fetch Response body as bytes arrive.
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf = (buf + value).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) !== -1) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const ev = parseFrame(block);
        if (ev) yield ev;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a consumer that stops early closes the connection
  }
}

const CANCEL_GRACE_MS = 3000; // how long Stop waits for the server's final event before hanging up

const streamUrl = (chatId, messageId) =>
  `/api/chat/${encodeURIComponent(chatId)}/messages/${encodeURIComponent(messageId)}/stream`;

async function open(url, init) {
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "network_error", "Cannot reach the server. Check your connection.");
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

// Start one turn; `key` is its Idempotency-Key. handlers: onStarted(data), onDelta(text),
// onEnd("done"|"error", data), and onReconnecting() / onResumed() around a reconnect.
// Returns {finished, cancel, detach}: `finished` resolves after onEnd, or rejects with an ApiError
// raised before the stream started (budget, rate limit, validation..., or no network after the
// retries) or when the answer could not be followed again, or with an AbortError after Stop or
// detach.
export function sseTurn({ chatId, message, model, key }, handlers) {
  const body = { message };
  if (model) body.model = model;
  return postTurn(`/api/chat/${encodeURIComponent(chatId)}/message`, chatId, body, key, handlers);
}

// Regenerate an answer or edit a question (`kind`; `message`: an edit's new text): a turn like
// a send, on POST /api/chat/{id}/messages/{messageId}/{kind}. Same handlers and result.
export function sseBranch({ chatId, messageId, kind, message, model, key }, handlers) {
  const body = kind === "edit" ? { message } : {};
  if (model) body.model = model;
  const url = `/api/chat/${encodeURIComponent(chatId)}/messages/${encodeURIComponent(messageId)}/${kind}`;
  return postTurn(url, chatId, body, key, handlers);
}

// A turn started by a POST whose answer streams back (a send, a regenerate, an edit).
function postTurn(url, chatId, body, key, handlers) {
  return follow({ chatId, messageId: null, after: 0 }, handlers, (signal) =>
    open(url, {
      method: "POST",
      headers: authHeaders({
        "Content-Type": "application/json",
        Accept: "text/event-stream",
        "Idempotency-Key": key,
      }),
      body: JSON.stringify(body),
      signal,
    }),
  );
}

// Follow an answer that is already running (or has ended meanwhile) from `after`: the page was
// reloaded mid-answer. Same handlers and result as sseTurn.
export function sseResume({ chatId, messageId, after }, handlers) {
  return follow({ chatId, messageId, after }, handlers, null);
}

function follow({ chatId, messageId: knownId, after }, handlers, post) {
  const controller = new AbortController();
  const answer = new AnswerOffset(after);
  const retry = new Retry();
  controller.signal.addEventListener("abort", () => retry.wake());
  let messageId = knownId;
  let startedOnce = false;
  let ended = false;
  let stopping = false;
  let identified;
  const known = new Promise((resolve) => {
    identified = resolve;
  });
  if (messageId) identified();

  const resume = (signal) =>
    open(`${streamUrl(chatId, messageId)}?after=${answer.offset}`, {
      headers: authHeaders({ Accept: "text/event-stream" }),
      signal,
    });

  // Read one response to its end: true once the answer's terminal event was handled, false when
  // the stream broke first (network error, cut short, or a gap in the text).
  async function read(resp) {
    try {
      for await (const ev of readEvents(resp.body)) {
        const offset = ev.id == null ? NaN : Number(ev.id);
        if (ev.event === "started") {
          messageId = ev.data.message_id;
          identified();
          if (startedOnce) handlers.onResumed?.(ev.data);
          else handlers.onStarted(ev.data);
          startedOnce = true;
        } else if (ev.event === "delta") {
          const text = answer.take(ev.data.text, offset);
          if (text === null) return false;
          if (text) {
            retry.reset();
            handlers.onDelta(text);
          }
        } else if (ev.event === "reasoning") {
          if (ev.data.text) handlers.onReasoning?.(ev.data.text);
        } else if (ev.event === "done" || ev.event === "error") {
          if (!answer.complete(offset)) return false;
          ended = true;
          handlers.onEnd(ev.event, ev.data);
          return true;
        }
      }
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
    }
    return false;
  }

  // Once the answer has an id, follow it from the page's offset; before, send again (with the
  // same key, so the server joins the turn the first attempt may have started).
  const attempt = (signal) => (messageId ? resume(signal) : post(signal));

  // Before "started", only a network failure is worth another try: a refusal stays a refusal.
  const again = (exc) => (messageId ? retriable(exc) : exc.status === 0);

  // Open the stream; after a failure (`err`: the last stream broke, or an attempt failed) try
  // again on the reconnect schedule.
  async function connect(err) {
    for (let waiting = false; ; ) {
      if (err) {
        if (!again(err)) throw err;
        if (!waiting) handlers.onReconnecting?.();
        waiting = true;
        if (!(await retry.wait())) throw messageId ? reconnectFailed() : err;
        if (controller.signal.aborted) throw new DOMException("stopped", "AbortError");
      }
      try {
        return await attempt(controller.signal);
      } catch (exc) {
        err = exc;
      }
    }
  }

  async function run() {
    let resp = await connect(null);
    while (!(await read(resp))) {
      const why = "The connection dropped before the answer started.";
      resp = await connect(new ApiError(0, "stream_interrupted", why));
    }
  }

  let failed = false;
  let unconfirmed = null;
  const finished = run().catch((exc) => {
    failed = true;
    throw exc.name === "AbortError" && unconfirmed ? unconfirmed : exc;
  });

  // Stop. If the server cannot be told (no network), `finished` rejects with stop_unconfirmed.
  async function cancel() {
    if (ended || stopping) return;
    stopping = true;
    const settled = finished.catch(() => {});
    // Before "started" there is no id to cancel by: wait for it (the turn runs without us).
    await Promise.race([known, settled, delay(CANCEL_GRACE_MS)]);
    let told = !messageId && failed; // refused before it started (budget...): nothing runs
    if (messageId && !ended) {
      // Ask the server to stop (it saves the partial answer as cancelled and sends "done")...
      try {
        await api("POST", `/api/chat/${chatId}/messages/${messageId}/cancel`);
        told = true;
      } catch (exc) {
        told = exc.status === 409; // not_streaming: it ended meanwhile
      }
      retry.wake(); // reconnecting: follow again now, the stopped answer ends at once
      await Promise.race([settled, delay(CANCEL_GRACE_MS)]);
    }
    // ...and stop listening if it has not ended.
    if (!ended) {
      if (!told) unconfirmed = stopUnconfirmed();
      controller.abort();
    }
  }

  // Stop following without stopping the answer (another chat is opened): it goes on on the
  // server, and is followed again from what is stored when its chat is opened again.
  function detach() {
    if (!ended) controller.abort();
  }

  return { finished, cancel, detach };
}

// The SSE transport: POST /api/chat/{id}/message and read its event stream with fetch.
//
// Frames are "id: N\nevent: <name>\ndata: <json>\n\n"; lines starting with ":" are heartbeats.
// EventSource cannot POST or send an Authorization header, hence fetch + ReadableStream.

import { ApiError, api, authHeaders, errorFrom } from "./api.js";

const CANCEL_GRACE_MS = 3000; // how long Stop waits for the server's final event before hanging up

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
    reader.releaseLock();
  }
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Start one turn. handlers: onStarted(data), onDelta(text), onEnd("done"|"error", data).
// Returns {finished, cancel}: `finished` resolves after onEnd, or rejects with an ApiError raised
// before the stream started (budget, rate limit, validation...) or with an AbortError after Stop.
export function sseTurn({ chatId, message, model }, handlers) {
  const controller = new AbortController();
  let messageId = null;
  let ended = false;

  const finished = (async () => {
    const body = { message };
    if (model) body.model = model;
    let resp;
    try {
      resp = await fetch(`/api/chat/${encodeURIComponent(chatId)}/message`, {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
      throw new ApiError(0, "network_error", "Cannot reach the server. Check your connection.");
    }
    if (!resp.ok) throw await errorFrom(resp);
    try {
      for await (const ev of readEvents(resp.body)) {
        if (ev.event === "started") {
          messageId = ev.data.message_id;
          handlers.onStarted(ev.data);
        } else if (ev.event === "delta") {
          handlers.onDelta(ev.data.text);
        } else if (ev.event === "done" || ev.event === "error") {
          ended = true;
          handlers.onEnd(ev.event, ev.data);
          return;
        }
      }
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
      throw new ApiError(0, "stream_interrupted", "The connection dropped during the answer.");
    }
    throw new ApiError(0, "stream_interrupted", "The stream ended before the answer finished.");
  })();

  async function cancel() {
    if (ended) return;
    if (messageId) {
      // Ask the server to stop (it saves the partial answer as cancelled and sends "done")...
      try {
        await api("POST", `/api/chat/${chatId}/messages/${messageId}/cancel`);
      } catch {
        // 409 not_streaming: it finished meanwhile; anything else: hanging up cancels too
      }
      await Promise.race([finished.catch(() => {}), delay(CANCEL_GRACE_MS)]);
    }
    // ...and hang up if it has not ended (before "started" there is nothing to cancel by id).
    if (!ended) controller.abort();
  }

  return { finished, cancel };
}

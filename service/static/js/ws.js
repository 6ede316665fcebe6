// The WebSocket transport, protocol v2 (docs/websocket.md).
//
// POST /api/ws/ticket (bearer) -> {"ticket"}; connect to /api/ws?ticket=...; the server says
// {"type":"ready","v":2,"max_turns":N}. Client: {"type":"send","id","chat_id","message","key"}
// ("send" may also name a "model"; "key" is its idempotency key),
// {"type":"regenerate"|"edit","id","chat_id","message_id"(,"message")...} (the send's fields),
// {"type":"resume","id","message_id","after"} and {"type":"cancel","id"}.
// Server: started / delta / done / error, each with the client's "id" and an "offset" (a delta's
// is the answer's length up to the end of its text, in code points).
// Closing the socket does not stop a turn: when it drops mid-answer the page opens a new one and
// resumes from the last offset it has; when it drops before "started", the page sends again with
// the same key (the server joins the turn the first "send" may have started). A ticket is
// single-use, so every connection gets a fresh one.

import { ApiError, api, randomId } from "./api.js";
import { AnswerOffset, Retry, delay, reconnectFailed, retriable, stopUnconfirmed } from "./resume.js";

const PROTOCOL_VERSION = 2;
const READY_TIMEOUT_MS = 10000;
const CANCEL_GRACE_MS = 3000;

function wireError(msg) {
  const details = msg.details ?? null;
  const ms = msg.retry_after_ms ?? (details ? details.retry_after_ms : null);
  const retry = ms != null ? ms / 1000 : null;
  const status = typeof msg.status === "number" ? msg.status : 0; // refusals carry the HTTP status
  return new ApiError(status, msg.code || "ws_error", msg.message || "WebSocket error", details, retry);
}

function waitReady(ws) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      ws.close();
      reject(new ApiError(0, "ws_unavailable", "The WebSocket server did not answer in time."));
    }, READY_TIMEOUT_MS);
    const onMessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      clearTimeout(timer);
      ws.removeEventListener("message", onMessage);
      ws.removeEventListener("close", onClose);
      if (msg.type === "ready" && msg.v === PROTOCOL_VERSION) resolve(msg);
      else {
        ws.close();
        reject(
          msg.type === "ready"
            ? new ApiError(400, "ws_protocol", `The server speaks WebSocket protocol v${msg.v}, not v2.`)
            : wireError(msg),
        );
      }
    };
    const onClose = (ev) => {
      clearTimeout(timer);
      const why = ev.reason ? `: ${ev.reason}` : "";
      reject(new ApiError(0, "ws_unavailable", `WebSocket connection failed (${ev.code}${why}).`));
    };
    ws.addEventListener("message", onMessage);
    ws.addEventListener("close", onClose);
  });
}

class Connection {
  constructor(ws, maxTurns) {
    this.ws = ws;
    this.maxTurns = maxTurns;
    this.turns = new Map(); // client turn id -> WsTurn followed on this socket
    this.retired = false;
    ws.addEventListener("message", (ev) => this.onMessage(ev));
    ws.addEventListener("close", (ev) => this.onClose(ev));
  }

  static async open() {
    const { ticket } = await api("POST", "/api/ws/ticket");
    const url = new URL(`/api/ws?ticket=${encodeURIComponent(ticket)}`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    const ready = await waitReady(ws);
    return new Connection(ws, Number(ready.max_turns) || Infinity);
  }

  get open() {
    return !this.retired && this.ws.readyState === WebSocket.OPEN;
  }

  get usable() {
    return this.open && this.turns.size < this.maxTurns;
  }

  // Follow `turn` on this socket with its first frame ("send" or "resume").
  follow(turn, frame) {
    this.turns.set(turn.id, turn);
    this.send(frame);
  }

  release(turn) {
    if (this.turns.get(turn.id) === turn) this.turns.delete(turn.id);
    if (this.retired && this.turns.size === 0 && this.ws.readyState <= WebSocket.OPEN) {
      this.ws.close(1000, "done");
    }
  }

  send(obj) {
    this.ws.send(JSON.stringify(obj));
  }

  onMessage(ev) {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    const turn = msg.id != null ? this.turns.get(msg.id) : null;
    if (turn) turn.onFrame(msg);
    else if (msg.type === "error" && msg.id == null) {
      const err = wireError(msg); // connection-level error
      for (const t of [...this.turns.values()]) t.fail(err);
    }
  }

  onClose(ev) {
    this.retired = true;
    const why = ev.reason ? `: ${ev.reason}` : "";
    const text = `The WebSocket closed during the answer (${ev.code}${why}).`;
    const err = new ApiError(0, "stream_interrupted", text);
    const turns = [...this.turns.values()];
    this.turns.clear();
    for (const turn of turns) turn.dropped(err);
  }

  retire() {
    this.retired = true;
    if (this.turns.size === 0 && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "done");
  }
}

// One answer followed over WebSocket, across as many sockets as it takes.
class WsTurn {
  // `sendFrame` starts a new turn; without it the turn `messageId` is followed from `after`.
  constructor(transport, handlers, { chatId, messageId = null, after = 0, sendFrame = null }) {
    this.transport = transport;
    this.handlers = handlers;
    this.id = sendFrame ? sendFrame.id : randomId();
    this.sendFrame = sendFrame;
    this.chatId = chatId;
    this.messageId = messageId;
    this.answer = new AnswerOffset(after);
    this.retry = new Retry();
    this.conn = null;
    this.startedOnce = false;
    this.ended = false;
    this.stopping = false;
    this.reconnecting = false;
    this.finished = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.finished.catch(() => {}); // the caller awaits it; no unhandled rejection meanwhile
  }

  // Open (or reuse) a socket and follow the answer there: from the offset the page has once the
  // answer has an id; before, with the "send" frame (again: its key joins the first attempt).
  async attach() {
    const conn = await this.transport.connection();
    if (this.ended) return;
    if (this.stopping && !this.messageId) throw new DOMException("stopped before sending", "AbortError");
    this.conn = conn;
    const resume = { type: "resume", id: this.id, message_id: this.messageId, after: this.answer.offset };
    conn.follow(this, this.messageId ? resume : this.sendFrame);
  }

  start() {
    this.attach().catch((err) => this.dropped(err));
    return this.finished;
  }

  // Before "started", only a network failure is worth another try: a refusal stays a refusal.
  again(err) {
    return this.messageId ? retriable(err) : err.status === 0;
  }

  onFrame(msg) {
    switch (msg.type) {
      case "started":
        this.messageId = msg.message_id;
        this.chatId = msg.chat_id || this.chatId;
        if (this.startedOnce) this.handlers.onResumed?.(msg);
        else this.handlers.onStarted(msg);
        this.startedOnce = true;
        break;
      case "delta": {
        if (msg.reasoning) this.handlers.onReasoning?.(msg.reasoning);
        const text = this.answer.take(msg.text, msg.offset);
        if (text === null) this.resync();
        else if (text) {
          this.retry.reset();
          this.handlers.onDelta(text);
        }
        break;
      }
      case "done":
      case "error":
        if (msg.type === "error" && !msg.message_id) {
          // refused (send: budget, rate limit...; resume: not found, bad offset), a server error
          // (a resume then tries again), or a protocol error (no HTTP status)
          const err = wireError(msg);
          const again = this.messageId && typeof msg.status === "number" && retriable(err);
          if (again) this.dropped(err);
          else this.fail(err);
        } else if (!this.answer.complete(msg.offset)) this.resync();
        else this.end(() => this.handlers.onEnd(msg.type, msg));
        break;
      default:
        break;
    }
  }

  // Text is missing: follow again from what the page has. The protocol has no frame to stop
  // following one turn ("cancel" stops the turn itself), so the socket goes: its turns resume.
  resync() {
    const conn = this.conn;
    if (conn && conn.open) {
      conn.retired = true;
      conn.ws.close(1000, "resync");
    } else this.dropped(new ApiError(0, "stream_interrupted", "A gap in the answer's text."));
  }

  end(action) {
    if (this.ended) return;
    this.ended = true;
    if (this.conn) this.conn.release(this);
    action();
    this.resolve();
  }

  fail(err) {
    if (this.ended) return;
    this.ended = true;
    if (this.conn) this.conn.release(this);
    this.reject(err);
  }

  // The socket went away (or could not be opened): follow again on a new one.
  dropped(err) {
    if (this.ended) return;
    if (this.conn) this.conn.release(this);
    this.conn = null;
    if (!this.again(err)) return this.fail(err);
    if (this.reconnecting) return;
    this.reconnecting = true;
    this.handlers.onReconnecting?.();
    this.reconnect(err).then(
      () => {
        this.reconnecting = false;
      },
      (exc) => {
        this.reconnecting = false;
        this.fail(exc);
      },
    );
  }

  async reconnect(err) {
    for (;;) {
      if (!(await this.retry.wait())) {
        throw this.messageId ? reconnectFailed() : err;
      }
      if (this.ended) return;
      try {
        await this.attach();
        return;
      } catch (exc) {
        if (!this.again(exc)) throw exc;
        err = exc;
      }
    }
  }

  // Stop following without stopping the answer (another chat is opened). The protocol has no
  // frame to stop following one turn, so its socket is retired: it closes once its other turns
  // have ended, and the server stops sending there what the page no longer reads.
  detach() {
    if (this.ended) return;
    if (this.conn) this.conn.retired = true;
    this.fail(new DOMException("detached", "AbortError"));
  }

  // Stop. If the server cannot be told (no network), `finished` rejects with stop_unconfirmed.
  async cancel() {
    if (this.ended || this.stopping) return;
    this.stopping = true;
    let told = true; // not sent yet: attach() sends nothing now
    const conn = this.conn;
    if (conn && conn.open && conn.turns.get(this.id) === this) {
      conn.send({ type: "cancel", id: this.id }); // stops the turn itself, wherever it runs
    } else if (this.messageId && this.chatId) {
      try {
        await api("POST", `/api/chat/${this.chatId}/messages/${this.messageId}/cancel`);
      } catch (exc) {
        told = exc.status === 409; // not_streaming: it ended meanwhile
      }
      this.retry.wake(); // reconnecting: follow again now, the stopped answer ends at once
    }
    await Promise.race([this.finished.catch(() => {}), delay(CANCEL_GRACE_MS)]);
    if (!this.ended) this.fail(told ? new DOMException("stopped", "AbortError") : stopUnconfirmed());
  }
}

export class WsTransport {
  constructor() {
    this.conn = null;
    this.opening = null;
  }

  async connection() {
    if (this.conn && this.conn.usable) return this.conn;
    if (this.conn) this.conn.retire();
    this.conn = null;
    if (!this.opening) {
      this.opening = Connection.open().finally(() => {
        this.opening = null;
      });
    }
    this.conn = await this.opening;
    return this.conn;
  }

  close() {
    if (this.conn) this.conn.retire();
    this.conn = null;
  }

  // Same contract as sseTurn: {finished, cancel, detach}.
  turn({ chatId, message, model, key }, handlers) {
    const sendFrame = { type: "send", id: randomId(), chat_id: chatId, message, key };
    if (model) sendFrame.model = model;
    const turn = new WsTurn(this, handlers, { chatId, sendFrame });
    return { finished: turn.start(), cancel: () => turn.cancel(), detach: () => turn.detach() };
  }

  // Same contract as sseBranch: regenerate an answer or edit a question (`kind`), a turn like a
  // send (sent again with its key when the socket drops before "started").
  branch({ chatId, messageId, kind, message, model, key }, handlers) {
    const sendFrame = { type: kind, id: randomId(), chat_id: chatId, message_id: messageId, key };
    if (kind === "edit") sendFrame.message = message;
    if (model) sendFrame.model = model;
    const turn = new WsTurn(this, handlers, { chatId, sendFrame });
    return { finished: turn.start(), cancel: () => turn.cancel(), detach: () => turn.detach() };
  }

  // Same contract as sseResume: follow a running answer from `after`.
  resume({ chatId, messageId, after }, handlers) {
    const turn = new WsTurn(this, handlers, { chatId, messageId, after });
    return { finished: turn.start(), cancel: () => turn.cancel(), detach: () => turn.detach() };
  }
}

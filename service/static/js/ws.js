// The WebSocket transport, protocol v1.
//
// POST /api/ws/ticket (bearer) -> {"ticket"}; connect to /api/ws?ticket=...; the server says
// {"type":"ready","v":1,"max_turns":N}. Client: {"type":"send","id","chat_id","message"} and
// {"type":"cancel","id"} ("send" may also name a "model"). Server: started / delta / done /
// error, each with the client's "id".
// A ticket is single-use, so every connection gets a fresh one.

import { ApiError, api } from "./api.js";

const READY_TIMEOUT_MS = 10000;
const CANCEL_GRACE_MS = 3000;

let turnCounter = 0;
const newTurnId = () =>
  globalThis.crypto && crypto.randomUUID ? crypto.randomUUID() : `t${Date.now()}-${++turnCounter}`;

function wireError(msg) {
  const details = msg.details ?? null;
  const ms = msg.retry_after_ms ?? (details ? details.retry_after_ms : null);
  const retry = ms != null ? ms / 1000 : null;
  const status = typeof msg.status === "number" ? msg.status : 0; // refusals carry the HTTP status
  return new ApiError(status, msg.code || "ws_error", msg.message || "WebSocket error", details, retry);
}

class Connection {
  constructor(ws, maxTurns) {
    this.ws = ws;
    this.maxTurns = maxTurns;
    this.sent = 0;
    this.turns = new Map(); // client turn id -> {handlers, resolve, reject, ended}
    this.retired = false;
    ws.addEventListener("message", (ev) => this.onMessage(ev));
    ws.addEventListener("close", (ev) => this.onClose(ev));
  }

  static async open() {
    const { ticket } = await api("POST", "/api/ws/ticket");
    const url = new URL(`/api/ws?ticket=${encodeURIComponent(ticket)}`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    const ready = await new Promise((resolve, reject) => {
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
        if (msg.type === "ready") resolve(msg);
        else {
          ws.close();
          reject(wireError(msg));
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
    return new Connection(ws, Number(ready.max_turns) || Infinity);
  }

  get usable() {
    return !this.retired && this.ws.readyState === WebSocket.OPEN && this.sent < this.maxTurns;
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
    if (!turn) {
      if (msg.type === "error") this.failAll(wireError(msg)); // connection-level error
      return;
    }
    switch (msg.type) {
      case "started":
        turn.started = true;
        turn.handlers.onStarted(msg);
        break;
      case "delta":
        turn.handlers.onDelta(msg.text);
        break;
      case "done":
        this.finish(msg.id, turn, () => turn.handlers.onEnd("done", msg));
        break;
      case "error":
        if (msg.message_id) {
          // the turn ran and failed: a saved message with a status, like SSE's "error" event
          this.finish(msg.id, turn, () => turn.handlers.onEnd("error", msg));
        } else {
          this.finish(msg.id, turn, () => turn.reject(wireError(msg)), false);
        }
        break;
      default:
        break;
    }
  }

  finish(id, turn, action, resolve = true) {
    turn.ended = true;
    this.turns.delete(id);
    action();
    if (resolve) turn.resolve();
    if (this.retired && this.turns.size === 0) this.ws.close(1000, "done");
  }

  failAll(err) {
    for (const [id, turn] of this.turns) this.finish(id, turn, () => turn.reject(err), false);
  }

  onClose(ev) {
    this.retired = true;
    const why = ev.reason ? `: ${ev.reason}` : "";
    this.failAll(
      new ApiError(0, "stream_interrupted", `The WebSocket closed during the answer (${ev.code}${why}).`),
    );
  }

  retire() {
    this.retired = true;
    if (this.turns.size === 0 && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "done");
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

  // Same contract as sseTurn: {finished, cancel}.
  turn({ chatId, message, model }, handlers) {
    const id = newTurnId();
    let conn = null;
    let turn = null;
    let aborted = false;
    const finished = (async () => {
      conn = await this.connection();
      if (aborted) throw new DOMException("cancelled before sending", "AbortError");
      await new Promise((resolve, reject) => {
        turn = { handlers, resolve, reject, started: false, ended: false };
        conn.turns.set(id, turn);
        conn.sent += 1;
        const frame = { type: "send", id, chat_id: chatId, message };
        if (model) frame.model = model;
        conn.send(frame);
      });
    })();

    const cancel = async () => {
      aborted = true;
      if (!conn || !turn || turn.ended) return;
      conn.send({ type: "cancel", id });
      await Promise.race([
        finished.catch(() => {}),
        new Promise((resolve) => setTimeout(resolve, CANCEL_GRACE_MS)),
      ]);
      if (!turn.ended) {
        // No answer to the cancel: hang up (the server cancels the turn on disconnect).
        conn.finish(id, turn, () => turn.reject(new DOMException("cancelled", "AbortError")), false);
        conn.retire();
        conn.ws.close(1000, "cancel");
        if (this.conn === conn) this.conn = null;
      }
    };
    return { finished, cancel };
  }
}

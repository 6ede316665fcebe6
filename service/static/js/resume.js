// What both transports need to follow an answer across dropped connections: how much of the
// answer the page has (an offset, as the server counts it), and when to try again.
//
// The server counts offsets in characters = Unicode code points (Python's len), not in the
// UTF-16 units of a JS string's .length: "😀".length is 2, one code point.

import { ApiError } from "./api.js";

// Waits before each reconnect attempt: about 30 s in all, then the page gives up.
export const RETRY_DELAYS_MS = [500, 1000, 2000, 4000, 8000, 8000, 8000];

export function codePoints(text) {
  let n = 0;
  for (const _ of text) n++; // the string iterator walks code points
  return n;
}

// The answer's text as the page has it, by offset. `take` turns an event's text and the offset
// at its end (an SSE `id:`, a WebSocket `offset`) into what is new: text the page already has
// is never appended twice, whatever a resumed stream repeats.
export class AnswerOffset {
  constructor(offset = 0) {
    this.offset = offset;
  }

  // The new part of `text` (maybe ""), or null when text before it is missing (a gap: follow
  // again from this.offset).
  take(text, end) {
    if (!Number.isSafeInteger(end)) {
      this.offset += codePoints(text); // no offset given: trust the order
      return text;
    }
    if (end <= this.offset) return "";
    const chars = [...text];
    const start = end - chars.length;
    if (start > this.offset) return null;
    const have = this.offset - start;
    this.offset = end;
    return have === 0 ? text : chars.slice(have).join("");
  }

  // A terminal event says how long the whole answer is: longer than what the page has means
  // text is missing; shorter, that the page has text its replica sent and died before saving
  // (the event's `unsaved`; the page then keeps the answer as stored: app.js).
  complete(end) {
    return !Number.isSafeInteger(end) || end <= this.offset;
  }
}

// The reconnect schedule. `wait` resolves after the next delay, or sooner when the browser
// comes back online or `wake` is called (Stop: follow again at once to get the answer's end);
// it resolves false when the schedule is used up. `reset` after the stream made progress.
export class Retry {
  constructor(delays = RETRY_DELAYS_MS) {
    this.delays = delays;
    this.attempt = 0;
    this.wakers = new Set();
  }

  wait() {
    if (this.attempt >= this.delays.length) return Promise.resolve(false);
    const ms = this.delays[this.attempt++];
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        window.removeEventListener("online", done);
        this.wakers.delete(done);
        resolve(true);
      };
      const timer = setTimeout(done, ms);
      window.addEventListener("online", done);
      this.wakers.add(done);
    });
  }

  wake() {
    for (const done of [...this.wakers]) done();
  }

  reset() {
    this.attempt = 0;
  }
}

// Retry a failed attempt only when it can succeed later: no network, a server error, too many
// requests. A refusal (bad offset, not found, signed out) stays a refusal.
export function retriable(err) {
  return err && (err.status === 0 || err.status === 429 || err.status >= 500);
}

// What `finished` rejects with when the schedule is used up and the answer could not be
// followed again.
export function reconnectFailed() {
  return new ApiError(
    0,
    "stream_interrupted",
    "The connection dropped during the answer and could not be restored. Reload the page to see the rest.",
  );
}

// What `finished` rejects with when Stop could not reach the server (no network): the answer
// may go on to its end without the page.
export function stopUnconfirmed() {
  return new ApiError(
    0,
    "stop_unconfirmed",
    "The server could not be reached to stop the answer: it may go on to its end. Reload the page to see it.",
  );
}

export const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

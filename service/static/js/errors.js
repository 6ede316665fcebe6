// Errors in words a person understands: every error code the page can get, as a sentence.
// The server's own message is added only where it says something the sentence cannot (which
// limit, which field); a code alone or an exception name is never shown.

import { formatMoney, isMoneyUnit } from "./money.js";

const SENTENCES = {
  // the network and the page's own
  network_error: "Cannot reach the server. Check your connection and try again.",
  request_timeout: "The request took too long to reach the server. Check your connection and try again.",
  ws_unavailable: "The WebSocket connection could not be opened. Try again, or turn the WebSocket switch off.",
  ws_protocol: "This page and the server speak different WebSocket versions. Reload the page.",
  ws_error: "The WebSocket connection failed. Try again, or turn the WebSocket switch off.",
  // sign-in
  unauthorized: "Your sign-in was not accepted",
  invalid_api_key: "Your sign-in was not accepted",
  dev_token_unavailable: "This server cannot sign you in by itself. Paste a token to sign in.",
  dev_token_local_only: "This server signs you in by itself only on its own machine, at http://127.0.0.1. Paste a token to sign in.",
  origin_not_allowed: "This page's address is not allowed to open a WebSocket here. Turn the WebSocket switch off.",
  websocket_required: "The server expected a WebSocket connection. Turn the WebSocket switch off and on again.",
  invalid_frame: "The page sent the WebSocket server something it did not understand. Reload the page.",
  duplicate_id: "The page sent two answers under one id. Reload the page.",
  invalid_user: "That user name cannot be used: letters, digits and . _ @ - only, up to 64.",
  // chats and messages
  chat_not_found: "This chat no longer exists (was it deleted elsewhere?).",
  message_not_found: "That message no longer exists (was its chat deleted elsewhere?).",
  not_found: "That was not found: it may have been deleted.",
  chat_limit_reached: "You have as many chats as allowed. Delete one to start another.",
  invalid_message: "The message cannot be sent as it is",
  context_too_long: "This chat has grown too long for the model. Start a new chat.",
  context_length_exceeded: "This chat has grown too long for the model. Start a new chat.",
  model_not_found: "That model is not available to you. Pick another one.",
  model_unavailable: "That model is not available right now. Pick another one or try again later.",
  unsupported_parameter: "The chosen model cannot do what was asked",
  answer_streaming: "The answer is still being written: rate it once it has ended.",
  not_streaming: "The answer had already ended.",
  answer_running: "An answer in this chat is still being written: stop it or wait for it to end.",
  superseded: "That message was replaced by a newer version meanwhile. Reload the page.",
  wrong_role: "Only an answer can be regenerated, and only a question edited.",
  invalid_query: "Search for at least one word (letters or digits).",
  invalid_cursor: "The search changed meanwhile. Search again.",
  invalid_offset: "The answer could not be followed from where the page was. Reload the page.",
  // limits
  rate_limited: "You are sending messages too quickly.",
  rate_limit_exceeded: "You are sending messages too quickly.",
  too_many_turns: "Too many answers are being written at once. Wait for one to end.",
  budget_exceeded: "Your monthly token budget is used up.",
  budget_held: "The rest of your monthly budget is held by answers still being written. Try again when they end.",
  forbidden: "You are not allowed to do that.",
  model_not_allowed: "This API key may not use that model.",
  unknown_model: "One of those models is not in the catalogue.",
  key_limit_reached: "You have as many API keys as allowed. Revoke one to create another.",
  key_not_found: "That API key no longer exists (was it revoked elsewhere?).",
  insufficient_quota: "Your monthly token budget is used up.",
  // sending again
  idempotency_key_in_progress: "The message is still being sent. Wait a moment.",
  idempotency_key_reused: "This message was already sent with other content. Send it again.",
  invalid_idempotency_key: "The page sent a malformed request. Reload the page.",
  // requests the page should never make: still words
  validation_error: "The request was not valid",
  invalid_request: "The request was not valid",
  invalid_value: "The request was not valid",
  bad_request: "The request was not valid",
  conflict: "That could not be done now: something changed meanwhile. Reload the page.",
  invalid_json: "The page sent a malformed request. Reload the page.",
  invalid_body: "The page sent a malformed request. Reload the page.",
  invalid_id: "That link does not name a chat. Pick one from the list.",
  payload_too_large: "The message is too long to send.",
  unsupported_content_encoding: "The page sent a malformed request. Reload the page.",
  // the service and the model provider
  database_unavailable: "The service's database is not answering. Try again in a moment.",
  service_unavailable: "The service is not available right now. Try again in a moment.",
  shutting_down: "The server is restarting. Try again in a moment.",
  internal_error: "Something went wrong on the server. Try again; if it goes on, tell the operators.",
  upstream_auth: "The model provider refused this service's credentials. Tell the operators.",
  upstream_billing: "The model provider refused this service's account: its credit is used up. Tell the operators.",
  upstream_bad_request: "The model provider refused the request.",
  upstream_bad_response: "The model provider sent an answer that could not be read. Try again.",
  upstream_rate_limited: "The model provider is busy. Try again in a moment.",
  upstream_unavailable: "The model provider is not reachable right now. Try again in a moment.",
  upstream_timeout: "The model provider took too long to answer. Try again.",
  upstream_refused: "The model provider refused to answer this.",
  upstream_content_filtered: "The model provider's content filter stopped this answer.",
  // how an answer ended
  interrupted: "The server that wrote this answer stopped before the end.",
  timeout: "The answer took too long and was stopped.",
  failed: "The answer failed.",
  cancelled: "The answer was stopped.",
};

// Codes whose server message adds the detail the sentence lacks (which field, which limit).
const WITH_DETAIL = new Set([
  "unauthorized",
  "forbidden",
  "unknown_model",
  "invalid_api_key",
  "invalid_message",
  "unsupported_parameter",
  "validation_error",
  "invalid_request",
  "invalid_value",
  "bad_request",
  "upstream_bad_request",
]);

const STATUS_SENTENCES = {
  400: "The request was not valid. Reload the page and try again.",
  401: "Your sign-in was not accepted. Paste a new token.",
  403: "That is not allowed.",
  404: "That was not found: it may have been deleted.",
  413: "The message is too long to send.",
  429: "Too many requests. Wait a moment and try again.",
  500: "Something went wrong on the server. Try again; if it goes on, tell the operators.",
  502: "The service could not reach what it needs. Try again in a moment.",
  503: "The service is not available right now. Try again in a moment.",
  504: "The service took too long to answer. Try again.",
};

// A server message as a clause: "invalid token: expired" -> "invalid token: expired".
const clause = (message) => String(message || "").trim().replace(/[.\s]+$/, "");

// What the month's budget counts ("tokens" or a currency's code), from GET /api/usage: a refusal
// by the budget says so in its words.
let budgetUnit = "tokens";
export function setBudgetUnit(unit) {
  budgetUnit = unit || "tokens";
}

function limitDetail(code, err) {
  const d = err.details || {};
  if (code === "budget_exceeded" || code === "insufficient_quota") {
    let left = "";
    if (isMoneyUnit(d.unit)) {
      const [rest, all] = [formatMoney(d.remaining ?? "0", d.unit), formatMoney(d.limit, d.unit)];
      if (rest && all) left = ` (${rest} of ${all} left)`;
    } else if (d.limit != null) {
      left = ` (${d.remaining ?? 0} of ${d.limit} tokens left)`;
    }
    return `${left}. It renews at the start of next month.`;
  }
  if (code === "rate_limited" || code === "rate_limit_exceeded") {
    const wait = err.retryAfter != null ? Math.max(1, Math.ceil(err.retryAfter)) : null;
    return wait ? `. Try again in ${wait} s.` : ".";
  }
  return null;
}

// The sentence for an ApiError-like {code, message, status, details, retryAfter}.
export function describe(err) {
  const code = err.code || "";
  if (code === "budget_exceeded" || code === "insufficient_quota") {
    // A budget refuses a turn it cannot hold (the prompt and a minimum answer), so some may be
    // left. A money budget: "token" is not its word; its amounts come in the refusal's unit.
    const budget = budgetUnit === "tokens" ? "monthly token budget" : "monthly budget";
    const some = Number((err.details || {}).remaining) > 0;
    const head = some ? `What is left of your ${budget} is not enough for this message` : `Your ${budget} is used up`;
    return head + limitDetail(code, err);
  }
  const sentence = SENTENCES[code];
  if (sentence) {
    const limit = limitDetail(code, err);
    if (limit !== null) return sentence.replace(/\.$/, "") + limit;
    if (WITH_DETAIL.has(code) && err.message) {
      const tail = code === "unauthorized" || code === "invalid_api_key" ? " Paste a new token." : "";
      return `${sentence.replace(/\.$/, "")} (${clause(err.message)}).${tail}`;
    }
    return sentence;
  }
  if (code.startsWith("upstream_")) return SENTENCES.upstream_bad_response;
  if (["stream_interrupted", "stop_unconfirmed"].includes(code)) return err.message;
  if (STATUS_SENTENCES[err.status]) return STATUS_SENTENCES[err.status];
  return err.message && !/^[a-z_]+$/.test(err.message)
    ? `Something went wrong: ${clause(err.message)}.`
    : "Something went wrong. Try again.";
}

// The sentence for an answer that ended with an error event ({code, message, status, reason}).
export function describeEnd(data) {
  const code = data.code || data.reason || data.status || "failed";
  return describe({ code, message: data.message, details: data.details });
}

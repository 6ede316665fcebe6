// HTTP API client: the bearer token, JSON calls and the service's one error shape.

const TOKEN_KEY = "chat-gateway.token";

export class ApiError extends Error {
  constructor(status, code, message, details = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

export const auth = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  // The user id inside the token, for display only (the server verifies the signature).
  get user() {
    const token = this.token;
    if (!token) return null;
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part)).sub || null;
    } catch {
      return null;
    }
  },
};

// Listeners for "the token was refused" (the page shows the sign-in box).
const unauthorizedListeners = [];
export function onUnauthorized(fn) {
  unauthorizedListeners.push(fn);
}

// Turn a non-2xx response into an ApiError (JSON {"error":{code,message,details}} or anything).
export async function errorFrom(resp) {
  let code = `http_${resp.status}`;
  let message = `${resp.status} ${resp.statusText || "error"}`;
  let details = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
      details = body.error.details ?? null;
    }
  } catch {
    // not JSON: keep the status line
  }
  const retry = resp.headers.get("Retry-After");
  const err = new ApiError(resp.status, code, message, details, retry ? Number(retry) : null);
  if (resp.status === 401) unauthorizedListeners.forEach((fn) => fn(err));
  return err;
}

// A random id: an Idempotency-Key for a send, a WebSocket turn's id. crypto.randomUUID exists only
// in secure contexts (https, localhost); getRandomValues everywhere.
export function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const hex = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0"));
  return hex.join("");
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (auth.token) headers.Authorization = `Bearer ${auth.token}`;
  return headers;
}

// fetch() with the token; JSON body in, JSON out; throws ApiError on failure.
export async function api(method, path, body = undefined, { signal } = {}) {
  const init = { method, headers: authHeaders({ Accept: "application/json" }), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "network_error", "Cannot reach the server. Check your connection.");
  }
  if (!resp.ok) throw await errorFrom(resp);
  if (resp.status === 204) return null;
  return resp.json();
}

// Development sign-in: GET /api/dev/token exists only when the server enables it (else 404).
export async function devToken(user) {
  const resp = await fetch(`/api/dev/token?user=${encodeURIComponent(user)}`, {
    headers: { Accept: "application/json" },
  });
  if (resp.status === 404) return null;
  if (!resp.ok) throw await errorFrom(resp);
  return (await resp.json()).token;
}

// Models: the OpenAI-compatible list (GET /v1/models) when the server has it, else the service's
// own list; the default model always comes from GET /api/models (the OpenAI shape has none).
export async function listModels() {
  const [openai, own] = await Promise.allSettled([api("GET", "/v1/models"), api("GET", "/api/models")]);
  for (const r of [openai, own]) {
    if (r.status === "rejected" && r.reason.status === 401) throw r.reason;
  }
  const fallback = own.status === "fulfilled" ? own.value.default : null;
  if (openai.status === "fulfilled" && Array.isArray(openai.value.data) && openai.value.data.length) {
    return { models: openai.value.data.map((m) => m.id), default: fallback };
  }
  if (own.status === "rejected") throw own.reason;
  return { models: own.value.models.map((m) => m.name), default: fallback };
}

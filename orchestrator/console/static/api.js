// The console's only door to the control plane: the /v1 API with the tab's bearer token.
const KEY = "edgeplane.token";

export class Unauthorized extends Error {}

// No answer within the time the request was given: the control plane (or whatever sits in
// front of it) took the request and holds it, hung, or the network dropped it unseen.
export class Unanswered extends Error {}

// How long a request may take, its answer read included, unless its caller says otherwise: one
// the control plane never answers must fail, or the poll waiting on it would never poll again.
export const TIMEOUT_MS = 10_000;

// A refusal that says to ask again later (503: the store does not answer for now; 429: the
// control plane is busy); retryAfter is its Retry-After in seconds, or null where it gives none.
export class RetryLater extends Error {
  constructor(message, retryAfter) { super(message); this.retryAfter = retryAfter; }
}

// A 429: every what-if slot taken; retryAfter is its Retry-After, 5 s where it gives none.
export class Busy extends RetryLater {}

// The seconds a Retry-After asks for (at least one, so a wait always waits), or null: an HTTP
// date is read as none, as the CLI reads it.
function retryAfter(resp) {
  const seconds = Number(resp.headers.get("retry-after") ?? NaN);
  return Number.isFinite(seconds) ? Math.max(1, seconds) : null;
}

// A token pasted from a chat or a PDF brings characters no token has: whitespace around it and
// invisible ones (zero-width spaces and joiners, word joiner, byte-order mark, soft hyphen).
const INVISIBLE = /[\u00AD\u200B-\u200D\u2060\uFEFF]/g;
// What is left must be visible ASCII, as every bearer token is: fetch() refuses outright a
// header with anything past U+00FF, and the control plane knows no token with anything else.
const SENDABLE = /^[\x21-\x7E]*$/;

export class BadToken extends Error {}

// The token as typed or pasted, cleaned; throws BadToken when what is left cannot be sent.
export function cleanToken(typed) {
  const value = typed.replace(INVISIBLE, "").trim();
  const bad = [...value].find((c) => !SENDABLE.test(c));
  if (bad !== undefined) {
    const code = `U+${bad.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
    throw new BadToken(`this token has a character no token has (${code}${bad.trim() ? ` "${bad}"` : ""}): copy it again`);
  }
  return value;
}

// The tab's token; one that cannot be sent (stored by an older page) is dropped, to sign in again.
export function token() {
  const value = sessionStorage.getItem(KEY) || "";
  if (SENDABLE.test(value)) return value;
  sessionStorage.removeItem(KEY);
  return "";
}
export function setToken(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); }

// The signal that gives up at `ms` or when `signal` (a caller's AbortController's) does.
function within(ms, signal) {
  const timeout = AbortSignal.timeout(ms);
  if (!signal) return timeout;
  if (AbortSignal.any) return AbortSignal.any([signal, timeout]);
  const both = new AbortController();  // a browser without AbortSignal.any (before 2023)
  for (const s of [signal, timeout]) {
    if (s.aborted) both.abort(s.reason); else s.addEventListener("abort", () => both.abort(s.reason), { once: true });
  }
  return both.signal;
}

// `signal` (an AbortController's) gives up on the request: the promise rejects with an AbortError;
// past `timeoutMs` it rejects with Unanswered.
async function call(method, path, body, signal, timeoutMs = TIMEOUT_MS) {
  const headers = {};
  if (token()) headers.authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const giveUp = within(timeoutMs, signal);
  let resp, text;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: giveUp });
    text = await resp.text();
  } catch (err) {
    if (giveUp.aborted && giveUp.reason?.name === "TimeoutError") throw new Unanswered(`no answer in ${timeoutMs / 1000} s`);
    throw err;
  }
  if (!resp.ok) {
    let message = null;
    try { message = JSON.parse(text).error; } catch (_) { /* not JSON: a proxy's page, say */ }
    // A 401 from a proxy in front of the control plane comes with a page of its own: the sign-in form all the same.
    if (resp.status === 401) throw new Unauthorized(message || "unauthorized");
    message = message || text;
    if (resp.status === 429) throw new Busy(message, retryAfter(resp) ?? 5);
    if (resp.status === 503) throw new RetryLater(`${resp.status}: ${message}`, retryAfter(resp));
    throw new Error(`${resp.status}: ${message}`);
  }
  if (path !== "/metrics") return JSON.parse(text);
  // Which replica answered, and how long it has run (absent from an older control plane: one replica).
  const uptime = resp.headers.get("x-edgeplane-uptime");
  return { text, replica: resp.headers.get("x-edgeplane-replica") || "", uptimeS: uptime === null ? Infinity : Number(uptime) };
}

export const get = (path) => call("GET", path);
export const post = (path, body, signal, timeoutMs) => call("POST", path, body, signal, timeoutMs);

// Gateway requests per site from the Prometheus text (edgeplane_gateway_requests_total{site=...}),
// in a Map: a site may be named as a plain object's property is (`constructor`).
export function requestsBySite(metrics) {
  const out = new Map();
  const re = /^edgeplane_gateway_requests_total\{([^}]*)\}\s+([0-9.eE+-]+)$/gm;
  for (const m of metrics.matchAll(re)) {
    const site = /site="([^"]*)"/.exec(m[1]);
    if (site) out.set(site[1], (out.get(site[1]) || 0) + Number(m[2]));
  }
  return out;
}

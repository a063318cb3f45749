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

// The seconds a Retry-After asks for (at least one, so a wait always waits), or null where it
// gives none or one that cannot be read: as the CLI reads it.
function retryAfter(resp) {
  const seconds = retryAfterSeconds(resp.headers.get("retry-after"));
  return seconds === null ? null : Math.max(1, seconds);
}

// The seconds a Retry-After value asks to wait, read as edgeplane_proto/retry_after.py reads it
// for the CLI and the Python client: a number of seconds in ASCII digits (at most 18: not a
// fraction, a sign or "1e3", which Number() takes), or an HTTP date in any of its three forms
// ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37
// 1994"), with the zones and the leeway Python's email.utils takes, measured from `nowMs`
// (0 for a date past); null for none, or a value that cannot be read (a day no month has).
export function retryAfterSeconds(value, nowMs = Date.now()) {
  if (value === null || value === undefined) return null;
  const text = value.trim();
  if (/^[0-9]{1,18}$/.test(text)) return Number(text);
  const when = httpDateMs(text);
  return when === null ? null : Math.max(0, (when - nowMs) / 1000);
}

const MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
// Zones by name, in hours east of UTC (email.utils' table; HTTP itself sends GMT only).
const ZONES = { ut: 0, utc: 0, gmt: 0, z: 0, ast: -4, adt: -3, est: -5, edt: -4, cst: -6, cdt: -5, mst: -7, mdt: -6, pst: -8, pdt: -7 };
// "[Sun, ]06 Nov 1994 08:49[:37] GMT" and RFC 850's "Sunday, 06-Nov-94 08:49:37 GMT"; a zone is required.
const DATED = /^(?:[a-z]+,\s*)?([0-9]{1,2})[ -]([a-z]{3})[ -]([0-9]{4}|[0-9]{2}) ([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))? ([a-z]+|[+-][0-9]{4})$/i;
// asctime's, which names no zone and is in UTC: "Sun Nov  6 08:49:37 1994".
const ASCTIME = /^[A-Z][a-z]{2} ([A-Z][a-z]{2}) ([ 0-9][0-9]) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([0-9]{4})$/;

// The time an HTTP date names, in ms since the epoch, or null.
function httpDateMs(text) {
  let day, month, year, hour, minute, second, offsetS;
  let found = DATED.exec(text);
  if (found) {
    [, day, month, year, hour, minute, second = "0"] = found;
    const zone = found[7].toLowerCase();
    if (zone in ZONES) offsetS = ZONES[zone] * 3600;
    else if (zone === "-0000") return null;  // "no zone known", which an HTTP date never is
    else if (/^[+-][0-9]{4}$/.test(zone)) {
      const hhmm = Number(zone.slice(1));
      offsetS = (zone[0] === "-" ? -1 : 1) * (Math.floor(hhmm / 100) * 3600 + (hhmm % 100) * 60);
    } else return null;
  } else if ((found = ASCTIME.exec(text))) {
    [, month, day, hour, minute, second, year] = found;
    offsetS = 0;
  } else return null;
  const m = MONTHS.indexOf(month.toLowerCase());
  let y = Number(year);
  if (y < 100) y += y > 68 ? 1900 : 2000;  // a two-digit year, as email.utils reads it
  const [d, h, min, s] = [Number(day), Number(hour), Number(minute), Number(second)];
  if (m < 0 || d < 1 || d > new Date(Date.UTC(y, m + 1, 0)).getUTCDate() || h > 23 || min > 59 || s > 59
      || Math.abs(offsetS) >= 86400) return null;
  return Date.UTC(y, m, d, h, min, s) - offsetS * 1000;
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

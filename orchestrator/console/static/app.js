// The console page: polls the read API once a second and redraws; the what-if panel asks
// POST /v1/simulate and draws the moves on the map. Read-only: nothing here writes.
import * as api from "./api.js";
import { cascadeViews, renderCascades } from "./cascades.js";
import { FleetMap } from "./map.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
// After a failed poll the next waits twice as long as the last, up to BACKOFF_MAX_MS, and at
// least what a refusal's Retry-After asks, up to MAX_RETRY_AFTER_S (as `edgeplane events
// --follow` caps it: more would leave the page silent): every page left open asks a control
// plane in trouble less, not five requests a second.
const BACKOFF_MAX_MS = 30_000;
const MAX_RETRY_AFTER_S = 60;

// How long to wait before asking again, after `failures` (1 or more) failed in a row. `jitter`
// (0 to 1) stretches a wait by up to a fifth, so that the pages a failure met at once do not
// all ask again at once.
function pollDelayMs(failures, retryAfterS, jitter) {
  const backoff = Math.min(POLL_MS * 2 ** (failures - 1), BACKOFF_MAX_MS);
  return Math.max(backoff, Math.min(retryAfterS ?? 0, MAX_RETRY_AFTER_S) * 1000) * (1 + jitter / 5);
}

const state = { sites: [], deployments: [], placements: [], cascades: [], events: [], lastEvent: 0, reloadEvents: true, store: undefined,
                failures: 0,  // polls failed in a row
                mapLoading: false,  // the base map is asked (and asked again until it loads)
                // every table keyed by a site's name is a Map: a site may be named `constructor`
                replicas: new Map(), requests: new Map(), rates: new Map(), whatif: null, map: null, timer: null,
                signedIn: 0,  // bumped at each sign-in and sign-out: a poll from before neither draws nor polls again
                whatifRun: null };  // the running what-if's AbortController: given up at sign-out or at the next run

// A site's health word, as the table colours it; anything else is bad. A Rejoining site kept
// its replicas over a control-plane restart and waits for its agent to come back; a Waiting
// data centre has not answered its first observation yet; an OwnedElsewhere one answers but is
// another control plane's (ownedBy), held until an operator takes it over: no outage, grey.
const HEALTH_CLASS = { Healthy: "Healthy", Rejoining: "waiting", Waiting: "waiting", OwnedElsewhere: "elsewhere" };

// A site's maintenance as `edgeplane get sites` words it (render.scheduling), and the
// tooltip's lines on it: who took it out, since when, why, and what a drain waits for.
function scheduling(status) {
  const m = status && status.maintenance;
  if (!m) return { state: "Schedulable", word: "Schedulable", about: [] };
  const word = m.state === "Draining" ? `Draining (${m.replicasLeft || 0} replica${m.replicasLeft === 1 ? "" : "s"} left)` : String(m.state || "-");
  const about = [`scheduling: ${word}, by ${m.by || "?"} since ${m.since ? localTime(m.since) : "?"}${m.reason ? `: ${m.reason}` : ""}`];
  if (m.waitingFor && m.waitingFor.length) about.push(`waiting for replacements of ${m.waitingFor.join(", ")} to serve`);
  for (const x of m.stuck || []) about.push(`${x.deployment} stays (${x.replicas}): ${x.reason}`);
  if (m.note) about.push(m.note);
  return { state: String(m.state || "-"), word, about };
}

// A time from the API (RFC 3339 in UTC, or seconds since the epoch) as this browser's clock
// reads it, with its zone, and its date unless it is today: the Events tab opens on the newest
// 200 events, which in a quiet fleet go back weeks.
function localTime(ts) {
  const at = new Date(typeof ts === "number" ? ts * 1000 : ts);
  if (Number.isNaN(at.getTime())) return String(ts);
  const time = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short" });
  return at.toDateString() === new Date().toDateString() ? time : `${at.toLocaleDateString()} ${time}`;
}

function text(tag, value, cls) { const td = document.createElement(tag); td.textContent = value; if (cls) td.className = cls; return td; }

function titled(node, title) { if (title) node.title = title; return node; }

function row(cells) { const tr = document.createElement("tr"); for (const c of cells) tr.appendChild(c); return tr; }

function showLogin(message) {
  state.signedIn++;
  clearTimeout(state.timer);
  forgetWhatif();  // neither a running what-if nor a result is left for whoever signs in next
  $("console").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = message || "";
  $("server-state").textContent = "signed out";
}

function start() {
  const signedIn = ++state.signedIn;
  state.failures = 0;
  $("login").hidden = true;
  $("console").hidden = false;
  $("logout").hidden = !api.token();
  loadMap();
  if (signedIn === state.signedIn) poll();
}

// The base map, asked until it loads, as a failed poll is asked again: its files come from the
// control plane, which may be restarting as the page opens. The tables are polled meanwhile.
async function loadMap() {
  if (state.map || state.mapLoading) return;
  state.mapLoading = true;
  for (let failures = 1; ; failures++) {
    try {
      const [world, iso] = await Promise.all([api.get("vendor/countries-110m.json"), api.get("iso-countries.json")]);
      state.map = new FleetMap($("map"), world, iso);
      $("map-state").hidden = true;
      drawMap(siteViews());
      return;
    } catch (err) {
      const wait = pollDelayMs(failures, err instanceof api.RetryLater ? err.retryAfter : null, Math.random());
      $("map-state").textContent = `base map: ${err.message} · asking again in ${Math.round(wait / 1000)} s`;
      $("map-state").hidden = false;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }
}

async function poll() {
  clearTimeout(state.timer);
  const signedIn = state.signedIn;
  let wait = POLL_MS;
  try {
    const [sites, deployments, placements, cascades, events, metrics] = await Promise.all([
      api.get("/v1/sites"), api.get("/v1/modeldeployments"), api.get("/v1/placements"), api.get("/v1/cascades"), newEvents(),
      api.get("/metrics").catch(() => null),  // no counts this time: not a reset
    ]);
    if (signedIn !== state.signedIn) return;  // signed out (and maybe in again) while it was asked
    state.sites = sites.items;
    state.deployments = deployments.items;
    state.placements = placements.items;
    state.cascades = cascades.items;
    if (events.reloaded) { state.events = []; state.lastEvent = 0; state.store = events.store; }
    for (const e of events.items) { state.events.push(e); state.lastEvent = Math.max(state.lastEvent, e.id); }
    state.events = state.events.slice(-300);
    state.reloadEvents = false;
    if (metrics !== null) updateRequests(metrics);
    $("server-state").textContent = `live · ${new Date().toLocaleTimeString()}`;
    state.failures = 0;
    render();
  } catch (err) {
    if (signedIn !== state.signedIn) return;
    state.reloadEvents = true;  // what answers next may be another control plane, or another store
    if (err instanceof api.Unauthorized) { showLogin(err.message); return; }
    wait = pollDelayMs(++state.failures, err instanceof api.RetryLater ? err.retryAfter : null, Math.random());
    $("server-state").textContent = `unreachable: ${err.message} · asking again in ${Math.round(wait / 1000)} s`;
  }
  state.timer = setTimeout(poll, wait);
}

// The events after the last one shown; or the newest 200, in place of the list, at first,
// after a failed poll, and when the control plane answers from another store than the list's
// (each store numbers its events from its own start: those after the old mark are not the
// ones since) or its newest event is older than the last one shown (a restored backup of the
// same store, whose identity it keeps, numbers its events from lower down).
async function newEvents() {
  if (state.lastEvent && !state.reloadEvents) {
    const [after, newest] = await Promise.all([api.get(`/v1/events?since=${state.lastEvent}&limit=200`), api.get("/v1/events?last=1")]);
    if (after.store === state.store && newest.store === state.store && newest.items.length
        && newest.items[newest.items.length - 1].id >= state.lastEvent) return { items: after.items, reloaded: false };
  }
  const newest = await api.get("/v1/events?last=200");
  return { items: newest.items, store: newest.store, reloaded: true };
}

// Requests each site answered since the page opened, from the gateway's lifetime counters.
// Each control-plane replica counts what its own gateway answered, and any of them may answer
// /metrics, so each replica's counts are kept apart: the first read of one that ran before the
// page opened is its baseline; all that one started since has counted is new (a restart is a
// new replica); a counter lower than at the same replica's last read started again from zero.
const OPENED_AT = performance.now();
const RATE_WINDOW_MS = 30_000;  // a replica not read for this long (gone) adds nothing to the rates

function updateRequests({ text, replica, uptimeS }) {
  const counts = api.requestsBySite(text);
  const now = performance.now();
  let seen = state.replicas.get(replica);
  if (!seen) {
    const startedAt = now - uptimeS * 1000;
    seen = startedAt > OPENED_AT ? { counts: new Map(), at: startedAt, rates: new Map() } : { counts, at: now, rates: new Map() };
    state.replicas.set(replica, seen);
  }
  const dt = (now - seen.at) / 1000;
  for (const site of new Set([...counts.keys(), ...seen.counts.keys()])) {
    const n = counts.get(site) || 0, before = seen.counts.get(site) || 0;
    const added = n >= before ? n - before : n;
    state.requests.set(site, (state.requests.get(site) || 0) + added);
    if (dt > 0) seen.rates.set(site, added / dt);
  }
  seen.counts = counts;
  seen.at = now;
  state.rates = new Map();
  for (const r of state.replicas.values()) {
    if (now - r.at > RATE_WINDOW_MS) continue;
    for (const [site, rate] of r.rates) state.rates.set(site, (state.rates.get(site) || 0) + rate);
  }
}

// One pass over the placements per poll (a fleet has thousands of sites and placements).
function siteViews() {
  const failed = new Set(state.whatif ? state.whatif.failedSites : []);
  const modelOf = new Map(state.deployments.map((d) => [d.metadata.name, d.spec.model]));
  const placed = new Map();  // site → { replicas, models }
  for (const p of state.placements) {
    let here = placed.get(p.site);
    if (!here) placed.set(p.site, here = { replicas: 0, models: new Set() });
    here.replicas += p.replicas;
    here.models.add(modelOf.get(p.deployment) ?? p.deployment);
  }
  return state.sites.map((s) => {
    const here = placed.get(s.metadata.name) || { replicas: 0, models: new Set() };
    const loc = s.spec.location;
    return {
      name: s.metadata.name, tier: s.spec.tier, country: loc.country, region: loc.region || "", lat: loc.lat, lon: loc.lon,
      health: (s.status && s.status.health) || "Unknown", scheduling: scheduling(s.status),
      error: (s.status && s.status.error) || "",  // why a data centre is out of reach, or its last apply failed
      ownedBy: (s.status && s.status.ownedBy) || "",  // the control plane whose mark is on a data centre's cluster
      replicas: here.replicas, models: [...here.models].sort(),
      requests: Math.round(state.requests.get(s.metadata.name) || 0), rate: state.rates.get(s.metadata.name) || 0,
      failed: failed.has(s.metadata.name),
    };
  });
}

// The sites table: at most SITE_ROWS rows (the filter finds the others; a table of thousands
// of rows takes the browser seconds to lay out again), one per site kept by name, rewritten
// only when what it shows changed and moved only when the order did: an unchanged poll
// writes nothing.
const SITE_ROWS = 200;
const siteRows = new Map();  // site name → { tr, shown }

function renderSiteRows(views) {
  const words = $("sites-filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const matching = words.length
    ? views.filter((v) => {
      const about = [v.name, v.tier, v.country, v.region, v.health, v.scheduling.word].join(" ").toLowerCase();
      return words.every((w) => about.includes(w));
    })
    : views;
  const shownViews = matching.slice(0, SITE_ROWS);
  const more = $("sites-more");
  const note = matching.length > SITE_ROWS ? `showing ${SITE_ROWS} of ${matching.length} sites: filter to find the others` : "";
  if (more.textContent !== note) { more.textContent = note; more.hidden = !note; }
  const body = $("sites-body");
  let before = null;
  for (const v of shownViews) {
    const cells = [[v.name], [v.tier], [v.country], [v.health, HEALTH_CLASS[v.health] || "bad", v.error],
      [v.scheduling.word, v.scheduling.state === "Schedulable" ? "" : "maintenance"], [String(v.replicas)],
      [v.models.join(", ")], [v.requests ? `${v.requests} (${v.rate.toFixed(1)}/s)` : "0"]];
    const shown = cells.flat().join("\u0000");
    let r = siteRows.get(v.name);
    if (!r) siteRows.set(v.name, r = { tr: document.createElement("tr"), shown: "" });
    if (r.shown !== shown) { r.tr.replaceChildren(...cells.map(([value, cls, why]) => titled(text("td", value, cls), why))); r.shown = shown; }
    const at = before ? before.nextSibling : body.firstChild;
    if (at !== r.tr) body.insertBefore(r.tr, at);
    before = r.tr;
  }
  const names = new Set(shownViews.map((v) => v.name));
  for (const [name, r] of siteRows) if (!names.has(name)) { r.tr.remove(); siteRows.delete(name); }
}

function render() {
  const views = siteViews();
  const healthy = views.filter((v) => v.health === "Healthy").length;
  const rejoining = views.filter((v) => v.health === "Rejoining").length;  // a restarted control plane awaits their agents
  const waiting = views.filter((v) => v.health === "Waiting").length;  // data centres not observed yet
  const elsewhere = views.filter((v) => v.health === "OwnedElsewhere").length;  // data centres another control plane owns
  const replicas = views.reduce((n, v) => n + v.replicas, 0);
  $("summary").textContent = `${views.length} sites (${healthy} healthy${rejoining ? `, ${rejoining} rejoining` : ""}`
    + `${waiting ? `, ${waiting} waiting` : ""}${elsewhere ? `, ${elsewhere} owned elsewhere` : ""}) · `
    + `${state.deployments.length} deployments · ${replicas} replicas`;
  drawMap(views);
  renderSiteRows(views);
  $("deployments-body").replaceChildren(...state.deployments.map((d) => {
    const st = d.status || {};
    const a = st.autoscaling;
    // observedPerReplica is absent while no replica reports load (the count is then held): say that instead
    const load = a && a.observedPerReplica !== undefined ? `${a.observedPerReplica} ${a.metric}/replica` : "no load reported";
    const scaling = a && a.desiredReplicas !== undefined ? `${a.desiredReplicas} replicas (${load}, target ${a.target})` : (d.spec.autoscaling ? "waiting for load" : "–");
    const tr = row([text("td", d.metadata.name), text("td", d.spec.model), text("td", st.phase || "Pending", st.phase === "Running" || st.phase === "Scheduled" ? "Healthy" : ""),
      text("td", `${st.readyReplicas || 0}/${st.replicas || 0}`), rolloutCell(st.rollout), text("td", scaling)]);
    tr.title = st.reason || "";
    tr.dataset.deployment = d.metadata.name;
    return tr;
  }));
  renderCascades($("cascades"), cascadeViews(state.cascades, state.deployments, state.placements));
  const list = $("events-list");
  list.replaceChildren(...state.events.slice(-100).reverse().map((e) => {
    const li = document.createElement("li");
    li.appendChild(text("span", localTime(e.ts), "when"));
    li.appendChild(text("span", `${e.action} ${e.kind}/${e.name} by ${e.actor} — ${e.reason}`));  // who, as the audit log says
    li.dataset.action = e.action;
    li.dataset.id = e.id;
    return li;
  }));
  fillResidencyChoices();
  fillWhatifTargets(views);
}

// A version rollout as `get modeldeployments` says it: sites upgraded of those rolling, the
// canary step open, the sites a replaceWhenFull rollout left serving no version meanwhile;
// and when it halted, which site failed to load the version and why, in the cell itself.
function rolloutCell(r) {
  if (!r) return text("td", "–");
  const step = r.canaryStep ? `, canary ${r.canaryStep}` : "";
  const replacing = r.replacing && r.replacing.length ? `, replacing on ${r.replacing.join(", ")}` : "";
  const td = text("td", `${r.upgraded}/${r.upgraded + r.switching + r.waiting} upgraded${step}${replacing}`, "reason");
  if (r.halted) td.appendChild(text("div", `HALTED: ${r.halted}`, "error"));
  return td;
}

// The sites, residency zones and what-if moves on the map, once the base map has loaded.
function drawMap(views) {
  if (!state.map) return;
  state.map.drawSites(views);
  renderResidency();
  if (state.whatif) state.map.drawMoves(state.whatif.moves.slice(0, WHATIF_ROWS), new Map(views.map((v) => [v.name, v])));
}

function residencyOf(d) { return (d.spec.placement && d.spec.placement.residency) || []; }

function renderResidency() {
  if (!state.map) return;
  const chosen = $("residency-of").value;
  const zone = new Set();
  for (const d of state.deployments) {
    if (chosen && d.metadata.name !== chosen) continue;
    for (const code of residencyOf(d)) {
      if (code === "EU") for (const c of EU) zone.add(c); else zone.add(code);
    }
  }
  state.map.shadeResidency(zone);
}

const EU = ["AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"];

// One choice per deployment, named with its residency: rebuilt when either changes (a
// deployment applied again with another residency keeps its name).
function fillResidencyChoices() {
  const select = $("residency-of");
  const choices = state.deployments.map((d) => [d.metadata.name, `${d.metadata.name} (${residencyOf(d).join(",") || "any"})`]);
  const have = [...select.options].slice(1).map((o) => [o.value, o.text]);
  if (JSON.stringify(have) === JSON.stringify(choices)) return;
  const keep = select.value;
  select.replaceChildren(new Option("every deployment", ""), ...choices.map(([name, label]) => new Option(label, name)));
  select.value = choices.some(([name]) => name === keep) ? keep : "";
}

function fillWhatifTargets(views) {
  const kind = $("whatif-kind").value;
  const values = kind === "sites" ? views.map((v) => v.name) : kind === "regions" ? views.map((v) => v.region).filter(Boolean)
    : kind === "countries" ? views.map((v) => v.country) : ["edge", "datacenter"];
  const unique = [...new Set(values)].sort();
  const select = $("whatif-target");
  if ([...select.options].map((o) => o.value).join() === unique.join()) return;
  const keep = select.value;
  select.replaceChildren(...unique.map((v) => new Option(v, v)));
  if (unique.includes(keep)) select.value = keep;
}

// Gives up on a running what-if, and clears the result and its moves on the map.
function forgetWhatif() {
  if (state.whatifRun) state.whatifRun.abort();
  state.whatifRun = null;
  state.whatif = null;
  $("whatif-result").replaceChildren();
  if (state.map) state.map.drawMoves([], new Map());
}

async function runWhatif(event) {
  event.preventDefault();
  if (state.whatifRun) state.whatifRun.abort();  // its answer is for the question asked before
  const run = state.whatifRun = new AbortController();
  const kind = $("whatif-kind").value, target = $("whatif-target").value, factor = Number($("whatif-demand").value || 1);
  const spec = { fail: { [kind]: [target] } };
  if (factor !== 1) spec.demand = [{ factor }];
  const out = $("whatif-result");
  out.replaceChildren(text("p", "simulating…", "muted"));
  try {
    const r = await simulate({ kind: "Scenario", metadata: { name: "console" }, spec }, out, run.signal);
    if (run.signal.aborted) return;  // answered as it was given up on
    const views = siteViews();
    const lost = views.filter((v) => (kind === "sites" && v.name === target) || (kind === "regions" && v.region === target)
      || (kind === "countries" && v.country === target) || (kind === "tiers" && v.tier === target)).map((v) => v.name);
    state.whatif = { moves: r.moves, failedSites: lost };
    showReport(r);
    render();
  } catch (err) {
    if (run.signal.aborted) return;
    if (err instanceof api.Unauthorized) { showLogin(err.message); return; }
    out.replaceChildren(text("p", err.message, "error"));
  } finally {
    if (state.whatifRun === run) state.whatifRun = null;
  }
}

// How long a what-if waits for a slot that other callers hold, and for its answer once it
// runs (a large fleet's takes minutes), as the CLI does.
const SIMULATE_WAIT_MS = 120_000;
const SIMULATE_ANSWER_MS = 600_000;

// POST /v1/simulate; while the control plane is busy with other what-ifs (429), waits as its
// Retry-After asks, saying so in `out`, for up to SIMULATE_WAIT_MS, unless `signal` gives up.
async function simulate(body, out, signal) {
  const giveUp = Date.now() + SIMULATE_WAIT_MS;
  for (;;) {
    try {
      return await api.post("/v1/simulate", body, signal, SIMULATE_ANSWER_MS);
    } catch (err) {
      if (!(err instanceof api.Busy) || Date.now() + err.retryAfter * 1000 > giveUp) throw err;
      const note = text("p", `${err.message}: waiting ${err.retryAfter} s`, "muted");
      note.id = "whatif-waiting";
      out.replaceChildren(note);
      await new Promise((resolve) => setTimeout(resolve, err.retryAfter * 1000));
      signal.throwIfAborted();
      out.replaceChildren(text("p", "simulating…", "muted"));
    }
  }
}

// A what-if's tables stop at WHATIF_ROWS rows, as `edgeplane simulate` prints them, and the
// map draws the arrows of the moves listed: losing a region of a large fleet moves thousands
// of replicas, which no one reads as rows or arrows (and the page would stall drawing them).
const WHATIF_ROWS = 50;

// The note under a table that lists the first WHATIF_ROWS of `count` rows, as the CLI says it.
function moreRows(count, what, id) {
  if (count <= WHATIF_ROWS) return [];
  const note = text("p", `... and ${count - WHATIF_ROWS} more${what} (edgeplane simulate -o json for all)`, "muted");
  note.id = id;
  return [note];
}

function card(label, value, bad) {
  const div = document.createElement("div");
  div.className = bad ? "card bad" : "card";
  div.appendChild(text("b", String(value)));
  div.appendChild(text("span", label));
  return div;
}

// Demand no replica serves and its share of all demand, as `edgeplane simulate` says it: "180 of 854 (21%)".
function unserved(m) {
  const total = m.demandRps;
  return total ? `${m.unservedRps} of ${total} (${Math.round(100 * m.unservedRps / total)}%)` : String(m.unservedRps);
}

function ms(x, m) { return m && !m.demand.length ? "no demand" : x === null || x === undefined ? "unserved" : `${x.toFixed(1)} ms`; }

// How a what-if was planned (the report's `method`), as `edgeplane simulate` says it.
const METHODS = {
  repair: "planned by repair: the plan in force repaired, as the next pass would, only the lost replicas moving",
  full: "planned in full: every deployment planned again (planner.plan), other replicas may move too",
};

function showReport(r) {
  const s = r.summary, b = r.before, a = r.after;
  const cards = document.createElement("div");
  cards.className = "cards";
  cards.id = "whatif-summary";
  cards.append(card("replicas moved", s.moved), card("no longer fit", s.unschedulableReplicas, s.unschedulableReplicas > 0),
    card("residency crossings", s.residencyCrossings, s.residencyCrossings > 0),
    card(`p50, unserved as slowest (today ${ms(b.latencyP50Ms, b)})`, ms(a.latencyP50Ms, a), a.latencyP50Ms === null && a.demand.length > 0),
    card(`p95, unserved as slowest (today ${ms(b.latencyP95Ms, b)})`, ms(a.latencyP95Ms, a), a.latencyP95Ms === null && a.demand.length > 0),
    card(`unserved rps (today ${unserved(b)})`, unserved(a), a.unservedRps > b.unservedRps),
    card(`gCO2/h (today ${Math.round(b.gramsCO2PerHour)})`, Math.round(a.gramsCO2PerHour)));
  const moves = document.createElement("table");
  moves.id = "whatif-moves";
  moves.appendChild(row([text("th", "deployment"), text("th", "from"), text("th", "to"), text("th", "variant")]));
  for (const m of r.moves.slice(0, WHATIF_ROWS)) moves.appendChild(row([text("td", m.deployment), text("td", m.from), text("td", m.to), text("td", m.variant)]));
  const parts = [text("h3", r.scenario), cards];
  if (r.method in METHODS) {  // a control plane before `method` says nothing of it
    const method = text("p", METHODS[r.method], "muted");
    method.id = "whatif-method";
    parts.push(method);
  }
  parts.push(text("h4", `Moves (${r.moves.length})`), moves, ...moreRows(r.moves.length, "", "whatif-moves-more"));
  if (r.unschedulable.length) {
    const t = document.createElement("table");
    t.appendChild(row([text("th", "deployment"), text("th", "placed/wanted"), text("th", "reason")]));
    for (const u of r.unschedulable.slice(0, WHATIF_ROWS)) {
      t.appendChild(row([text("td", u.deployment), text("td", `${u.placed}/${u.wanted}`), text("td", u.reason, "reason")]));
    }
    parts.push(text("h4", `Short of replicas (${r.unschedulable.length})`), t,
      ...moreRows(r.unschedulable.length, " deployments short", "whatif-short-more"));
  }
  $("whatif-result").replaceChildren(...parts);
}

function selectTab(name) {
  for (const b of document.querySelectorAll("#side nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== `tab-${name}`;
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  try { api.setToken(api.cleanToken($("token").value)); } catch (err) { showLogin(err.message); return; }
  start();
});
$("logout").addEventListener("click", () => { api.setToken(""); showLogin(""); });
$("residency-of").addEventListener("change", renderResidency);
$("sites-filter").addEventListener("input", () => renderSiteRows(siteViews()));
$("whatif-kind").addEventListener("change", () => fillWhatifTargets(siteViews()));
$("whatif-form").addEventListener("submit", runWhatif);
$("whatif-clear").addEventListener("click", () => { forgetWhatif(); render(); });
for (const b of document.querySelectorAll("#side nav button")) b.addEventListener("click", () => selectTab(b.dataset.tab));
start();

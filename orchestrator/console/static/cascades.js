// The Cascades tab: each deployment with spec.cascade as `edgeplane get cascades` shows it
// (GET /v1/cascades: requests, answers per stage, escalations, latency, energy), with what
// the deployment itself says of it: each stage's rule (when it hands a request to the next)
// and the sites it runs on, what it captures for distillation, and what it kept today
// against its daily cap. Everything is written as text: a rule holds what a manifest's
// author typed (an output's name, a refusal pattern).

// A stage on thousands of edge sites: its first few named, the count of the others.
const LISTED_SITES = 10;

function num(x, fmt) { return x === null || x === undefined ? "–" : fmt(x); }
const fixed2 = (x) => x.toFixed(2);
const percent = (x) => `${(x * 100).toFixed(1)}%`;
const sig = (digits) => (x) => String(Number(x.toPrecision(digits)));

// When a stage hands a request to the next, as its `escalate` says it.
function rule(escalate) {
  if (!escalate) return "answers what reaches it";
  const when = [];
  const c = escalate.confidence;
  if (c) when.push(`confidence below ${c.below} (${c.measure || "top"} of ${c.scores || "probabilities"}, output ${c.output})`);
  if (escalate.meanLogprobBelow !== undefined && escalate.meanLogprobBelow !== null) when.push(`mean token logprob below ${escalate.meanLogprobBelow}`);
  if (escalate.truncated) when.push("truncated (finish_reason length)");
  if (escalate.refusal && escalate.refusal.length) when.push(`answer matching ${escalate.refusal.map((p) => JSON.stringify(p)).join(", ")}`);
  if (escalate.maxInflight) when.push(`${escalate.maxInflight} requests in flight at its best replica`);
  return when.join(" or ") || "–";
}

function captures(capture) {
  if (!capture) return "captures nothing (no spec.cascade.capture)";
  const days = capture.retentionDays ?? 30;
  return `captures ${sig(4)(capture.sampleRate * 100)}% of requests, at most ${capture.dailyCap ?? 10000} a day per zone (UTC), `
    + `kept ${days} day${days === 1 ? "" : "s"}, in ${(capture.zones || []).join(", ")}`;
}

// What the cascade kept today against its dailyCap, by zone (GET /v1/cascades' `capture`):
// a zone at its cap keeps nothing more until the day resets (UTC midnight).
function today(count) {
  if (!count) return "";
  if (count.error) return `today: ${count.error}`;
  const zones = count.zones.map((z) => `${z.zone} ${z.captured.toLocaleString("en")} of ${count.dailyCap.toLocaleString("en")}`
    + (z.capped ? `, capture stopped until ${count.resetsAt}` : ""));
  return `today (${count.day}, UTC): ${zones.join("; ")}`;
}

function listed(sites) {
  if (!sites.length) return "no replica placed";
  const shown = sites.slice(0, LISTED_SITES).join(", ");
  return sites.length <= LISTED_SITES ? shown : `${shown}, … and ${(sites.length - LISTED_SITES).toLocaleString("en")} more`;
}

// What the tab shows of each cascade, decided from the API's answers alone: `cascades` (GET
// /v1/cascades' items), the deployments and the placement rows.
export function cascadeViews(cascades, deployments, placements) {
  const specs = new Map(deployments.map((d) => [d.metadata.name, d.spec.cascade]));
  const sites = new Map();  // "deployment\0variant" → its sites
  for (const p of placements) {
    const key = `${p.deployment}\u0000${p.variant}`;
    if (!sites.has(key)) sites.set(key, []);
    sites.get(key).push(p.site);
  }
  return cascades.map((c) => {
    const spec = specs.get(c.name);
    const stageSpec = new Map(((spec && spec.stages) || []).map((s) => [s.variant, s]));
    const causes = Object.entries(c.escalations || {}).map(([cause, n]) => `${cause} ${n}`).join(", ");
    return {
      name: c.name,
      figures: [c.model, String(c.requests), num(c.escalationRate, percent) + (causes ? ` (${causes})` : ""), String(c.notEscalated),
        String(c.failed ?? 0), num(c.meanLatencyMs, fixed2), num(c.meanAddedLatencyMs, fixed2), num(c.energyPerRequestJ, sig(4)),
        num(c.co2PerRequestG, sig(3))],
      stages: c.stages.map((variant) => [variant, listed([...new Set(sites.get(`${c.name}\u0000${variant}`) || [])].sort()),
        String((c.answered || {})[variant] ?? 0), spec ? rule(stageSpec.has(variant) ? stageSpec.get(variant).escalate : null) : "–"]),
      capture: spec ? captures(spec.capture) : "",
      today: today(c.capture),
    };
  });
}

function el(tag, value, cls) { const node = document.createElement(tag); if (value !== undefined) node.textContent = value; if (cls) node.className = cls; return node; }

function table(cls, head, rows, reasonFrom) {
  const t = el("table", undefined, cls);
  const tr = el("tr");
  for (const h of head) tr.appendChild(el("th", h));
  t.appendChild(tr);
  for (const cells of rows) {
    const r = el("tr");
    cells.forEach((value, i) => r.appendChild(el("td", value, i >= reasonFrom ? "reason" : undefined)));
    t.appendChild(r);
  }
  return t;
}

const FIGURES = ["model", "requests", "escalated", "not escalated", "failed", "mean ms", "added ms", "J/req", "gCO2/req"];

// Writes `views` into `container`, only when what they show changed (the page polls each second).
export function renderCascades(container, views) {
  const shown = JSON.stringify(views);
  if (container.dataset.shown === shown) return;
  container.dataset.shown = shown;
  if (!views.length) {
    const none = el("p", "No cascades (deployments with spec.cascade).", "muted");
    none.id = "cascades-none";
    container.replaceChildren(none);
    return;
  }
  container.replaceChildren(...views.map((v) => {
    const section = el("section", undefined, "cascade");
    section.dataset.cascade = v.name;
    section.append(el("h3", v.name), table("figures", FIGURES, [v.figures], 2),
      table("stages", ["stage", "sites", "answered", "escalates when"], v.stages, 1));
    if (v.capture) section.appendChild(el("p", v.capture, "capture muted"));
    if (v.today) section.appendChild(el("p", v.today, "capture-today"));
    return section;
  }));
}

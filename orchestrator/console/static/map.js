// The fleet map: Natural Earth country borders (vendored, offline) and the sites on top.
// Equirectangular projection scaled by the cosine of the middle latitude: enough for a
// continent, and a dozen lines instead of a projection library.
const SVG = "http://www.w3.org/2000/svg";

// Above this many sites the labels would cover one another, and rewriting thousands of SVG
// texts each poll (every rate changes under traffic) stalls the page for a second: the
// sites are drawn unlabelled, their name, replicas and requests in the tooltip.
const LABELLED_SITES = 250;

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

export class FleetMap {
  constructor(svg, world, isoCodes) {
    this.svg = svg;
    this.countries = topojson.feature(world, world.objects.countries).features
      .map((f) => ({ feature: f, alpha2: isoCodes[String(f.id).padStart(3, "0")] || null }));
    this.width = 1000;
    this.height = 700;
    svg.setAttribute("viewBox", `0 0 ${this.width} ${this.height}`);
    const defs = el("defs", {}, svg);
    const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "6", markerHeight: "6", orient: "auto-start-reverse" }, defs);
    el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#e8a317" }, marker);
    this.land = el("g", { class: "land" }, svg);
    this.moves = el("g", { class: "moves" }, svg);
    this.sitesLayer = el("g", { class: "sites" }, svg);
    this.siteNodes = new Map();  // site name → its <g> and parts, and what they show
    this.bounds = null;
  }

  fit(sites) {
    const lats = sites.map((s) => s.lat), lons = sites.map((s) => s.lon);
    if (!lats.length) { lats.push(35, 60); lons.push(-10, 30); }
    let [s, n, w, e] = [Math.min(...lats), Math.max(...lats), Math.min(...lons), Math.max(...lons)];
    const padLat = Math.max(3, (n - s) * 0.25), padLon = Math.max(5, (e - w) * 0.25);
    [s, n, w, e] = [s - padLat, n + padLat, w - padLon, e + padLon];
    const key = [s, n, w, e].map((x) => x.toFixed(2)).join();
    if (this.bounds && this.bounds.key === key) return false;
    const k = Math.cos(((s + n) / 2) * Math.PI / 180);
    const scale = Math.min(this.width / ((e - w) * k), this.height / (n - s));
    const cx = (w + e) / 2, cy = (s + n) / 2;
    this.bounds = { key, project: (lon, lat) => [this.width / 2 + (lon - cx) * k * scale, this.height / 2 - (lat - cy) * scale] };
    this.drawLand();
    return true;
  }

  drawLand() {
    this.land.replaceChildren();
    const project = this.bounds.project;
    for (const c of this.countries) {
      const g = c.feature.geometry;
      if (!g) continue;
      const polys = g.type === "Polygon" ? [g.coordinates] : g.coordinates;
      let d = "";
      for (const poly of polys) for (const ring of poly) {
        d += ring.map(([lon, lat], i) => { const [x, y] = project(lon, lat); return `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`; }).join("") + "Z";
      }
      const path = el("path", { d, class: "country" }, this.land);
      if (c.alpha2) path.dataset.country = c.alpha2;
      el("title", {}, path).textContent = c.feature.properties.name;
    }
  }

  shadeResidency(countries) {
    for (const path of this.land.children) path.classList.toggle("zone", countries.has(path.dataset.country));
  }

  // sites: [{name, lat, lon, health, error, ownedBy, scheduling, replicas, models, rate, failed}]. A fleet has thousands of
  // sites and this runs every poll: each site's <g> is kept by name and each of its parts is
  // written only when what it shows changed (with traffic, only the rate labels change), so a
  // poll that changes nothing writes nothing to the page.
  drawSites(sites) {
    this.fit(sites);
    const labelled = sites.length <= LABELLED_SITES;
    const project = this.bounds.project;
    const seen = new Set();
    for (const s of sites) {
      seen.add(s.name);
      let node = this.siteNodes.get(s.name);
      if (!node) {
        const g = el("g", { class: "site" }, this.sitesLayer);
        g.dataset.site = s.name;
        const shown = {};  // part → what it shows: a part is written only when that changes
        node = { g, circle: el("circle", {}, g), name: el("text", { class: "name" }, g), rate: el("text", { class: "rate" }, g),
                 title: el("title", {}, g), set: (part, value, write) => { if (shown[part] !== value) { shown[part] = value; write(); } } };
        this.siteNodes.set(s.name, node);
      }
      const [x, y] = project(s.lon, s.lat);
      const r = 6 + Math.min(10, 2 * s.replicas);
      const lx = (x + 4 + r).toFixed(1);
      node.set("geometry", [x.toFixed(1), y.toFixed(1), r].join(), () => {
        node.circle.setAttribute("cx", x.toFixed(1));
        node.circle.setAttribute("cy", y.toFixed(1));
        node.circle.setAttribute("r", String(r));
        for (const [t, dy] of [[node.name, 4], [node.rate, 16]]) { t.setAttribute("x", lx); t.setAttribute("y", (y + dy).toFixed(1)); }
      });
      node.set("state", [s.health, s.scheduling.state, s.replicas, s.failed].join(), () => {
        node.g.dataset.health = s.health;
        node.g.dataset.scheduling = s.scheduling.state;
        node.g.dataset.replicas = String(s.replicas);
        node.g.dataset.failed = s.failed ? "true" : "false";
      });
      const away = s.scheduling.state === "Schedulable" ? "" : ` · ${s.scheduling.state}`;
      const name = labelled ? `${s.name} (${s.replicas})${away}` : "";
      node.set("name", name, () => { node.name.textContent = name; });
      const requests = s.requests ? `${s.requests} req${s.rate ? `, ${s.rate.toFixed(1)}/s` : ""}` : "";
      const rate = labelled ? requests : "";
      node.set("rate", rate, () => { node.rate.textContent = rate; });
      const title = `${s.name} — ${s.tier}, ${s.country}${s.region ? " / " + s.region : ""}\nhealth: ${s.health}${s.ownedBy ? `\nowned by: ${s.ownedBy}` : ""}${s.error ? `\nerror: ${s.error}` : ""}\nreplicas: ${s.replicas}\n`
        + `models: ${s.models.join(", ") || "none"}${requests ? `\nrequests: ${requests}` : ""}`
        + s.scheduling.about.map((line) => `\n${line}`).join("");
      node.set("title", title, () => { node.title.textContent = title; });
    }
    for (const [name, node] of this.siteNodes) {
      if (!seen.has(name)) { node.g.remove(); this.siteNodes.delete(name); }
    }
  }

  // sitesByName: a Map of the sites drawn, by name.
  drawMoves(moves, sitesByName) {
    this.moves.replaceChildren();
    if (!this.bounds) return;
    const project = this.bounds.project;
    for (const m of moves) {
      const a = sitesByName.get(m.from), b = sitesByName.get(m.to);
      if (!a || !b) continue;
      const [x1, y1] = project(a.lon, a.lat), [x2, y2] = project(b.lon, b.lat);
      const mx = (x1 + x2) / 2 - (y2 - y1) * 0.15, my = (y1 + y2) / 2 + (x2 - x1) * 0.15;
      const path = el("path", { class: "move", d: `M${x1.toFixed(1)},${y1.toFixed(1)} Q${mx.toFixed(1)},${my.toFixed(1)} ${x2.toFixed(1)},${y2.toFixed(1)}` }, this.moves);
      path.dataset.from = m.from;
      path.dataset.to = m.to;
      el("title", {}, path).textContent = `${m.deployment}: ${m.from} → ${m.to} (${m.variant})`;
    }
  }
}

// tally live dashboard: lays out the panels the worker lists, polls each panel's data and draws it (Chart.js).
// State for tests and curious humans: window.tally = {ready, updates, filterKey, points, values, series, errors}.
"use strict";

(() => {
  const PALETTE = ["#3d5afe", "#12b76a", "#f79009", "#7a5af8", "#ee46bc", "#06aed4", "#ef6820", "#66c61c",
    "#2e90fa", "#f63d68", "#875bf7", "#98a2b3"];
  const SERIES_COLORS = { input: "#2e90fa", output: "#12b76a", cache_read: "#06aed4", cache_write: "#7a5af8",
    tools: "#f79009", reasoning: "#ee46bc", "(unattributed)": "#98a2b3" };
  const LABELS = {
    spend_usd: "Spend", requests: "Requests", wasted_usd: "Retry waste", waste_pct: "Waste share",
    unattributed_usd: "Unattributed", unattributed_pct: "Unattributed share", daily_avg_7d_usd: "7-day avg per day",
    reasoning_share_pct: "Reasoning share", reasoning_usd: "Reasoning spend", cache_read: "cache read",
    cache_write: "cache write", usd_per_min: "USD/min", wasted_usd_per_min: "wasted USD/min",
  };
  const RANGE_LABELS = { "15m": "Last 15 minutes", "1h": "Last hour", "6h": "Last 6 hours", "24h": "Last 24 hours",
    "7d": "Last 7 days", "30d": "Last 30 days" };
  const FILTERS = ["range", "team", "environment"];

  const tally = (window.tally = { ready: false, updates: 0, filterKey: "", points: {}, values: {}, series: {},
    errors: {} });
  const charts = {};
  const cards = {};
  let meta = null;
  let running = false;
  let again = false;

  const label = (name) => LABELS[name] || name.replace(/_/g, " ");
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  function usd(v) {
    const a = Math.abs(v);
    const digits = a === 0 || a >= 100 ? 2 : a >= 1 ? 2 : a >= 0.01 ? 4 : 6;
    return "$" + v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: digits });
  }

  function fmt(v, unit) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    switch (unit) {
      case "usd": return usd(v);
      case "usd_per_min": return usd(v) + "/min";
      case "usd_per_hour": return usd(v) + "/h";
      case "pct": return v.toFixed(v < 10 ? 2 : 1) + " %";
      case "count": return Math.round(v).toLocaleString("en-US");
      default: return String(v);
    }
  }

  const unitOf = (panel, column) => (panel.units && panel.units[column]) || panel.unit;

  function fmtTime(ms, spanMs) {
    const d = new Date(ms);
    const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return spanMs > 36 * 3600e3 ? d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + hm : hm;
  }

  function filterParams() {
    const p = new URLSearchParams();
    for (const f of FILTERS) {
      const v = document.getElementById("f-" + f).value;
      if (v) p.set(f, v);
    }
    return p;
  }

  // The API token (when the worker requires one): opened as /dashboard/#token=…, kept for this tab only and taken
  // out of the address bar so it is not bookmarked or shared.
  const apiToken = (() => {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem("tally.token", decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem("tally.token") || "";
  })();

  async function getJSON(url) {
    const headers = apiToken ? { Authorization: "Bearer " + apiToken } : {};
    const r = await fetch(url, { cache: "no-store", headers });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }

  // ------------------------------------------------------------------ layout
  function fillSelect(select, values, allLabel) {
    const keep = select.value;
    select.replaceChildren(el("option", "", allLabel));
    select.firstChild.value = "";
    for (const v of values) {
      const o = el("option", "", v);
      o.value = v;
      select.appendChild(o);
    }
    select.value = values.includes(keep) ? keep : "";
  }

  function setupFilters() {
    const range = document.getElementById("f-range");
    for (const r of meta.ranges) {
      const o = el("option", "", RANGE_LABELS[r] || r);
      o.value = r;
      range.appendChild(o);
    }
    const initial = new URLSearchParams(window.location.search);
    range.value = meta.ranges.includes(initial.get("range")) ? initial.get("range") : meta.default_range;
    fillSelect(document.getElementById("f-team"), meta.filters.team || [], "All teams");
    fillSelect(document.getElementById("f-environment"), meta.filters.environment || [], "All environments");
    for (const f of ["team", "environment"]) {
      const s = document.getElementById("f-" + f);
      if ((meta.filters[f] || []).includes(initial.get(f))) s.value = initial.get(f);
    }
    for (const f of FILTERS) {
      document.getElementById("f-" + f).addEventListener("change", () => {
        const q = filterParams().toString();
        window.history.replaceState(null, "", q ? "?" + q : window.location.pathname);
        refresh();
      });
    }
  }

  const KPIS = [
    { name: "Spend", col: "spend_usd", unit: "usd" },
    { name: "Logical requests", col: "requests", unit: "count" },
    { name: "Retry waste", col: "wasted_usd", unit: "usd", note: "waste_pct" },
    { name: "Unattributed", col: "unattributed_usd", unit: "usd", note: "unattributed_pct" },
    { name: "Open anomalies", id: "anomalies" },
    { name: "Budgets ≥ 80 %", id: "budgets" },
  ];

  function setupLayout() {
    const kpis = document.getElementById("kpis");
    for (const k of KPIS) {
      const c = el("div", "kpi");
      c.dataset.kpi = k.col || k.id;
      c.append(el("div", "name", k.name), el("div", "value", "–"), el("div", "note", ""));
      kpis.appendChild(c);
    }
    const grid = document.getElementById("grid");
    for (const p of meta.panels) {
      if (p.kind === "stat") continue;
      const card = el("article", "card");
      card.id = "panel-" + p.id;
      card.dataset.panel = p.id;
      card.dataset.points = "0";
      card.style.gridColumn = "span " + p.width;
      const body = p.kind === "timeseries" || p.kind === "bar" ? el("div", "chart-box") : el("div", "body");
      if (body.className === "chart-box") body.appendChild(el("canvas"));
      card.append(el("h2", "", p.title), el("p", "desc", p.description), body, el("div", "error"));
      grid.appendChild(card);
      cards[p.id] = card;
    }
  }

  // ------------------------------------------------------------------ drawing
  const countValues = (series) => series.reduce((n, s) => n + s.values.filter((v) => v !== null).length, 0);

  function drawKpis(panel, data) {
    tally.values.totals = data.values;
    for (const k of KPIS.filter((k) => k.col)) {
      const c = document.querySelector(`[data-kpi="${k.col}"]`);
      const v = data.values[k.col];
      c.querySelector(".value").textContent = fmt(v, k.unit);
      c.dataset.value = String(v);
      c.querySelector(".note").textContent = k.note ? fmt(data.values[k.note], "pct") + " of spend" : "in range";
    }
    return Object.keys(data.values).length;
  }

  function chartOptions(panel, extra) {
    return Object.assign({
      responsive: true, maintainAspectRatio: false, animation: false,
      interaction: { mode: "index", intersect: false },
      plugins: {
        legend: { position: "bottom", labels: { usePointStyle: true, boxWidth: 10, boxHeight: 10, font: { size: 12 } } },
        tooltip: { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${fmt(ctx.parsed[extra.valueAxis], ctx.dataset.unit)}` } },
      },
    }, extra.options);
  }

  // Time ticks on round local minutes, hours or days: at most ~7 across the range.
  const TICK_MINUTES = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10080];
  function timeTicks(from, to) {
    const step = 60e3 * (TICK_MINUTES.find((m) => (to - from) / (m * 60e3) <= 7) || 10080);
    const offset = -new Date(from).getTimezoneOffset() * 60e3;
    const ticks = [];
    for (let t = Math.ceil((from + offset) / step) * step - offset; t <= to; t += step) ticks.push({ value: t });
    return ticks;
  }

  function drawTimeseries(panel, data, box, from, to) {
    const span = to - from;
    const datasets = data.series.map((s, i) => {
      const apart = panel.apart.includes(s.name);
      const color = SERIES_COLORS[s.name] || PALETTE[i % PALETTE.length];
      return {
        label: label(s.name), unit: panel.unit, data: data.x.map((x, j) => ({ x, y: s.values[j] })),
        borderColor: color, backgroundColor: apart ? color : color + "59", borderWidth: apart ? 2.5 : 1.5,
        borderDash: apart ? [6, 4] : [], fill: panel.stacked && !apart ? (i === 0 ? "origin" : "stack") : false,
        stack: apart ? "apart" : "main", pointRadius: data.x.length < 3 ? 3 : 0, cubicInterpolationMode: "monotone", order: apart ? 0 : 1,
        pointStyle: apart ? "line" : "rect",
      };
    });
    const yTitle = { usd_per_min: "USD per minute", pct: "% of spend", usd: "USD" }[panel.unit] || "";
    const options = chartOptions(panel, { valueAxis: "y", options: {
      scales: {
        x: { type: "linear", min: from, max: to, grid: { display: false },
          afterBuildTicks: (axis) => { axis.ticks = timeTicks(from, to); },
          ticks: { maxRotation: 0, callback: (v) => fmtTime(v, span) } },
        y: { stacked: panel.stacked, beginAtZero: true, title: { display: !!yTitle, text: yTitle },
          ticks: { callback: (v) => (panel.unit === "pct" ? v + " %" : usd(v)) } },
      },
    } });
    options.plugins.tooltip.callbacks.title = (items) => items.length ? fmtTime(items[0].parsed.x, 0) : "";
    render(panel.id, box, { type: "line", data: { datasets }, options });
    tally.series[panel.id] = data.series.map((s) => s.name);
    return countValues(data.series);
  }

  function drawBars(panel, data, box) {
    const labels = data.labels.map((l, i) => (data.extra[i].team ? `${l} (${data.extra[i].team})` : l));
    const datasets = data.series.map((s, i) => ({
      label: label(s.name), unit: unitOf(panel, s.name), data: s.values, borderRadius: 3,
      backgroundColor: i === 0 ? PALETTE[0] : "#a4bcfd", maxBarThickness: 18,
    }));
    const options = chartOptions(panel, { valueAxis: "x", options: {
      indexAxis: "y",
      scales: {
        x: { beginAtZero: true, ticks: { callback: (v) => (panel.unit === "pct" ? v + " %" : usd(v)) } },
        y: { grid: { display: false }, ticks: { autoSkip: false, font: { size: 11 } } },
      },
    } });
    options.plugins.legend.display = datasets.length > 1;
    options.plugins.tooltip.callbacks.afterBody = (items) => {
      const extra = items.length ? data.extra[items[0].dataIndex] : {};
      return Object.entries(extra).filter(([k]) => k !== panel.label_column && k !== "team")
        .map(([k, v]) => `${label(k)}: ${fmt(v, unitOf(panel, k))}`);
    };
    render(panel.id, box, { type: "bar", data: { labels, datasets }, options });
    tally.series[panel.id] = data.labels;
    return data.labels.length;
  }

  function render(id, box, config) {
    const chart = charts[id];
    if (chart && chart.config.type === config.type) {
      chart.data = config.data;
      chart.options = config.options;
      chart.update("none");
    } else {
      if (chart) chart.destroy();
      charts[id] = new Chart(box.querySelector("canvas"), config);
    }
  }

  function drawAnomalies(panel, data, body) {
    const i = Object.fromEntries(data.columns.map((c, n) => [c, n]));
    body.replaceChildren();
    setKpi("anomalies", data.rows.length, data.rows.length ? "firing now" : "all quiet", data.rows.length > 0);
    if (!data.rows.length) {
      body.appendChild(el("div", "empty", "No open anomalies at the end of this range."));
      return 0;
    }
    const table = el("table", "rows anomalies");
    const head = el("tr");
    for (const h of ["Since", "Feature", "Signal", "Value vs baseline", "Why"]) head.appendChild(el("th", "", h));
    table.appendChild(head);
    const num = (v) => Number(v).toPrecision(3);
    for (const r of data.rows) {
      const tr = el("tr");
      const feature = el("td", "", r[i.feature_id]);
      if (r[i.team_id]) feature.append(el("div", "sub", r[i.team_id]));
      const signal = el("td", "", r[i.signal] + " ");
      signal.append(el("span", "sev " + r[i.severity], r[i.severity]));
      if (r[i.dimension]) signal.append(el("div", "sub", `${r[i.dimension]} ${r[i.dimension_value]}`));
      tr.append(el("td", "", fmtTime(Date.parse(r[i.started_at]), 0)), feature, signal,
        el("td", "num", `${num(r[i.value])} vs ${num(r[i.baseline])}`), el("td", "why", r[i.explanation]));
      table.appendChild(tr);
    }
    body.appendChild(table);
    return data.rows.length;
  }

  function drawBudgets(panel, data, body) {
    body.replaceChildren();
    const budgets = data.budgets;
    setKpi("budgets", budgets.filter((b) => b.used_pct !== null && b.used_pct >= 80).length,
      budgets.length ? `of ${budgets.length} budgets` : "no budgets loaded", budgets.some((b) => b.used_pct >= 100));
    if (!budgets.length) {
      body.appendChild(el("div", "empty", "No budgets loaded (tally reference load …): spend so far this month."));
      const t = el("table", "rows");
      const head = el("tr");
      for (const h of ["Scope", "Id", "Today", "This month", "Burn"]) head.appendChild(el("th", "", h));
      t.appendChild(head);
      for (const r of data.spend.rows) {
        const tr = el("tr");
        tr.append(el("td", "", r[0]), el("td", "", r[1]), el("td", "num", usd(r[2])), el("td", "num", usd(r[3])),
          el("td", "num", fmt(r[4], "usd_per_hour")));
        t.appendChild(tr);
      }
      body.appendChild(t);
      return data.spend.rows.length;
    }
    const list = el("div", "budgets");
    for (const b of budgets) {
      const row = el("div", "budget");
      const head = el("div", "head");
      const who = el("span", "who", `${b.id} `);
      who.appendChild(el("small", "", `${b.scope} · ${b.period === "day" ? "daily" : "monthly"}`));
      head.append(who, el("span", "amt", `${usd(b.spent_usd)} of ${usd(b.budget_usd)} · ${fmt(b.used_pct, "pct")}`));
      const bar = el("div", "bar");
      const fill = el("div", "fill" + (b.used_pct >= 100 ? " over" : b.used_pct >= 80 ? " warn" : ""));
      fill.style.width = `max(${b.spent_usd > 0 ? 3 : 0}px, ${Math.min(100, b.used_pct || 0)}%)`;
      bar.appendChild(fill);
      for (const t of b.thresholds.filter((t) => t < 100)) {
        const tick = el("div", "tick");
        tick.style.left = t + "%";
        bar.appendChild(tick);
      }
      const foot = el("div", "foot", `burn ${fmt(b.burn_usd_per_hour, "usd_per_hour")} · gateway advice: `);
      foot.appendChild(el("span", "advice " + b.recommendation, b.recommendation || "–"));
      row.append(head, bar, foot);
      list.appendChild(row);
    }
    body.appendChild(list);
    return budgets.length;
  }

  function setKpi(id, value, note, alert) {
    const c = document.querySelector(`[data-kpi="${id}"]`);
    c.querySelector(".value").textContent = String(value);
    c.querySelector(".note").textContent = note;
    c.dataset.value = String(value);
    c.classList.toggle("alert", !!alert);
  }

  function draw(panel, out) {
    const data = out.data;
    if (panel.kind === "stat") return drawKpis(panel, data);
    const card = cards[panel.id];
    const box = card.querySelector(".chart-box, .body");
    const from = Date.parse(out.from);
    const to = Date.parse(out.to);
    if (panel.kind === "timeseries") return drawTimeseries(panel, data, box, from, to);
    if (panel.kind === "bar") return drawBars(panel, data, box);
    if (panel.kind === "budget") return drawBudgets(panel, data, box);
    return drawAnomalies(panel, data, box);
  }

  // ------------------------------------------------------------------ polling
  async function load(panel, key) {
    const card = cards[panel.id];
    try {
      const out = await getJSON(`/api/panels/${panel.id}?${key}`);
      if (key !== filterParams().toString()) return false;  // the filters changed meanwhile: drawn next round
      const n = draw(panel, out);
      tally.points[panel.id] = n;
      delete tally.errors[panel.id];
      if (card) {
        card.dataset.points = String(n);
        card.querySelector(".error").textContent = "";
      }
      return true;
    } catch (err) {
      tally.errors[panel.id] = String(err.message || err);
      if (card) card.querySelector(".error").textContent = "Could not load: " + tally.errors[panel.id];
      return false;
    }
  }

  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        const key = filterParams().toString();
        const done = await Promise.all(meta.panels.map((p) => load(p, key)));
        if (key === filterParams().toString()) {
          tally.filterKey = key;
          tally.updates += 1;
          tally.ready = done.every(Boolean);
        }
      } while (again);
      const status = document.getElementById("status");
      const failed = Object.keys(tally.errors).length;
      status.className = "status " + (failed ? "error" : "live");
      document.getElementById("status-text").textContent = (failed ? `${failed} panel(s) failing · ` : "live · ") +
        "updated " + new Date().toLocaleTimeString();
    } finally {
      running = false;
    }
  }

  async function refreshFilterValues() {
    try {
      const fresh = await getJSON("/api/panels");
      fillSelect(document.getElementById("f-team"), fresh.filters.team || [], "All teams");
      fillSelect(document.getElementById("f-environment"), fresh.filters.environment || [], "All environments");
    } catch (err) {
      // The next panel refresh shows the problem; the drop-downs keep their values.
    }
  }

  async function start() {
    try {
      meta = await getJSON("/api/panels");
    } catch (err) {
      document.getElementById("status").className = "status error";
      document.getElementById("status-text").textContent = "cannot reach the worker: " + err.message;
      window.setTimeout(start, 3000);
      return;
    }
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.color = "#475467";
    Chart.defaults.borderColor = "#eaecf0";
    setupFilters();
    setupLayout();
    await refresh();
    window.setInterval(refresh, meta.refresh_s * 1000);
    window.setInterval(refreshFilterValues, 30000);
  }

  start();
})();

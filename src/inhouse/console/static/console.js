// The inhouse console: plain browser JavaScript, no framework. Every call goes to the server's own
// APIs with the key (if any) in the Authorization header; the server checks every one of them.
"use strict";

(() => {
  const KEY_SLOT = "inhouse.console.key";
  const NOTICE_SLOT = "inhouse.console.notice";  // why the last session ended, shown at the next sign-in
  const $ = (sel) => document.querySelector(sel);
  const TRITON_KEYS = new Set(["platform", "max_batch_size", "input", "output", "instance_group", "dynamic_batching",
    "model_transaction_policy"]);
  const state = { session: null, tab: null, timers: [], metrics: [], configs: new Map() };

  // ---- helpers ------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
    return node;
  }
  function show(node, on) { node.hidden = !on; }
  function message(node, text) { node.textContent = text || ""; show(node, Boolean(text)); }
  function fmtTime(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }
  function fmtNum(x, digits = 1) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    return Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(digits);
  }
  function localToUnix(value) { return value ? String(new Date(value).getTime() / 1000) : ""; }

  class ApiError extends Error {
    constructor(status, text) { super(text); this.status = status; }
  }

  function apiKey() { return sessionStorage.getItem(KEY_SLOT); }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", "Bearer " + key);
    if (options.json !== undefined) {
      headers.set("Content-Type", "application/json");
      options = { ...options, body: JSON.stringify(options.json) };
    }
    const res = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
    if (!res.ok) {
      let text = res.status + " " + res.statusText;
      try {
        const doc = await res.json();
        text = (doc.error && (doc.error.message || doc.error)) || doc.message || text;
      } catch (_) { /* not JSON */ }
      if (res.status === 401 && state.session && !options.raw) signOut("Your key was refused: " + text);
      throw new ApiError(res.status, String(text));
    }
    return options.raw ? res : res.json();
  }

  function every(ms, fn) {
    fn();
    state.timers.push(setInterval(fn, ms));
  }
  function stopTimers() { state.timers.forEach(clearInterval); state.timers = []; }

  // ---- session and tabs ----------------------------------------------------------------------
  async function start() {
    $("#login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY_SLOT, $("#api-key").value.trim());
      $("#api-key").value = "";
      await openSession();
    });
    $("#sign-out").addEventListener("click", () => signOut(""));
    for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => openTab(b.dataset.tab));
    wireModels(); wirePlayground(); wireKeys(); wireAudit();
    $("#doctor-run").addEventListener("click", loadDoctor);
    await openSession();
  }

  async function openSession() {
    let session;
    try {
      session = await api("/console/api/session", { raw: false });
    } catch (err) {
      const hadKey = Boolean(apiKey());
      sessionStorage.removeItem(KEY_SLOT);
      state.session = null;
      const notice = sessionStorage.getItem(NOTICE_SLOT);
      sessionStorage.removeItem(NOTICE_SLOT);
      showLogin(err.status === 401 ? (hadKey ? "The key was refused: " + err.message : notice || "") : err.message);
      return;
    }
    state.session = session;
    show($("#login"), false);
    message($("#login-error"), "");
    const allowed = [];
    for (const b of document.querySelectorAll("#tabs button")) {
      const needs = b.dataset.needs;
      const ok = session.scopes.includes(b.dataset.scope) && (needs !== "auth" || session.auth)
        && (needs !== "audit" || session.audit);
      if (ok) allowed.push(b.dataset.tab); else b.remove();
    }
    show($("#tabs"), true);
    show($("#who"), true);
    $("#who-text").textContent = session.auth
      ? `key ${session.key.name} (${session.key.key_id}) · ${session.scopes.join(", ")}`
      : "no authentication (loopback)";
    show($("#sign-out"), session.auth);
    if (!allowed.length) { message($("#banner"), "This key has no scope the console can use."); return; }
    const wanted = location.hash.slice(1);
    openTab(allowed.includes(wanted) ? wanted : allowed[0]);
  }

  function showLogin(error) {
    stopTimers();
    show($("#tabs"), false); show($("#who"), false);
    document.querySelectorAll(".view").forEach((v) => show(v, false));
    show($("#login"), true);
    message($("#login-error"), error);
    $("#api-key").focus();
  }

  function signOut(reason) {
    sessionStorage.removeItem(KEY_SLOT);
    if (reason) sessionStorage.setItem(NOTICE_SLOT, reason);
    history.replaceState(null, "", location.pathname);
    location.reload();
  }

  function openTab(name) {
    stopTimers();
    state.tab = name;
    if (location.hash.slice(1) !== name) history.replaceState(null, "", "#" + name);
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
    document.querySelectorAll(".view").forEach((v) => show(v, v.id === "view-" + name));
    message($("#banner"), "");
    const open = { models: () => every(3000, loadModels), metrics: () => every(2000, loadMetrics),
      playground: loadPlayground, keys: loadKeys, audit: loadAudit, doctor: loadDoctor }[name];
    open();
  }

  function failed(err) { message($("#banner"), err.message); }

  // ---- models --------------------------------------------------------------------------------
  function wireModels() {}

  async function loadModels() {
    let index;
    try { index = await api("/v2/repository/index", { method: "POST", json: {} }); } catch (e) { failed(e); return; }
    const body = $("#models-table tbody");
    body.replaceChildren(...index.map(modelRow));
    $("#models-updated").textContent = "updated " + new Date().toLocaleTimeString();
    await Promise.all(index.filter((e) => e.state === "READY").map((e) => modelConfig(e.name, e.version)));
  }

  function modelRow(e) {
    const cfgKey = e.name + "/" + (e.version || "");
    const cfg = state.configs.get(cfgKey);
    const busy = (b) => { b.disabled = true; };
    const act = (label, fn) => el("button", { type: "button", "data-action": label.toLowerCase(), onclick: (ev) => {
      busy(ev.target); fn().catch(failed).finally(loadModels);
    } }, label);
    const serving = e.state === "READY" || e.state === "LOADING";
    return el("tr", { "data-model": e.name, "data-version": e.version || "" },
      el("td", {}, e.name), el("td", {}, e.version || "–"),
      el("td", {}, el("span", { class: "state state-" + e.state }, e.state)),
      el("td", {}, e.reason || ""), el("td", {}, e.code !== undefined ? String(e.code) : ""),
      el("td", { class: "backend" }, cfg ? cfg.backend || "" : ""),
      el("td", { class: "device" }, cfg ? deviceOf(cfg) : ""),
      el("td", { class: "actions" },
        serving ? act("Unload", () => api(`/v2/repository/models/${encodeURIComponent(e.name)}/unload`,
          { method: "POST", json: {} })) : act("Load", () => load(e.name)),
        serving ? act("Reload", () => load(e.name)) : "",
        e.state === "READY" ? el("button", { type: "button", onclick: () => showConfig(e.name, e.version) }, "model.yaml")
          : ""));
  }

  function load(name) {
    return api(`/v2/repository/models/${encodeURIComponent(name)}/load`, { method: "POST", json: {} });
  }

  function deviceOf(cfg) {
    const inst = cfg.instances || {};
    return inst.device || (cfg.gpu ? "cuda" : "cpu");
  }

  async function modelConfig(name, version) {
    const cfgKey = name + "/" + (version || "");
    if (state.configs.has(cfgKey)) return state.configs.get(cfgKey);
    const path = `/v2/models/${encodeURIComponent(name)}` + (version ? `/versions/${version}` : "") + "/config";
    try {
      const cfg = await api(path);
      state.configs.set(cfgKey, cfg);
      const row = document.querySelector(`#models-table tr[data-model="${CSS.escape(name)}"][data-version="${version || ""}"]`);
      if (row) { row.querySelector(".backend").textContent = cfg.backend || ""; row.querySelector(".device").textContent = deviceOf(cfg); }
      return cfg;
    } catch (_) { return null; }
  }

  async function showConfig(name, version) {
    const cfg = await modelConfig(name, version);
    $("#model-config-name").textContent = name + (version ? " v" + version : "");
    // the config endpoint adds Triton's keys for Triton clients; the console shows the model.yaml fields
    const spec = cfg ? Object.fromEntries(Object.entries(cfg).filter(([k]) => !TRITON_KEYS.has(k))) : null;
    $("#model-config-text").textContent = spec ? toYaml(spec) : "(not available: the model is not serving)";
    show($("#model-config"), true);
  }

  function toYaml(value, indent = "") {
    const scalar = (v) => (v === null ? "null" : typeof v === "string"
      ? (/^[\w./@:+-][\w ./@:+-]*$/.test(v) && !/^(true|false|null|[\d.+-]+)$/.test(v) ? v : JSON.stringify(v))
      : String(v));
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      return value.map((v) => {
        if (v !== null && typeof v === "object") {
          const inner = toYaml(v, indent + "  ");
          return indent + "- " + inner.trimStart();
        }
        return indent + "- " + scalar(v);
      }).join("\n");
    }
    if (value !== null && typeof value === "object") {
      const keys = Object.keys(value);
      if (!keys.length) return "{}";
      return keys.map((k) => {
        const v = value[k];
        if (v !== null && typeof v === "object" && (Array.isArray(v) ? v.length : Object.keys(v).length)) {
          return indent + k + ":\n" + toYaml(v, indent + "  ");
        }
        return indent + k + ": " + (v !== null && typeof v === "object" ? (Array.isArray(v) ? "[]" : "{}") : scalar(v));
      }).join("\n");
    }
    return indent + scalar(value);
  }

  // ---- metrics -------------------------------------------------------------------------------
  function quantile(prev, cur, q) {
    // from the bucket counts added between two snapshots; linear inside a bucket
    const b = cur.buckets.map(([le, n], i) => [le, n - ((prev && prev.buckets[i]) ? prev.buckets[i][1] : 0)]);
    const total = b.length ? b[b.length - 1][1] : 0;
    if (total <= 0) return null;
    const rank = q * total;
    let lower = 0, below = 0;
    for (const [le, n] of b) {
      if (n >= rank) {
        if (le === null) return lower;
        const inBucket = n - below;
        return inBucket > 0 ? lower + (le - lower) * ((rank - below) / inBucket) : le;
      }
      lower = le === null ? lower : le; below = n;
    }
    return lower;
  }

  async function loadMetrics() {
    let snap;
    try { snap = await api("/console/api/metrics"); } catch (e) { failed(e); return; }
    const hist = state.metrics;
    hist.push(snap);
    if (hist.length > 61) hist.shift();
    const prev = hist.length > 1 ? hist[hist.length - 2] : null;
    const point = derive(prev, snap);
    snap.derived = point;
    const series = hist.filter((s) => s.derived && s.derived.dt);
    const cards = [
      ["Requests / s", fmtNum(point.rps)], ["Inference requests", String(snap.inference.requests)],
      ["Error rate", point.errorRate === null ? "–" : fmtNum(point.errorRate) + " %"],
      ["p50", ms(point.p50)], ["p95", ms(point.p95)], ["p99", ms(point.p99)],
      ["Queue depth", String(snap.queue_depth)], ["In flight", String(snap.inflight)],
      ["Mean batch size", fmtNum(point.batch)],
      ["Tokens / s", fmtNum(point.tokensPerS)], ["TTFT p50", ms(point.ttft)],
      ["CPU", point.cpu === null ? "–" : fmtNum(point.cpu) + " %"],
      ["Resident memory", fmtNum(snap.process.resident_memory_bytes / 1048576, 0) + " MiB"],
      ["System memory free", fmtNum(snap.process.system_memory_available_bytes / 1073741824) + " GiB"],
    ];
    $("#metric-cards").replaceChildren(...cards.map(([label, value]) => el("div", { class: "card", "data-metric": label },
      el("div", { class: "label" }, label), el("div", { class: "value" }, value))));
    chart("#chart-rps", series, [(s) => s.derived.rps]);
    chart("#chart-latency", series, [(s) => toMs(s.derived.p50), (s) => toMs(s.derived.p95), (s) => toMs(s.derived.p99)]);
    chart("#chart-errors", series, [(s) => s.derived.errorRate]);
    chart("#chart-cpu", series, [(s) => s.derived.cpu]);
    chart("#chart-ram", series, [(s) => s.process.resident_memory_bytes / 1048576]);
    chart("#chart-queue", series, [(s) => s.queue_depth]);
    bars("#chart-batches", snap.batch_size.buckets);
    const rows = [];
    for (const [status, n] of Object.entries(snap.http.by_status)) {
      if (Number(status) >= 400) rows.push(el("tr", {}, el("td", {}, "HTTP status"), el("td", {}, status), el("td", {}, String(n))));
    }
    for (const [code, n] of Object.entries(snap.inference.errors_by_code)) {
      rows.push(el("tr", {}, el("td", {}, "inhouse error"), el("td", {}, code), el("td", {}, String(n))));
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 3, class: "muted" }, "No errors.")));
    $("#errors-table tbody").replaceChildren(...rows);
    $("#metrics-updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function toMs(s) { return s === null || s === undefined ? null : s * 1000; }
  function ms(s) { return s === null || s === undefined ? "–" : fmtNum(s * 1000, 2) + " ms"; }

  function derive(prev, cur) {
    const p = { dt: 0, rps: null, errorRate: null, p50: null, p95: null, p99: null, batch: null, tokensPerS: null,
      ttft: null, cpu: null };
    if (!prev) return p;
    const dt = cur.time - prev.time;
    if (dt <= 0) return p;
    const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);
    const errors = (s) => sum(Object.fromEntries(Object.entries(s.http.by_status).filter(([k]) => Number(k) >= 400)));
    const dReq = cur.http.requests - prev.http.requests;
    p.dt = dt;
    p.rps = dReq / dt;
    p.errorRate = dReq > 0 ? 100 * (errors(cur) - errors(prev)) / dReq : 0;
    p.p50 = quantile(prev.latency, cur.latency, 0.5);
    p.p95 = quantile(prev.latency, cur.latency, 0.95);
    p.p99 = quantile(prev.latency, cur.latency, 0.99);
    const dBatches = cur.batch_size.count - prev.batch_size.count;
    p.batch = dBatches > 0 ? (cur.batch_size.sum - prev.batch_size.sum) / dBatches : null;
    p.tokensPerS = (cur.llm.completion_tokens - prev.llm.completion_tokens) / dt;
    p.ttft = quantile(prev.llm.ttft, cur.llm.ttft, 0.5);
    p.cpu = 100 * (cur.process.cpu_seconds - prev.process.cpu_seconds) / dt;
    return p;
  }

  function chart(sel, points, lines) {
    const svg = $(sel);
    const NS = "http://www.w3.org/2000/svg";
    const W = 300, H = 100, L = 28, B = 12;
    const values = lines.map((f) => points.map((s) => f(s)));
    const max = Math.max(0, ...values.flat().filter((v) => v !== null && Number.isFinite(v)));
    const top = max > 0 ? niceMax(max) : 1;
    const nodes = [];
    const line = (x1, y1, x2, y2, cls) => {
      const n = document.createElementNS(NS, "line");
      Object.entries({ x1, y1, x2, y2, class: cls }).forEach(([k, v]) => n.setAttribute(k, v));
      return n;
    };
    const text = (x, y, t) => {
      const n = document.createElementNS(NS, "text");
      n.setAttribute("x", x); n.setAttribute("y", y); n.setAttribute("class", "tick"); n.textContent = t;
      return n;
    };
    for (const f of [0, 0.5, 1]) {
      const y = H - B - f * (H - B - 4);
      nodes.push(line(L, y, W, y, "axis"), text(0, y + 2, fmtNum(top * f)));
    }
    const n = 60;
    values.forEach((vals, i) => {
      const pts = [];
      vals.forEach((v, j) => {
        if (v === null || !Number.isFinite(v)) return;
        const x = L + (W - L) * ((n - (vals.length - 1 - j)) / n);
        const y = H - B - (v / top) * (H - B - 4);
        pts.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      const pl = document.createElementNS(NS, "polyline");
      pl.setAttribute("points", pts.join(" "));
      pl.setAttribute("class", "s" + i);
      nodes.push(pl);
    });
    nodes.push(text(L, H - 1, "−2 min"), text(W - 18, H - 1, "now"));
    svg.replaceChildren(...nodes);
  }

  function bars(sel, buckets) {
    // cumulative histogram buckets → calls per bucket, one bar each (empty top buckets left out beyond the sixth)
    const NS = "http://www.w3.org/2000/svg";
    const counts = buckets.map(([le, n], i) => [le, n - (i ? buckets[i - 1][1] : 0)]);
    while (counts.length > 6 && counts[counts.length - 1][1] === 0) counts.pop();
    const top = niceMax(Math.max(1, ...counts.map(([, n]) => n)));
    const W = 300, H = 100, L = 28, B = 12, w = (W - L) / Math.max(counts.length, 1);
    const nodes = [];
    counts.forEach(([le, n], i) => {
      const h = (n / top) * (H - B - 4);
      const r = document.createElementNS(NS, "rect");
      Object.entries({ x: L + i * w + 1, y: H - B - h, width: Math.max(w - 2, 1), height: h, class: "bar" })
        .forEach(([k, v]) => r.setAttribute(k, v));
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", L + i * w + 2); t.setAttribute("y", H - 2); t.setAttribute("class", "tick");
      t.textContent = le === null ? "more" : "≤" + le;
      nodes.push(r, t);
    });
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", 0); t.setAttribute("y", 8); t.setAttribute("class", "tick"); t.textContent = fmtNum(top, 0);
    nodes.push(t);
    document.querySelector(sel).replaceChildren(...nodes);
  }

  function niceMax(x) {
    const e = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 5, 10]) if (x <= m * e) return m * e;
    return 10 * e;
  }

  // ---- playground ----------------------------------------------------------------------------
  function wirePlayground() {
    $("#pg-model").addEventListener("change", () => pickModel($("#pg-model").value));
    $("#pg-example").addEventListener("click", fillExample);
    $("#pg-form").addEventListener("submit", (ev) => { ev.preventDefault(); runInfer(); });
    $("#chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendChat(); });
    $("#chat-clear").addEventListener("click", () => { state.chat = []; $("#chat-log").replaceChildren(); });
  }

  async function modelNames() {
    if (state.session.scopes.includes("admin")) {
      const index = await api("/v2/repository/index", { method: "POST", json: { ready: true } });
      return [...new Set(index.map((e) => e.name))];
    }
    if (state.session.models) return state.session.models;
    const stats = await api("/v2/models/stats");
    const names = (stats.model_stats || []).map((m) => m.name);
    try { (await api("/v1/models")).data.forEach((m) => names.push(m.id)); } catch (_) { /* no LLM API */ }
    return [...new Set(names)];
  }

  async function loadPlayground() {
    let names = [];
    try { names = await modelNames(); } catch (e) { failed(e); }
    const current = $("#pg-model").value;
    $("#pg-model").replaceChildren(el("option", { value: "" }, "— pick a model —"),
      ...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(current)) $("#pg-model").value = current;
    $("#chat-models").replaceChildren(...names.map((n) => el("option", { value: n })));
  }

  async function pickModel(name) {
    state.meta = null;
    $("#pg-inputs").replaceChildren();
    $("#pg-result").replaceChildren();
    message($("#pg-error"), "");
    $("#pg-desc").textContent = "";
    if (!name) return;
    try {
      const meta = await api(`/v2/models/${encodeURIComponent(name)}`);
      state.meta = meta;
      const desc = meta.parameters && meta.parameters.description;
      $("#pg-desc").textContent = desc || `${meta.platform || ""} · versions ${(meta.versions || []).join(", ")}`;
      $("#pg-inputs").replaceChildren(...meta.inputs.map((t) => el("label", { class: "tensor" },
        `${t.name} · ${t.datatype} · shape [${t.shape.join(", ")}]`,
        el("textarea", { rows: 2, "data-input": t.name, spellcheck: "false",
          placeholder: t.datatype === "BYTES" ? "one text per line" : "numbers, comma-separated (or a JSON array)" }))));
    } catch (e) { message($("#pg-error"), e.message); }
  }

  function rowShape(shape) { return shape.slice(1).map((d) => (d < 0 ? 1 : d)); }

  function fillExample() {
    if (!state.meta) return;
    for (const t of state.meta.inputs) {
      const n = rowShape(t.shape).reduce((a, b) => a * b, 1);
      const area = document.querySelector(`#pg-inputs textarea[data-input="${CSS.escape(t.name)}"]`);
      if (t.datatype === "BYTES") area.value = "hello world";
      else if (t.datatype === "BOOL") area.value = Array(n).fill("true").join(", ");
      else if (/^(FP|BF)/.test(t.datatype)) area.value = Array.from({ length: n }, (_, i) => (1 + (i % 5) * 0.5).toFixed(1)).join(", ");
      else area.value = Array.from({ length: n }, (_, i) => String(i % 3)).join(", ");
    }
  }

  function parseTensor(t, text) {
    if (t.datatype === "BYTES") {
      const data = text.split("\n").filter((s) => s.length);
      return { name: t.name, datatype: t.datatype, shape: t.shape.length >= 2 ? [data.length, ...rowShape(t.shape)] : [data.length], data };
    }
    const trimmed = text.trim();
    let flat = trimmed.startsWith("[") ? JSON.parse(trimmed).flat(Infinity)
      : trimmed.split(/[\s,;]+/).filter(Boolean).map(Number);
    if (t.datatype === "BOOL") flat = flat.map((v) => v === true || v === "true" || v === 1);
    if (flat.some((v) => typeof v === "number" && Number.isNaN(v))) throw new Error(`Input ${t.name}: not a list of numbers.`);
    const per = rowShape(t.shape).reduce((a, b) => a * b, 1);
    if (!flat.length || flat.length % per) throw new Error(`Input ${t.name} needs a multiple of ${per} values (got ${flat.length}).`);
    const shape = t.shape.length ? [flat.length / per, ...rowShape(t.shape)] : [];
    return { name: t.name, datatype: t.datatype, shape, data: flat };
  }

  async function runInfer() {
    const meta = state.meta;
    message($("#pg-error"), "");
    if (!meta) return;
    let inputs;
    try {
      inputs = meta.inputs.map((t) => parseTensor(t, document.querySelector(`#pg-inputs textarea[data-input="${CSS.escape(t.name)}"]`).value));
    } catch (e) { message($("#pg-error"), e.message); return; }
    const started = performance.now();
    try {
      const out = await api(`/v2/models/${encodeURIComponent(meta.name)}/infer`, { method: "POST", json: { inputs } });
      const took = performance.now() - started;
      const labels = out.outputs.filter((o) => o.datatype === "BYTES");
      $("#pg-result").replaceChildren(
        ...(labels.length ? [el("div", { class: "result-label", id: "pg-label" }, labels[0].data.join(", "))] : []),
        el("p", { class: "muted small" }, `model ${out.model_name} v${out.model_version || ""} · ${took.toFixed(1)} ms`),
        el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Output"), el("th", {}, "Type"), el("th", {}, "Shape"), el("th", {}, "Data"))),
          el("tbody", {}, ...out.outputs.map((o) => el("tr", {}, el("td", {}, o.name), el("td", {}, o.datatype),
            el("td", {}, "[" + o.shape.join(", ") + "]"),
            el("td", {}, JSON.stringify(o.data.map((v) => (typeof v === "number" ? Math.round(v * 1e4) / 1e4 : v)))))))));
    } catch (e) { message($("#pg-error"), e.message); }
  }

  async function sendChat() {
    const model = $("#chat-model").value.trim();
    const text = $("#chat-input").value;
    message($("#chat-error"), "");
    if (!model || !text.trim()) { message($("#chat-error"), "Name a chat model and write a message."); return; }
    state.chat = state.chat || [];
    state.chat.push({ role: "user", content: text });
    $("#chat-input").value = "";
    const log = $("#chat-log");
    log.append(el("div", { class: "msg user" }, el("b", {}, "you: "), text));
    const answer = el("span", {});
    log.append(el("div", { class: "msg assistant" }, el("b", {}, model + ": "), answer));
    $("#chat-send").disabled = true;
    const started = performance.now();
    let first = null, usage = null, content = "";
    try {
      const res = await api("/v1/chat/completions", { method: "POST", raw: true,
        json: { model, messages: state.chat, stream: true, stream_options: { include_usage: true },
          max_tokens: Number($("#chat-max").value) || 256 } });
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
          for (const line of block.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.usage) usage = chunk.usage;
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              if (first === null) first = performance.now();
              content += delta.content;
              answer.textContent = content;
              log.scrollTop = log.scrollHeight;
            }
          }
        }
      }
      state.chat.push({ role: "assistant", content });
      const secs = (performance.now() - started) / 1000;
      const stats = [];
      if (first !== null) stats.push(`first token ${(first - started).toFixed(0)} ms`);
      if (usage) stats.push(`prompt ${usage.prompt_tokens} tokens · completion ${usage.completion_tokens} tokens · `
        + `${(usage.completion_tokens / secs).toFixed(1)} tokens/s`);
      $("#chat-stats").textContent = stats.join(" · ");
    } catch (e) {
      state.chat.pop();
      message($("#chat-error"), e.message);
    } finally { $("#chat-send").disabled = false; }
  }

  // ---- keys ----------------------------------------------------------------------------------
  function wireKeys() {
    $("#key-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      message($("#key-error"), "");
      const scopes = [...document.querySelectorAll('#key-form input[name="scope"]:checked')].map((c) => c.value);
      const models = $("#key-models").value.split(",").map((s) => s.trim()).filter(Boolean);
      const doc = { name: $("#key-name").value.trim(), scopes };
      if (models.length) doc.models = models;
      if ($("#key-rate").value.trim()) doc.rate = $("#key-rate").value.trim();
      if ($("#key-expires").value) doc.expires_at = Number(localToUnix($("#key-expires").value));
      try {
        const made = await api("/v2/security/keys", { method: "POST", json: doc });
        $("#key-secret").textContent = made.key;
        show($("#key-created"), true);
        $("#key-form").reset();
        loadKeys();
      } catch (e) { message($("#key-error"), e.message); }
    });
    $("#key-copy").addEventListener("click", async () => {
      const text = $("#key-secret").textContent;
      try { await navigator.clipboard.writeText(text); $("#key-copy").textContent = "Copied"; } catch (_) {
        const range = document.createRange(); range.selectNodeContents($("#key-secret"));
        const sel = getSelection(); sel.removeAllRanges(); sel.addRange(range);
        $("#key-copy").textContent = "Selected: press Ctrl+C";
      }
    });
    $("#key-dismiss").addEventListener("click", () => {
      $("#key-secret").textContent = ""; $("#key-copy").textContent = "Copy"; show($("#key-created"), false);
    });
  }

  async function loadKeys() {
    let keys;
    try { keys = await api("/v2/security/keys"); } catch (e) { failed(e); return; }
    $("#keys-table tbody").replaceChildren(...keys.map((k) => el("tr", { "data-key": k.key_id, "data-name": k.name },
      el("td", {}, el("code", {}, k.key_id)), el("td", {}, k.name), el("td", {}, k.scopes.join(", ")),
      el("td", {}, k.models ? k.models.join(", ") : "all"), el("td", {}, k.rate || ""),
      el("td", {}, fmtTime(k.expires_at)), el("td", {}, fmtTime(k.created_at)),
      el("td", { class: "status" }, k.status),
      el("td", {}, k.status === "active" ? el("button", { type: "button", "data-action": "revoke", onclick: async () => {
        if (!confirm(`Revoke key ${k.name} (${k.key_id})? Clients using it are refused from now on.`)) return;
        try { await api(`/v2/security/keys/${encodeURIComponent(k.key_id)}`, { method: "DELETE" }); } catch (e) { failed(e); }
        loadKeys();
      } }, "Revoke") : ""))));
  }

  // ---- audit ---------------------------------------------------------------------------------
  function auditQuery() {
    const q = new URLSearchParams();
    const add = (k, v) => { if (v) q.set(k, v); };
    add("since", localToUnix($("#audit-since").value)); add("until", localToUnix($("#audit-until").value));
    add("key", $("#audit-key").value.trim()); add("model", $("#audit-model").value.trim());
    add("action", $("#audit-action").value.trim()); add("result", $("#audit-result").value);
    return q.toString();
  }

  function wireAudit() {
    $("#audit-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadAudit(); });
    $("#audit-verify").addEventListener("click", verifyAudit);
    $("#audit-export").addEventListener("click", async () => {
      try {
        const res = await api("/console/api/audit/export?" + auditQuery(), { raw: true });
        const url = URL.createObjectURL(await res.blob());
        const a = el("a", { href: url, download: "inhouse-audit.jsonl" });
        document.body.append(a); a.click(); a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (e) { failed(e); }
    });
  }

  async function loadAudit() {
    let doc;
    try { doc = await api("/console/api/audit?" + auditQuery()); } catch (e) { failed(e); return; }
    $("#audit-summary").textContent = doc.matched > doc.entries.length
      ? `${doc.matched} entries match; the newest ${doc.entries.length} are shown (export has them all).`
      : `${doc.matched} entries match.`;
    $("#audit-table tbody").replaceChildren(...doc.entries.map((r) => el("tr", {},
      el("td", {}, String(r.seq)), el("td", {}, fmtTime(r.ts)), el("td", {}, r.action), el("td", {}, r.key_id || ""),
      el("td", {}, r.model || ""), el("td", {}, r.client_ip || ""), el("td", {}, r.status ?? ""),
      el("td", {}, r.code ?? ""), el("td", {}, r.latency_ms !== null && r.latency_ms !== undefined ? r.latency_ms.toFixed(1) : ""))));
  }

  async function verifyAudit() {
    const out = $("#audit-verify-status");
    try {
      const r = await api("/console/api/audit/verify");
      out.replaceChildren(r.ok
        ? el("span", { class: "ok-text" }, `Chain verified: ${r.entries} entries intact` + (r.entries ? ` (#${r.first_seq}–#${r.last_seq}).` : "."))
        : el("span", { class: "bad-text" }, "Chain broken: " + r.problems.join("; ")));
      show(out, true);
    } catch (e) { failed(e); }
  }

  // ---- doctor --------------------------------------------------------------------------------
  async function loadDoctor() {
    const list = $("#doctor-findings");
    list.replaceChildren(el("li", { class: "muted" }, "Running checks…"));
    let findings;
    try { findings = await api("/console/api/doctor"); } catch (e) { list.replaceChildren(); failed(e); return; }
    list.replaceChildren(...findings.map((f) => el("li", { "data-severity": f.severity },
      el("span", { class: "state sev-" + f.severity }, f.severity), " ", el("b", {}, f.area), " — ", f.message,
      f.fix ? el("div", { class: "fix" }, "Fix: " + f.fix) : "")));
  }

  document.addEventListener("DOMContentLoaded", start);
})();

// commandbus console: reads the JSON API beside this file and builds the
// page with DOM calls. Text from the database only ever goes into
// textContent or attribute values, never into markup, so a payload holding
// "<script>" shows as those characters. No libraries, no build step.
"use strict";

(function () {
  const meta = (name) => {
    const el = document.querySelector('meta[name="commandbus-' + name + '"]');
    return el ? el.getAttribute("content") : "";
  };
  const config = {
    csrf: meta("csrf"),
    actions: meta("actions"), // "off", "token" or "remote_user"
    readOnlyReason: meta("read-only-reason"),
    operator: meta("operator"),
    refresh: Math.max(1, Number(meta("refresh")) || 10),
  };

  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = {
    PENDING: "#8a94a6", IN_PROGRESS: "#2f5fd0", COMPLETED: "#2e8b57", FAILED: "#c0392b", CANCELED: "#b07cc6",
    IN_TROUBLESHOOTING_QUEUE: "#e67e22", WAITING: "#8a94a6", WAITING_FOR_REPLY: "#8a94a6", EXECUTING: "#2f5fd0",
    WAITING_FOR_TSQ: "#e67e22", COMPENSATING: "#c98a00", COMPENSATED: "#b07cc6",
  };
  const GOOD = ["COMPLETED", "running", "SUCCESS"];
  const BAD = ["FAILED", "IN_TROUBLESHOOTING_QUEUE", "WAITING_FOR_TSQ", "lost", "COMPLETED_WITH_FAILURES", "MOVED_TO_TSQ",
               "BUSINESS_RULE_FAILED", "MESSAGE_REJECTED"];
  const WARN = ["stopping", "COMPENSATING", "COMPENSATED", "CANCELED", "IN_PROGRESS", "starting"];

  // ---- DOM helpers: every string becomes a text node ----------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    append(el, children);
    return el;
  }
  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  function s(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    return el;
  }
  const list = (x) => (Array.isArray(x) ? x : []); // an empty Lua table arrives as {}
  const entries = (x) => (x && typeof x === "object" && !Array.isArray(x) ? Object.entries(x) : []);

  // ---- formatting ----------------------------------------------------------
  function parseTime(v) {
    if (v === undefined || v === null || v === "") return null;
    if (typeof v === "number") return new Date(v * 1000);
    // PostgreSQL's text: "2026-11-30 19:32:22.906334+00"
    let t = String(v).replace(" ", "T").replace(/([+-]\d\d)$/, "$1:00");
    t = t.replace(/\.(\d{3})\d+/, ".$1");
    const d = new Date(t);
    return isNaN(d) ? null : d;
  }
  function time(v) {
    const d = parseTime(v);
    return d ? d.toISOString().replace(/\.\d+Z$/, "Z").replace("T", " ") : "";
  }
  function ago(v) {
    const d = parseTime(v);
    return d ? duration((Date.now() - d.getTime()) / 1000) + " ago" : "";
  }
  function duration(seconds) {
    if (seconds === undefined || seconds === null) return "–";
    seconds = Math.max(0, seconds);
    if (seconds < 60) return Math.round(seconds) + " s";
    if (seconds < 3600) return Math.round(seconds / 60) + " min";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }
  const num = (n) => (n === undefined || n === null ? "–" : Number(n).toLocaleString("en"));
  const rate = (n) => (n === undefined || n === null ? "–" : n < 10 ? n.toFixed(1) : Math.round(n).toLocaleString("en"));
  function json(v) {
    if (v === undefined || v === null) return "";
    try { return JSON.stringify(v, null, 2); } catch (e) { return String(v); }
  }
  // JSON on one line with a space after each comma and colon, so that a
  // long payload wraps between its fields.
  function jsonLine(v) {
    const text = JSON.stringify(v, null, 1);
    return text === undefined ? "" : text.replace(/\n\s*/g, " ");
  }
  function pill(text) {
    const cls = GOOD.includes(text) ? "ok" : BAD.includes(text) ? "bad" : WARN.includes(text) ? "warn" : "";
    return h("span", { class: "pill " + cls }, text);
  }
  const commandLink = (domain, id) => h("a", { href: "#/command/" + encodeURIComponent(domain) + "/" + encodeURIComponent(id), class: "mono" }, id);
  const processLink = (domain, id) => h("a", { href: "#/process/" + encodeURIComponent(domain) + "/" + encodeURIComponent(id), class: "mono" }, id);

  function table(headers, rows, empty) {
    const head = h("tr", null, headers.map((x) => h("th", { class: x.endsWith(" ") ? "num" : "" }, x.trim())));
    const body = rows.length ? rows : [h("tr", null, h("td", { colspan: headers.length, class: "empty" }, empty))];
    return h("table", null, h("thead", null, head), h("tbody", null, body));
  }
  const td = (x, cls) => h("td", { class: cls }, x);
  const tdn = (x) => h("td", { class: "num" }, x);

  // ---- charts (inline SVG) -------------------------------------------------
  // A horizontal bar split by status, with a legend.
  const ORDER = Object.keys(COLORS);
  const rank = (status) => (ORDER.includes(status) ? ORDER.indexOf(status) : ORDER.length);
  function statusBar(counts, width) {
    const items = entries(counts).filter(([, n]) => n > 0)
      .sort(([a], [b]) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0));
    const total = items.reduce((a, [, n]) => a + n, 0);
    const svg = s("svg", { class: "chart", width: width, height: 12, role: "img" });
    let x = 0;
    for (const [status, n] of items) {
      const w = total ? (n / total) * width : 0;
      const r = s("rect", { x: x, y: 0, width: Math.max(w, 1), height: 12, fill: COLORS[status] || "#999" });
      r.appendChild(s("title")).textContent = status + ": " + n;
      svg.appendChild(r);
      x += w;
    }
    if (!items.length) svg.appendChild(s("rect", { x: 0, y: 0, width: width, height: 12, fill: "#eef0f4" }));
    const legend = h("div", { class: "legend" }, items.map(([status, n]) => {
      const el = h("span", null, status.toLowerCase().replace(/_/g, " ") + " " + num(n));
      el.style.setProperty("--swatch", COLORS[status] || "#999");
      return el;
    }));
    return h("div", null, svg, legend);
  }

  // A sparkline of messages in (blue) and out (green) per second.
  function sparkline(points, width, height) {
    const svg = s("svg", { class: "chart", width: width, height: height, role: "img" });
    svg.appendChild(s("rect", { x: 0, y: 0, width: width, height: height, fill: "#f3f4f7" }));
    points = list(points);
    if (points.length < 2) return svg;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    const max = Math.max(1e-9, ...points.map((p) => Math.max(p[1], p[2])));
    const xy = (p, i) => [((p[0] - t0) / Math.max(1e-9, t1 - t0)) * (width - 2) + 1, height - 2 - (p[i] / max) * (height - 4)];
    const line = (i) => points.map((p) => xy(p, i).map((v) => v.toFixed(1)).join(",")).join(" ");
    // out: a green area; in: a blue line over it
    svg.appendChild(s("polygon", { points: "1," + (height - 2) + " " + line(2) + " " + (width - 1) + "," + (height - 2),
                                   fill: "#bfe3cd", stroke: "#2e8b57", "stroke-width": 1 }));
    svg.appendChild(s("polyline", { points: line(1), fill: "none", stroke: "#2f5fd0", "stroke-width": 1.5 }));
    svg.appendChild(s("title")).textContent = "peak " + rate(max) + " msg/s over " + duration(t1 - t0);
    return svg;
  }

  // A progress bar for a batch: completed, failed, canceled, in the TSQ.
  function progress(b) {
    const width = 220, total = Math.max(1, b.total_count || 0);
    const svg = s("svg", { class: "chart", width: width, height: 12, role: "img" });
    svg.appendChild(s("rect", { x: 0, y: 0, width: width, height: 12, fill: "#eef0f4" }));
    let x = 0;
    const parts = [["completed_count", COLORS.COMPLETED], ["failed_count", COLORS.FAILED],
                   ["canceled_count", COLORS.CANCELED], ["in_troubleshooting_count", COLORS.IN_TROUBLESHOOTING_QUEUE]];
    for (const [field, color] of parts) {
      const w = ((b[field] || 0) / total) * width;
      if (w > 0) svg.appendChild(s("rect", { x: x, y: 0, width: w, height: 12, fill: color }));
      x += w;
    }
    const done = (b.completed_count || 0) + (b.failed_count || 0) + (b.canceled_count || 0) + (b.in_troubleshooting_count || 0);
    svg.appendChild(s("title")).textContent = done + " of " + (b.total_count || 0) + " done";
    return h("div", null, svg, h("div", { class: "muted" }, done + " / " + num(b.total_count) + " done",
      b.failed_count ? " · " + b.failed_count + " failed" : "",
      b.in_troubleshooting_count ? " · " + b.in_troubleshooting_count + " in TSQ" : ""));
  }

  // ---- the API --------------------------------------------------------------
  async function get(path, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v) q.set(k, v);
    const res = await fetch("api/" + path + (q.toString() ? "?" + q : ""), { credentials: "same-origin", cache: "no-store" });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error((body.error && (body.error.code + ": " + body.error.message)) || "HTTP " + res.status);
    return body;
  }

  async function post(path, payload, token) {
    const headers = { "Content-Type": "application/json", "X-CSRF-Token": config.csrf };
    if (token) headers["X-Commandbus-Token"] = token;
    const res = await fetch("api/" + path, { method: "POST", credentials: "same-origin", headers: headers, body: JSON.stringify(payload) });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error((body.error && (body.error.code + ": " + body.error.message)) || "HTTP " + res.status);
    return body;
  }

  // ---- views -----------------------------------------------------------------
  const views = {};

  views.overview = async function () {
    const o = await get("overview");
    const domains = list(o.domains), queues = list(o.queues), runners = list(o.runners);
    const tsq = domains.reduce((a, d) => a + (d.tsq || 0), 0);
    const live = runners.filter((r) => r.state === "running").length;
    const lost = runners.filter((r) => r.state === "lost").length;
    const depth = queues.reduce((a, q) => a + (q.depth || 0), 0);
    const history = o.history || {};
    return [
      h("div", { class: "cards" },
        h("div", { class: "card" }, h("div", { class: "n" }, num(depth)), h("div", { class: "label" }, "messages waiting")),
        h("a", { class: "card" + (tsq ? " bad" : ""), href: "#/tsq" }, h("div", { class: "n" }, num(tsq)), h("div", { class: "label" }, "in the troubleshooting queue")),
        h("a", { class: "card", href: "#/workers" }, h("div", { class: "n" }, num(live)), h("div", { class: "label" }, "workers and routers running")),
        lost ? h("a", { class: "card bad", href: "#/workers" }, h("div", { class: "n" }, num(lost)), h("div", { class: "label" }, "lost (no heartbeat)")) : null),
      h("h2", null, "Domains"),
      table(["Domain", "Commands by status", "TSQ ", "Processes by status"], domains.map((d) =>
        h("tr", { "data-domain": d.domain },
          td(h("strong", null, d.domain)), td(statusBar(d.commands, 320)),
          tdn(d.tsq ? h("a", { href: "#/tsq?domain=" + encodeURIComponent(d.domain) }, num(d.tsq)) : "0"),
          td(entries(d.processes).length ? statusBar(d.processes, 220) : h("span", { class: "muted" }, "none")))),
        "No commands yet."),
      h("h2", null, "Queues"),
      history.available ? null : h("p", { class: "muted" }, "Throughput: " + (history.reason || "no history yet")),
      table(["Queue", "Depth ", "Oldest ", "Sent ever ", "In /s ", "Out /s ",
             "Last " + duration(history.seconds || 900) + ": in (line), out (area)"], queues.map((q) =>
        h("tr", { "data-queue": q.name },
          td(h("span", { class: "mono" }, q.name)), tdn(num(q.depth)), tdn(duration(q.oldest_age)), tdn(num(q.total)),
          tdn(rate(q.rate_in)), tdn(rate(q.rate_out)), td(sparkline(q.history, 240, 28)))),
        "No queues."),
    ];
  };

  async function domainFilter(params, view) {
    const d = await get("domains");
    const select = h("select", { id: "domain-filter", onchange: (e) => {
      location.hash = "#/" + view + (e.target.value ? "?domain=" + encodeURIComponent(e.target.value) : "");
    } }, h("option", { value: "" }, "all domains"), list(d.domains).map((name) =>
      h("option", { value: name, selected: name === params.get("domain") }, name)));
    return h("div", { class: "filters" }, h("label", null, "Domain ", select));
  }

  views.tsq = async function (params) {
    const [filter, page] = await Promise.all([domainFilter(params, "tsq"), get("tsq", { domain: params.get("domain") })]);
    const items = list(page.items);
    const can = config.actions !== "off";
    const button = (label, action, item) => h("button", {
      type: "button", "data-action": action, "data-command": item.command_id,
      disabled: !can, title: can ? null : "read-only: " + config.readOnlyReason,
      onclick: () => openAction(action, item),
    }, label);
    return [
      filter,
      h("p", { class: "muted" }, num(page.total) + " command(s) wait for an operator" + (items.length < page.total ? "; showing " + items.length : "")),
      table(["Command", "Type", "Error", "Attempts ", "Since", "Payload", "Actions"], items.map((it) =>
        h("tr", { "data-command": it.command_id },
          td([h("div", { class: "muted" }, it.domain), commandLink(it.domain, it.command_id)]),
          td(it.type),
          td([h("div", null, h("strong", { class: "error" }, it.last_error_code || ""), " ", it.last_error_type ? h("span", { class: "muted" }, "(" + it.last_error_type + ")") : null),
              h("div", { class: "error-message" }, it.last_error_msg || "")]),
          tdn((it.attempts || 0) + " / " + (it.max_attempts || 0)),
          td(h("span", { title: time(it.updated_at) }, ago(it.updated_at))),
          td(h("pre", { class: "payload" }, jsonLine(it.data !== undefined ? it.data : it.payload))),
          h("td", { class: "actions" }, button("Retry", "retry", it), button("Cancel", "cancel", it), button("Complete", "complete", it)))),
        "The troubleshooting queue is empty."),
    ];
  };

  views.command = async function (params, domain, id) {
    const c = await get("command", { domain: domain, id: id });
    const cmd = c.command || {};
    const fields = ["domain", "command_id", "type", "status", "attempts", "max_attempts", "queue_name", "msg_id",
                    "reply_to", "correlation_id", "batch_id", "last_error_type", "last_error_code", "last_error_msg",
                    "created_at", "updated_at", "lease_expires_at"];
    return [
      h("h2", null, "Command ", h("span", { class: "mono" }, cmd.command_id || id), " ", pill(cmd.status || "")),
      cmd.status === "IN_TROUBLESHOOTING_QUEUE" ? h("p", null, h("a", { href: "#/tsq?domain=" + encodeURIComponent(domain) }, "Act on it in the troubleshooting queue")) : null,
      record(cmd, fields),
      h("h2", null, "Audit trail"),
      timeline(list(c.audit).map((e) => ({ title: e.event_type, when: e.ts, details: e.details }))),
    ];
  };

  function record(r, fields) {
    return h("dl", { class: "record" }, fields.filter((f) => r[f] !== undefined && r[f] !== null && r[f] !== "").map((f) => [
      h("dt", null, f.replace(/_/g, " ")),
      h("dd", { class: /_id$|^id$/.test(f) ? "mono" : "" }, /_at$/.test(f) ? time(r[f]) : f === "status" ? pill(r[f]) : typeof r[f] === "object" ? h("pre", null, json(r[f])) : String(r[f])),
    ]));
  }

  function timeline(events) {
    if (!events.length) return h("p", { class: "muted" }, "No events.");
    return h("ol", { class: "timeline" }, events.map((e) => h("li", { class: BAD.includes(e.title) ? "bad" : GOOD.includes(e.title) ? "ok" : "" },
      h("strong", null, e.title), e.extra ? [" ", e.extra] : null, h("span", { class: "when" }, time(e.when)),
      e.details !== undefined && e.details !== null && entries(e.details).length + list(e.details).length > 0 ? h("pre", null, json(e.details)) : null)));
  }

  views.batches = async function (params) {
    const [filter, page] = await Promise.all([domainFilter(params, "batches"), get("batches", { domain: params.get("domain") })]);
    return [
      filter,
      table(["Batch", "Name", "Status", "Progress", "Created", "Finished"], list(page.items).map((b) =>
        h("tr", { "data-batch": b.batch_id },
          td([h("div", { class: "muted" }, b.domain), h("span", { class: "mono" }, b.batch_id)]), td(b.name || ""),
          td(pill(b.status)), td(progress(b)), td(time(b.created_at)), td(time(b.completed_at)))),
        "No batches."),
    ];
  };

  views.processes = async function (params) {
    const [filter, page] = await Promise.all([domainFilter(params, "processes"), get("processes", { domain: params.get("domain") })]);
    return [
      filter,
      table(["Process", "Type", "Status", "Step", "Error", "Updated"], list(page.items).map((p) =>
        h("tr", { "data-process": p.process_id },
          td([h("div", { class: "muted" }, p.domain), processLink(p.domain, p.process_id)]), td(p.type), td(pill(p.status)),
          td(p.current_step || ""), td(p.error_code ? [h("strong", { class: "error" }, p.error_code), " ", p.error_message || ""] : ""),
          td(h("span", { title: time(p.updated_at) }, ago(p.updated_at))))),
        "No processes."),
    ];
  };

  views.process = async function (params, domain, id) {
    const p = await get("process", { domain: domain, id: id });
    const proc = p.process || {};
    return [
      h("h2", null, "Process ", h("span", { class: "mono" }, proc.process_id || id), " ", pill(proc.status || "")),
      record(proc, ["domain", "process_id", "type", "status", "current_step", "error_code", "error_message", "batch_id",
                    "created_at", "updated_at", "completed_at", "state"]),
      h("h2", null, "Events"),
      timeline(list(p.events).map((e) => ({ title: e.event_type, when: e.created_at, details: e.data,
        extra: h("span", { class: "muted" }, "#" + e.sequence + (e.step ? " · step " + e.step : "") + (e.status ? " · " + e.status : "")) }))),
      h("h2", null, "Steps"),
      table(["Step", "Command", "Sent", "Reply", "Received"], list(p.steps).map((st) =>
        h("tr", null, td(st.step_name), td([h("div", null, st.command_type), commandLink(proc.domain || domain, st.command_id)]),
          td(time(st.sent_at)), td(st.reply_outcome ? pill(st.reply_outcome) : h("span", { class: "muted" }, "waiting")),
          td(time(st.received_at)))),
        "No steps."),
    ];
  };

  views.workers = async function () {
    const w = await get("workers");
    const now = w.now || Date.now() / 1000;
    return [
      h("p", { class: "muted" }, "Workers and reply routers write a heartbeat every 5 s; one that stopped writing without saying so is lost."),
      table(["Kind", "Domain", "Host / pid", "State", "Heartbeat", "Lanes ", "In flight ", "Done ", "Failures ", "Retries ", "Set aside ", "Last success", "Lane depths"],
        list(w.runners).map((r) => h("tr", { "data-runner": r.runner_id },
          td(r.kind === "worker" ? "worker" : "reply router"), td(r.domain), td(h("span", { class: "mono" }, r.host + " / " + r.pid)),
          td(pill(r.state)), td(duration(now - r.heartbeat_at) + " ago"), tdn(num(r.lanes)), tdn(num(r.in_flight)),
          tdn(num(r.kind === "worker" ? r.successes : r.applied)), tdn(num(r.failures)), tdn(r.kind === "worker" ? num(r.retries) : "–"),
          tdn(num(r.kind === "worker" ? (r.poison || 0) + (r.stuck || 0) : r.rejected)),
          td(r.last_success_at ? duration(now - r.last_success_at) + " ago" : "–"), td(laneBars(list(r.lane_depths))))),
        "No worker or reply router has run in the last day."),
    ];
  };

  function laneBars(depths) {
    const max = Math.max(1, ...depths);
    const svg = s("svg", { class: "chart", width: Math.max(8, depths.length * 8), height: 16, role: "img" });
    depths.forEach((d, i) => {
      const hgt = (d / max) * 14;
      svg.appendChild(s("rect", { x: i * 8, y: 16 - Math.max(1, hgt), width: 6, height: Math.max(1, hgt), fill: d ? "#2f5fd0" : "#c5cbd6" }));
    });
    svg.appendChild(s("title")).textContent = "lane depths: " + depths.join(", ");
    return svg;
  }

  // ---- actions on the troubleshooting queue ----------------------------------
  const dialog = document.getElementById("confirm");
  let pending = null; // {action, item}

  function openAction(action, item) {
    pending = { action: action, item: item };
    const verb = { retry: "Retry", cancel: "Cancel", complete: "Complete" }[action];
    document.getElementById("confirm-title").textContent = verb + " command " + item.command_id + "?";
    const what = {
      retry: "It is sent again with its attempts reset (status PENDING).",
      cancel: "It ends CANCELED; its reply, if it asked for one, says CANCELED with the reason.",
      complete: "It ends COMPLETED as if handled; its reply, if it asked for one, carries the result below.",
    }[action];
    const body = document.getElementById("confirm-body");
    body.replaceChildren();
    append(body, [
      h("p", null, what),
      h("dl", { class: "record facts" },
        h("dt", null, "domain"), h("dd", null, item.domain), h("dt", null, "type"), h("dd", null, item.type),
        h("dt", null, "error"), h("dd", { class: "error" }, (item.last_error_code || "") + ": " + (item.last_error_msg || ""))),
      h("div", { class: "muted" }, "payload"), h("pre", { class: "payload" }, json(item.data !== undefined ? item.data : item.payload)),
    ]);
    const operator = document.getElementById("operator");
    document.getElementById("operator-label").hidden = config.actions === "remote_user";
    operator.required = config.actions !== "remote_user";
    operator.value = config.operator || localStorage.getItem("commandbus.operator") || "";
    document.getElementById("reason").value = "";
    document.getElementById("result-label").hidden = action !== "complete";
    document.getElementById("result").value = "{}";
    document.getElementById("token-label").hidden = config.actions !== "token";
    document.getElementById("token").value = sessionStorage.getItem("commandbus.token") || "";
    document.getElementById("confirm-ok").textContent = verb;
    document.getElementById("confirm-error").hidden = true;
    dialog.showModal();
    (operator.value || config.actions === "remote_user" ? document.getElementById("reason") : operator).focus();
  }

  document.getElementById("confirm-cancel").addEventListener("click", () => { pending = null; dialog.close(); });
  dialog.addEventListener("close", () => { pending = null; });
  document.getElementById("confirm-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!pending) return;
    const { action, item } = pending;
    const showError = (text) => { const el = document.getElementById("confirm-error"); el.textContent = text; el.hidden = false; };
    const body = { domain: item.domain, command_id: item.command_id, reason: document.getElementById("reason").value };
    if (config.actions !== "remote_user") {
      body.operator = document.getElementById("operator").value.trim();
      if (!body.operator) return showError("Say who you are: the operator name goes into the audit trail.");
      localStorage.setItem("commandbus.operator", body.operator);
    }
    if (action === "complete") {
      try { body.result = JSON.parse(document.getElementById("result").value || "{}"); } catch (err) { return showError("The result is not JSON: " + err.message); }
      if (body.result === null || typeof body.result !== "object" || Array.isArray(body.result)) return showError("The result must be a JSON object.");
    }
    const token = document.getElementById("token").value;
    if (config.actions === "token") sessionStorage.setItem("commandbus.token", token);
    const ok = document.getElementById("confirm-ok");
    ok.disabled = true;
    try {
      await post("tsq/" + action, body, config.actions === "token" ? token : null);
      pending = null;
      dialog.close();
      showBanner(({ retry: "Retried", cancel: "Canceled", complete: "Completed" })[action] + " command " + item.command_id + ".", false);
      render();
    } catch (err) {
      showError(err.message);
    } finally {
      ok.disabled = false;
    }
  });

  // ---- routing and refreshing ---------------------------------------------------
  function showBanner(text, isError) {
    const b = document.getElementById("banner");
    b.textContent = text;
    b.className = "banner" + (isError ? " error" : "");
    b.hidden = !text;
  }

  function route() {
    const hash = location.hash.replace(/^#\/?/, "");
    const [path, search] = hash.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    const name = parts[0] && views[parts[0]] ? parts[0] : "overview";
    return { name: name, args: parts.slice(1), params: new URLSearchParams(search || "") };
  }

  let rendering = false;
  async function render() {
    if (rendering) return;
    rendering = true;
    const r = route();
    const status = document.getElementById("status");
    for (const a of document.querySelectorAll("nav a")) {
      const view = a.getAttribute("data-view");
      a.classList.toggle("active", view === r.name || (view === "processes" && r.name === "process") || (view === "tsq" && r.name === "command"));
    }
    try {
      const content = await views[r.name](r.params, ...r.args);
      const view = document.getElementById("view");
      view.replaceChildren();
      append(view, [content]);
      view.setAttribute("data-view", r.name);
      view.setAttribute("data-loaded", String(Date.now()));
      status.textContent = "updated " + new Date().toLocaleTimeString() + " · every " + config.refresh + " s";
      status.classList.remove("stale");
    } catch (err) {
      status.textContent = "not updated: " + err.message;
      status.classList.add("stale");
    } finally {
      rendering = false;
    }
  }

  document.getElementById("mode").textContent = config.actions === "off"
    ? "read-only (" + config.readOnlyReason + ")"
    : "actions enabled (" + (config.actions === "token" ? "with the console token" : "as " + config.operator) + ")";
  window.addEventListener("hashchange", () => { showBanner("", false); render(); });
  setInterval(() => {
    if (document.hidden || dialog.open) return; // never redraw under an operator's hands
    render();
  }, config.refresh * 1000);
  render();
})();

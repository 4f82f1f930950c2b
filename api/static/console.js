// Parley's operator console: no framework, nothing fetched but this API.
//
// Safety rule: every piece of data (message texts, contact ids and names, provider payloads,
// dead-letter errors and values) reaches the page as a text node (textContent, append(string)) or
// as an attribute value set with setAttribute on a fixed attribute name. Nothing here assigns
// innerHTML, outerHTML or insertAdjacentHTML, and no URL is built from data except fragments
// (#/conversations/<encoded id>), so no text is ever parsed as HTML or run as script.
"use strict";
(() => {
  const TOKEN_KEY = "parleyToken"; // sessionStorage: this tab only, gone when it closes
  const POLL_MS = 3000;
  const OVERVIEW_POLL_MS = 5000; // GET /v1/overview costs more than a page of rows (README, "Console")
  const STATES = ["idle", "processing", "awaiting_confirmation", "waiting_close", "closed"];
  const REASONS = ["failed", "user_closed", "agent_closed", "idle_timeout", "expired"];
  const EXPLICIT = ["agent_closed", "user_closed", "failed"];
  const PARTS = ["lifecycle", "sender", "webhooks"];
  const WHATIF_SETTINGS = ["PARLEY_TIMEOUT_IDLE", "PARLEY_TIMEOUT_PROCESSING", "PARLEY_TIMEOUT_AWAITING_CONFIRMATION",
                           "PARLEY_TIMEOUT_WAITING_CLOSE", "PARLEY_CLOSE_GRACE", "PARLEY_REOPEN_WINDOW"];
  const SVGNS = "http://www.w3.org/2000/svg";
  const view = document.getElementById("view");
  const tokenBox = document.getElementById("token");
  let generation = 0; // bumped on every navigation: answers for an older view are dropped
  let pollTimer = null;

  // ---- DOM helpers (text only) ----
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
      else if (k === "data") Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
    return e;
  }
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const c of children) e.append(c instanceof Node ? c : String(c));
    return e;
  }
  function table(head, rows, attrs) {
    return el("table", attrs, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
  }
  function setProblem(text) { document.getElementById("problem").textContent = text || ""; }

  // ---- times: local and relative ----
  function span(seconds) {
    const s = Math.round(Math.abs(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) { const m = Math.floor((s % 3600) / 60); return `${Math.floor(s / 3600)} h` + (m ? ` ${m} min` : ""); }
    const h = Math.floor((s % 86400) / 3600);
    return `${Math.floor(s / 86400)} d` + (h ? ` ${h} h` : "");
  }
  function relative(iso, future, past) {
    const d = (Date.parse(iso) - Date.now()) / 1000;
    return d >= 0 ? `${future} in ${span(d)}` : `${past} ${span(d)} ago`;
  }
  function local(iso) {
    return new Date(iso).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  }
  // A <time> whose relative part is kept current by the ticker below.
  function when(iso, future = "", past = "", attrs = {}) {
    if (!iso) return el("span", { class: "mute" }, "—");
    const t = el("time", { datetime: iso, title: iso, ...attrs, data: { at: iso, future, past } });
    renderTime(t);
    return t;
  }
  function renderTime(t) {
    const { at, future, past } = t.dataset;
    t.textContent = `${local(at)} · ${relative(at, future, past).trim()}`;
  }
  setInterval(() => document.querySelectorAll("time[data-at]").forEach(renderTime), 1000);

  function count(n, cap) { return n > cap ? `${cap.toLocaleString()}+` : Number(n).toLocaleString(); }

  // ---- API ----
  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
  class ApiError extends Error {}
  async function api(path, options = {}) {
    const headers = { Authorization: "Bearer " + token() };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method: options.method || "GET", headers,
                                  body: options.body === undefined ? undefined : JSON.stringify(options.body) });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (!r.ok) throw new ApiError(`${r.status}: ${(body && body.error) || r.statusText}`);
    return body;
  }

  // ---- charts (inline SVG) ----
  function bars(values, cls, label) {
    const w = 300, h = 56, n = values.length, max = Math.max(1, ...values), bw = w / n;
    const s = svg("svg", { width: "100%", viewBox: `0 0 ${w} ${h + 12}`, role: "img", "aria-label": label });
    values.forEach((v, i) => {
      const bh = (v / max) * h;
      const rect = svg("rect", { x: i * bw + 0.5, y: h - bh, width: Math.max(1, bw - 1), height: bh, class: cls });
      rect.append(svg("title", {}, `${v} ${label}, ${n - 1 - i} min ago`));
      s.append(rect);
    });
    s.append(svg("text", { x: 0, y: h + 11 }, "-60 min"), svg("text", { x: w - 22, y: h + 11 }, "now"),
             svg("text", { x: w / 2 - 10, y: 9 }, `max ${max}`));
    return s;
  }
  function lines(series, keys, label) {
    const w = 300, h = 56;
    const s = svg("svg", { width: "100%", viewBox: `0 0 ${w} ${h + 12}`, role: "img", "aria-label": label });
    if (series.length < 2) { s.append(svg("text", { x: 0, y: 20 }, "collecting samples…")); return s; }
    const max = Math.max(1e-9, ...series.flatMap((p) => keys.map(([k]) => p[k])));
    for (const [k, cls] of keys) {
      const pts = series.map((p, i) => `${((i / (series.length - 1)) * w).toFixed(1)},${(h - (p[k] / max) * h).toFixed(1)}`);
      s.append(svg("polyline", { points: pts.join(" "), class: cls }));
    }
    s.append(svg("text", { x: 0, y: h + 11 }, `${span((Date.parse(series.at(-1).at) - Date.parse(series[0].at)) / 1000)} ago`),
             svg("text", { x: w - 22, y: h + 11 }, "now"), svg("text", { x: w / 2 - 10, y: 9 }, `max ${+max.toFixed(2)}`));
    return s;
  }
  function hbars(entries, cap) {
    const total = Math.max(1, ...entries.map(([, n]) => n));
    const w = 300, row = 16;
    const hh = Math.max(row, entries.length * row);
    const s = svg("svg", { width: "100%", viewBox: `0 0 ${w} ${hh}`, role: "img", "aria-label": "close reasons" });
    entries.forEach(([k, n], i) => {
      s.append(svg("rect", { x: 110, y: i * row + 3, width: Math.max(1, ((n / total) * (w - 170))), height: row - 6, class: "bar-reason" }),
               svg("text", { x: 0, y: i * row + 12 }, k), svg("text", { x: w - 55, y: i * row + 12 }, count(n, cap)));
    });
    return s;
  }

  // ---- views ----
  function kv(pairs) {
    return el("div", { class: "kv" }, pairs.flatMap(([k, v, id]) => [el("span", {}, k), el("span", { class: "n", id }, v)]));
  }

  async function overview(gen) {
    const o = await api("/v1/overview");
    if (gen !== generation) return;
    const c = o.conversations, cap = o.cap;
    const lag = o.lag ? Object.entries(o.lag) : [];
    const totalLag = lag.reduce((a, [, v]) => a + v.lag, 0);
    const ev = o.events;
    const reasons = Object.entries(c.close_reasons_last_24h);
    const newest = o.dead_letters.newest;
    view.replaceChildren(
      el("h1", {}, "Overview"),
      el("div", { class: "grid" },
        el("div", { class: "card", id: "card-conversations" }, el("h2", {}, "Conversations"),
          el("div", { class: "big", id: "ov-open" }, count(c.open, cap)), el("div", { class: "mute" }, "open now"),
          kv([...Object.entries(c.open_by_state).map(([s, n]) => [s, count(n, cap), `ov-state-${s}`]),
              ["closed (last 24 h)", count(c.closed_last_24h, cap), "ov-closed-24h"]])),
        el("div", { class: "card" }, el("h2", {}, "Opened per minute (last hour)"),
          bars(c.per_minute.opened, "bar-opened", "opened"),
          el("h2", {}, "Closed per minute"), bars(c.per_minute.closed, "bar-closed", "closed")),
        el("div", { class: "card", id: "card-close-reasons" }, el("h2", {}, "Close reasons (last 24 h)"),
          reasons.length ? hbars(reasons, cap) : el("div", { class: "mute" }, "none")),
        el("div", { class: "card" }, el("h2", {}, "Timers"),
          kv([["overdue", count(o.timers.overdue, cap), "ov-timers-overdue"],
              ["due in the next minute", count(o.timers.next_minute, cap), "ov-timers-minute"],
              ["due in the next hour", count(o.timers.next_hour, cap), "ov-timers-hour"]])),
        el("div", { class: "card" }, el("h2", {}, "Events/s (conversation events)"),
          kv([["written", ev.in_per_s === null ? "…" : ev.in_per_s.toFixed(1), "ov-events-in"],
              ["applied", ev.applied_per_s === null ? "…" : ev.applied_per_s.toFixed(1), "ov-events-applied"]]),
          lines(ev.series, [["in_per_s", "line-in"], ["applied_per_s", "line-applied"]], "events per second")),
        el("div", { class: "card" }, el("h2", {}, "Consumer lag"),
          o.lag_error ? el("div", { class: "bad" }, "unavailable: ", o.lag_error) : null,
          o.lag ? kv(lag.map(([t, v]) => [t, v.lag.toLocaleString(), null]).concat([["total", totalLag.toLocaleString(), "ov-lag-total"]]))
                : el("div", { class: "mute" }, "asking Kafka…"),
          lines(ev.series, [["lag", "line-lag"]], "lag")),
        el("div", { class: "card" }, el("h2", {}, "Dead letters"),
          el("div", { class: "big " + (o.dead_letters.not_retried ? "bad" : "ok"), id: "ov-dead-letters" },
            count(o.dead_letters.not_retried, cap)),
          el("div", { class: "mute" }, "not retried"),
          newest ? el("div", {}, "newest: ", when(newest.failed_at, "", "failed"), el("pre", { id: "ov-newest-error" }, newest.error))
                 : null,
          el("a", { href: "#/dead-letters" }, "see all")),
        el("div", { class: "card" }, el("h2", {}, "Outbound sends"),
          kv([["queued", count(o.outbound.queued, cap), "ov-sends-queued"], ["sending", count(o.outbound.sending, cap), null],
              ["failed", count(o.outbound.failed, cap), "ov-sends-failed"]])),
        el("div", { class: "card" }, el("h2", {}, "Schedules"),
          kv(Object.entries(o.schedules).map(([s, n]) => [s, count(n, cap), `ov-schedules-${s}`]))),
        el("div", { class: "card", id: "card-pause" }, el("h2", {}, "Emergency switch"),
          el("div", { class: "kv" }, PARTS.flatMap((part) => {
            const p = o.paused[part];
            return [el("span", {}, part, " ", p ? el("span", { class: "bad", id: `ov-paused-${part}` }, "paused ", when(p.since, "", ""),
                                                     p.reason ? ` (${p.reason})` : "")
                                              : el("span", { class: "ok", id: `ov-paused-${part}` }, "running")),
                    el("button", { id: `${p ? "resume" : "pause"}-${part}`, on: { click: async (e) => {
                      e.target.disabled = true;
                      try { await api(`/v1/admin/${p ? "resume" : "pause"}`, { method: "POST", body: { what: part, reason: "console" } }); }
                      catch (err) { setProblem(err.message); }
                      poll(false);
                    } } }, p ? "Resume" : "Pause")];
          })),
          el("div", { class: "mute" }, "Paused parts take no events; webhooks still queue up in Kafka.")),
        el("div", { class: "card wide" }, el("h2", {}, "Webhook endpoints"),
          el("div", {}, "pending deliveries: ", el("span", { id: "ov-webhooks-pending" }, count(o.webhooks.pending, cap))),
          o.webhooks.endpoints.length
            ? table(["endpoint", "health", "parked"], o.webhooks.endpoints.map((e) => el("tr", {},
                el("td", {}, el("div", {}, e.id), el("div", { class: "mute" }, e.url)),
                el("td", {}, !e.enabled ? el("span", { class: "bad" }, "disabled ", e.disabled_reason || "")
                  : e.failing_since ? el("span", { class: "warn" }, "failing since ", when(e.failing_since, "", ""))
                  : el("span", { class: "ok" }, "healthy")),
                el("td", {}, count(e.failed, cap)))))
            : el("div", { class: "mute" }, "no endpoints registered")),
      ));
    return `overview at ${local(o.generated_at)}`;
  }

  function stateBadge(state) { return el("span", { class: `state ${state}`, data: { state } }, state); }
  function deadline(c) {
    if (c.state === "closed") return when(c.closed_at, "closes", "closed");
    return c.deadline_at ? when(c.deadline_at, "closes", "overdue by", { class: "deadline" }) : el("span", { class: "mute" }, "none");
  }

  function filtersOf(query) {
    return { state: query.get("state") || "", channel: query.get("channel") || "", contact: query.get("contact") || "",
             reason: query.get("reason") || "" };
  }
  function select(name, value, options) {
    return el("select", { name, id: `filter-${name}` }, el("option", { value: "" }, "any"),
      options.map((o) => el("option", { value: o, selected: o === value }, o)));
  }
  let channelsCache = null;
  async function conversations(gen, query, fresh) {
    const f = filtersOf(query);
    if (fresh || !channelsCache) channelsCache = (await api("/v1/channels")).items.map((c) => c.id);
    const params = new URLSearchParams({ limit: "100" });
    for (const [k, v] of Object.entries(f)) if (v) params.set(k, v);
    const page = await api("/v1/conversations?" + params);
    if (gen !== generation) return;
    const rows = page.items.map((c) => el("tr", {
        class: "row", data: { id: c.id, state: c.state },
        on: { click: () => { location.hash = "#/conversations/" + encodeURIComponent(c.id); } } },
      el("td", {}, el("a", { href: "#/conversations/" + encodeURIComponent(c.id) }, when(c.opened_at, "opens", "opened"))),
      el("td", {}, c.channel_id), el("td", { class: "contact" }, c.contact_id), el("td", {}, stateBadge(c.state)),
      el("td", {}, deadline(c)), el("td", {}, c.close_reason || ""), el("td", {}, c.assigned_agent || "")));
    if (fresh) {
      const form = el("form", { class: "filters", id: "filters", on: { submit: (e) => {
          e.preventDefault();
          const q = new URLSearchParams();
          for (const [k, v] of new FormData(e.target)) if (v) q.set(k, String(v));
          const target = "#/conversations" + (q.size ? "?" + q : "");
          if (location.hash === target) route(); else location.hash = target;
        }, change: (e) => { if (e.target.tagName === "SELECT") e.currentTarget.requestSubmit(); } } },
        el("label", {}, "state", select("state", f.state, STATES)),
        el("label", {}, "channel", select("channel", f.channel, channelsCache)),
        el("label", {}, "contact", el("input", { name: "contact", id: "filter-contact", value: f.contact, placeholder: "exact id" })),
        el("label", {}, "close reason", select("reason", f.reason, REASONS)),
        el("button", { type: "submit" }, "Filter"));
      view.replaceChildren(el("h1", {}, "Conversations"), form,
        table(["opened", "channel", "contact", "state", "deadline / closed", "close reason", "agent"], [], { id: "conversations" }),
        el("p", { class: "mute", id: "conversations-count" }));
    }
    document.querySelector("#conversations tbody").replaceChildren(...rows);
    document.getElementById("conversations-count").textContent =
      `${page.items.length} shown` + (page.next_cursor ? " (newest 100; narrow the filters to see others)" : "");
    return "conversations";
  }

  function ticks(status) {
    const marks = { queued: "○", received: "", sent: "✓", delivered: "✓✓", read: "✓✓", played: "✓✓", failed: "✗" };
    return el("span", { class: `ticks ${status}`, title: status, "aria-label": status }, marks[status] ?? "");
  }
  function payloadOf(m) {
    if (typeof m.payload === "string") { try { return JSON.parse(m.payload); } catch (_) { return {}; } }
    return m.payload || {};
  }
  async function conversation(gen, id, fresh) {
    const enc = encodeURIComponent(id);
    const [c, msgs, events] = await Promise.all([api(`/v1/conversations/${enc}`), api(`/v1/conversations/${enc}/messages`),
                                                 api(`/v1/conversations/${enc}/events`)]);
    if (gen !== generation) return;
    const names = [...new Set(msgs.items.map((m) => payloadOf(m).contact_profile?.name).filter((n) => typeof n === "string"))];
    const info = el("div", { class: "kv card info", id: "conversation-info" },
      el("span", {}, "state"), el("span", { id: "conv-state" }, stateBadge(c.state)),
      el("span", {}, "channel"), el("span", {}, c.channel_id),
      el("span", {}, "contact"), el("span", { id: "conv-contact" }, c.contact_id),
      names.length ? [el("span", {}, "contact name"), el("span", { id: "conv-contact-name" }, names.join(", "))] : null,
      el("span", {}, "opened"), el("span", {}, when(c.opened_at, "opens", "opened")),
      el("span", {}, c.state === "closed" ? "closed" : "pending deadline"),
      el("span", { id: "conv-deadline" }, deadline(c),
        c.pending_close_reason && c.state !== "closed" ? ` (then ${c.pending_close_reason})` : ""),
      el("span", {}, "close reason"), el("span", { id: "conv-reason" }, c.close_reason || "—"),
      el("span", {}, "agent"), el("span", {}, c.assigned_agent || "—"),
      el("span", {}, "version"), el("span", {}, String(c.version)),
      c.previous_conversation_id ? [el("span", {}, "previous"),
        el("a", { href: "#/conversations/" + encodeURIComponent(c.previous_conversation_id) }, c.previous_conversation_id)] : null);
    const messages = table(["sent", "", "type", "text", "status"], msgs.items.map((m) => el("tr", { class: m.direction === "inbound" ? "msg-in" : "msg-out" },
      el("td", {}, when(m.sent_at, "", "")), el("td", { title: m.direction, class: "direction" }, m.direction === "inbound" ? "→ in" : "← out"),
      el("td", {}, m.type), el("td", { class: "text message-text" }, m.text ?? JSON.stringify(payloadOf(m))),
      el("td", {}, ticks(m.status), " ", el("span", { class: "mute" }, m.status)))), { id: "messages" });
    const timeline = table(["when", "kind", "transition", "cause", "detail", "v"], events.items.map((e) => el("tr", {},
      el("td", {}, when(e.occurred_at, "", "")), el("td", {}, e.kind),
      el("td", {}, e.from_state || e.to_state ? `${e.from_state || "∅"} → ${e.to_state || "∅"}` : ""),
      el("td", {}, e.cause), el("td", { class: "text" }, e.detail), el("td", {}, String(e.version)))), { id: "timeline" });
    if (fresh) {
      const out = el("span", { id: "action-result", class: "mute" });
      const act = async (what, body) => {
        out.textContent = `${what}…`;
        try {
          const r = await api(`/v1/conversations/${enc}/${what}`, { method: "POST", body });
          out.textContent = `${what} accepted (${r.accepted}); the worker applies it in order`;
        } catch (e) { out.textContent = `${what} refused: ${e.message}`; }
        poll(false); // refresh the data now; the buttons and this answer stay
      };
      const agent = el("input", { id: "agent-id", value: "console", size: 10, "aria-label": "agent id" });
      const reason = el("select", { id: "close-reason", "aria-label": "close reason" }, EXPLICIT.map((r) => el("option", { value: r }, r)));
      view.replaceChildren(
        el("p", {}, el("a", { href: "#/conversations" }, "← conversations")),
        el("h1", {}, "Conversation ", el("span", { class: "mute" }, id)),
        el("div", { id: "conversation-info-slot" }),
        el("div", { class: "actions" },
          el("span", {}, agent, " ", el("button", { id: "accept", on: { click: () => act("accept", { agent_id: agent.value }) } }, "Accept")),
          el("span", {}, reason, " ", el("button", { id: "close", on: { click: () => act("close", { reason: reason.value, by: "console" }) } }, "Close")),
          out),
        el("div", { class: "section" }, el("h2", {}, "Messages"), el("div", { id: "messages-slot" })),
        el("div", { class: "section" }, el("h2", {}, "Timeline (events and decisions)"), el("div", { id: "timeline-slot" })));
    }
    document.getElementById("conversation-info-slot").replaceChildren(info);
    document.getElementById("messages-slot").replaceChildren(messages);
    document.getElementById("timeline-slot").replaceChildren(timeline);
    const closed = c.state === "closed";
    document.getElementById("accept").disabled = closed || c.state === "processing";
    document.getElementById("close").disabled = closed;
    return "conversation";
  }

  async function deadLetters(gen, fresh) {
    const page = await api("/v1/dead-letters?limit=100");
    if (gen !== generation) return;
    if (fresh) view.replaceChildren(el("h1", {}, "Dead letters"), el("p", { class: "mute" },
      "Events the pipeline could not process. Retry puts one back where it came from; a still-poisonous one is parked again."),
      el("div", { id: "letters-slot" }));
    const rows = page.items.map((d) => {
      const result = el("div", { class: "mute retry-result" });
      return el("tr", { data: { id: String(d.id) } },
        el("td", {}, String(d.id)), el("td", {}, when(d.failed_at, "", "failed")),
        el("td", {}, d.source_topic, el("div", { class: "mute" }, `partition ${d.source_partition}, offset ${d.source_offset}`)),
        el("td", { class: "text" }, d.key ?? ""),
        el("td", {}, el("pre", { class: "letter-error" }, d.error)),
        el("td", {}, String(d.attempts)),
        el("td", {}, d.retried_at ? when(d.retried_at, "", "retried") : el("span", { class: "mute" }, "not retried")),
        el("td", {}, el("details", {}, el("summary", {}, "value"), el("pre", {}, d.value))),
        el("td", {}, el("button", { class: "retry", on: { click: async (e) => {
          e.target.disabled = true;
          try { const r = await api(`/v1/dead-letters/${encodeURIComponent(d.id)}/retry`, { method: "POST" });
                result.textContent = `re-driven: ${r.events} event(s)`; }
          catch (err) { result.textContent = `refused: ${err.message}`; }
          poll(false);
        } } }, "Retry"), result));
    });
    // A row keeps its open <details> and retry result across refreshes: only new rows are built.
    const slot = document.getElementById("letters-slot");
    let t = slot.querySelector("table");
    if (!t) { t = table(["id", "failed", "source", "key", "error", "attempts", "retried", "", ""], [], { id: "dead-letters" }); slot.append(t); }
    const body = t.querySelector("tbody");
    const old = new Map([...body.children].map((tr) => [tr.dataset.id, tr]));
    body.replaceChildren(...rows.map((tr) => {
      const prev = old.get(tr.dataset.id);
      if (prev) { prev.children[6].replaceChildren(...tr.children[6].childNodes); return prev; }
      return tr;
    }));
    if (!page.items.length) slot.replaceChildren(el("p", { id: "no-letters" }, "No dead letters."));
    return "dead letters";
  }

  async function channels(gen) {
    const page = await api("/v1/channels");
    if (gen !== generation) return;
    view.replaceChildren(el("h1", {}, "Channels"), table(["id", "provider", "created", ""], page.items.map((c) => el("tr", {},
      el("td", {}, c.id), el("td", {}, c.provider), el("td", {}, when(c.created_at, "", "created")),
      el("td", {}, el("a", { href: "#/conversations?" + new URLSearchParams({ channel: c.id }) }, "conversations")))), { id: "channels" }));
    return "channels";
  }

  function duration(s) {
    if (s === null || s === undefined) return "-";
    if (s < 60) return s.toFixed(s < 1 ? 3 : 0) + " s";
    return span(s);
  }
  function rowsTable(head, rows, attrs) {
    return table(head, rows.map((r) => el("tr", {}, r.map((v) => el("td", {}, v ?? "")))), attrs);
  }
  function showWhatif(r) {
    const cur = r.current, chg = r.changed, c = r.comparison;
    const reasons = [...new Set([...Object.keys(cur.closed_by_reason), ...Object.keys(chg.closed_by_reason)])].sort();
    const peak = (x) => (x.peak_hour ? `${x.peak_firings_per_hour} (${x.peak_hour})` : "-");
    const out = [
      el("p", {}, `${r.records_read} records, ${r.events} lifecycle events on ${r.threads} threads; ` +
        `${r.recorded_firings} recorded firings not used (deadlines simulated). Changed: ` +
        (Object.entries(r.overrides).map(([k, v]) => k + "=" + v).join(" ") || "nothing")),
      rowsTable(["", "current", "changed"], [
        ["conversations opened", cur.opened, chg.opened],
        ["closed", cur.closed, chg.closed],
        ...reasons.map((k) => ["  " + k, cur.closed_by_reason[k] || 0, chg.closed_by_reason[k] || 0]),
        ["open at the end", cur.open_at_end, chg.open_at_end],
        ["duration median", duration(cur.duration.median_s), duration(chg.duration.median_s)],
        ["duration p90", duration(cur.duration.p90_s), duration(chg.duration.p90_s)],
        ["wrote again after an automatic close", cur.reopened_after_close, chg.reopened_after_close],
        ["timer firings", cur.timer_firings, chg.timer_firings],
        ["peak firings in one hour", peak(cur), peak(chg)],
      ], { id: "whatif-table" }),
      el("p", {}, `Both runs: ${c.paired}; same outcome ${c.same_outcome}, different ${c.different_outcome}; ` +
        `closing earlier ${c.closed_earlier.count} (median ${duration(c.closed_earlier.median_by_s)}), ` +
        `later ${c.closed_later.count} (median ${duration(c.closed_later.median_by_s)}); ` +
        `only in current ${c.only_in_current}, only in changed ${c.only_in_changed}.`),
    ];
    if (r.check) out.push(el("p", {}, `Postgres check: ${r.check.matched} of ${r.check.checked} conversations match` +
      Object.entries(r.check.mismatched).map(([k, v]) => `; ${v.count} ${k}: ${v.why}`).join("")));
    for (const ex of r.examples) {
      out.push(el("h3", {}, "Example " + ex.conversation_id),
               rowsTable(["time", "event", "current", "changed"], ex.timeline.map((t) => [t.at, t.event, t.current, t.changed])));
    }
    return out;
  }
  function whatif(gen) {
    // A form, not polled: a run is started by hand and followed until it ends.
    if (view.querySelector("#whatif")) return "what-if";
    const status = el("span", { id: "whatif-status", class: "mute" });
    const result = el("div", { id: "whatif-result" });
    const input = (name, attrs) => el("label", {}, name, el("input", { name, ...attrs }));
    const form = el("form", { id: "whatif", class: "filters", on: { submit: async (ev) => {
      ev.preventDefault();
      const f = new FormData(ev.target);
      const set = {};
      for (const k of WHATIF_SETTINGS) if (f.get(k)) set[k] = f.get(k);
      const body = { since: f.get("since"), set, examples: Number(f.get("examples") || 0) };
      if (f.get("until")) body.until = f.get("until");
      status.textContent = "starting…";
      result.replaceChildren();
      try {
        const job = await api("/v1/whatif", { method: "POST", body });
        for (;;) {
          if (gen !== generation) return;
          const v = await api(job.url);
          status.textContent = `${v.status}: ${v.progress.records_read} of ${v.progress.records_total} records`;
          if (v.status === "done") { result.replaceChildren(...showWhatif(v.result)); break; }
          if (v.status === "failed") throw new ApiError(v.error);
          await new Promise((res) => setTimeout(res, 1000)); // the job's progress is polled, once a second
        }
      } catch (e) { status.textContent = e.message; }
    } } },
      input("since", { value: "P1D" }), input("until", { placeholder: "now" }),
      input("examples", { type: "number", min: 0, max: 100, value: 0 }),
      WHATIF_SETTINGS.map((k) => input(k, { placeholder: "unchanged", size: 10 })),
      el("button", { type: "submit" }, "Run"));
    view.replaceChildren(el("h1", {}, "What-if"),
      el("p", { class: "mute" }, "Replays the retained log under the current policy and a changed one; writes nothing. " +
        "Times: ISO-8601 with a timezone, or a duration before now (P2D, PT6H). Durations: seconds or ISO-8601."),
      form, status, result);
    return "what-if";
  }

  // ---- routing and polling ----
  function parse() {
    const [path, q] = location.hash.replace(/^#/, "").split("?");
    const parts = path.split("/").filter(Boolean);
    return { name: parts[0] || "overview", id: parts[1] ? decodeURIComponent(parts[1]) : null, query: new URLSearchParams(q || "") };
  }
  // One poll at a time per view: a refresh asked for while one runs (a button pressed) runs right
  // after it, instead of starting a second chain of timers.
  let busy = null; // the generation a poll is running for
  let again = false;
  async function poll(fresh) {
    if (!fresh && busy === generation) { again = true; return; }
    clearTimeout(pollTimer);
    const gen = generation;
    busy = gen;
    again = false;
    let next = null;
    try { next = await pollOnce(gen, fresh); } finally { if (busy === gen) busy = null; }
    if (gen !== generation || next === null) return;
    pollTimer = setTimeout(() => poll(next.fresh), again ? 0 : next.delay);
    again = false;
  }
  // Draws the current view; says when to poll next (null: not again).
  async function pollOnce(gen, fresh) {
    const where = parse();
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === where.name));
    if (!token()) {
      view.replaceChildren(el("p", { id: "need-token" },
        "Paste the admin token (PARLEY_ADMIN_TOKEN; `make run` prints a link carrying it) above."));
      return null;
    }
    try {
      let what;
      if (where.name === "conversations" && where.id) what = await conversation(gen, where.id, fresh);
      else if (where.name === "conversations") what = await conversations(gen, where.query, fresh);
      else if (where.name === "dead-letters") what = await deadLetters(gen, fresh);
      else if (where.name === "channels") what = await channels(gen);
      else if (where.name === "whatif") { whatif(gen); document.getElementById("updated").textContent = ""; return null; }
      else what = await overview(gen);
      if (gen !== generation) return null;
      setProblem("");
      document.getElementById("updated").textContent = `${what} updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      if (gen !== generation) return null;
      if (!(e instanceof ApiError) && !(e instanceof TypeError)) throw e; // TypeError: fetch found no server
      setProblem(e.message);
      if (fresh) view.replaceChildren(el("p", { class: "bad" }, e.message));
      return { fresh, delay: POLL_MS }; // a view that never drew is drawn anew
    }
    return { fresh: false, delay: where.name === "overview" ? OVERVIEW_POLL_MS : POLL_MS };
  }
  function route() { generation += 1; poll(true); }

  // A link may carry the token in its fragment (#token=..., never sent to the server): keep it for
  // this tab and take it out of the address bar.
  const linked = new URLSearchParams(location.hash.slice(1)).get("token");
  if (linked) { sessionStorage.setItem(TOKEN_KEY, linked); history.replaceState(null, "", location.pathname + "#/overview"); }
  tokenBox.value = token();
  document.getElementById("token-form").addEventListener("submit", (e) => {
    e.preventDefault(); sessionStorage.setItem(TOKEN_KEY, tokenBox.value.trim()); route();
  });
  document.getElementById("forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); tokenBox.value = ""; route(); });
  window.addEventListener("hashchange", route);
  route();
})();

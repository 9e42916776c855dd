/* The System health page (monitoring/health_page.py).
 *
 * Draws the page from the document in #system-health-data, then fetches it
 * again from the page's own URL (?format=json) every refresh_seconds (as the
 * latest document says), or when "Refresh now" is pressed or the tab comes
 * back into view, and draws it anew: no full page reload. Every
 * value goes into the page as text (textContent), never as markup. The
 * calls-per-minute charts are inline SVG built here; no library, no CDN.
 */
(function () {
  "use strict";

  const root = document.getElementById("system-health");
  if (!root) {
    return;
  }
  const SVG = "http://www.w3.org/2000/svg";
  const CHART = {width: 300, height: 64, pad: 2};
  const endpoint = root.dataset.endpoint;
  let timer = null;
  let timerSeconds = null;
  let inFlight = false;

  // -- small builders --------------------------------------------------------

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) {
        continue;
      }
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      node.setAttribute(name, String(value));
    }
    return node;
  }

  function percent(ratio, digits) {
    return ratio === null || ratio === undefined ? "–" : (100 * ratio).toFixed(digits === undefined ? 1 : digits) + "%";
  }

  function millis(value) {
    return value === null || value === undefined ? "–" : Math.round(value) + " ms";
  }

  function clock(iso) {
    return iso ? new Date(iso).toLocaleTimeString() : "–";
  }

  function label(text) {
    return String(text).replace(/_/g, "-");
  }

  function level(name, text) {
    return el("span", {class: "level level-" + (name || "none")}, text);
  }

  function link(href, text) {
    return el("a", {href: href}, text);
  }

  // -- the parts of the page -------------------------------------------------

  function banner(doc) {
    const node = document.getElementById("health-banner");
    node.replaceChildren();
    node.hidden = doc.critical.length === 0;
    if (node.hidden) {
      return;
    }
    node.append(el("strong", null, doc.critical.length + " critical alert" + (doc.critical.length > 1 ? "s" : "") + ": "));
    const list = el("ul");
    for (const alert of doc.critical) {
      list.append(el("li", null, link(alert.url, (alert.integration ? alert.integration + ": " : "") + alert.message)));
    }
    node.append(list);
  }

  function toolbar(doc) {
    const status = document.getElementById("health-status");
    status.className = "health-status status-" + doc.status;
    status.textContent = "Overall: " + doc.status;
    document.getElementById("health-updated").textContent = clock(doc.generated_at);
    document.getElementById("health-updated").setAttribute("datetime", doc.generated_at);
    document.getElementById("health-refresh-seconds").textContent = doc.refresh_seconds;
  }

  function tile(title, value, detail, levelName, href) {
    return el("div", {class: "health-tile level-border-" + (levelName || "none")},
      el("div", {class: "health-tile-title"}, href ? link(href, title) : title),
      el("div", {class: "health-tile-value"}, value),
      detail ? el("div", {class: "health-quiet"}, detail) : null);
  }

  function summary(doc) {
    const integrations = doc.integrations;
    const open = integrations.filter((i) => i.state === "open").length;
    const halfOpen = integrations.filter((i) => i.state === "half_open").length;
    const tiles = [
      tile("Integrations", String(integrations.length),
        open + " open, " + halfOpen + " half-open", open ? "critical" : halfOpen ? "warning" : "healthy",
        doc.links.integrations),
      tile("Cache hit ratio", percent(doc.cache.hit_ratio),
        doc.cache.hits + " hits, " + doc.cache.misses + " misses (last " + doc.window_minutes + " min)", null),
      tile("Alerts", String(doc.critical.length + doc.warnings.length),
        doc.critical.length + " critical, " + doc.warnings.length + " warning", doc.status, doc.links.alerts),
    ];
    if (doc.dead_letters) {
      const byStatus = doc.dead_letters.by_status;
      tiles.push(tile("Dead letters waiting", String(doc.dead_letters.waiting),
        byStatus.pending + " pending, " + byStatus.retrying + " retrying, " + byStatus.dead + " dead, " +
        byStatus.succeeded + " succeeded", byStatus.dead ? "critical" : doc.dead_letters.waiting ? "warning" : "healthy",
        doc.dead_letters.url));
    }
    tiles.push(tile("Fault injections", String(doc.faults.length),
      doc.fault_injection_enabled ? "allowed on this site" : "off on this site",
      doc.faults.length ? "critical" : null, doc.links.faults));
    document.getElementById("health-summary").replaceChildren(...tiles);
  }

  function quotaBar(name, window) {
    const ratio = Math.min(window.ratio || 0, 1);
    const fill = el("div", {class: "health-bar-fill level-bg-" + window.level});
    fill.style.width = (100 * ratio).toFixed(1) + "%";
    return el("div", {class: "health-quota", "data-window": name},
      el("div", {class: "health-quota-label"}, name + ": " + window.used + " / " + window.limit + " (" + percent(window.ratio, 0) + ")"),
      el("div", {class: "health-bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": window.limit,
        "aria-valuenow": window.used, "aria-label": name + " quota"}, fill));
  }

  function chart(counts, windowMinutes) {
    const max = Math.max(1, ...counts);
    const step = (CHART.width - 2 * CHART.pad) / Math.max(counts.length - 1, 1);
    const points = counts.map((count, index) => [
      CHART.pad + index * step,
      CHART.height - CHART.pad - (count / max) * (CHART.height - 2 * CHART.pad),
    ]);
    const line = points.map(([x, y], index) => (index ? "L" : "M") + x.toFixed(1) + "," + y.toFixed(1)).join(" ");
    const baseline = (CHART.height - CHART.pad).toFixed(1);
    const area = line + " L" + points[points.length - 1][0].toFixed(1) + "," + baseline +
      " L" + points[0][0].toFixed(1) + "," + baseline + " Z";
    const total = counts.reduce((sum, count) => sum + count, 0);
    const node = svg("svg", {class: "health-chart", viewBox: "0 0 " + CHART.width + " " + CHART.height,
      preserveAspectRatio: "none", role: "img", "data-points": counts.length, "data-max": max});
    const title = svg("title");
    title.textContent = "Calls per minute over the last " + windowMinutes + " min: " + total + " calls, at most " +
      Math.max(...counts) + " in a minute";
    node.append(title, svg("path", {class: "health-chart-area", d: area}),
      svg("path", {class: "health-chart-line", d: line}));
    return el("figure", {class: "health-figure"}, node,
      el("figcaption", {class: "health-quiet"},
        "Calls/min, last " + windowMinutes + " min (peak " + Math.max(...counts) + ")"));
  }

  function stat(name, value) {
    return el("div", {class: "health-stat"}, el("dt", null, name), el("dd", null, value));
  }

  function card(integration, doc) {
    const state = integration.state;
    let stateText = label(state);
    if (integration.mode !== "normal") {
      stateText += " (" + label(integration.mode).replace(/-/g, " ") + ")";
    }
    const quota = integration.quota;
    const latency = integration.latency;
    const stats = el("dl", {class: "health-stats"},
      stat("Calls", String(integration.calls)),
      stat("Success", level(integration.success_level, percent(integration.success_rate))),
      stat("p50", millis(latency.p50_ms)),
      stat("p95", level(latency.level, millis(latency.p95_ms))),
      stat("p99", millis(latency.p99_ms)),
      stat("Cache hits", percent(integration.cache.hit_ratio)),
      stat("Capacity", integration.capacity < 1 ? level("warning", percent(integration.capacity, 0) + " (degraded)")
        : "100%"),
      stat("Dead letters", String(integration.dead_letters_waiting)));
    const fault = integration.fault;
    return el("article", {class: "health-card state-" + state, "data-integration": integration.name,
      "data-state": state},
      el("header", {class: "health-card-header"},
        el("h3", null, link(integration.url, integration.name)),
        el("span", {class: "health-quiet"}, integration.kind.replace(/_/g, " ")),
        el("span", {class: "health-state state-bg-" + state, "data-role": "state"}, stateText)),
      quota ? el("div", {class: "health-quotas"},
        quota.hourly ? quotaBar("hourly", quota.hourly) : null,
        quota.daily ? quotaBar("daily", quota.daily) : null) : el("div", {class: "health-quiet"}, "No quota."),
      stats,
      chart(integration.calls_per_minute, doc.window_minutes),
      fault ? el("p", {class: "health-fault"},
        "Fault injected: " + fault.error_percent + "% errors, +" + fault.latency_ms + " ms until " +
        clock(fault.ends_at) + (fault.created_by ? " (by " + fault.created_by + ")" : "")) : null);
  }

  function table(headers, rows, empty) {
    if (!rows.length) {
      return el("p", {class: "health-quiet health-empty"}, empty);
    }
    const head = el("tr", null, ...headers.map((header) => el("th", {scope: "col"}, header)));
    return el("table", {class: "health-table"}, el("thead", null, head),
      el("tbody", null, ...rows.map((cells) => el("tr", null, ...cells.map((cell) => el("td", null, cell))))));
  }

  function alerts(doc) {
    const rows = doc.critical.concat(doc.warnings).map((alert) => [
      level(alert.severity, alert.severity), alert.integration || "(site)", link(alert.url, alert.message),
      alert.status, String(alert.occurrences), clock(alert.last_seen)]);
    document.getElementById("health-alerts").replaceChildren(
      table(["Severity", "Integration", "Message", "Status", "Seen", "Last seen"], rows, "No active alert."));
  }

  function ruleValue(rule, entry) {
    const where = entry.integration === null ? "" : entry.integration + ": ";
    const value = entry.value === null ? "no data" : entry.value + (rule.unit || "");
    const samples = entry.samples === null ? "" : " (" + entry.samples + " samples)";
    return where + value + samples;
  }

  function rules(doc) {
    const levels = (rule) => rule.direction + " " + [
      rule.warning === null ? null : "warning " + rule.warning + (rule.unit || ""),
      rule.critical === null ? null : "critical " + rule.critical + (rule.unit || "")].filter(Boolean).join(", ");
    const stateLevel = (state) => state === "error" ? "critical" : state === "no_data" ? null : state;
    const rows = (doc.rules || []).map((rule) => [
      el("span", {title: rule.description || rule.metric, "data-rule": rule.name}, rule.name),
      rule.state === "error" ? el("span", {class: "health-rule-error"}, rule.error) :
        rule.values.length ? rule.values.map((entry) => ruleValue(rule, entry)).join("; ") : "no data",
      levels(rule),
      level(stateLevel(rule.state), rule.state.replace("_", " "))]);
    document.getElementById("health-rules").replaceChildren(
      table(["Rule", "Current value", "Levels", "State"], rows, "No user-defined rule."));
  }

  function faults(doc) {
    const rows = doc.faults.map((fault) => [
      link(fault.url, fault.integration), fault.error_percent + "%", fault.latency_ms + " ms",
      clock(fault.starts_at), clock(fault.ends_at), fault.created_by || "–"]);
    document.getElementById("health-faults").replaceChildren(
      table(["Integration", "Errors", "Latency", "Since", "Until", "By"], rows,
        doc.fault_injection_enabled ? "None." : "None (fault injection is off on this site)."));
  }

  function render(doc) {
    banner(doc);
    toolbar(doc);
    summary(doc);
    document.getElementById("health-cards").replaceChildren(...doc.integrations.map((i) => card(i, doc)));
    rules(doc);
    alerts(doc);
    faults(doc);
    root.dataset.generatedAt = doc.generated_at;
    if (doc.refresh_seconds !== timerSeconds) {
      schedule(doc.refresh_seconds);
    }
  }

  // -- refreshing ------------------------------------------------------------

  function showError(message) {
    const node = document.getElementById("health-error");
    node.textContent = message || "";
    node.hidden = !message;
  }

  async function refresh() {
    if (inFlight) {
      return;
    }
    inFlight = true;
    try {
      const response = await fetch(endpoint, {credentials: "same-origin", headers: {Accept: "application/json"}});
      const type = response.headers.get("Content-Type") || "";
      if (response.redirected || !type.startsWith("application/json")) {
        showError("Your session has ended: reload the page to log in again.");
        return;
      }
      if (!response.ok) {
        showError("Could not refresh (HTTP " + response.status + "); showing the last figures.");
        return;
      }
      render(await response.json());
      showError("");
    } catch (error) {
      showError("Could not refresh (" + error.message + "); showing the last figures.");
    } finally {
      inFlight = false;
      root.dataset.refreshes = String(Number(root.dataset.refreshes || 0) + 1);
    }
  }

  function schedule(seconds) {
    clearInterval(timer);
    timerSeconds = seconds;
    timer = setInterval(() => {
      if (!document.hidden) {
        refresh();
      }
    }, seconds * 1000);
  }

  const initial = JSON.parse(document.getElementById("system-health-data").textContent);
  render(initial);
  document.getElementById("health-refresh").addEventListener("click", refresh);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      refresh();
    }
  });
})();

/* edgelabel dashboard: draws /api/status and keeps it fresh by polling (no page reload). */
"use strict";

(() => {
  const POLL_MS = 2000;
  const MAX_LOGS = 8;
  const thumbs = new Map(); // source -> {seq, loading}
  let lastLogSeq = 0;
  let logs = [];

  const $ = (sel, root) => (root || document).querySelector(sel);

  function meter(name, percent) {
    const el = $(`[data-meter="${name}"]`);
    if (!el) return;
    const p = EL.num(percent);
    el.style.width = `${p === null ? 0 : Math.min(100, Math.max(0, p))}%`;
    el.className = p !== null && p >= 90 ? "bad" : p !== null && p >= 75 ? "warn" : "";
  }

  function renderDevice(dev) {
    const card = $("#card-device");
    if (!dev) return;
    EL.setF(card, "uptime", EL.fmtDuration(dev.uptime_s));
    const cpu = dev.cpu || {};
    const load = Array.isArray(cpu.loadavg) ? ` · load ${cpu.loadavg[0].toFixed(2)}` : "";
    EL.setF(card, "cpu", `${cpu.percent === null || cpu.percent === undefined ? "–" : `${cpu.percent.toFixed(0)} %`}${load}${cpu.cores ? ` · ${cpu.cores} cores` : ""}`);
    meter("cpu", cpu.percent);
    const mem = dev.memory;
    EL.setF(card, "memory", mem ? `${EL.fmtBytes(mem.used)} of ${EL.fmtBytes(mem.total)} (${mem.percent.toFixed(0)} %)` : "–");
    meter("memory", mem ? mem.percent : null);
    const disks = (dev.disk || []).map((d) => `${d.label}: ${d.percent === null ? "?" : d.percent.toFixed(0)} % used, ${EL.fmtBytes(d.free)} free`);
    EL.setF(card, "disk", disks.length ? disks.join(" · ") : "–");
    const temps = dev.temperatures || [];
    EL.setF(card, "temperatures", temps.length ? temps.map((t) => `${t.type} ${t.celsius.toFixed(1)} °C`).join(" · ") : "no thermal zones on this machine");
    const hot = temps.some((t) => t.celsius >= 85);
    card.querySelector('[data-f="temperatures"]').classList.toggle("error-text", hot);
    const gpu = dev.gpu || {};
    const gpuEl = card.querySelector('[data-f="gpu"]');
    if (gpu.available) {
      gpuEl.textContent = `${gpu.load_percent.toFixed(0)} %${gpu.name ? ` · ${gpu.name}` : ""}${gpu.celsius ? ` · ${gpu.celsius} °C` : ""}`;
      gpuEl.classList.remove("muted");
    } else {
      gpuEl.textContent = `not readable (${gpu.reason || "unknown"})`;
      gpuEl.classList.add("muted");
    }
  }

  function renderEngine(engine) {
    const card = $("#card-engine");
    if (!engine) {
      EL.setF(card, "engine", "model not loaded");
      return;
    }
    EL.setF(card, "engine", engine.engine || "–");
    EL.setF(card, "engine_reason", engine.engine_reason || "–");
    EL.setF(card, "provider", engine.provider || "–");
    EL.setF(card, "precision", engine.precision || "–");
    EL.setF(card, "model", `${engine.name}${engine.family ? ` (${engine.family})` : ""}`);
    EL.setF(card, "sha", engine.sha256 ? `${engine.sha256.slice(0, 16)}…` : "–", engine.sha256 || "");
    const size = Array.isArray(engine.input_size) ? `${engine.input_size[1]} × ${engine.input_size[0]} px` : "–";
    EL.setF(card, "input", size);
    const avg = EL.num(engine.inference_ms_avg), last = EL.num(engine.inference_ms_last);
    EL.setF(card, "inference", avg === null ? "no frame yet" : `${avg.toFixed(1)} ms average${last === null ? "" : ` · ${last.toFixed(1)} ms last`}`);
  }

  function renderMqtt(m, now) {
    const card = $("#card-mqtt");
    const state = $('[data-f="mqtt_state"]', card);
    if (!m || !m.enabled) {
      EL.badge(state, "disabled", "muted");
      ["broker", "outbox", "last_publish", "mqtt_latency", "mqtt_dropped", "mqtt_error"].forEach((f) => EL.setF(card, f, "–"));
      return;
    }
    if (m.connected === true) EL.badge(state, "connected", "ok");
    else if (m.connected === false) EL.badge(state, "disconnected", "bad");
    else EL.badge(state, "unknown", "muted");
    EL.setF(card, "broker", m.broker || "–");
    EL.setF(card, "outbox", m.outbox_depth === null || m.outbox_depth === undefined ? "–" : `${EL.fmtNum(m.outbox_depth)} waiting`);
    EL.setF(card, "last_publish", EL.fmtAgo(m.last_publish_at, now));
    const d = m.details || {};
    const p50 = EL.num(d.puback_p50_ms), p99 = EL.num(d.puback_p99_ms);
    EL.setF(card, "mqtt_latency", p50 === null ? "no label acknowledged yet"
      : `${p50.toFixed(0)} ms median · ${p99.toFixed(0)} ms p99 (last ${EL.fmtNum(d.puback_latency_n)} labels)`,
      "from the frame's capture to the broker's acknowledgement of its label");
    const drops = m.drops ? Object.entries(m.drops).map(([k, v]) => `${k.replace(/_/g, " ")}: ${v}`).join(", ") : "";
    EL.setF(card, "mqtt_dropped", EL.fmtNum(m.dropped), drops);
    EL.setF(card, "mqtt_error", m.last_error || "–");
    $('[data-f="mqtt_error"]', card).classList.toggle("error-text", !!m.last_error);
  }

  function makeCard(name) {
    const tpl = $("#source-card");
    const card = tpl.content.firstElementChild.cloneNode(true);
    card.dataset.source = name;
    const title = $('[data-role="title"]', card);
    title.textContent = name;
    title.href = `/sources/${encodeURIComponent(name)}`;
    $('[data-role="thumb-link"]', card).href = `/sources/${encodeURIComponent(name)}`;
    $('[data-role="thumb"]', card).alt = `latest frame of ${name} with detections`;
    $('[data-role="live"]', card).href = `/sources/${encodeURIComponent(name)}`;
    $('[data-role="labels"]', card).href = `/labels?source=${encodeURIComponent(name)}`;
    card.querySelectorAll("form[data-action]").forEach((f) => {
      f.action = `/sources/${encodeURIComponent(name)}/${f.dataset.action}`;
    });
    EL.bindControls(card, name, (src) => updateCard(card, src, Date.now() / 1000));
    return card;
  }

  function updateThumb(card, name, s) {
    const img = $('[data-role="thumb"]', card);
    const empty = $('[data-role="thumb-empty"]', card);
    const t = thumbs.get(name) || { seq: 0, loading: false };
    thumbs.set(name, t);
    if (!s.snapshot_seq || s.snapshot_seq === t.seq || t.loading) return;
    t.loading = true;
    const seq = s.snapshot_seq;
    img.onload = () => { t.loading = false; t.seq = seq; img.classList.add("loaded"); empty.hidden = true; };
    img.onerror = () => { t.loading = false; };
    img.src = `${s.snapshot_url}?seq=${seq}`;
  }

  function updateCard(card, s, now) {
    EL.badge($('[data-f="status"]', card), s.status || "unknown", EL.STATUS_KIND[s.status] || "muted");
    EL.showPaused(card, s.paused);
    card.classList.toggle("is-paused", !!s.paused);
    EL.setF(card, "fps_in", EL.fmtNum(s.fps_in, 1));
    EL.setF(card, "fps_out", EL.fmtNum(s.fps_out, 1));
    EL.setF(card, "fps_cap", s.fps_cap ? `cap ${s.fps_cap}` : "");
    const total = EL.num(s.total);
    EL.setF(card, "frames_in", `${EL.fmtNum(s.frames_in)}${total !== null ? ` of ${EL.fmtNum(total)}` : ""}`);
    EL.setF(card, "frames_dropped", `${EL.fmtNum(s.frames_dropped)}${s.frames_skipped_fps ? ` (+${EL.fmtNum(s.frames_skipped_fps)} over the fps cap)` : ""}`);
    EL.setF(card, "last_frame", EL.fmtAgo(s.last_frame_at, now), EL.fmtTime(s.last_frame_at));
    EL.setF(card, "uri", s.uri || "");
    const err = $('[data-f="last_error"]', card);
    err.textContent = s.last_error || "";
    err.hidden = !s.last_error || s.status === "online";
    updateThumb(card, s.name || card.dataset.source, s);
  }

  function renderSources(sources, now) {
    const box = $("#sources");
    const names = Object.keys(sources || {});
    const present = new Set(names);
    box.querySelectorAll("article[data-source]").forEach((card) => {
      if (!present.has(card.dataset.source)) card.remove();
    });
    names.forEach((name) => {
      let card = box.querySelector(`article[data-source="${CSS.escape(name)}"]`);
      if (!card) {
        card = makeCard(name);
        box.append(card);
      }
      updateCard(card, sources[name], now);
    });
    $("#no-sources").hidden = names.length > 0;
  }

  function renderAlarms(alarms) {
    const box = $("#alarms");
    const list = Array.isArray(alarms) ? alarms : [];
    box.replaceChildren(...list.map((a) => {
      const p = document.createElement("p");
      p.className = `notice ${a.severity === "error" ? "bad" : "warn"}`;
      p.dataset.alarm = a.id;
      const id = document.createElement("b");
      id.textContent = `${a.severity === "error" ? "Alarm" : "Warning"}: ${a.id.replace(/_/g, " ")}`;
      p.append(id, document.createTextNode(` — ${a.message}`));
      return p;
    }));
    box.hidden = list.length === 0;
  }

  function render(s) {
    const now = s.time;
    const line = $("#statusline");
    EL.badge($('[data-f="running"]', line), s.running ? "running" : "stopped", s.running ? "ok" : "bad");
    EL.setF(line, "frames", EL.fmtNum(s.frames));
    EL.setF(line, "detections", EL.fmtNum(s.detections));
    EL.setF(line, "rejected", EL.fmtNum(s.rejected));
    const ds = (s.sinks || {}).dataset || {};
    const lost = [(s.ledger || {}).lost, (ds.index || {}).lost, ((s.mqtt || {}).drops || {}).outbox_lost]
      .reduce((sum, v) => sum + (EL.num(v) || 0), 0);
    EL.setF(line, "lost", EL.fmtNum(lost));
    $("#lost").hidden = lost === 0;
    EL.setF(line, "daemon_uptime", EL.fmtDuration(s.uptime_s));
    EL.setF(line, "updated", `updated ${new Date().toLocaleTimeString()}`);
    $("#updated").classList.remove("error-text");
    renderDevice(s.device);
    renderEngine(s.engine);
    renderAlarms(s.alarms);
    renderMqtt(s.mqtt, now);
    renderSources(s.sources, now);
  }

  function renderLogs(entries) {
    entries.forEach((e) => { lastLogSeq = Math.max(lastLogSeq, e.seq); });
    logs = entries.slice().reverse().concat(logs).slice(0, MAX_LOGS);
    const list = $("#log-list");
    list.replaceChildren(...logs.map((e) => {
      const li = document.createElement("li");
      li.className = `lvl-${e.level}`;
      const time = document.createElement("time");
      time.textContent = new Date(e.time * 1000).toLocaleTimeString();
      const lvl = document.createElement("span");
      lvl.className = `badge ${e.level === "warning" ? "warn" : "bad"}`;
      lvl.textContent = e.level;
      const msg = document.createElement("span");
      msg.className = "msg";
      msg.textContent = e.message;
      msg.title = e.logger;
      li.append(time, " ", lvl, " ", msg);
      return li;
    }));
    $("#log-empty").hidden = logs.length > 0;
  }

  async function poll() {
    try {
      render(await EL.getJSON("/api/status"));
      const l = await EL.getJSON(`/api/logs?since=${lastLogSeq}&limit=${MAX_LOGS}`);
      if (l.entries.length) renderLogs(l.entries);
    } catch (e) {
      const u = $("#updated");
      u.textContent = `connection lost (${e.message}); retrying`;
      u.classList.add("error-text");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    try {
      render(JSON.parse($("#initial-status").textContent));
      // the server sends the newest first; renderLogs wants them oldest first
      renderLogs(JSON.parse($("#initial-logs").textContent).reverse());
    } catch (e) {
      EL.notice(`Could not draw the page: ${e.message}`, "bad");
    }
    setTimeout(poll, POLL_MS / 2);
  });
})();

/* edgelabel: helpers shared by every page (formatting, notices, the operator's actions).
   Plain script, no framework and no CDN: the appliance serves everything itself. */
"use strict";

const EL = (() => {
  const csrf = () => {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  };

  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);

  function fmtDuration(s) {
    s = num(s);
    if (s === null) return "–";
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${s % 60} s`;
    return `${s} s`;
  }

  function fmtAgo(ts, now) {
    ts = num(ts);
    if (ts === null) return "never";
    const dt = (num(now) ?? Date.now() / 1000) - ts;
    if (dt < 1.5) return "just now";
    return `${fmtDuration(dt)} ago`;
  }

  function fmtBytes(n) {
    n = num(n);
    if (n === null) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
  }

  function fmtNum(v, digits) {
    v = num(v);
    if (v === null) return "–";
    return digits === undefined ? v.toLocaleString() : v.toFixed(digits);
  }

  function fmtTime(ts) {
    ts = num(ts);
    return ts === null ? "–" : new Date(ts * 1000).toLocaleString();
  }

  /* Set the text of every [data-f=name] inside root. */
  function setF(root, name, text, title) {
    root.querySelectorAll(`[data-f="${name}"]`).forEach((el) => {
      el.textContent = text;
      if (title !== undefined) el.title = title;
    });
  }

  function badge(el, text, kind) {
    if (!el) return;
    el.textContent = text;
    el.className = `badge ${kind || ""}`.trim();
  }

  const STATUS_KIND = { online: "ok", reconnecting: "warn", offline: "bad", finished: "muted", disabled: "muted" };

  let noticeTimer = null;
  /* A message at the top of the page; link = {href, text} adds a link after it. */
  function notice(text, kind, link) {
    const box = document.getElementById("notice");
    if (!box) return;
    box.replaceChildren(document.createTextNode(text));
    if (link) {
      const a = document.createElement("a");
      a.href = link.href;
      a.textContent = link.text;
      box.append(" ", a);
    }
    box.className = `notice ${kind || ""}`.trim();
    box.dataset.kind = kind || "";
    box.hidden = false;
    clearTimeout(noticeTimer);
    if (kind === "ok") noticeTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store", credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) {
      location.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
      throw new Error("login required");
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    return r.json();
  }

  /* POST a pause/resume through the API; the session cookie plus the CSRF header, never the token itself. */
  async function control(name, action) {
    const r = await fetch(`/api/sources/${encodeURIComponent(name)}/${action}`, {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-CSRF-Token": csrf(), Accept: "application/json" },
    });
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { ok: r.ok, status: r.status, data };
  }

  /* Make the pause/resume forms inside root act in the background; onDone(sourceJson) after success. */
  function bindControls(root, name, onDone) {
    root.querySelectorAll("form[data-action]").forEach((form) => {
      const field = form.querySelector('input[name="csrf_token"]');
      if (field) field.value = csrf();
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const action = form.dataset.action;
        const button = form.querySelector("button");
        if (button) button.disabled = true;
        try {
          const res = await control(name, action);
          if (res.ok) {
            notice(`${name}: ${action === "pause" ? "paused" : "resumed"}.`, "ok");
            if (onDone) onDone(res.data);
          } else if (res.status === 401) {
            notice(`Refused: to ${action} ${name} you need to log in (as an admin).`, "bad",
              { href: `/login?next=${encodeURIComponent(location.pathname)}`, text: "Log in" });
          } else {
            notice(`Refused: ${(res.data && res.data.error) || `HTTP ${res.status}`}`, "bad");
          }
        } catch (e) {
          notice(`The appliance did not answer (${e.message}).`, "bad");
        } finally {
          if (button) button.disabled = false;
        }
      });
    });
  }

  function showPaused(root, paused) {
    root.querySelectorAll('[data-f="paused"]').forEach((el) => { el.hidden = !paused; });
    root.querySelectorAll('form[data-action="pause"]').forEach((el) => { el.hidden = !!paused; });
    root.querySelectorAll('form[data-action="resume"]').forEach((el) => { el.hidden = !paused; });
  }

  function localizeTimes(root) {
    (root || document).querySelectorAll("time[data-ts]").forEach((el) => {
      const ts = parseFloat(el.dataset.ts);
      if (isFinite(ts)) {
        el.title = el.textContent;
        el.textContent = new Date(ts * 1000).toLocaleString();
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => localizeTimes(document));

  return { csrf, num, fmtDuration, fmtAgo, fmtBytes, fmtNum, fmtTime, setF, badge, STATUS_KIND, notice, getJSON,
    control, bindControls, showPaused, localizeTimes };
})();

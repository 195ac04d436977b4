/* edgelabel review page: the queue of frames that need a person, the frame with editable boxes, decisions
   saved at once, keyboard shortcuts. Plain script (no framework, no CDN). Boxes are SVG in the image's own
   pixel coordinates (viewBox = the frame size), so what is drawn is what is saved.
   Every change goes to /api/review/items/<id> right away; requests run one after another (a key pressed
   while a save is in flight waits for it) and carry the version the page shows, so a frame someone else
   changed meanwhile is reloaded instead of overwritten. */
"use strict";

(() => {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const SVGNS = "http://www.w3.org/2000/svg";
  const classesEl = document.getElementById("review-classes");
  if (!classesEl) return; // the dataset is disabled: nothing to review
  const CLASSES = JSON.parse(classesEl.textContent);
  const STATES = ["auto_accepted", "needs_review", "accepted", "corrected", "rejected"];
  const MIN_BOX = 4; // image pixels: a drag shorter than this is a click, not a box
  const img = $("#review-image");
  const svg = $("#overlay");
  const stage = $("#stage");
  const ui = {
    queue: [], // the needs_review queue as last loaded
    current: null, // the frame shown: the API's item, its detections edited in place while dragging
    selected: -1,
    drawing: false,
    drag: null,
    skipped: new Set(), // frames passed with "next" in this visit: shown again only when nothing else is left
    chain: Promise.resolve(), // serialises requests that change something
    pending: 0,
  };

  const color = (cls) => `hsl(${Math.round(((cls * 0.618033988749895) % 1) * 360)}, 85%, 55%)`;
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const round2 = (v) => Math.round(v * 100) / 100;

  function el(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // the reviewer is the logged-in operator: the server records that name, the page only shows it

  // ------------------------------------------------------------------ API

  async function api(method, url, body) {
    const opts = { method, credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.headers["X-CSRF-Token"] = EL.csrf();
      opts.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(url, opts);
    } catch (e) {
      EL.notice(`The appliance did not answer (${e.message}).`, "bad");
      return { ok: false, status: 0, data: null };
    }
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (r.status === 401) {
      EL.notice("Reviewing needs a login: your session ended.", "bad",
        { href: `/login?next=${encodeURIComponent("/review")}`, text: "Log in" });
    }
    return { ok: r.ok, status: r.status, data };
  }

  function setCounts(counts) {
    if (!counts) return;
    for (const s of STATES) EL.setF(document, `count-${s}`, String(counts[s] ?? 0));
  }

  // ------------------------------------------------------------------ queue

  async function loadQueue() {
    const res = await api("GET", "/api/review/queue?limit=200");
    if (!res.ok || !res.data) return false;
    ui.queue = res.data.items;
    setCounts(res.data.counts);
    EL.setF(document, "queue-total", `(${res.data.total})`);
    renderQueue();
    return true;
  }

  function renderQueue() {
    const ol = $("#queue");
    ol.replaceChildren();
    for (const it of ui.queue) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.id = it.id;
      if (ui.current && ui.current.id === it.id) b.setAttribute("aria-current", "true");
      const title = document.createElement("span");
      title.textContent = `${it.source} #${it.frame_index}`;
      const u = document.createElement("span");
      u.className = "u";
      u.title = "uncertainty: 1 = a score right at the threshold";
      u.textContent = Number(it.uncertainty).toFixed(2);
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `${it.n_detections} box${it.n_detections === 1 ? "" : "es"} · ${it.captured_at.replace("T", " ").slice(0, 19)}`;
      b.append(title, u, meta);
      b.addEventListener("click", () => openItem(it.id));
      li.append(b);
      ol.append(li);
    }
    $("#queue-empty").hidden = ui.queue.length > 0;
  }

  function nextId(after) {
    const candidates = ui.queue.filter((it) => it.id !== after);
    const fresh = candidates.find((it) => !ui.skipped.has(it.id));
    return (fresh || candidates[0] || {}).id || null;
  }

  async function goNext(after) {
    const id = nextId(after);
    if (id) return openItem(id);
    clearEditor("Nothing else waits for review.");
    return undefined;
  }

  // ------------------------------------------------------------------ the frame

  async function openItem(id) {
    const res = await api("GET", `/api/review/items/${id}`);
    if (!res.ok || !res.data) {
      if (res.status !== 401) EL.notice(`Cannot open that frame: ${(res.data && res.data.error) || `HTTP ${res.status}`}`, "bad");
      return;
    }
    showItem(res.data);
  }

  function clearEditor(text) {
    ui.current = null;
    ui.selected = -1;
    setDrawing(false);
    img.classList.remove("loaded");
    img.removeAttribute("src");
    svg.replaceChildren();
    $("#box-list").replaceChildren();
    EL.setF(document, "box-count", "");
    const empty = $("#stage-empty");
    empty.textContent = text;
    empty.hidden = false;
    $("#item-status").textContent = "";
    delete stage.dataset.recordId;
    renderQueue();
  }

  function showItem(item) {
    const same = ui.current && ui.current.id === item.id;
    ui.current = item;
    if (!same) {
      ui.selected = -1;
      setDrawing(false);
      img.classList.remove("loaded");
      img.src = item.image_url;
    }
    ui.selected = Math.min(ui.selected, item.detections.length - 1);
    const empty = $("#stage-empty");
    empty.hidden = item.image_available;
    empty.textContent = item.image_available ? "" : "The image of this frame is no longer on the appliance.";
    svg.setAttribute("viewBox", `0 0 ${item.width} ${item.height}`);
    stage.dataset.recordId = item.id;
    stage.dataset.state = item.state;
    stage.dataset.version = String(item.version);
    renderBoxes();
    renderStatus();
    renderQueue();
  }

  img.addEventListener("load", () => { img.classList.add("loaded"); renderBoxes(); });
  window.addEventListener("resize", () => renderBoxes());

  function renderStatus() {
    const it = ui.current;
    const parts = [`${it.source} frame ${it.frame_index}`, it.state.replace("_", " "), `version ${it.version}`];
    if (it.reviewed_by) parts.push(`${it.reviewed_by}, ${new Date(it.reviewed_at).toLocaleString()}`);
    const status = $("#item-status");
    status.textContent = parts.join(" · ");
    status.dataset.state = it.state;
  }

  /* one image pixel in screen pixels, inverted: labels and handles keep their screen size on any frame size */
  function unit() {
    const shown = svg.clientWidth || img.clientWidth;
    return ui.current && shown ? ui.current.width / shown : 1;
  }

  function renderBoxes() {
    svg.replaceChildren();
    const tbody = $("#box-list");
    tbody.replaceChildren();
    if (!ui.current) return;
    const u = unit();
    const handle = 9 * u;
    ui.current.detections.forEach((d, i) => {
      const [x1, y1, x2, y2] = d.box;
      const g = el("g", { class: `box${i === ui.selected ? " selected" : ""}`, "data-i": i });
      g.append(el("rect", { class: "frame", x: x1, y: y1, width: x2 - x1, height: y2 - y1, stroke: color(d.class_id) }));
      const fs = 13 * u;
      const ty = y1 - 4 * u >= fs ? y1 - 4 * u : y1 + fs + 2 * u;
      const score = d.score === null || d.score === undefined ? "" : ` ${Number(d.score).toFixed(2)}`;
      g.append(el("text", { x: x1 + 3 * u, y: ty, "font-size": fs, "stroke-width": 3 * u }, `${d.label}${score}`));
      for (const [corner, hx, hy] of [["nw", x1, y1], ["ne", x2, y1], ["sw", x1, y2], ["se", x2, y2]]) {
        g.append(el("rect", { class: "handle", "data-corner": corner, x: hx - handle / 2, y: hy - handle / 2,
          width: handle, height: handle }));
      }
      svg.append(g);
      tbody.append(boxRow(d, i));
    });
    EL.setF(document, "box-count", `(${ui.current.detections.length})`);
  }

  function boxRow(d, i) {
    const tr = document.createElement("tr");
    tr.dataset.i = String(i);
    if (i === ui.selected) tr.className = "selected";
    const num = document.createElement("td");
    num.textContent = String(i + 1);
    const cls = document.createElement("td");
    const sw = el("svg", { class: "swatch", viewBox: "0 0 10 10", "aria-hidden": "true" });
    sw.append(el("rect", { width: 10, height: 10, fill: color(d.class_id) }));
    const sel = document.createElement("select");
    sel.setAttribute("aria-label", `class of box ${i + 1}`);
    sel.dataset.role = "class";
    CLASSES.forEach((name, c) => {
      const o = document.createElement("option");
      o.value = String(c);
      o.textContent = name;
      if (c === d.class_id) o.selected = true;
      sel.append(o);
    });
    sel.addEventListener("change", () => { setClass(i, Number(sel.value)); sel.blur(); });
    cls.append(sw, " ", sel);
    const score = document.createElement("td");
    score.className = "num";
    score.textContent = d.score === null || d.score === undefined ? "drawn" : Number(d.score).toFixed(2);
    const act = document.createElement("td");
    const del = document.createElement("button");
    del.type = "button";
    del.dataset.role = "delete";
    del.title = "Delete this box (Del)";
    del.setAttribute("aria-label", `delete box ${i + 1}`);
    del.textContent = "✕";
    del.addEventListener("click", (ev) => { ev.stopPropagation(); deleteBox(i); });
    act.append(del);
    tr.append(num, cls, score, act);
    tr.addEventListener("click", (ev) => { if (!ev.target.closest("select, button")) select(i); });
    return tr;
  }

  function select(i) {
    ui.selected = i;
    renderBoxes();
  }

  function setDrawing(on) {
    ui.drawing = !!on;
    $("#btn-draw").setAttribute("aria-pressed", ui.drawing ? "true" : "false");
    stage.classList.toggle("drawing", ui.drawing);
  }

  // ------------------------------------------------------------------ edits (each saved at once)

  function plain(dets) {
    return dets.map((d) => ({ class_id: d.class_id, box: d.box.map(round2), score: d.score ?? null }));
  }

  function setClass(i, cls) {
    const d = ui.current && ui.current.detections[i];
    if (!d || !(cls >= 0 && cls < CLASSES.length) || d.class_id === cls) return;
    d.class_id = cls;
    d.label = CLASSES[cls];
    ui.selected = i;
    renderBoxes();
    save("update");
  }

  function deleteBox(i) {
    if (!ui.current || i < 0 || i >= ui.current.detections.length) return;
    ui.current.detections.splice(i, 1);
    ui.selected = -1;
    renderBoxes();
    save("update");
  }

  function toImage(ev) {
    const m = svg.getScreenCTM();
    if (!m) return [0, 0];
    const pt = svg.createSVGPoint();
    pt.x = ev.clientX;
    pt.y = ev.clientY;
    const p = pt.matrixTransform(m.inverse());
    return [clamp(p.x, 0, ui.current.width), clamp(p.y, 0, ui.current.height)];
  }

  svg.addEventListener("pointerdown", (ev) => {
    if (!ui.current || ev.button !== 0) return;
    const [x, y] = toImage(ev);
    const g = ev.target.closest ? ev.target.closest(".box") : null;
    const handle = ev.target.closest ? ev.target.closest(".handle") : null;
    if (ui.drawing) {
      const draft = el("rect", { class: "draft", x, y, width: 0, height: 0 });
      svg.append(draft);
      ui.drag = { mode: "draw", x0: x, y0: y, draft };
    } else if (g) {
      const i = Number(g.dataset.i);
      if (i !== ui.selected) select(i);
      const start = ui.current.detections[i].box.slice();
      ui.drag = handle ? { mode: "resize", i, corner: handle.dataset.corner, start, moved: false }
        : { mode: "move", i, x0: x, y0: y, start, moved: false };
    } else {
      if (ui.selected !== -1) select(-1);
      return;
    }
    svg.setPointerCapture(ev.pointerId);
    ev.preventDefault();
  });

  svg.addEventListener("pointermove", (ev) => {
    const drag = ui.drag;
    if (!drag || !ui.current) return;
    const [x, y] = toImage(ev);
    const W = ui.current.width, H = ui.current.height;
    if (drag.mode === "draw") {
      drag.draft.setAttribute("x", Math.min(x, drag.x0));
      drag.draft.setAttribute("y", Math.min(y, drag.y0));
      drag.draft.setAttribute("width", Math.abs(x - drag.x0));
      drag.draft.setAttribute("height", Math.abs(y - drag.y0));
      return;
    }
    const d = ui.current.detections[drag.i];
    let [x1, y1, x2, y2] = drag.start;
    if (drag.mode === "move") {
      const dx = clamp(x - drag.x0, -x1, W - x2), dy = clamp(y - drag.y0, -y1, H - y2);
      x1 += dx; x2 += dx; y1 += dy; y2 += dy;
    } else {
      if (drag.corner.includes("w")) x1 = x; else x2 = x;
      if (drag.corner.includes("n")) y1 = y; else y2 = y;
    }
    d.box = [Math.min(x1, x2), Math.min(y1, y2), Math.max(x1, x2), Math.max(y1, y2)];
    drag.moved = true;
    renderBoxes();
  });

  function endDrag(ev) {
    const drag = ui.drag;
    if (!drag) return;
    ui.drag = null;
    try { svg.releasePointerCapture(ev.pointerId); } catch (e) { /* already released */ }
    if (drag.mode === "draw") {
      drag.draft.remove();
      const [x, y] = toImage(ev);
      const box = [Math.min(x, drag.x0), Math.min(y, drag.y0), Math.max(x, drag.x0), Math.max(y, drag.y0)];
      if (box[2] - box[0] < MIN_BOX || box[3] - box[1] < MIN_BOX) return;
      const cls = Number($("#new-class").value) || 0;
      ui.current.detections.push({ class_id: cls, label: CLASSES[cls], score: null, box });
      ui.selected = ui.current.detections.length - 1;
      setDrawing(false);
      renderBoxes();
      save("update");
      return;
    }
    const d = ui.current.detections[drag.i];
    if (!drag.moved || !d) return;
    if (d.box[2] - d.box[0] < 1 || d.box[3] - d.box[1] < 1) d.box = drag.start; // collapsed: undo
    renderBoxes();
    save("update");
  }
  svg.addEventListener("pointerup", endDrag);
  svg.addEventListener("pointercancel", endDrag);

  // ------------------------------------------------------------------ decisions

  /* Queue one request; each runs when the one before it has finished, with the version it produced.
     data-pending on the stage counts what is still in flight (0 = everything shown is saved). */
  function save(action) {
    if (!ui.current) return ui.chain;
    const id = ui.current.id;
    const snapshot = action === "update" ? plain(ui.current.detections) : null;
    ui.pending += 1;
    stage.dataset.pending = String(ui.pending);
    ui.chain = ui.chain.then(() => send(id, action, snapshot)).catch(() => false).finally(() => {
      ui.pending -= 1;
      stage.dataset.pending = String(ui.pending);
    });
    return ui.chain;
  }

  async function send(id, action, detections) {
    const item = ui.current && ui.current.id === id ? ui.current : null;
    const body = { action };
    if (item) body.version = item.version;
    if (detections) body.detections = detections;
    const res = await api("POST", `/api/review/items/${id}`, body);
    if (res.ok && res.data) {
      const saved = res.data.item;
      setCounts(res.data.counts);
      const words = { accept: `accepted (${saved.state})`, update: `saved (${saved.state})`, reject: "rejected",
        reopen: "back in the queue" };
      EL.notice(`${saved.source} #${saved.frame_index}: ${words[action]}.`, "ok");
      if (action === "accept" || action === "reject") {
        await loadQueue();
        if (ui.current && ui.current.id === id) await goNext(id);
      } else {
        if (ui.current && ui.current.id === id) showItem(saved);
        loadQueue();
      }
      return true;
    }
    if (res.status === 409 && res.data && res.data.item) {
      EL.notice("Someone changed this frame meanwhile; it was reloaded as it is now.", "bad");
      if (ui.current && ui.current.id === id) showItem(res.data.item);
    } else if (res.status !== 401) {
      EL.notice(`Not saved: ${(res.data && res.data.error) || `HTTP ${res.status}`}`, "bad");
      if (ui.current && ui.current.id === id) await openItem(id); // show what the dataset holds
    }
    return false;
  }

  function next() {
    if (!ui.current) return goNext(null);
    ui.skipped.add(ui.current.id);
    return goNext(ui.current.id);
  }

  $("#btn-accept").addEventListener("click", () => save("accept"));
  $("#btn-reject").addEventListener("click", () => save("reject"));
  $("#btn-next").addEventListener("click", () => { ui.chain = ui.chain.then(next); });
  $("#btn-draw").addEventListener("click", () => setDrawing(!ui.drawing));

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target.closest && ev.target.closest("input, select, textarea")) return;
    const k = ev.key;
    if (k === "a" || k === "A") save("accept");
    else if (k === "r" || k === "R") save("reject");
    else if (k === "n" || k === "N" || k === "ArrowRight") ui.chain = ui.chain.then(next);
    else if (k === "d" || k === "D") setDrawing(!ui.drawing);
    else if (k === "Delete" || k === "Backspace") deleteBox(ui.selected);
    else if (/^[1-9]$/.test(k)) { if (ui.selected >= 0) setClass(ui.selected, Number(k) - 1); }
    else if (k === "Escape") { setDrawing(false); if (ui.selected !== -1) select(-1); }
    else return;
    ev.preventDefault();
  });

  // ------------------------------------------------------------------ export

  $("#export-form").addEventListener("submit", (ev) => {
    if (!ev.target.querySelector('input[name="state"]:checked')) {
      ev.preventDefault();
      EL.notice("Choose at least one state to export.", "bad");
    }
  });

  // ------------------------------------------------------------------ start

  (async () => {
    stage.dataset.pending = "0";
    if (await loadQueue()) {
      if (ui.queue.length) await openItem(ui.queue[0].id);
      else clearEditor("Nothing waits for review.");
    }
    setInterval(() => { if (!ui.drag && !ui.pending) loadQueue(); }, 10000);
  })();
})();

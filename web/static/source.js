/* edgelabel live view: keeps the numbers next to the MJPEG stream fresh; pause/resume in the background. */
"use strict";

(() => {
  const POLL_MS = 2000;
  const root = document.getElementById("live");
  const name = root.dataset.source;
  const page = document.querySelector("main");

  function update(s) {
    EL.badge(page.querySelector('[data-f="status"]'), s.status || "unknown", EL.STATUS_KIND[s.status] || "muted");
    EL.showPaused(page, s.paused);
    EL.setF(root, "fps_in", EL.fmtNum(s.fps_in, 1));
    EL.setF(root, "fps_out", EL.fmtNum(s.fps_out, 1));
    ["frames_in", "records", "detections", "frames_dropped", "frames_skipped_fps", "reconnects", "rejected"].forEach(
      (f) => EL.setF(root, f, EL.fmtNum(s[f])));
    EL.setF(root, "last_frame", EL.fmtAgo(s.last_frame_at), EL.fmtTime(s.last_frame_at));
    EL.setF(root, "last_error", s.last_error || "–");
    root.querySelector('[data-f="last_error"]').classList.toggle("error-text", !!s.last_error);
  }

  async function poll() {
    try {
      update(await EL.getJSON(`/api/sources/${encodeURIComponent(name)}`));
    } catch (e) {
      EL.notice(`The appliance did not answer (${e.message}); retrying.`, "bad");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    EL.bindControls(page.querySelector(".actions[data-source]"), name, update);
    const img = document.getElementById("stream");
    img.addEventListener("error", () => {
      EL.notice("The live view is not available right now (too many viewers, or the daemon stopped); retrying.", "bad");
      setTimeout(() => { img.src = `${img.src.split("?")[0]}?retry=${Date.now()}`; }, 5000);
    });
    poll();
  });
})();

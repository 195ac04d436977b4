"""The daemon's data flow: source -> frame -> preprocess -> engine -> decode -> record -> sinks.

Threads and queues::

    SourceRunner (one per source) --FrameHub--> prepare --queue--> inference worker(s) --queue--> sink worker
                                                letterbox,          engine, decode boxes           reorder, LabelRecord,
                                                sequence number                                    dataset, MQTT, ledger

Capture, letterbox, inference and publishing overlap.  Live sources keep only
their newest frame in the hub (and count what they drop); storage sources
block, so they never drop.  On the CPU, ONNX Runtime runs fastest for small
detectors as one single-threaded session called by one worker per core (two
1-thread calls beat one 2-thread call, which spends its time spinning and
synchronising); the workers finish out of order, so the sink worker puts the
results back in prepare order before tracking and publishing.  An engine
that must stay on one thread (native TensorRT: one CUDA context and stream)
gets one worker.  The sink worker is the only thread that calls sinks.
"""

from __future__ import annotations

import csv
import errno
import gc
import logging
import os
import queue
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelabel.edge.config import Config, ConfigError, SourceConfig
from edgelabel.edge.frame import Frame, text_path
from edgelabel.edge.ledger import Job, Ledger, StateUnavailable, forget_done, storage_fault, storage_problem
from edgelabel.edge.loader import load_model, worker_count
from edgelabel.edge.locks import LockHeld, hold_lock
from edgelabel.edge.progress import Progress
from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, iso_utc, record_id
from edgelabel.edge.sinks.base import Sink, SinkRefused
from edgelabel.edge.sources import create_source
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.imageio import given_up
from edgelabel.edge.sources.pathguard import protected_paths
from edgelabel.edge.sources.runner import SourceRunner
from edgelabel.engines.base import Detection
from edgelabel.engines.detector import Detector

log = logging.getLogger("edgelabel.pipeline")

_STOP = object()
#: this many frames in a row failing in the engine means the engine, not the frames, is broken
ENGINE_FAILURE_LIMIT = 100
#: first and longest wait between two tries of a write that failed on storage (disk full, read-only, I/O error)
STORAGE_RETRY_FIRST_S = 0.5
STORAGE_RETRY_MAX_S = 5.0


@dataclass
class Inferred:
    """A frame and what the model found in it, on its way to the sinks."""

    frame: Frame
    detections: list[Detection]
    preprocess_ms: float
    inference_ms: float
    decode_ms: float
    model: ModelInfo


@dataclass
class _StatusEvent:
    source: str
    status: str


@dataclass
class Totals:
    """Running totals for summaries and status pages."""

    frames: int = 0
    detections: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    inference_ms_sum: float = 0.0


#: the file systems table consulted for a state_dir whose disk is not mounted
FSTAB = Path("/etc/fstab")


def _state_problem(state_dir: Path, exc: BaseException) -> str:
    return storage_problem("state_dir", state_dir, exc)


def unmounted_mount_point(path: Path, fstab: Path = FSTAB) -> str | None:
    """The mount point in ``fstab`` that holds ``path`` but is not mounted now (None when there is none).

    Without this a state_dir on an external disk that failed to mount would silently be created on the
    root file system: a fresh ledger and outbox, labels done again, the disk's own state hidden.
    """
    try:
        lines = fstab.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    target = os.path.abspath(path)
    best: str | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#") or not fields[1].startswith("/") or fields[1] == "/":
            continue
        mp = os.path.normpath(fields[1].replace("\\040", " "))
        if (target == mp or target.startswith(mp + os.sep)) and (best is None or len(mp) > len(best)):
            best = mp
    return best if best is not None and not os.path.ismount(best) else None


def check_state_dir(state_dir: Path, fstab: Path = FSTAB) -> None:
    """Create ``state_dir`` and prove it takes a write; StateUnavailable (path, cause, what to check) if not."""
    missing = unmounted_mount_point(state_dir, fstab)
    if missing is not None:
        raise StateUnavailable(f"state_dir: {state_dir} is on {missing}, which {fstab} lists but is not mounted: "
                               f"mount it (`mount {missing}`; check the disk and `dmesg`); the service starts again "
                               "by itself once it is there")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=state_dir)
        try:
            os.write(fd, b"edgelabel")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):  # an ownership or permission mistake: fixed by an edit
            raise ConfigError([f"state_dir: {state_dir}: {exc.strerror}; give the service's user write access "
                               "(the unit's StateDirectory= does that for /var/lib/edgelabel)"]) from None
        raise StateUnavailable(_state_problem(state_dir, exc)) from exc


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``<state_dir>/edgelabel.lock`` for this process; ConfigError when another process holds it.

    Two daemons on one state_dir would both publish the same outbox rows and
    mark frames in one ledger: duplicates for every consumer.  ``flock`` is
    released by the kernel when the process dies, so a kill -9 leaves no
    stale lock behind.
    """
    try:
        return hold_lock(state_dir)
    except LockHeld as held:
        raise ConfigError([f"state_dir: {state_dir} is in use by another edgelabel process ({held.holder}); "
                           "give each daemon its own state_dir"]) from None


def _sink_where(sink: Sink) -> str:
    """Where a sink stores (the outbox file, the dataset folder) for a storage alarm; its name when unknown."""
    try:
        st = sink.status()
    except Exception:
        return f"the {sink.name} sink's storage"
    where = (st.get("outbox") or {}).get("path") if isinstance(st.get("outbox"), dict) else st.get("path")
    return str(where) if where else f"the {sink.name} sink's storage"


def _gate_status(result: Any) -> dict[str, Any] | None:
    """The INT8 gate's verdict for status pages (None when no gate ran)."""
    if result is None:
        return None
    return {"accepted": result.accepted, "map50": round(result.map50, 4), "drop_points": round(result.drop_points, 2),
            "margin_points": result.margin_points, "images": result.images, "reason": result.reason}


def model_info(detector: Detector) -> ModelInfo:
    """The record's description of a loaded detector (logged once)."""
    d = detector.describe()
    info = ModelInfo(
        name=d["name"],
        sha256=d["sha256"],
        family=d["family"],
        engine=d["engine"],
        provider=d["provider"],
        precision=d["precision"],
        input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
    )
    log.info("model %s (%s, %s on %s, %s, input %sx%s)",
             info.name, info.family, info.engine, info.provider, info.precision, *info.input_size)
    return info


def build_sinks(cfg: Config, detector: Detector) -> list[Sink]:
    """The sinks the config asks for, dataset first so it can fill in the stored frame path."""
    sinks: list[Sink] = []
    if cfg.dataset.enabled:
        from edgelabel.edge.sinks.dataset import DatasetSink

        sinks.append(DatasetSink(cfg.dataset, cfg.resolve(cfg.dataset.path), detector.names, detector.describe()["name"],
                                 zones={n: s.zones for n, s in cfg.sources.items() if s.zones}))
        sinks[-1].index.protected = protected_paths(cfg)  # type: ignore[attr-defined]  # originals never read there
    if cfg.mqtt.enabled:
        from edgelabel.edge.sinks.mqtt import MqttSink

        sinks.append(MqttSink(cfg.mqtt, cfg.device_id, state_dir=cfg.resolve(cfg.state_dir),
                              sources=[n for n, sc in cfg.sources.items() if sc.enabled]))
    return sinks


class Pipeline:
    """Runs the configured sources through one detector into the sinks."""

    def __init__(
        self,
        cfg: Config,
        *,
        detector: Detector | None = None,
        sinks: list[Sink] | None = None,
        extra_sinks: list[Sink] | None = None,
        show_progress: bool = True,
        fresh: bool = False,
    ) -> None:
        self.cfg = cfg
        self.detector = detector
        self.sinks = sinks
        self.extra_sinks = list(extra_sinks or [])
        self.show_progress = show_progress
        self.fresh = fresh
        self.totals = Totals()
        self.started_at = time.time()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._prepared: queue.Queue[Any] = queue.Queue(maxsize=2)  # letterboxed tensors waiting for the engine
        self._records: queue.Queue[Any] = queue.Queue(maxsize=16)
        self._workers = 1  # inference workers, set at start
        self._engine_failures = 0  # frames in a row that failed in the engine (any worker)
        self._frames_failed = 0  # frames that failed in preprocessing or the engine, in all
        self._frames_delivered = 0  # frames whose record reached the sinks
        self._hub = FrameHub()
        self._runners: dict[str, SourceRunner] = {}
        self._threads: list[threading.Thread] = []
        self._progress: Progress | None = None
        self._model_info: ModelInfo | None = None
        self._active: tuple[Detector, ModelInfo]
        self._source_status: dict[str, str] = {}
        # status changes waiting for the prepare thread to number them behind their source's frames
        self._status_lock = threading.Lock()
        self._status_queue: list[tuple[int, _StatusEvent]] = []  # (frames of the source taken before it, event)
        self._status_direct = False  # True once the prepare thread has ended: straight to the sink worker
        self._last_error: str | None = None
        self._trackers: dict[str, Any] = {}
        self._track_ids: Any = None  # edge.tracking.TrackIdStore in state_dir, made with the first tracker
        self._zones: dict[str, Any] = {}  # source -> edge.zones.ZoneCounter (sources with zones or lines)
        self._source_stops: dict[str, threading.Event] = {}
        self._reload_lock = threading.Lock()
        #: monotonic time of each worker's last loop turn (liveness for the watchdog)
        self.heartbeats: dict[str, float] = {}
        self.ledger: Ledger | None = None
        self._state_lock: int | None = None  # fd holding the state_dir lock while running
        #: writes waiting for storage to come back, by component ("ledger", a sink's name): what and since when
        self._storage_faults: dict[str, dict[str, Any]] = {}
        self._stuck_logged: str | None = None  # the last stuck sink thread reported by alive()
        #: worker threads that ended on an exception: name -> "Type: message" (the daemon exits 1)
        self._died: dict[str, str] = {}
        self._next_stats = 0.0  # monotonic time of the sink worker's next stats snapshot
        #: how long start() waits for an unwritable state_dir (see _wait_state_dir); the daemon sets it
        self.state_wait_s = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the model, open sinks and sources, start the threads.

        Raises EngineError when the model cannot be loaded; nothing is left running then.
        """
        cfg = self.cfg
        state_dir = cfg.resolve(cfg.state_dir)
        self._wait_state_dir(state_dir)  # read-only, full or unmounted: StateUnavailable before the model loads
        if self.detector is None:
            self.detector = load_model(cfg)
        self._model_info = model_info(self.detector)
        self._active = (self.detector, self._model_info)
        if self.sinks is None:  # before the ledger: a sink's config error leaves no job state behind
            self.sinks = build_sinks(cfg, self.detector)
        self.sinks = self.sinks + self.extra_sinks
        # before the first file of job state (ledger, outbox); after the model, so a model that cannot be
        # used leaves the state_dir as it was
        self._state_lock = lock_state_dir(state_dir)
        ledger_path = state_dir / "ledger.sqlite"
        if self.fresh:
            forget_done(ledger_path)  # keeps which content owns each file name (edge.sources.folder)
        info = self._model_info
        try:
            self.ledger = Ledger(ledger_path, Job(info.sha256, cfg.model.conf, cfg.model.iou, info.name))
        except (OSError, sqlite3.Error) as exc:
            if storage_fault(exc) is None:
                raise
            raise StateUnavailable(_state_problem(state_dir, exc)) from exc
        for sink in self.sinks:
            sink.open()

        finite_total: int | None = 0
        for name, scfg in cfg.sources.items():
            source = self._make_runner(scfg).source
            if not scfg.enabled:
                continue
            if source.live or scfg.watch or scfg.loop:
                finite_total = None
            elif finite_total is not None:
                try:
                    source.open()
                    n = source.total()
                    source.close()
                except Exception:  # the runner reports open failures properly
                    n = None
                if n is None:
                    finite_total = None
                else:
                    already = self.ledger.done_count(name)
                    if already:
                        log.info("%s: %d frames already labeled in a previous run (resuming; --fresh starts over)",
                                 name, already)
                    finite_total += max(n - already, 0)
        if finite_total is not None and self.show_progress:
            self._progress = Progress(finite_total, label="labeling")

        self._workers = worker_count(cfg, self.detector)
        if self._workers > 1:
            log.info("%d inference workers share the engine", self._workers)
        self._prepared = queue.Queue(maxsize=self._workers + 1)
        self._threads = [
            threading.Thread(target=self._guarded, args=("prepare", self._prepare_loop), name="prepare", daemon=True),
            *(threading.Thread(target=self._guarded, args=(f"inference-{i}", self._inference_loop, i),
                               name=f"inference-{i}", daemon=True) for i in range(self._workers)),
            threading.Thread(target=self._guarded, args=("sinks", self._sink_loop), name="sinks", daemon=True),
        ]
        # everything loaded so far (model, config, sinks) lives for the whole run: take it out of the
        # collector's generations so a full collection does not walk it again and stall a frame
        gc.collect()
        gc.freeze()
        for t in self._threads:
            t.start()
        for runner in self._runners.values():
            runner.start()

    def _wait_state_dir(self, state_dir: Path) -> None:
        """``check_state_dir``, retried for up to ``state_wait_s`` seconds (a stop request ends the wait).

        A disk that mounts late or is being remounted read-write is waited for here rather than by a quick
        series of restarts, which the unit's ``StartLimitBurst`` would end for good within half a minute.
        """
        deadline = time.monotonic() + self.state_wait_s
        next_log = 0.0
        while True:
            try:
                check_state_dir(state_dir)
            except StateUnavailable as exc:
                now = time.monotonic()
                if now >= deadline or self._stop.is_set():
                    raise
                if now >= next_log:
                    log.error("%s; waiting up to %.0f s more", exc, deadline - now)
                    next_log = now + 30.0
                if self._stop.wait(1.0):
                    raise
                continue
            if next_log:
                log.warning("state_dir %s is writable again: starting", state_dir)
            return

    def _make_runner(self, scfg: SourceConfig) -> SourceRunner:
        """Create (not start) the runner of one source, with its own stop event."""
        name = scfg.name
        source = create_source(scfg)
        if not source.live:
            source.skip = lambda key, _n=name: self._skip(_n, key)
            source.given_up = lambda path, _n=name: self._given_up(_n, path)
            source.identity_of = lambda key, _n=name: None if self.ledger is None else self.ledger.identity(_n, key)
            source.adopt_identity = lambda key, c, _n=name: None if self.ledger is None else self.ledger.note_identity(_n, key, c)
            source.protected = protected_paths(self.cfg)  # never read the daemon's own files as input
        self._hub.register(name, live=source.live, capacity=1 if source.live else 4)
        stop = threading.Event()
        if self._stop.is_set():
            stop.set()
        runner = SourceRunner(source, self._hub, self._on_status, stop, on_reject=self._on_reject)
        self._runners[name] = runner
        self._source_stops[name] = stop
        return runner

    def stop(self) -> None:
        """Ask everything to stop: the frame in flight finishes, sinks are flushed."""
        if not self._stop.is_set() and not self._finished.is_set():
            log.info("stopping: finishing the frame in flight and flushing sinks")
        self._stop.set()
        for stop in list(self._source_stops.values()):
            stop.set()
        self._hub.close()
        for sink in self.sinks or []:
            try:
                sink.interrupt()
            except Exception:
                log.exception("interrupting sink %s failed", sink.name)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the pipeline has finished (all finite sources done, or stopped)."""
        return self._finished.wait(timeout)

    def run(self) -> int:
        """Start, block until done or stopped, shut down; 0 on success, 1 if a source failed."""
        try:
            self.start()
            while not self._finished.wait(0.5) and not self._died:
                pass
        finally:
            self.shutdown()
        return self.exit_code()

    def exit_code(self) -> int:
        """1 when a worker thread died, when a source failed (offline at the end of a run that was not stopped)
        or when frames were read and every one failed (a job of zero labels is not a success), else 0."""
        if self._died:
            log.error("exit status 1: worker thread(s) died (%s); a restart starts them again",
                      "; ".join(f"{k}: {v}" for k, v in self._died.items()))
            return 1
        failed = [n for n, s in self._source_status.items() if s == "offline"]
        if failed and not self._stop.is_set():
            return 1
        if self._frames_failed and not self._frames_delivered:
            log.error("every frame read (%d) failed in preprocessing or the engine and none was labeled; see the "
                      "errors above (the model, or the device it runs on)", self._frames_failed)
            return 1
        return 0

    def shutdown(self) -> None:
        """Stop threads, flush and close sinks, write the rejected-files report."""
        self.stop()
        for runner in list(self._runners.values()):
            runner.join(5.0)
        for t in self._threads:
            t.join(30.0)
        if "sinks" in self._died:  # its final stats (the alarm saying why) and flush never ran: do them here
            self._emit_stats(self.sinks or [])
            for sink in self.sinks or []:
                try:
                    sink.flush()
                except Exception:
                    log.exception("flushing sink %s failed", sink.name)
        if self._progress is not None:
            self._progress.close()
        for sink in self.sinks or []:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %s failed", sink.name)
        try:
            self._write_rejected_report()
        except OSError as exc:
            log.error("cannot write %s (%s); the rejected inputs stay listed in the ledger", self.rejected_report, exc)
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self.detector is not None:
            self.detector.engine.close()
        if self._state_lock is not None:
            os.close(self._state_lock)  # releases the lock
            self._state_lock = None

    # ------------------------------------------------------------------ callbacks from source runners

    def _on_status(self, source: str, status: str) -> None:
        """Forward a source's state change to the sinks behind every frame the source emitted before it.

        A runner reports ``finished`` right after handing its last frame to the hub, while frames are
        still in the hub, the prepare queue or an inference worker; sent straight to the sink worker the
        status would overtake them (consumers read ``finished`` as "no more labels").  So this waits (on
        the runner's thread) until the prepare thread has taken the source's frames from the hub, notes how
        many it took, and the prepare thread numbers the status like a frame right after that many
        (:meth:`_sequence_statuses`): the sink worker's reorder buffer delivers it in that place.  Once the
        prepare thread has ended it goes straight on.
        """
        previous = self._source_status.get(source)
        self._source_status[source] = status
        if previous == status:
            return  # the runner has logged the change
        while self._hub.pending(source) and not self._stop.is_set() and not self._hub.closed:
            time.sleep(0.01)
        event = _StatusEvent(source, status)
        with self._status_lock:
            if not self._status_direct:
                self._status_queue.append((self._hub.delivered(source), event))
                return
        try:
            self._records.put(event, timeout=5.0)
        except queue.Full:
            log.warning("source %s: status %s not forwarded (sink worker busy)", source, status)

    def _sequence_statuses(self, seq: int, taken: Counter[str], *, final: bool = False) -> int:
        """Number the queued status changes whose source's earlier frames are numbered; returns the next seq.

        The prepare thread calls this between frames (``taken``: the frames it has numbered or skipped per
        source), and after taking a frame from the hub but before numbering it (not yet counted in
        ``taken``), so a status reported between two frames of a source gets a number between theirs.
        ``final`` (the thread ends) numbers everything left and sends later changes straight to the sink worker.
        """
        with self._status_lock:
            if not self._status_queue and not final:
                return seq
            ready = [ev for mark, ev in self._status_queue if final or mark <= taken[ev.source]]
            self._status_queue = [(m, ev) for m, ev in self._status_queue if not (final or m <= taken[ev.source])]
            if final:
                self._status_direct = True
        for ev in ready:
            self._put(self._records, (seq, ev), "prepare")
            seq += 1
        return seq

    def _skip(self, source: str, key: str) -> bool:
        """Done by this job, or given up (``_given_up``)."""
        if self.ledger is None:
            return False
        return self.ledger.is_done(source, key) or self._given_up(source, key)

    def _given_up(self, source: str, key: str) -> bool:
        """Rejected by a decode over the budget (the same bytes would take as long again) and not written since."""
        if self.ledger is None:
            return False
        rejected = self.ledger.rejection(source, key)
        if rejected is None or not given_up(rejected[0]):
            return False
        try:  # a file written since it was given up is tried again
            return os.stat(key).st_mtime <= rejected[1]
        except (OSError, ValueError):
            return True

    def _on_reject(self, source: str, path: str, reason: str) -> None:
        self.totals.rejected += 1  # the runner has logged it
        if self.ledger is not None:
            try:
                self.ledger.mark_rejected(source, path, reason)
            except Exception as exc:  # the source's thread must go on; the file is rejected again on the next start
                if storage_fault(exc) is None:
                    raise
                log.error("ledger %s: cannot note the rejected input %s (%s)", self.ledger.path, path, exc)

    # ------------------------------------------------------------------ thread liveness and storage faults

    def _guarded(self, name: str, loop: Callable[..., None], *args: Any) -> None:
        """Run a worker loop; an exception that escapes it is recorded, logged and stops the pipeline.

        Every loop catches what one frame or one sink can throw; what still escapes is a bug or a state the
        loop cannot recover from.  A silently dead thread would leave a daemon that looks alive and labels
        nothing, so the watchdog is withheld (``alive``), the alarm names the thread, and ``exit_code`` is 1:
        systemd restarts the service.
        """
        try:
            loop(*args)
        except BaseException as exc:
            self._died[name] = f"{type(exc).__name__}: {exc}"
            log.critical("worker thread %s died (%s: %s); labeling stops and the daemon exits with status 1 "
                         "so that systemd restarts it", name, type(exc).__name__, exc, exc_info=True)
            self.stop()

    @property
    def died(self) -> dict[str, str]:
        """Worker threads that ended on an exception (name -> error); empty while all run."""
        return dict(self._died)

    def _stats_tick(self, sinks: list[Sink]) -> None:
        """Emit the stats snapshot (and with it the alarm) when due; the sink worker calls this."""
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + self.cfg.mqtt.stats_interval
            self._emit_stats(sinks)

    def _retry_storage(self, component: str, where: Callable[[], str], op: Callable[[], None],
                       sinks: list[Sink]) -> bool:
        """Run ``op`` until it succeeds (True) or a stop is requested while storage fails (False).

        A write that fails because the disk is full, read-only or failing (``storage_fault``) succeeds again
        once space is freed or the file system remounted, so the record waits here instead of being lost or
        killing the thread: the alarm says what and where (``storage_faults`` in the status), the stats keep
        going out, the heartbeat stays fresh (the thread waits on purpose), and SIGTERM ends the wait at once.
        Other errors propagate unchanged.
        """
        delay = STORAGE_RETRY_FIRST_S
        while True:
            try:
                op()
            except Exception as exc:
                cause = storage_fault(exc)
                if cause is None:
                    raise
                fault = self._storage_faults.get(component)
                if fault is None or fault["error"] != cause:
                    path = where() if fault is None else fault["where"]
                    self._storage_faults[component] = {"component": component, "where": path, "error": cause,
                                                       "since": iso_utc(time.time()) if fault is None else fault["since"]}
                    self._last_error = f"{component}: {cause}"
                    log.error("%s cannot write %s (%s); the record waits and is retried every %g s at most: free "
                              "space there, or remount it read-write, or check the disk (dmesg)",
                              component, path, cause, STORAGE_RETRY_MAX_S)
                self.heartbeats["sinks"] = time.monotonic()
                self._stats_tick(sinks)
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, STORAGE_RETRY_MAX_S)
                continue
            gone = self._storage_faults.pop(component, None)
            if gone is not None:
                log.warning("%s writes again (%s): the waiting record went through", component, gone["where"])
            return True

    # ------------------------------------------------------------------ workers

    def _sources_running(self) -> bool:
        return any(r.is_alive() for r in self._runners.values())

    def _put(self, q: queue.Queue[Any], item: Any, beat: str) -> None:
        """Blocking put that keeps the worker's heartbeat fresh while it waits on back-pressure.

        Gives up once a worker thread has died and a stop is requested: the consumer may be the dead one,
        and the daemon is exiting anyway (frames not marked done are labeled again on the next start).
        """
        while True:
            self.heartbeats[beat] = time.monotonic()
            try:
                q.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._died and self._stop.is_set():
                    return

    def _prepare_loop(self) -> None:
        """Take frames from the hub and letterbox them, overlapping with the engine's run.

        Each prepared frame gets the next sequence number; the sink worker
        delivers in that order whatever order the inference workers finish in.
        """
        seq = 0
        taken: Counter[str] = Counter()  # frames taken from the hub per source (for _sequence_statuses)
        try:
            while True:
                self.heartbeats["prepare"] = time.monotonic()
                seq = self._sequence_statuses(seq, taken)
                frame = self._hub.get(timeout=0.2)
                if frame is not None:
                    seq = self._sequence_statuses(seq, taken)  # statuses reported before this frame first
                    taken[frame.source] += 1
                if frame is None:
                    if self._stop.is_set():
                        break
                    if not self._sources_running() and not any(self._hub.pending(n) for n in self._runners):
                        break
                    continue
                active = self._active  # one read: detector and model info are swapped as a pair on reload
                try:
                    t0 = time.perf_counter()
                    tensor, info = active[0].preprocess(frame.image)
                    pre_ms = (time.perf_counter() - t0) * 1e3
                except Exception as exc:  # one bad frame must not stop the daemon
                    self._last_error = f"{frame.source} frame {frame.index}: {exc}"
                    log.exception("preprocessing failed on %s frame %d", frame.source, frame.index)
                    self._frames_failed += 1
                    continue
                self._put(self._prepared, (seq, frame, active, tensor, info, pre_ms), "prepare")
                seq += 1
        finally:
            self._sequence_statuses(seq, taken, final=True)
            self._put(self._prepared, _STOP, "prepare")

    def _inference_loop(self, worker: int = 0) -> None:
        """Run the engine and the decoder on prepared frames; results carry their sequence number."""
        beat = f"inference-{worker}"
        try:
            try:
                self._active[0].warmup()
            except Exception as exc:  # a model that fails here fails on frames too, and is reported there
                log.debug("inference worker %d: warm-up failed: %s", worker, exc)
            while True:
                self.heartbeats[beat] = time.monotonic()
                try:
                    item = self._prepared.get(timeout=0.5)
                except queue.Empty:
                    if self._died and self._stop.is_set():
                        break  # the thread that would send _STOP may be the dead one
                    continue
                if item is _STOP:
                    self._put(self._prepared, _STOP, beat)  # for the next worker
                    break
                seq, frame, (det, info_record), tensor, info, pre_ms = item
                try:
                    t1 = time.perf_counter()
                    outputs = det.infer(tensor)
                    t2 = time.perf_counter()
                    detections = det.decode(outputs, info)
                    t3 = time.perf_counter()
                except Exception as exc:  # one bad frame must not stop the daemon
                    self._last_error = f"{frame.source} frame {frame.index}: {exc}"
                    log.exception("inference failed on %s frame %d", frame.source, frame.index)
                    self._put(self._records, (seq, None), beat)  # the reorder buffer must not wait for it
                    self._engine_failures += 1
                    self._frames_failed += 1
                    if self._engine_failures == ENGINE_FAILURE_LIMIT:
                        log.critical("the last %d frames all failed in the engine (a GPU in an error state?); the "
                                     "watchdog is no longer fed, so systemd restarts the service", ENGINE_FAILURE_LIMIT)
                    continue
                self._engine_failures = 0
                self._put(self._records,
                          (seq, Inferred(frame, detections, pre_ms, (t2 - t1) * 1e3, (t3 - t2) * 1e3, info_record)),
                          beat)
        finally:
            self._put(self._records, _STOP, beat)

    def _tracker(self, source: str) -> Any:
        """The source's tracker, created on first use (None when tracking is off, or for stills: tracking.folders)."""
        src = self.cfg.sources.get(source)
        tracking = src.tracking if src is not None and src.tracking is not None else self.cfg.tracking
        if not tracking.enabled:
            return None
        tracker = self._trackers.get(source)
        if tracker is None:
            runner = self._runners.get(source)
            if runner is not None and runner.source.stills and not tracking.folders:
                return None  # unrelated pictures: nothing to follow from one to the next
            from edgelabel.edge.tracking import Tracker, TrackIdStore

            if self._track_ids is None:  # track ids stay unique per source across restarts
                self._track_ids = TrackIdStore(self.cfg.resolve(self.cfg.state_dir) / "track-ids.json")
            tracker = self._trackers[source] = Tracker(source, tracking, ids=self._track_ids)
        return tracker

    def _zone_counter(self, source: str) -> tuple[Any, list[dict[str, Any]]]:
        """The source's zones and lines (None when it has none), created on first use and again when a reload
        changed them; with the exits of the replaced counter's tracks (counters start again from zero)."""
        src = self.cfg.sources.get(source)
        shapes = (src.zones, src.lines) if src is not None and (src.zones or src.lines) else None
        counter = self._zones.get(source)
        if source in self._zones and (counter.shapes if counter is not None else None) == shapes:
            return counter, []
        events = counter.finish() if counter is not None else []
        if shapes is None:
            self._zones[source] = None
        else:
            from edgelabel.edge.zones import ZoneCounter

            self._zones[source] = ZoneCounter(source, *shapes)
        return self._zones[source], events

    def zone_counts(self) -> dict[str, Any]:
        """Counters per source, zone / line, class and direction (see edge.zones.ZoneCounter.counts)."""
        return {name: z.counts() for name, z in self._zones.items() if z is not None}

    def _finish_source(self, source: str) -> list[dict[str, Any]]:
        """End the source's tracks and zone stays (it stopped, went offline or reconnects), at its last frame's time."""
        events = self._trackers[source].finish() if source in self._trackers else []
        zones = self._zones.get(source)
        return events + (zones.finish() if zones is not None else [])

    def _emit_events(self, events: list[dict[str, Any]], sinks: list[Sink]) -> None:
        if not events:
            return
        for sink in sinks:
            try:
                if not self._retry_storage(f"sink {sink.name}", lambda s=sink: _sink_where(s),
                                           lambda s=sink: s.events(events), sinks):
                    log.warning("stopping while sink %s cannot store %d track event(s)", sink.name, len(events))
            except Exception:
                log.exception("sink %s failed on track events", sink.name)

    def _emit_stats(self, sinks: list[Sink]) -> None:
        snapshot = self.status()
        for sink in sinks:
            try:
                sink.stats(snapshot)
            except Exception:
                log.exception("sink %s failed on stats", sink.name)

    def _sink_loop(self) -> None:
        sinks = self.sinks or []
        self._next_stats = time.monotonic() + self.cfg.mqtt.stats_interval
        pending: dict[int, Inferred | None] = {}  # results that overtook an earlier frame
        next_seq = 0
        stops = 0
        while True:
            now = time.monotonic()
            self.heartbeats["sinks"] = now
            self._stats_tick(sinks)
            try:
                item = self._records.get(timeout=max(0.05, self._next_stats - now))
            except queue.Empty:
                continue
            if item is _STOP:
                stops += 1
                if stops < self._workers:
                    continue
                break
            if isinstance(item, tuple):  # (sequence number, Inferred, None for a frame the engine failed on,
                pending[item[0]] = item[1]  # or a _StatusEvent numbered behind its source's frames)
                while next_seq in pending:
                    ready = pending.pop(next_seq)
                    next_seq += 1
                    self._release(ready, sinks)
                continue
            if isinstance(item, _StatusEvent):
                self._apply_status(item, sinks)
                continue
        for seq in sorted(pending):  # not reached normally: every sequence number arrives before the stops
            self._release(pending.pop(seq), sinks)
        for source in list(self._trackers):
            self._emit_events(self._finish_source(source), sinks)
        self._emit_stats(sinks)
        if self._stop.is_set() and self._storage_faults:
            # stopping while storage fails: a flush cannot make progress and would only hold SIGTERM up by its
            # timeout; close() still delivers what it can, and what is unstored is labeled again on the next start
            log.warning("stopping while %s cannot write: sinks are not flushed", ", ".join(self._storage_faults))
        else:
            for sink in sinks:
                try:
                    sink.flush()
                except Exception:
                    log.exception("flushing sink %s failed", sink.name)
        self._finished.set()

    def _release(self, ready: Inferred | _StatusEvent | None, sinks: list[Sink]) -> None:
        """Hand the next item in sequence order to the sinks."""
        if isinstance(ready, _StatusEvent):
            self._apply_status(ready, sinks)
        elif ready is not None:
            self._deliver(ready, sinks)

    def _apply_status(self, item: _StatusEvent, sinks: list[Sink]) -> None:
        """The source's tracks end first (their ``end`` events), then the sinks get the new status."""
        if item.status in ("finished", "offline", "reconnecting") and item.source in self._trackers:
            self._emit_events(self._finish_source(item.source), sinks)
        for sink in sinks:
            try:
                sink.source_status(item.source, item.status)
            except Exception:
                log.exception("sink %s failed on a status update", sink.name)

    def make_record(self, item: Inferred, rid: str, track_ids: list[int | None] | None = None) -> LabelRecord:
        """The label record ``rid`` for one inferred frame (with the tracker's ids when given)."""
        frame = item.frame
        w, h = frame.width, frame.height
        ids = track_ids if track_ids is not None else [None] * len(item.detections)
        return LabelRecord(
            id=rid,
            device_id=self.cfg.device_id,
            source=frame.source,
            frame_index=frame.index,
            frame_key=frame.key,
            captured_at=iso_utc(frame.captured_at),
            captured_ts=round(frame.captured_at, 6),
            width=w,
            height=h,
            model=item.model,
            inference_ms=round(item.inference_ms, 3),
            detections=[DetectionRecord.from_detection(d, w, h, t) for d, t in zip(item.detections, ids, strict=True)],
            frame_path=text_path(frame.path) if frame.path else None,
            media_time=None if frame.media_time is None else round(frame.media_time, 6),
        )

    def _deliver(self, item: Inferred, sinks: list[Sink]) -> None:
        self._frames_delivered += 1
        frame = item.frame
        track_ids = None
        rid = record_id(self.cfg.device_id, frame.source, frame.key)
        zones, events = self._zone_counter(frame.source)  # events: exits from zones a reload replaced
        if zones is not None:  # ignore zones: a static false positive never reaches the record
            item.detections = zones.drop_ignored(item.detections, frame.width, frame.height)
        tracker = self._tracker(frame.source)
        if tracker is not None:
            track_ids, tracked = tracker.update(item.detections, frame.captured_at, rid, frame.index)
            events += tracked
            if zones is not None:
                events += zones.observe(item.detections, track_ids, tracker.uids(), tracked, frame.captured_at,
                                        frame.width, frame.height, rid, frame.index)
        record = self.make_record(item, rid, track_ids)
        for sink in sinks:
            try:
                sink.prepare(record, frame)
            except Exception:
                log.exception("sink %s failed to prepare record %s", sink.name, record.id)
        taken = True
        for sink in sinks:
            try:
                if not self._retry_storage(f"sink {sink.name}", lambda s=sink: _sink_where(s),
                                           lambda s=sink: s.write(record, frame), sinks):
                    taken = False
                    log.warning("stopping while sink %s cannot store record %s", sink.name, record.id)
            except SinkRefused as exc:
                taken = False
                log.warning("sink %s did not take record %s (%s)", sink.name, record.id, exc)
            except Exception:
                taken = False
                log.exception("sink %s failed to write record %s", sink.name, record.id)
        self._emit_events(events, sinks)
        if not taken and not frame.live:
            log.warning("%s frame %s is not marked done; it is labeled again on the next start", frame.source, frame.key)
        elif not frame.live and self.ledger is not None:
            ledger = self.ledger
            if self._retry_storage("ledger", lambda: str(ledger.path),
                                   lambda: ledger.mark_done(frame.source, frame.key, record.id), sinks):
                self._retry_storage("ledger", lambda: str(ledger.path),
                                    lambda: ledger.note_identity(frame.source, frame.key, frame.extra.get("identity")),
                                    sinks)
            else:
                log.warning("%s frame %s is not marked done (the ledger cannot write); it is labeled again on the "
                            "next start", frame.source, frame.key)
        t = self.totals
        t.frames += 1
        t.detections += len(record.detections)
        t.by_source[frame.source] += 1
        t.inference_ms_sum += item.inference_ms
        for d in record.detections:
            t.by_class[d.label] += 1
        if self._progress is not None:
            self._progress.update()

    # ------------------------------------------------------------------ control

    def source_states(self) -> dict[str, str | None]:
        """Each configured source's last reported state (None until it reports)."""
        return {name: self._source_status.get(name) for name in list(self._runners)}

    @property
    def stopped(self) -> bool:
        """True once a stop was requested (signal, web, shutdown)."""
        return self._stop.is_set()

    def alive(self, max_age: float) -> bool:
        """True while every worker has turned its loop within ``max_age`` seconds.

        An idle or back-pressured worker still turns (it waits in short timeouts),
        so this is false only when one is stuck, e.g. an engine call that never returns,
        or when ENGINE_FAILURE_LIMIT frames in a row failed in the engine.
        """
        now = time.monotonic()
        if self._died:
            return False  # a thread is gone: only a restart brings it back
        if self._engine_failures >= ENGINE_FAILURE_LIMIT:
            return False  # workers turn, but every frame fails: a restart is the only way out
        for sink in self.sinks or []:
            why = sink.stuck()
            if why:
                if why != self._stuck_logged:
                    log.critical("%s: the watchdog is no longer fed, so systemd restarts the daemon", why)
                    self._stuck_logged = why
                return False
        workers = [f"inference-{i}" for i in range(self._workers)]
        stale = [k for k in ("prepare", *workers, "sinks")
                 if self.heartbeats.get(k) is None or now - self.heartbeats[k] > max_age]
        if stale == ["sinks"] and any(s.waiting() for s in self.sinks or []):
            return True  # a sink waits on purpose (stop_capture with a full outbox), nothing is stuck
        return not stale

    def reload(self, new: Config) -> list[str]:
        """Apply a new, already validated config without a restart; returns what changed.

        Sources are added, removed or restarted one by one; a model change loads the
        new engine beside the old one and swaps it in between two frames, so records
        already queued keep their model info and nothing queued is dropped.  Sink,
        web and tracking settings need a restart (a warning says so).
        """
        changes: list[str] = []
        with self._reload_lock:
            old = self.cfg
            if new.model != old.model:
                detector = load_model(new)
                info = model_info(detector)
                previous = self.detector
                self.detector, self._model_info = detector, info
                self._active = (detector, info)
                changes.append(f"model {info.name}")
                if previous is not None:
                    # the inference worker may still be inside previous.infer(); let the GC close it
                    log.info("previous model %s released", previous.describe()["name"])
            for name in old.sources.keys() - new.sources.keys():
                self._remove_source(name)
                changes.append(f"source {name} removed")
            for name, scfg in new.sources.items():
                if name in old.sources and old.sources[name] == scfg:
                    continue
                if name in old.sources:
                    self._remove_source(name)
                    changes.append(f"source {name} changed")
                else:
                    changes.append(f"source {name} added")
                self._make_runner(scfg).start()
            for section in ("mqtt", "dataset", "web", "tracking", "state_dir", "device_id"):
                if getattr(new, section) != getattr(old, section):
                    log.warning("reload: %s changed; that takes effect after a restart", section)
            new.sources = {**new.sources}
            self.cfg = new
        log.info("reloaded: %s", ", ".join(changes) if changes else "nothing changed")
        return changes

    def _remove_source(self, name: str) -> None:
        runner = self._runners.pop(name, None)
        stop = self._source_stops.pop(name, None)
        if stop is not None:
            stop.set()
        if runner is not None and not runner.join(10.0):
            log.warning("source %s did not stop within 10 s; it is abandoned", name)
        self._source_status.pop(name, None)

    def set_source_paused(self, name: str, paused: bool) -> None:
        """Pause or resume one source (KeyError when there is no such source)."""
        runner = self._runners[name]
        if paused:
            runner.pause()
        else:
            runner.resume()

    # ------------------------------------------------------------------ reporting

    def _write_rejected_report(self) -> None:
        if self.ledger is None:
            return
        rows = self.ledger.rejected()
        path = self.cfg.resolve(self.cfg.state_dir) / "rejected.csv"
        if not rows:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["source", "path", "reason", "at"])
            for source, p, reason, at in rows:
                w.writerow([source, p, reason, iso_utc(at)])
        os.replace(tmp, path)
        log.warning("%d input(s) rejected; see %s", len(rows), path)

    @property
    def rejected_report(self) -> Path:
        return self.cfg.resolve(self.cfg.state_dir) / "rejected.csv"

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot of the whole daemon (read by the web page and stats)."""
        t = self.totals
        return {
            "device_id": self.cfg.device_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "running": not self._finished.is_set(),
            "model": None if self._model_info is None else {
                **self._model_info.__dict__, "input_size": list(self._model_info.input_size),
                "engine_reason": getattr(self._active[0], "engine_reason", None),
                "int8_gate": _gate_status(getattr(self._active[0], "int8_gate", None)),
                "inference_workers": self._workers},
            "frames": t.frames,
            "detections": t.detections,
            "rejected": t.rejected,
            "inference_ms_avg": round(t.inference_ms_sum / t.frames, 2) if t.frames else None,
            "sources": {n: r.stats().__dict__ for n, r in self._runners.items()},
            "sinks": {s.name: s.status() for s in self.sinks or []},
            "zones": self.zone_counts(),
            "last_error": self._last_error,
            "storage_faults": list(self._storage_faults.values()),
            "threads_died": dict(self._died),
            "ledger": None if self.ledger is None else self.ledger.stats(),
        }

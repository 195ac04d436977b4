"""``edgelabel doctor``: is this machine ready to run the configured job?

Why: on a headless Jetson the usual failures are environmental (pip's OpenCV
shadowing JetPack's GStreamer build, ONNX Runtime without the GPU providers,
the service user outside group ``video``, a broker that refuses the
password, a full disk) and each one shows up in the daemon's log far from its
cause.  The doctor checks them in one go and prints one line per check::

    OK    python        3.10.12 at /opt/edgelabel/venv/bin/python (venv, system site-packages visible)
    FAIL  model         /opt/edgelabel/models/yolo11n.onnx: file not found
          fix: copy the model there (install.sh --models DIR) or set model.path

Statuses: ``OK``; ``INFO`` (a fact, e.g. "no CUDA device: inference runs on
the CPU"); ``WARN`` (works, but degraded or may fail later); ``FAIL`` (the
configured job cannot run as configured).  The exit code is 1 when any check
FAILs, else 0.  What counts as a FAIL:

* the config does not validate; the model file is missing, unreadable or not
  a detector we can decode; a file source is missing (``edgelabel run``
  refuses to start then too);
* the config asks for GPU providers only (no ``cpu`` in ``model.providers``)
  and there is no CUDA device or no GPU-enabled ONNX Runtime;
* a ``csi://``/``gst://`` source without a GStreamer-enabled OpenCV;
* a configured camera the service user cannot open; state or dataset folder
  not writable; less than 100 MiB free there;
* the broker refuses the connection (CONNACK: bad user name or password, not
  authorized) or the TLS handshake fails: those never heal by waiting.

The ``web`` check (when the page is on) shows the HTTPS certificate's SHA-256
fingerprint and expiry (also under ``data`` in ``--json``), WARNs of plain
HTTP bound beyond loopback and of a given certificate that expires within 30
days, and FAILs one that has expired.

A broker that cannot be reached is only a WARN: the daemon keeps labeling
into the dataset and buffers messages until the broker is back.  Likewise an
absent camera or an unreachable RTSP host (the daemon retries them).

"The service user": the checks of permissions are made for the user the job
runs as, which is ``edgelabel`` when that user exists (installed as a
service), else the user running the doctor.  Run it as root (``sudo``) on an
installed device so that the secrets file can be read too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import importlib
import importlib.util
import ipaddress
import json
import logging
import os
import platform
import pwd
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from edgelabel.edge.certs import AUTO_CERT_FILE, certificate_info
from edgelabel.edge.config import MIRROR_ENV, Config, ConfigError, config_from_dict, mirror_folder, mirror_hint, read_config_file

log = logging.getLogger(__name__)

OK, INFO, WARN, FAIL = "OK", "INFO", "WARN", "FAIL"
STATUSES = (OK, INFO, WARN, FAIL)

# Where the doctor looks; module constants so tests can point them elsewhere.
BUNDLED_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
INSTALLED_CONFIG = Path("/etc/edgelabel/config.yaml")
ENV_FILE = Path("/etc/edgelabel/edgelabel.env")
UNIT_FILE = Path("/etc/systemd/system/edgelabel.service")
UNIT_DROPINS = Path("/etc/systemd/system/edgelabel.service.d")
SYSTEMD_RUN = Path("/run/systemd/system")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
DEV_DIR = Path("/dev")
ARGUS_SOCKET = Path("/tmp/argus_socket")
SERVICE_NAME = "edgelabel"
SERVICE_USER = "edgelabel"
#: folders the unit makes writable under ProtectSystem=strict (StateDirectory=, LogsDirectory=)
SERVICE_WRITABLE = ("/var/lib/edgelabel", "/var/log/edgelabel")

BROKER_TIMEOUT = 3.0
RTSP_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0
DISK_WARN = 1 << 30  # 1 GiB
DISK_FAIL = 100 << 20  # 100 MiB
#: a given HTTPS certificate that expires within this many days is a WARN
CERT_WARN_DAYS = 30

#: Jetson module name -> CUDA compute capability (platform notes §0: Orin sm_87, Xavier sm_72, Nano/TX1 sm_53)
_JETSON_CC = (("orin", "8.7"), ("xavier", "7.2"), ("tx2", "6.2"), ("nano", "5.3"), ("tx1", "5.3"))
#: L4T release -> JetPack (platform notes §0)
_L4T_JETPACK = {(35, None): "5.x", (36, 3): "6.0", (36, 4): "6.1/6.2", (38, None): "7.x"}


@dataclass
class Check:
    """One line of the report: what was checked, the verdict, and how to fix a problem."""

    name: str
    status: str
    detail: str
    fix: str | None = None
    #: facts for scripts (``--json`` only), e.g. the web page's certificate fingerprint and expiry
    data: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["data"] is None:
            del out["data"]
        return out


# --------------------------------------------------------------------------- helpers


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _run(cmd: Sequence[str]) -> tuple[int, str] | None:
    """Run a short command; (exit code, stdout) or None when it is not installed or hangs."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.returncode, proc.stdout.strip()


@contextlib.contextmanager
def _env_overlay(extra: dict[str, str]) -> Iterator[None]:
    """Variables from the secrets file, for ``${VAR}`` in the config, without leaking into the process."""
    added = {k: v for k, v in extra.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def parse_env_file(text: str) -> dict[str, str]:
    """``NAME=value`` lines as systemd's ``EnvironmentFile=`` reads them (comments, optional quotes)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[name] = value
    return out


@contextlib.contextmanager
def _captured_warnings(logger_name: str) -> Iterator[list[str]]:
    """Collect WARNING+ messages of a logger (the engine's fallback warning) instead of printing them."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = _Collect()
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


@dataclass
class _User:
    """A user to judge permissions for: name, uid and every group id it has."""

    name: str
    uid: int
    gids: frozenset[int]
    is_current: bool

    @classmethod
    def current(cls) -> _User:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}), True)

    @classmethod
    def named(cls, name: str) -> _User | None:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(name, entry.pw_uid, frozenset(gids), entry.pw_uid == os.geteuid())

    def can(self, path: Path, mode: int) -> bool:
        """Whether this user has ``mode`` (os.R_OK/W_OK/X_OK bits) on ``path``.

        The current user asks the kernel (ACLs included); for another user the
        owner/group/other bits are evaluated (ACLs, e.g. logind's uaccess, ignored).
        """
        if self.is_current:
            return os.access(path, mode)
        try:
            st = path.stat()
        except OSError:
            return False
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & mode == mode


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _inside(path: Path, folders: Sequence[str]) -> bool:
    """Whether ``path`` is one of ``folders`` or below one of them."""
    text = str(path)
    return any(text == f.rstrip("/") or text.startswith(f.rstrip("/") + "/") for f in folders)


def _natural_key(path: Path) -> tuple[str, int]:
    m = re.match(r"(\D*)(\d*)$", path.name)
    return (m.group(1), int(m.group(2) or -1)) if m else (path.name, -1)


# --------------------------------------------------------------------------- the doctor


class Doctor:
    """Runs every check for one config (or none) and collects :class:`Check` lines."""

    def __init__(self, config_path: str | None = None) -> None:
        self.config_arg = config_path
        self.config_path: Path | None = None
        self.cfg: Config | None = None
        self.checks: list[Check] = []
        self.me = _User.current()
        service = _User.named(SERVICE_USER)
        #: the user the job runs as: the service user when installed as a service, else whoever runs the doctor
        self.job_user = service if service is not None else self.me
        # facts gathered once and used by several checks
        self.jetson_release: str | None = None
        self.gstreamer: bool | None = None
        self.ort_providers: list[str] = []
        self.cuda_device: str | None = None

    # ------------------------------------------------------------------ plumbing

    def add(self, name: str, status: str, detail: str, fix: str | None = None, *,
            data: dict[str, Any] | None = None) -> Check:
        check = Check(name, status, _one_line(detail), _one_line(fix) if fix and status in (WARN, FAIL) else None,
                      data)
        self.checks.append(check)
        return check

    def _guard(self, name: str, func: Any) -> None:
        """A check that crashes is reported as a FAIL of that check, never as a doctor traceback."""
        try:
            func()
        except Exception as exc:
            log.debug("check %s crashed", name, exc_info=True)
            self.add(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                     "report this with the output of `edgelabel doctor --json`")

    @property
    def gpu_only(self) -> bool:
        """The config asks for GPU inference and nothing else (no CPU fallback)."""
        if self.cfg is None:
            return False
        m = self.cfg.model
        return m.engine == "tensorrt" or (bool(m.providers) and "cpu" not in m.providers)

    def run(self) -> list[Check]:
        """Every check, in report order."""
        self._guard("config", self.check_config)
        for name, func in (
            ("python", self.check_python),
            ("jetson", self.check_jetson),
            ("opencv", self.check_opencv),
            ("cuda", self.check_cuda),
            ("onnxruntime", self.check_onnxruntime),
            ("tensorrt", self.check_tensorrt),
            ("cameras", self.check_cameras),
        ):
            self._guard(name, func)
        if self.cfg is not None:
            for name, func in (
                ("model", self.check_model),
                ("sources", self.check_sources),
                ("mqtt", self.check_mqtt),
                ("web", self.check_web),
                ("disk", self.check_disk),
                ("engine cache", self.check_engine_cache),
            ):
                self._guard(name, func)
        self._guard("service", self.check_service)
        return self.checks

    # ------------------------------------------------------------------ config

    def _pick_config(self) -> tuple[Path, Path, str]:
        """(config file, base folder for relative paths, how it was chosen)."""
        if self.config_arg:
            p = Path(self.config_arg)
            return p, p.resolve().parent, "given with -c"
        if INSTALLED_CONFIG.is_file():
            return INSTALLED_CONFIG, INSTALLED_CONFIG.resolve().parent, "the installed service config"
        return BUNDLED_CONFIG, Path.cwd(), "the bundled demo config: no -c and no /etc/edgelabel/config.yaml"

    def _secrets(self, path: Path) -> tuple[dict[str, str], str | None]:
        """Variables of the service's secrets file when the config is the service's; a note when unreadable."""
        if not ENV_FILE.exists() or path.resolve().parent != ENV_FILE.resolve().parent:
            return {}, None
        try:
            return parse_env_file(ENV_FILE.read_text(encoding="utf-8")), None
        except OSError as exc:
            return {}, f"cannot read {ENV_FILE} ({exc.strerror}): ${{VAR}}s from it are unset here; run with sudo"

    def check_config(self) -> None:
        path, base_dir, why = self._pick_config()
        self.config_path = path
        secrets, note = self._secrets(path)
        try:
            data = read_config_file(path)
        except ConfigError as exc:  # the file itself (missing, not YAML): the lines name it already
            self.add("config", FAIL, "; ".join(exc.problems), f"fix {path} at the place named above "
                     f"(edgelabel check-config {path})")
            return
        try:
            with _env_overlay(secrets):
                self.cfg = config_from_dict(data, base_dir=base_dir)
        except ConfigError as exc:
            self.add("config", FAIL, f"{path}: " + "; ".join(exc.problems),
                     f"fix the fields named above (edgelabel check-config {path})")
            return
        n = len(self.cfg.sources)
        detail = f"{path} ({why}): valid, {n} source(s)" + (", secrets from " + str(ENV_FILE) if secrets else "")
        if note:
            self.add("config", WARN, f"{detail}; {note}", f"sudo edgelabel doctor -c {path}")
        else:
            self.add("config", OK, detail)

    # ------------------------------------------------------------------ platform

    def _mirror_fix(self, missing: Path) -> str | None:
        """For the bundled demo config, whose files live in the asset mirror: where it looked, what to set."""
        if self.config_path != BUNDLED_CONFIG or self.cfg is None:
            return None
        base = Path(self.cfg.base_dir)
        if not str(os.path.normpath(missing)).startswith(str(mirror_folder(base)) + os.sep):
            return None
        return mirror_hint(base).removeprefix(f"{MIRROR_ENV}: ")

    def check_python(self) -> None:
        from edgelabel.edge import __version__

        detail = f"{platform.python_version()} at {sys.executable}, edgelabel {__version__}"
        in_venv = sys.prefix != sys.base_prefix
        system_site = False
        if in_venv:
            cfg_file = Path(sys.prefix) / "pyvenv.cfg"
            with contextlib.suppress(OSError):
                system_site = bool(re.search(r"^include-system-site-packages\s*=\s*true", cfg_file.read_text(), re.M | re.I))
            detail += " (venv, system site-packages " + ("visible)" if system_site else "hidden)")
        if TEGRA_RELEASE.exists() and in_venv and not system_site:
            self.add("python", WARN, detail + ": JetPack's TensorRT and GStreamer OpenCV are not visible",
                     "recreate the venv with --system-site-packages (scripts/install.sh does)")
        else:
            self.add("python", OK, detail)

    def check_jetson(self) -> None:
        if not TEGRA_RELEASE.exists():
            self.add("jetson", INFO, f"not a Jetson (no {TEGRA_RELEASE})")
            return
        try:
            first = TEGRA_RELEASE.read_text(errors="replace").splitlines()[0]
        except (OSError, IndexError):
            self.add("jetson", WARN, f"{TEGRA_RELEASE} is unreadable or empty", "check the L4T installation")
            return
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
        model = ""
        with contextlib.suppress(OSError):
            model = DEVICE_TREE_MODEL.read_text(errors="replace").strip("\x00 \n")
        if not m:
            self.add("jetson", WARN, f"cannot parse {TEGRA_RELEASE}: {first!r}", "check the L4T installation")
            return
        major, revision = int(m.group(1)), m.group(2)
        minor = int(revision.split(".")[0]) if revision.split(".")[0].isdigit() else -1
        self.jetson_release = f"R{major}.{revision}"
        jetpack = _L4T_JETPACK.get((major, minor)) or _L4T_JETPACK.get((major, None)) or "unknown"
        detail = f"L4T {self.jetson_release} (JetPack {jetpack})" + (f", {model}" if model else "")
        if major < 36:
            self.add("jetson", WARN, detail + ": JetPack 5's TensorRT and OpenCV are built for Python 3.8, edgelabel needs 3.10+",
                     "use JetPack 6 (see docs/jetson.md, supported versions)")
        else:
            self.add("jetson", OK, detail)

    def _needs_gstreamer(self) -> list[str]:
        if self.cfg is None:
            return []
        from edgelabel.edge.sources import parse_uri

        names = []
        for name, src in self.cfg.sources.items():
            with contextlib.suppress(ValueError):
                if src.enabled and parse_uri(src.uri)[0] in ("csi", "gst"):
                    names.append(name)
        return names

    def check_opencv(self) -> None:
        try:
            # as the daemon does: edge.sources.imageio sets OpenCV's image size limit before cv2 loads
            importlib.import_module("edgelabel.edge.sources.imageio")
            import cv2
        except Exception as exc:
            self.add("opencv", FAIL, f"cannot import cv2: {exc}",
                     "Jetson: sudo apt install nvidia-opencv and a venv with --system-site-packages; "
                     "elsewhere: pip install opencv-python-headless")
            return
        info = cv2.getBuildInformation()
        self.gstreamer = any("GStreamer" in line and "YES" in line for line in info.splitlines())
        where = Path(getattr(cv2, "__file__", "") or "?").parent
        detail = f"{cv2.__version__} from {where}, GStreamer: {'YES' if self.gstreamer else 'NO'}"
        fix = ("use JetPack's OpenCV: pip uninstall opencv-python opencv-python-headless in the venv, "
               "venv with --system-site-packages, install with EDGELABEL_SYSTEM_OPENCV=1")
        needing = self._needs_gstreamer()
        if needing and not self.gstreamer:
            self.add("opencv", FAIL, detail + f"; sources {', '.join(needing)} (csi:// or gst://) need GStreamer", fix)
        elif TEGRA_RELEASE.exists() and not self.gstreamer:
            self.add("opencv", WARN, detail + ": a pip OpenCV shadows JetPack's GStreamer build", fix)
        else:
            self.add("opencv", OK, detail)

    def _cuda_from_pycuda(self) -> str | None:
        try:
            drv = importlib.import_module("pycuda.driver")
            drv.init()  # no context is created: just the driver
            if drv.Device.count() < 1:
                return None
            dev = drv.Device(0)
            major, minor = dev.compute_capability()
            return f"{dev.name()}, compute capability {major}.{minor} (pycuda)"
        except Exception:
            return None

    def _cuda_from_nvidia_smi(self) -> str | None:
        res = _run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
        if res is None or res[0] != 0 or not res[1]:
            res = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
            if res is None or res[0] != 0 or not res[1]:
                return None
            name, _, driver = res[1].splitlines()[0].partition(",")
            return f"{name.strip()}, driver {driver.strip()} (nvidia-smi)"
        parts = [p.strip() for p in res[1].splitlines()[0].split(",")]
        if len(parts) < 3:
            return None
        return f"{parts[0]}, compute capability {parts[1]}, driver {parts[2]} (nvidia-smi)"

    def _cuda_from_proc(self) -> str | None:
        if not NVIDIA_PROC.is_dir():
            return None
        for info in sorted(NVIDIA_PROC.glob("*/information")):
            with contextlib.suppress(OSError):
                m = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.M)
                if m:
                    return f"{m.group(1).strip()} ({NVIDIA_PROC})"
        return None

    def _cuda_from_tegra(self) -> str | None:
        if not TEGRA_RELEASE.exists():
            return None
        gpu_nodes = [DEV_DIR / "nvhost-gpu", DEV_DIR / "nvgpu", DEV_DIR / "nvhost-ctrl-gpu"]
        if not any(p.exists() for p in gpu_nodes):
            return None
        model = ""
        with contextlib.suppress(OSError):
            model = DEVICE_TREE_MODEL.read_text(errors="replace").strip("\x00 \n")
        cc = next((c for key, c in _JETSON_CC if key in model.lower()), None)
        return f"integrated GPU of {model or 'this Jetson'}" + (f", compute capability {cc} (from the module name)" if cc else "")

    def check_cuda(self) -> None:
        for probe in (self._cuda_from_pycuda, self._cuda_from_nvidia_smi, self._cuda_from_proc, self._cuda_from_tegra):
            found = probe()
            if found:
                self.cuda_device = found
                self.add("cuda", OK, found)
                return
        detail = "no CUDA device found (no pycuda device, nvidia-smi, /proc/driver/nvidia or Tegra GPU node)"
        if self.gpu_only:
            self.add("cuda", FAIL, detail + f"; model.providers {', '.join(self.cfg.model.providers) if self.cfg else ''} has no cpu",
                     "add cpu to model.providers, or run on a machine with an NVIDIA GPU and its driver")
        else:
            self.add("cuda", INFO, detail + ": inference runs on the CPU")

    def check_onnxruntime(self) -> None:
        try:
            ort = importlib.import_module("onnxruntime")
        except Exception as exc:
            status = FAIL if self.cfg is None or self.cfg.model.engine == "onnxruntime" else WARN
            self.add("onnxruntime", status, f"cannot import onnxruntime: {exc}",
                     "x86: pip install onnxruntime (or onnxruntime-gpu); Jetson: install.sh --ort-index URL")
            return
        self.ort_providers = list(ort.get_available_providers())
        short = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
        names = [short.get(p, p) for p in self.ort_providers]
        detail = f"{ort.__version__}, providers: {', '.join(names)}"
        if self.cfg is None:
            self.add("onnxruntime", OK, detail)
            return
        wanted = list(self.cfg.model.providers)
        missing = [p for p in wanted if p != "cpu" and p not in names]
        gpu_build = any(p in names for p in ("tensorrt", "cuda"))
        fix = ("install onnxruntime-gpu (Jetson: scripts/install.sh --ort-index URL or --wheels DIR; "
               "x86: EDGELABEL_ORT_PACKAGE=onnxruntime-gpu)")
        if self.gpu_only and not any(p in names for p in wanted if p != "cpu"):
            self.add("onnxruntime", FAIL, detail + f"; model.providers {', '.join(wanted)} are not in this build", fix)
        elif missing and (self.cuda_device or TEGRA_RELEASE.exists()) and not gpu_build:
            self.add("onnxruntime", WARN, detail + f"; this machine has a GPU but the build lacks {', '.join(missing)}: runs on CPU", fix)
        elif missing:
            fallback = next((p for p in wanted if p in names), "cpu")
            self.add("onnxruntime", INFO, detail + f"; {', '.join(missing)} not in this build: runs on {fallback}")
        else:
            self.add("onnxruntime", OK, detail)

    def check_tensorrt(self) -> None:
        try:
            trt = importlib.import_module("tensorrt")
        except Exception as exc:
            detail = f"TensorRT Python bindings not installed ({type(exc).__name__})"
            if self.cfg is not None and self.cfg.model.engine == "tensorrt":
                self.add("tensorrt", FAIL, detail + "; model.engine is tensorrt",
                         "Jetson: sudo apt install python3-libnvinfer and a venv with --system-site-packages")
            elif TEGRA_RELEASE.exists():
                self.add("tensorrt", WARN, detail + " on a Jetson",
                         "sudo apt install python3-libnvinfer (JetPack) and a venv with --system-site-packages")
            else:
                self.add("tensorrt", INFO, detail + ": fine without an NVIDIA GPU (ONNX Runtime runs the model)")
            return
        version = getattr(trt, "__version__", "?")
        binding = next((name for name in ("pycuda.driver", "cuda.bindings.driver", "cuda.cuda")
                        if importlib.util.find_spec(name.split(".")[0]) is not None), None)
        if binding is None:
            self.add("tensorrt", WARN, f"{version}; no CUDA binding for the native TensorRT engine (pycuda or "
                     "cuda-python): ONNX Runtime runs the model instead",
                     "pip install pycuda (Jetson: PATH=/usr/local/cuda/bin:$PATH first) or pip install cuda-python")
            return
        detail = f"{version}, CUDA binding {binding.split('.')[0]}"
        if self.cfg is not None:
            from edgelabel.engines.select import choose_engine

            try:
                choice = choose_engine(self.cfg.model.engine, self.cfg.resolve(self.cfg.model.path))
                detail += f"; the model runs on {choice.engine} ({choice.reason})"
            except ValueError:
                pass
        self.add("tensorrt", OK, detail)

    # ------------------------------------------------------------------ cameras

    def _configured_cameras(self) -> dict[str, Path]:
        """Enabled v4l2 sources -> their device node."""
        if self.cfg is None:
            return {}
        from edgelabel.edge.sources import parse_uri

        out = {}
        for name, src in self.cfg.sources.items():
            with contextlib.suppress(ValueError):
                scheme, target = parse_uri(src.uri)
                if scheme == "v4l2" and src.enabled:
                    out[name] = DEV_DIR / f"video{target}" if target.isdigit() else Path(target)
        return out

    def _access(self, path: Path) -> str:
        def rw(user: _User) -> str:
            return ("r" if user.can(path, os.R_OK) else "-") + ("w" if user.can(path, os.W_OK) else "-")

        text = f"{self.me.name}: {rw(self.me)}"
        if self.job_user.name != self.me.name:
            text += f", {self.job_user.name}: {rw(self.job_user)}"
        return text

    def check_cameras(self) -> None:
        devices = sorted(DEV_DIR.glob("video*"), key=_natural_key)
        configured = self._configured_cameras()
        job = self.job_user
        fix_group = (f"sudo usermod -a -G video {job.name} (then log in again / restart the service); "
                     "the unit has SupplementaryGroups=video")
        if not devices:
            if configured:
                names = ", ".join(f"{n} ({p})" for n, p in configured.items())
                self.add("cameras", WARN, f"no /dev/video* devices; configured: {names} (the daemon retries)",
                         "plug the camera in; `v4l2-ctl --list-devices` lists what the kernel sees")
            else:
                self.add("cameras", INFO, "no /dev/video* devices")
            return
        parts = []
        blocked_configured = []
        blocked_other = []
        for dev in devices:
            try:
                st = dev.stat()
            except OSError:
                continue
            group = _group_name(st.st_gid)
            parts.append(f"{dev} ({_owner_name(st.st_uid)}:{group} {stat.filemode(st.st_mode)[1:]}, {self._access(dev)})")
            if not (job.can(dev, os.R_OK) and job.can(dev, os.W_OK)):
                (blocked_configured if dev in configured.values() else blocked_other).append(str(dev))
        absent = [f"{n} ({p})" for n, p in configured.items() if not p.exists()]
        detail = "; ".join(parts)
        if blocked_configured:
            self.add("cameras", FAIL, f"{job.name} cannot open {', '.join(blocked_configured)}: {detail}", fix_group)
        elif absent:
            self.add("cameras", WARN, f"configured but absent: {', '.join(absent)}; present: {detail}",
                     "check the device path in sources.*.uri (`v4l2-ctl --list-devices`)")
        elif blocked_other:
            self.add("cameras", WARN, f"{job.name} cannot open {', '.join(blocked_other)}: {detail}", fix_group)
        else:
            self.add("cameras", OK, detail)

    # ------------------------------------------------------------------ model

    def check_model(self) -> None:
        assert self.cfg is not None
        m = self.cfg.model
        path = Path(os.path.normpath(self.cfg.resolve(m.path)))
        fix_missing = self._mirror_fix(path) or "copy the model there (scripts/install.sh --models DIR) or set model.path"
        if not path.is_file():
            self.add("model", FAIL, f"{path}: file not found (an ONNX detector is expected)", fix_missing)
            return
        if not self.job_user.can(path, os.R_OK):
            self.add("model", FAIL, f"{path}: not readable by {self.job_user.name}", f"chmod a+r {path}")
            return
        labels = str(self.cfg.resolve(m.labels)) if m.labels else None
        if labels and not Path(labels).is_file():
            self.add("model", FAIL, f"model.labels: {labels}: file not found", "fix model.labels or remove it")
            return
        if m.engine != "onnxruntime" and path.suffix.lower() != ".onnx":
            self.add("model", INFO, f"{path}: present ({_human_bytes(path.stat().st_size)}); "
                     f"engine {m.engine} files are not loaded by the doctor")
            return
        # the loader check-config uses too: run's checks and message; TensorRT is left out on purpose
        # (building an engine can take minutes on a Jetson)
        from edgelabel.edge.loader import probe_model

        t0 = time.monotonic()
        with _captured_warnings("edgelabel.engines") as warnings:
            try:
                detector = probe_model(self.cfg)
            except Exception as exc:
                self.add("model", FAIL, _one_line(exc),
                         "use an ONNX detector of a supported family (yolov8/yolo11, yolov5, yolox, end2end) "
                         "or set model.family")
                return
        if detector is None:  # a TensorRT engine file: only TensorRT opens it
            self.add("model", INFO, f"{path}: present; TensorRT engine files are not loaded by the doctor")
            return
        try:
            d = detector.describe()
        finally:
            detector.close()
        note = " (TensorRT not tried: an engine build takes minutes)" if "tensorrt" in m.providers else ""
        detail = (f"{path.name}: {d['family']}, input {d['input_size'][0]}x{d['input_size'][1]}, "
                  f"{len(detector.names)} classes, {d['precision']}, loads on {d['provider']} "
                  f"in {time.monotonic() - t0:.1f} s{note}")
        if warnings:
            detail += "; " + " / ".join(warnings)
        if self.gpu_only and d["provider"] == "CPUExecutionProvider":
            self.add("model", FAIL, detail, "the GPU providers do not load here: see the cuda and onnxruntime lines")
        elif warnings:
            self.add("model", WARN, detail, "see the cuda and onnxruntime lines")
        else:
            self.add("model", OK, detail)

    # ------------------------------------------------------------------ sources

    def check_sources(self) -> None:
        assert self.cfg is not None
        from edgelabel.edge.sources import source_kind

        cameras = self._configured_cameras()
        for name, src in self.cfg.sources.items():
            label = f"source {name}"
            if not src.enabled:
                self.add(label, INFO, f"{self._display_uri(src.uri)}: disabled")
                continue
            try:
                kind, target = source_kind(src.uri)
            except ValueError as exc:
                self.add(label, FAIL, f"{src.uri}: {exc}", f"fix sources.{name}.uri")
                continue
            if kind in ("folder", "image", "video"):
                path = Path(os.path.normpath(self.cfg.resolve(target)))
                self._check_file_source(label, name, kind, path, src.watch)
            elif kind == "v4l2":
                dev = cameras.get(name)
                if dev is None or not dev.exists():
                    self.add(label, WARN, f"{src.uri}: {dev} absent (the daemon retries)",
                             "plug the camera in or fix the device path (`v4l2-ctl --list-devices`)")
                elif not (self.job_user.can(dev, os.R_OK) and self.job_user.can(dev, os.W_OK)):
                    self.add(label, FAIL, f"{src.uri}: {self.job_user.name} cannot open {dev}",
                             f"sudo usermod -a -G video {self.job_user.name}")
                else:
                    self.add(label, OK, f"{src.uri}: {dev} present and accessible")
            elif kind == "rtsp":
                self._check_rtsp(label, name, src.uri)
            elif kind == "csi":
                self._check_csi(label, src.uri)
            else:  # gst
                if self.gstreamer:
                    self.add(label, OK, "GStreamer pipeline (OpenCV has GStreamer); try it with gst-launch-1.0 ... ! fakesink")
                else:
                    self.add(label, FAIL, "gst:// needs an OpenCV built with GStreamer", "see the opencv line")

    @staticmethod
    def _display_uri(uri: str) -> str:
        from edgelabel.edge.sources.rtsp import mask_credentials

        return mask_credentials(uri)

    def _check_file_source(self, label: str, name: str, kind: str, path: Path, watch: bool) -> None:
        if not path.exists():
            if watch:
                self.add(label, WARN, f"{path}: does not exist yet (watched: labeled once files arrive)",
                         f"mkdir -p {path}")
            else:
                self.add(label, FAIL, f"{path}: no such {'folder' if kind == 'folder' else 'file'}",
                         self._mirror_fix(path) or f"fix sources.{name}.uri or put the {kind} there")
            return
        mode = os.R_OK | (os.X_OK if kind == "folder" else 0)
        if not self.job_user.can(path, mode):
            self.add(label, FAIL, f"{path}: not readable by {self.job_user.name}", f"chmod -R a+rX {path}")
            return
        if kind == "video":
            import cv2

            cap = cv2.VideoCapture(str(path))
            try:
                opened = cap.isOpened()
                frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if opened else 0
            finally:
                cap.release()
            if not opened:
                self.add(label, FAIL, f"{path}: OpenCV cannot open this video",
                         "check the file (ffprobe FILE); re-encode to H.264 mp4 if the codec is unsupported")
                return
            self.add(label, OK, f"{path}: video, {frames} frames")
        elif kind == "folder":
            self.add(label, OK, f"{path}: folder{' (watched)' if watch else ''}")
        else:
            self.add(label, OK, f"{path}: image, {_human_bytes(path.stat().st_size)}")

    def _check_rtsp(self, label: str, name: str, uri: str) -> None:
        from edgelabel.edge.sources.rtsp import host_port

        shown = self._display_uri(uri)
        host, given_port = host_port(uri)
        port = given_port or (322 if uri.lower().startswith("rtsps") else 554)
        try:
            with socket.create_connection((host, port), timeout=RTSP_TIMEOUT):
                pass
        except OSError as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__)
            self.add(label, WARN, f"{shown}: cannot reach {host}:{port} ({reason}); the daemon keeps retrying",
                     "check the camera's power, address and network (ping it; try the URL in ffplay/VLC)")
            return
        self.add(label, OK, f"{shown}: {host}:{port} accepts TCP connections (stream not opened)")

    def _check_csi(self, label: str, uri: str) -> None:
        if not TEGRA_RELEASE.exists():
            self.add(label, FAIL, f"{uri}: CSI cameras need a Jetson (nvarguscamerasrc)", "use v4l2:// or rtsp:// here")
        elif not self.gstreamer:
            self.add(label, FAIL, f"{uri}: needs an OpenCV built with GStreamer", "see the opencv line")
        elif not ARGUS_SOCKET.exists():
            self.add(label, WARN, f"{uri}: {ARGUS_SOCKET} missing: nvargus-daemon is not running",
                     "sudo systemctl restart nvargus-daemon (and keep PrivateTmp off in the unit)")
        else:
            self.add(label, OK, f"{uri}: nvargus-daemon socket present, OpenCV has GStreamer")

    # ------------------------------------------------------------------ mqtt

    def check_mqtt(self) -> None:
        assert self.cfg is not None
        mc = self.cfg.mqtt
        if not mc.enabled:
            self.add("mqtt", INFO, "disabled (mqtt.enabled: false)")
            return
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        where = f"{mc.host}:{mc.port}"
        password = mc.password
        if mc.password_file:
            try:
                password = self.cfg.resolve(mc.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.add("mqtt", FAIL, f"mqtt.password_file: {exc}", "fix mqtt.password_file or its permissions")
                return
        protocol = mqtt.MQTTv5 if mc.protocol == "5" else mqtt.MQTTv311
        # never the daemon's client id: the broker would disconnect the running daemon
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgelabel-doctor-{os.getpid()}", protocol=protocol)
        if mc.username:
            client.username_pw_set(mc.username, password)
        if mc.tls is not None:
            t = mc.tls
            try:
                client.tls_set(ca_certs=str(self.cfg.resolve(t.ca)) if t.ca else None,
                               certfile=str(self.cfg.resolve(t.cert)) if t.cert else None,
                               keyfile=str(self.cfg.resolve(t.key)) if t.key else None)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.add("mqtt", FAIL, f"mqtt.tls: cannot load CA/certificate/key: {exc}", "fix the paths in mqtt.tls")
                return
            client.tls_insecure_set(t.insecure)
        result: dict[str, Any] = {}

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
            result["reason"] = reason

        client.on_connect = on_connect
        client.connect_timeout = BROKER_TIMEOUT
        unreachable_fix = (f"start the broker or fix mqtt.host/mqtt.port ({where}); the daemon buffers "
                           "messages and keeps the dataset meanwhile")
        try:
            try:
                client.connect(mc.host, mc.port, keepalive=max(5, min(mc.keepalive, 60)))
            except ssl.SSLError as exc:
                self.add("mqtt", FAIL, f"{where}: TLS handshake failed: {exc}",
                         "check mqtt.tls (CA, client certificate) and that the port speaks TLS")
                return
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
                self.add("mqtt", WARN, f"{where}: cannot connect ({reason})", unreachable_fix)
                return
            deadline = time.monotonic() + BROKER_TIMEOUT
            while "reason" not in result and time.monotonic() < deadline:
                client.loop(timeout=0.1)
            reason = result.get("reason")
            if reason is None:
                self.add("mqtt", WARN, f"{where}: no CONNACK within {BROKER_TIMEOUT:.0f} s (not an MQTT broker? TLS port?)",
                         unreachable_fix)
                return
            who = f"as {mc.username}" if mc.username else "anonymously"
            tls = ", TLS" if mc.tls is not None else ""
            if getattr(reason, "is_failure", False):
                self.add("mqtt", FAIL, f"{where}: broker refused the connection {who}{tls} (CONNACK: {reason})",
                         "check mqtt.username/password (EDGELABEL_MQTT_USER/EDGELABEL_MQTT_PASSWORD in "
                         f"{ENV_FILE}) and the broker's ACL")
                return
            self.add("mqtt", OK, f"{where}: connected {who}{tls} (CONNACK: {reason})")
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop(timeout=0.1)
            with contextlib.suppress(Exception):
                sock = client.socket()
                if sock is not None:
                    sock.close()

    # ------------------------------------------------------------------ disk

    def check_web(self) -> None:
        """The web page's transport: the HTTPS certificate's SHA-256 fingerprint and expiry (what an operator
        compares with the browser's warning on a first visit), or plain HTTP bound beyond loopback."""
        assert self.cfg is not None
        web = self.cfg.web
        if not web.enabled:
            return
        where = f"{web.host}:{web.port}"
        tls = web.tls
        if tls is None:
            loopback = web.host == "localhost" or _is_loopback(web.host)
            data = {"scheme": "http", "bind": where}
            if loopback:
                self.add("web", OK, f"plain HTTP on {where} (loopback only)", data=data)
            elif web.trusted_proxy:
                self.add("web", INFO, f"plain HTTP on {where} behind the HTTPS proxy {web.trusted_proxy}", data=data)
            else:
                self.add("web", WARN, f"plain HTTP on {where}: the operator token and session cookie cross the "
                         "network readable", "set web.tls: auto (or {cert, key}), or put an HTTPS proxy in front "
                         "and set web.trusted_proxy", data=data)
            return
        auto = tls == "auto" or (isinstance(tls, dict) and tls.get("auto") is True)
        cert = self.cfg.state_path(AUTO_CERT_FILE) if auto else self.cfg.resolve(tls["cert"])
        hsts = tls.get("hsts") if isinstance(tls, dict) else None
        data = {"scheme": "https", "bind": where, "certificate": str(cert), "self_signed": auto,
                "hsts": None if hsts is None or hsts is False else int(hsts)}
        if auto and not cert.exists():
            self.add("web", INFO, f"HTTPS on {where}: the self-signed certificate is made on first start in "
                     f"{cert.parent} (run the daemon once, then the doctor shows its fingerprint)", data=data)
            return
        try:
            info = certificate_info(cert)
        except (OSError, ValueError, ssl.SSLError) as exc:
            status = INFO if auto else FAIL
            self.add("web", status, f"HTTPS on {where}: cannot read the certificate {cert} "
                     f"({getattr(exc, 'strerror', None) or exc})",
                     "give web.tls.cert a PEM certificate the service user can read" if not auto else None, data=data)
            return
        data.update(fingerprint_sha256=info.fingerprint, not_after=info.not_after.isoformat(),
                    days_left=info.days_left)
        detail = (f"HTTPS on {where} with {cert}{' (self-signed)' if auto else ''}: SHA-256 {info.fingerprint}, "
                  f"valid until {info.not_after:%Y-%m-%d}")
        if info.expired:
            if auto:
                self.add("web", INFO, f"{detail} (expired: a new one is made at the next start; browsers will "
                         "show a new fingerprint)", data=data)
            else:
                self.add("web", FAIL, f"{detail}: expired", "renew the certificate (web.tls.cert) and restart",
                         data=data)
        elif info.days_left < CERT_WARN_DAYS and not auto:
            self.add("web", WARN, f"{detail}: expires in {info.days_left} day(s)", "renew the certificate "
                     "(web.tls.cert) before it expires", data=data)
        else:
            self.add("web", OK, detail, data=data)

    def _unit_writable_paths(self) -> list[str]:
        """Folders the installed unit lets the service write under ProtectSystem=strict."""
        paths = list(SERVICE_WRITABLE)
        files = [UNIT_FILE, *sorted(UNIT_DROPINS.glob("*.conf"))] if UNIT_DROPINS.is_dir() else [UNIT_FILE]
        for f in files:
            with contextlib.suppress(OSError):
                for m in re.finditer(r"^\s*ReadWritePaths\s*=\s*(.*)$", f.read_text(), re.M):
                    paths += [p.lstrip("-+") for p in m.group(1).split()]
        return paths

    def _check_folder(self, name: str, path: Path) -> None:
        target = path if path.exists() else _existing_ancestor(path)
        usage = shutil.disk_usage(target)
        detail = f"{path}: {_human_bytes(usage.free)} free of {_human_bytes(usage.total)}"
        if not path.exists():
            detail += " (not created yet)"
        problems: list[tuple[str, str, str]] = []  # (status, text, fix)
        if usage.free < DISK_FAIL:
            problems.append((FAIL, f"less than {_human_bytes(DISK_FAIL)} free", "free space or move it to a bigger disk"))
        elif usage.free < DISK_WARN:
            problems.append((WARN, f"less than {_human_bytes(DISK_WARN)} free", "free space or move it to a bigger disk"))
        job = self.job_user
        if not job.can(target, os.W_OK | os.X_OK):
            systemd_creates = not path.exists() and UNIT_FILE.exists() and _inside(path, SERVICE_WRITABLE)
            if systemd_creates:
                detail += "; systemd creates it at start (StateDirectory=)"
            else:
                problems.append((FAIL, f"not writable by {job.name}", f"sudo install -d -o {job.name} -g {job.name} {path}"))
        if UNIT_FILE.exists() and not _inside(path, self._unit_writable_paths()):
            problems.append((WARN, "read-only for the service (ProtectSystem=strict)",
                             f"sudo systemctl edit edgelabel: [Service] ReadWritePaths={path}"))
        if not problems:
            self.add(name, OK, detail)
            return
        worst = FAIL if any(s == FAIL for s, _, _ in problems) else WARN
        self.add(name, worst, detail + "; " + "; ".join(t for _, t, _ in problems),
                 "; ".join(f for s, _, f in problems if s == worst))

    def check_disk(self) -> None:
        assert self.cfg is not None
        self._check_folder("state dir", self.cfg.resolve(self.cfg.state_dir))
        if self.cfg.dataset.enabled:
            self._check_folder("dataset", self.cfg.resolve(self.cfg.dataset.path))

    def check_engine_cache(self) -> None:
        assert self.cfg is not None
        configured = next((getattr(self.cfg.model, a) for a in ("engine_cache", "cache_dir", "engine_cache_dir")
                           if getattr(self.cfg.model, a, None)), None)
        cache = self.cfg.state_path(configured) if configured else self.cfg.state_path("engines")
        wants_trt = "tensorrt" in self.cfg.model.providers or self.cfg.model.engine == "tensorrt"
        trt_ready = "TensorrtExecutionProvider" in self.ort_providers or self.cfg.model.engine == "tensorrt"
        if not cache.exists():
            note = ("; the first start builds TensorRT engines (minutes on a Jetson)" if wants_trt and trt_ready else "")
            self.add("engine cache", INFO, f"{cache}: not created yet{note}")
            return
        engines = [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".engine", ".plan", ".trt")]
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        detail = f"{cache}: {len(engines)} cached engine(s), {_human_bytes(size)}"
        if not self.job_user.can(cache, os.W_OK | os.X_OK):
            self.add("engine cache", WARN, detail + f"; not writable by {self.job_user.name}: engines are rebuilt at every start",
                     f"sudo chown -R {self.job_user.name}: {cache}")
        else:
            self.add("engine cache", OK, detail)

    # ------------------------------------------------------------------ service

    def check_service(self) -> None:
        if not SYSTEMD_RUN.is_dir():
            installed = f"; unit {'installed' if UNIT_FILE.exists() else 'not installed'}"
            self.add("service", INFO, f"not under systemd (no {SYSTEMD_RUN}){installed}")
            return
        active = _run(["systemctl", "is-active", SERVICE_NAME])
        if active is None:
            self.add("service", INFO, "systemctl not available")
            return
        enabled = _run(["systemctl", "is-enabled", SERVICE_NAME])
        state = active[1] or "unknown"
        detail = f"{SERVICE_NAME}: {state}, {enabled[1] if enabled and enabled[1] else 'not installed'}"
        if state == "active" or state in ("activating", "reloading"):
            self.add("service", OK, detail)
        elif state == "failed":
            self.add("service", WARN, detail, f"journalctl -u {SERVICE_NAME} -b -e; then sudo systemctl reset-failed "
                     f"{SERVICE_NAME} && sudo systemctl start {SERVICE_NAME}")
        else:
            self.add("service", INFO, detail)


# --------------------------------------------------------------------------- entry points


def collect_checks(config_path: str | None = None) -> list[Check]:
    """Run every check and return them (for callers that format their own report)."""
    return Doctor(config_path).run()


def exit_code(checks: Sequence[Check]) -> int:
    """1 when something blocks the configured job (any FAIL), else 0."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def format_report(checks: Sequence[Check]) -> str:
    """The human report: one line per check, a ``fix:`` line under each WARN/FAIL, a summary."""
    width = max([len(c.name) for c in checks] + [12])
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    code = exit_code(checks)
    verdict = "something blocks the configured job" if code else "ready"
    lines.append(f"{counts[OK]} OK, {counts[INFO]} INFO, {counts[WARN]} WARN, {counts[FAIL]} FAIL: {verdict} (exit {code})")
    return "\n".join(lines) + "\n"


def run_doctor(config_path: str | None = None, as_json: bool = False, *, out: TextIO | None = None) -> int:
    """Check the machine for ``config_path`` (default: the installed config, else the bundled one).

    Writes the report (or JSON with ``as_json``) to ``out`` (stdout) and
    returns the exit code: 1 when any check FAILs, else 0.
    """
    out = sys.stdout if out is None else out
    doctor = Doctor(config_path)
    checks = doctor.run()
    code = exit_code(checks)
    if as_json:
        payload = {
            "config": str(doctor.config_path) if doctor.config_path else None,
            "exit_code": code,
            "summary": {s: sum(1 for c in checks if c.status == s) for s in STATUSES},
            "checks": [c.as_dict() for c in checks],
        }
        out.write(json.dumps(payload, indent=2) + "\n")
    else:
        out.write(format_report(checks))
    out.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge.doctor [-c CONFIG] [--json]``."""
    p = argparse.ArgumentParser(prog="edgelabel doctor", description="check this machine for the configured job")
    p.add_argument("-c", "--config", help="config file (default: /etc/edgelabel/config.yaml, else the bundled demo)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    return run_doctor(args.config, args.json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

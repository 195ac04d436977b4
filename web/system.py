"""What the device itself is doing: uptime, CPU, memory, disk, temperatures, GPU load.

Why read /proc and /sys directly: a Jetson has no nvidia-smi and psutil is one
more native wheel to build on aarch64; the kernel files are all that is
needed.  Jetson boards expose their thermal zones (``CPU-therm``,
``GPU-therm``...) under /sys/class/thermal and the GPU load (0-1000) under
/sys/devices/gpu.0/load (elsewhere on Orin); on a desktop GPU nvidia-smi is
asked, at most every few seconds.  Anything absent or unreadable is reported
as unavailable with the reason, never as an error.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("edgelabel.web")

#: Jetson GPU load files, relative to /sys (Nano/TX2/Xavier first, then Orin layouts)
GPU_LOAD_PATTERNS = (
    "devices/gpu.0/load",
    "devices/platform/gpu.0/load",
    "devices/*.gpu/load",
    "devices/platform/*.gpu/load",
    "devices/platform/*/*.gpu/load",
    "devices/platform/*/*.ga10b/load",
)
_SMI_TTL = 5.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


class DeviceMonitor:
    """Samples the machine on demand; CPU load is the average since the previous sample."""

    def __init__(self, disks: dict[str, Path], sys_root: str | Path = "/sys", proc_root: str | Path = "/proc",
                 nvidia_smi: str | None = None) -> None:
        """``disks``: label -> a path on each file system to report (state, dataset)."""
        self.disks = disks
        self.sys_root = Path(sys_root)
        self.proc_root = Path(proc_root)
        self.nvidia_smi = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
        self._lock = threading.Lock()
        self._cpu_prev = self._cpu_times()
        self._smi_cache: tuple[float, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ parts

    def _cpu_times(self) -> tuple[int, int] | None:
        """(idle, total) jiffies from /proc/stat."""
        line = (_read(self.proc_root / "stat") or "").splitlines()[:1]
        if not line or not line[0].startswith("cpu "):
            return None
        try:
            values = [int(v) for v in line[0].split()[1:]]
        except ValueError:
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return idle, sum(values[:8])

    def cpu(self) -> dict[str, Any]:
        """CPU use since the last call, the load averages and the core count."""
        now = self._cpu_times()
        with self._lock:
            prev, self._cpu_prev = self._cpu_prev, now or self._cpu_prev
        percent = None
        if now and prev and now[1] > prev[1]:
            percent = round(100.0 * (1.0 - (now[0] - prev[0]) / (now[1] - prev[1])), 1)
        load = (_read(self.proc_root / "loadavg") or "").split()
        try:
            loadavg = [float(v) for v in load[:3]] if len(load) >= 3 else None
        except ValueError:
            loadavg = None
        return {"percent": percent, "loadavg": loadavg, "cores": os.cpu_count()}

    def memory(self) -> dict[str, Any] | None:
        """Total and available memory (MemAvailable: what can be had without swapping)."""
        info: dict[str, int] = {}
        for line in (_read(self.proc_root / "meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                info[key] = int(parts[0]) * 1024
        total, avail = info.get("MemTotal"), info.get("MemAvailable")
        if not total or avail is None:
            return None
        return {"total": total, "available": avail, "used": total - avail,
                "percent": round(100.0 * (total - avail) / total, 1)}

    def disk(self) -> list[dict[str, Any]]:
        """Use of the file systems holding state and dataset (one entry per file system)."""
        out, seen = [], set()
        for label, path in self.disks.items():
            p = path
            while not p.exists() and p != p.parent:
                p = p.parent
            try:
                dev = p.stat().st_dev
                if dev in seen:
                    continue
                seen.add(dev)
                usage = shutil.disk_usage(p)
            except OSError:
                continue
            out.append({"label": label, "path": str(path), "total": usage.total, "used": usage.used,
                        "free": usage.free, "percent": round(100.0 * usage.used / usage.total, 1) if usage.total else None})
        return out

    def uptime(self) -> float | None:
        """Seconds since the machine booted."""
        text = _read(self.proc_root / "uptime")
        try:
            return round(float(text.split()[0]), 1) if text else None
        except ValueError:
            return None

    def temperatures(self) -> list[dict[str, Any]]:
        """Every readable thermal zone, in °C (Jetson: CPU-therm, GPU-therm, ...)."""
        zones = []
        for zone in sorted((self.sys_root / "class" / "thermal").glob("thermal_zone*"),
                           key=lambda p: int(p.name[12:]) if p.name[12:].isdigit() else 0):
            raw = _read(zone / "temp")
            if raw is None:
                continue
            try:
                milli = int(raw)
            except ValueError:
                continue
            zones.append({"zone": zone.name, "type": _read(zone / "type") or zone.name, "celsius": round(milli / 1000.0, 1)})
        return zones

    def gpu(self) -> dict[str, Any]:
        """GPU load: the Jetson load file, else nvidia-smi, else why neither is there."""
        for pattern in GPU_LOAD_PATTERNS:
            for path in sorted(glob.glob(str(self.sys_root / pattern))):
                raw = _read(Path(path))
                if raw is not None and raw.isdigit():
                    return {"available": True, "source": "jetson", "load_percent": round(int(raw) / 10.0, 1)}
        if self.nvidia_smi:
            return self._smi()
        return {"available": False, "reason": "no Jetson GPU load file and no nvidia-smi on this machine"}

    def _smi(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            if self._smi_cache and now - self._smi_cache[0] < _SMI_TTL:
                return self._smi_cache[1]
        result: dict[str, Any]
        try:
            proc = subprocess.run(
                [str(self.nvidia_smi), "--query-gpu=name,utilization.gpu,memory.used,memory.total,temperature.gpu",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=3, check=False)
            first = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
            name, util, used, total, temp = (v.strip() for v in first.split(","))
            result = {"available": True, "source": "nvidia-smi", "name": name, "load_percent": float(util),
                      "memory_used": int(float(used)) * 1024 * 1024, "memory_total": int(float(total)) * 1024 * 1024,
                      "celsius": float(temp)}
        except (OSError, subprocess.SubprocessError, ValueError):
            result = {"available": False, "reason": "nvidia-smi gave no readable answer"}
        with self._lock:
            self._smi_cache = (now, result)
        return result

    # ------------------------------------------------------------------ all of it

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard's device card shows."""
        return {
            "uptime_s": self.uptime(),
            "cpu": self.cpu(),
            "memory": self.memory(),
            "disk": self.disk(),
            "temperatures": self.temperatures(),
            "gpu": self.gpu(),
        }

"""scripts/install.sh into a temporary root: --dry-run, a real offline install (run twice), uninstall.

Nothing here touches the live system: every run uses --root (no users, no systemctl) or --dry-run.
The real install is offline: a wheel of this source tree is put in a local "mirror" folder
(built by hand with zipfile, so neither the network nor the `wheel` package is needed) and
installed with --wheels DIR, i.e. pip --no-index --find-links DIR.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "install.sh"
PACKAGES = ("edge", "engines", "web", "ingest")


def run_script(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    # the caller's own install settings must not change what the script does here
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELABEL_ORT", "EDGELABEL_INSTALL", "EDGELABEL_TEGRA"))}
    full_env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", **(env or {})})
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=600)
    if check:
        assert proc.returncode == 0, f"install.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path below root (outside the venv) -> (mode, content of files)."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if "/venv/" in f"/{rel}/" or "__pycache__" in rel:
            continue
        st = p.lstat()
        out[rel] = (stat.S_IMODE(st.st_mode), p.read_bytes() if p.is_file() else None)
    return out


def build_wheel(dest: Path) -> Path:
    """A pure-Python wheel of this source tree (what `pip wheel .` would put in a mirror)."""
    version = importlib.metadata.version("edgelabel")
    dist = f"edgelabel-{version}.dist-info"
    path = dest / f"edgelabel-{version}-py3-none-any.whl"
    records: list[str] = []

    def add(z: zipfile.ZipFile, arcname: str, data: bytes) -> None:
        z.writestr(arcname, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{arcname},sha256={digest},{len(data)}")

    requires = importlib.metadata.requires("edgelabel") or []
    metadata = f"Metadata-Version: 2.1\nName: edgelabel\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for pkg in PACKAGES:
            for f in sorted((ROOT / pkg).rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                    add(z, f"edgelabel/{f.relative_to(ROOT).as_posix()}", f.read_bytes())
        add(z, f"{dist}/METADATA", metadata.encode())
        add(z, f"{dist}/WHEEL", b"Wheel-Version: 1.0\nGenerator: edgelabel-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        add(z, f"{dist}/entry_points.txt", b"[console_scripts]\nedgelabel = edgelabel.edge.cli:main\n")
        records.append(f"{dist}/RECORD,,")
        z.writestr(f"{dist}/RECORD", "\n".join(records) + "\n")
    return path


# ----------------------------------------------------------------------------- the script itself


def test_script_syntax_and_help() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    proc = run_script("--help")
    for flag in ("--prefix", "--root", "--dry-run", "--wheels", "--models", "--ort-index", "uninstall", "--purge"):
        assert flag in proc.stdout
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    assert run_script("--bogus", check=False).returncode != 0
    proc = run_script("--root", str(tmp_path), "--prefix", "/usr", "--dry-run", check=False)
    assert proc.returncode != 0 and "system folder" in proc.stderr
    proc = run_script("--root", str(tmp_path), "--dry-run", "--models", str(tmp_path / "nope"), check=False)
    assert proc.returncode != 0 and "no such folder" in proc.stderr


# ----------------------------------------------------------------------------- what `pip install` pulls in

#: test tooling, and what it drags in (Datumaro brings pandas and pyarrow): never needed by the daemon
TEST_ONLY = ("pytest", "hypothesis", "ruff", "onnx", "playwright", "schemathesis", "datumaro", "pandas", "pyarrow",
             "jsonschema", "cryptography")


def requirement_sections(tmp: Path) -> dict[str, list[str]]:
    """The requirements setup.py declares, by extra ("" = a plain `pip install .`), read from egg_info."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in (tmp / "edgelabel.egg-info" / "requires.txt").read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        elif line.strip():
            sections[current].append(line.strip())
    return sections


def names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_a_plain_install_is_the_daemon_only_and_extras_add_jetson_and_test(tmp_path: Path) -> None:
    sections = requirement_sections(tmp_path)
    runtime = names(sections[""])
    assert {"numpy", "pyyaml", "paho-mqtt", "flask", "onnxruntime", "opencv-python-headless"} <= runtime
    assert not runtime & set(TEST_ONLY), f"test tooling in the runtime install: {runtime & set(TEST_ONLY)}"
    assert names(sections["jetson"]) == {"pycuda"}
    assert sections["gpu"] == sections["jetson"], "gpu stays an alias of jetson"
    assert {"pytest", "playwright", "schemathesis", "datumaro", "hypothesis", "onnx", "ruff"} <= names(sections["test"])
    # the plant-side ingest service's driver: its own extra (and the tests'), never on an appliance
    assert names(sections["ingest"]) == {"psycopg", "minio"} and "psycopg" in names(sections["test"])
    assert "psycopg" not in runtime and "minio" not in runtime


def test_the_main_job_runs_without_any_test_tooling(tmp_path: Path, assets: Path) -> None:
    """What `pip install .` gives is enough: label a folder with every test-only package made unimportable."""
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(assets / "images" / "bus.jpg", images)
    blocked = ", ".join(repr(n) for n in TEST_ONLY)
    code = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {{{blocked}}}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'{name} is test tooling, not installed by pip install .')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edge.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", code, "label", str(images), "--model",
                          str(assets / "models" / "yolox_nano.onnx"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "labeled 1 frame(s)" in res.stdout and (tmp_path / "out" / "labels").is_dir()


# ----------------------------------------------------------------------------- dry runs


def test_dry_run_generic_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = run_script("--root", str(root), "--dry-run", "--platform", "generic", "--python", sys.executable)
    assert not root.exists(), "--dry-run must not create anything"
    out = proc.stdout
    assert f"{sys.executable} -m venv {root}/opt/edgelabel/venv" in out
    assert "EDGELABEL_ORT_PACKAGE=onnxruntime " in out and "--system-site-packages" not in out
    assert "EDGELABEL_SYSTEM_OPENCV" not in out
    assert f"{root}/etc/systemd/system/edgelabel.service" in out
    assert "systemctl skipped" in out and "+ systemctl" not in out
    assert "+ useradd" not in out  # --root never creates users


def test_dry_run_on_the_live_system_changes_nothing() -> None:
    """Without --root the plan includes the service user; --dry-run still touches nothing."""
    watched = [Path("/opt/edgelabel"), Path("/etc/edgelabel"), Path("/etc/systemd/system/edgelabel.service"),
               Path("/var/lib/edgelabel"), Path("/var/log/edgelabel")]
    before = [p.exists() for p in watched]
    proc = run_script("--dry-run", "--platform", "generic", "--python", sys.executable)
    assert [p.exists() for p in watched] == before
    assert "+ useradd --system" in proc.stdout or "user exists: edgelabel" in proc.stdout
    assert "dry run: nothing was changed" in proc.stdout


def test_dry_run_jetson_uses_jetpack_packages(tmp_path: Path) -> None:
    root = tmp_path / "root"
    index = "https://jetson-wheels.example/jp6/cu126"
    proc = run_script("--root", str(root), "--dry-run", "--platform", "jetson", "--python", sys.executable,
                      "--ort-index", index)
    out = proc.stdout
    assert "--system-site-packages" in out
    assert f"--index-url {index} onnxruntime-gpu" in out
    assert "EDGELABEL_SYSTEM_OPENCV=1 EDGELABEL_ORT_PACKAGE=none" in out
    assert "[jetson]" in out.replace("\\", "")  # pycuda from the jetson extra
    assert not root.exists()


def test_dry_run_jetson_ort_index_from_environment(tmp_path: Path) -> None:
    proc = run_script("--root", str(tmp_path / "r"), "--dry-run", "--platform", "jetson", "--python", sys.executable,
                      env={"EDGELABEL_ORT_INDEX": "https://idx.example/jp6"})
    assert "--index-url https://idx.example/jp6 onnxruntime-gpu" in proc.stdout


def test_jetson_without_an_ort_source_says_what_to_do(tmp_path: Path) -> None:
    proc = run_script("--root", str(tmp_path / "r"), "--dry-run", "--platform", "jetson", "--python", sys.executable,
                      check=False)
    assert proc.returncode != 0
    assert "--ort-index" in proc.stderr and "--wheels" in proc.stderr


def test_dry_run_offline_mirror(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = run_script("--root", str(tmp_path / "r"), "--dry-run", "--platform", "jetson", "--python", sys.executable,
                      "--wheels", str(wheels))
    assert f"--no-index --find-links {wheels} onnxruntime-gpu" in proc.stdout
    assert "--no-build-isolation" in proc.stdout  # no wheel of edgelabel in the mirror: built offline from source


# ----------------------------------------------------------------------------- a real install into a temp root


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = tmp_path_factory.mktemp("mirror") / "wheels"
    wheels.mkdir()
    build_wheel(wheels)
    return wheels


@pytest.fixture
def models(tmp_path: Path, assets: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(assets / "models" / "yolox_nano.onnx", folder)
    shutil.copy(assets / "models" / "coco80.names", folder)
    return folder


def install_args(root: Path, mirror: Path, models: Path, *extra: str) -> list[str]:
    # --no-deps: the dependencies are checked by the dry runs; here the point is files, idempotency, uninstall
    return ["install", "--root", str(root), "--prefix", "/opt/el", "--platform", "generic", "--python", sys.executable,
            "--system-site-packages", "--no-deps", "--wheels", str(mirror), "--models", str(models), *extra]


def test_install_twice_then_uninstall_to_nothing(tmp_path: Path, mirror: Path, models: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = run_script(*install_args(root, mirror, models))
    assert f"--no-index --find-links {mirror}" in first.stdout

    prefix = root / "opt" / "el"
    unit = root / "etc/systemd/system/edgelabel.service"
    conf = root / "etc/edgelabel/config.yaml"
    env_file = root / "etc/edgelabel/edgelabel.env"
    assert "ExecStart=/opt/el/venv/bin/edgelabel run -c /etc/edgelabel/config.yaml" in unit.read_text()
    assert "/opt/edgelabel" not in unit.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600, "secrets must be root-only"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert "path: /opt/el/models/" in conf.read_text()
    assert (prefix / "models" / "yolox_nano.onnx").is_file() and (prefix / "models" / "coco80.names").is_file()
    assert (root / "var/lib/edgelabel/engines").is_dir() and (root / "var/log/edgelabel").is_dir()
    dists = list((prefix / "venv" / "lib").glob("python3*/site-packages/edgelabel-*.dist-info"))
    assert dists, "edgelabel is installed inside the venv"
    assert (prefix / "venv" / "bin" / "edgelabel").is_file()
    if sys.prefix == sys.base_prefix:  # the dependencies are visible through --system-site-packages
        version = subprocess.run([str(prefix / "venv/bin/edgelabel"), "--version"], capture_output=True, text=True,
                                 timeout=60, cwd=tmp_path)
        assert version.returncode == 0 and "edgelabel" in version.stdout, version.stderr
        where = subprocess.run([str(prefix / "venv/bin/python"), "-c", "import edgelabel.edge as e; print(e.__file__)"],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert str(prefix) in where.stdout, "the venv runs its own copy, not the source tree"

    # a second run changes nothing
    before = tree(root)
    second = run_script(*install_args(root, mirror, models))
    assert "venv exists" in second.stdout and "kept existing config" in second.stdout
    assert "unchanged: " + str(unit) in second.stdout
    assert tree(root) == before

    dry = run_script("uninstall", "--root", str(root), "--prefix", "/opt/el", "--dry-run")
    assert "+ rm -rf " + str(prefix / "venv") in dry.stdout and tree(root) == before
    run_script("uninstall", "--root", str(root), "--prefix", "/opt/el")
    assert list(root.iterdir()) == [], "everything installed was removed (nothing was changed by hand)"


def test_uninstall_keeps_what_the_admin_changed(tmp_path: Path, mirror: Path, models: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/edgelabel").mkdir(parents=True)
    (root / "etc/edgelabel/config.yaml").write_text("# mine\n")
    run_script(*install_args(root, mirror, models))
    assert (root / "etc/edgelabel/config.yaml").read_text() == "# mine\n", "an existing config is never overwritten"
    env_file = root / "etc/edgelabel/edgelabel.env"
    env_file.write_text("EDGELABEL_MQTT_PASSWORD=mine\n")  # the admin fills in the secrets
    (root / "var/lib/edgelabel/dataset").mkdir()
    (root / "var/lib/edgelabel/dataset/classes.txt").write_text("person\n")  # labels the daemon made

    gone = run_script("uninstall", "--root", str(root), "--prefix", "/opt/el")
    assert "kept " + str(env_file) in gone.stdout
    left = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert left == ["etc/edgelabel/config.yaml", "etc/edgelabel/edgelabel.env", "var/lib/edgelabel/dataset/classes.txt"]
    assert not (root / "opt").exists() and not (root / "etc/systemd").exists()

    run_script("uninstall", "--root", str(root), "--prefix", "/opt/el", "--purge")
    assert list(root.iterdir()) == []


def readme_blocks() -> list[str]:
    """The ```sh blocks of the README's quick start, in order."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):text.index("\n## ", text.index("## Quick start") + 1)]
    return re.findall(r"```sh\n(.*?)```", quick, re.S)


def test_the_readme_quick_start_installs_the_runtime_and_ci_runs_the_readme_test_commands() -> None:
    setup, tests = readme_blocks()[:2]
    assert 'pip install -e .' in setup and "[test]" not in setup and "edgelabel run" in setup
    assert "mosquitto" in setup  # the broker the main job publishes to
    assert 'pip install -e ".[test]"' in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -q -e ".[test]"' in ci
    test_command = tests.strip().splitlines()[-1]
    assert test_command in ci.splitlines(), f"{test_command!r} is not what .ci/run runs"
    # the system packages .ci/run installs for the full suite are the README's
    for package in ("mosquitto", "chromium", "gir1.2-gst-rtsp-server-1.0", "python3-gi", "gstreamer1.0-libav"):
        assert package in ci and package in tests, package


# ----------------------------------------------------------------------------- the distribution's import names


def test_the_distribution_installs_one_import_root_and_a_console_script(tmp_path: Path) -> None:
    """edge, engines and web are generic names (web.py claims ``web``): installed, they live under ``edgelabel.``,
    and the only other thing installed is the ``edgelabel`` command."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    info = tmp_path / "edgelabel.egg-info"
    assert (info / "top_level.txt").read_text().split() == ["edgelabel"]
    assert "[console_scripts]\nedgelabel = edgelabel.edge.cli:main" in (info / "entry_points.txt").read_text()
    # what this environment has installed answers to the same names, from outside the source tree
    probe = ("import importlib.util as u, edgelabel.edge.cli, edgelabel.engines.base, edgelabel.web.app, "
             "edgelabel.ingest.db; print([n for n in ('edge', 'engines', 'web', 'ingest') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"generic top-level names installed: {out.stdout}"

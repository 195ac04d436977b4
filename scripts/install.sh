#!/usr/bin/env bash
# Install or uninstall edgelabel as a systemd service (Jetson or any Linux box).
#
#   sudo scripts/install.sh [install] [options]
#   sudo scripts/install.sh uninstall [--purge] [options]
#
# Why one script: a Jetson needs JetPack's TensorRT, pycuda and GStreamer-enabled
# OpenCV, which live in the system Python, plus an onnxruntime-gpu wheel that PyPI
# does not have; a plain `pip install` gets all three wrong.  This script builds a
# virtual environment that sees the system packages, keeps pip's OpenCV out, takes
# onnxruntime-gpu from a Jetson wheel index or a local wheel folder, and installs
# the unit, the service user and the config.  Running it again changes nothing
# that is already right (the config and secrets files are never overwritten);
# `uninstall` removes what it installed and keeps what you changed.
#
# Tests (and package builds) run it with --root DIR (a DESTDIR-like staging root:
# no users, no systemctl) and --dry-run (print every action, change nothing).
set -euo pipefail

PROG="install.sh"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_PREFIX=/opt/edgelabel
SERVICE=edgelabel
SERVICE_USER=edgelabel

ACTION=install
PREFIX="$DEFAULT_PREFIX"
ROOT=/
DRY_RUN=0
WHEELS=""
MODELS=""
ORT_INDEX="${EDGELABEL_ORT_INDEX:-}"
ORT_PACKAGE="${EDGELABEL_INSTALL_ORT_PACKAGE:-}"
PLATFORM=auto
PYTHON=""
SYSTEM_SITE=auto
NO_DEPS=0
START=0
PURGE=0
TEGRA_RELEASE="${EDGELABEL_TEGRA_RELEASE:-/etc/nv_tegra_release}"

usage() {
    cat <<EOF
usage: $PROG [install|uninstall] [options]

install (default)
  --prefix DIR          install prefix (default $DEFAULT_PREFIX): DIR/venv, DIR/models, DIR/docs
  --root DIR            stage everything below DIR (like DESTDIR): no user is created and
                        systemctl is not called; the venv is only usable at that path
  --dry-run             print every action, change nothing
  --wheels DIR          offline: pip --no-index --find-links DIR (a local wheel mirror; an
                        edgelabel-*.whl there is used instead of building this source tree)
  --models DIR          copy the model files in DIR to PREFIX/models
  --ort-index URL       Jetson: pip index that serves onnxruntime-gpu for this JetPack
                        (env EDGELABEL_ORT_INDEX), e.g. NVIDIA's Jetson AI Lab index
  --ort-package NAME    onnxruntime, onnxruntime-gpu or none (default: onnxruntime on x86,
                        onnxruntime-gpu on a Jetson; none = keep what is installed)
  --platform P          auto (default: Jetson when $TEGRA_RELEASE exists), jetson, generic
  --python PATH         interpreter for the venv (default: /usr/bin/python3 on a Jetson,
                        python3 elsewhere)
  --system-site-packages  let the venv see system packages (always on for a Jetson)
  --no-deps             install edgelabel only; its dependencies are already there
  --now                 start (or restart) the service after installing
uninstall
  --purge               also remove /etc/edgelabel, /var/lib/edgelabel (the dataset!),
                        /var/log/edgelabel and the service user if this script created it
  (--prefix, --root and --dry-run as above)
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# run CMD...: print it; execute unless --dry-run
run() {
    local quoted
    quoted="$(printf '%q ' "$@")"
    printf '+ %s\n' "${quoted% }"
    if [ "$DRY_RUN" = 1 ]; then return 0; fi
    "$@"
}

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }

while [ $# -gt 0 ]; do
    opt="$1"
    val=""
    case "$opt" in
        --*=*) val="${opt#*=}"; opt="${opt%%=*}"; set -- "$opt" "$val" "${@:2}" ;;
    esac
    case "$opt" in
        install|--install) ACTION=install ;;
        uninstall|--uninstall) ACTION=uninstall ;;
        --prefix) need_value "$@"; PREFIX="$2"; shift ;;
        --root) need_value "$@"; ROOT="$2"; shift ;;
        --dry-run) DRY_RUN=1 ;;
        --wheels) need_value "$@"; WHEELS="$2"; shift ;;
        --models) need_value "$@"; MODELS="$2"; shift ;;
        --ort-index) need_value "$@"; ORT_INDEX="$2"; shift ;;
        --ort-package) need_value "$@"; ORT_PACKAGE="$2"; shift ;;
        --platform) need_value "$@"; PLATFORM="$2"; shift ;;
        --python) need_value "$@"; PYTHON="$2"; shift ;;
        --system-site-packages) SYSTEM_SITE=1 ;;
        --no-deps) NO_DEPS=1 ;;
        --now|--start) START=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $opt" ;;
    esac
    shift
done

# ----------------------------------------------------------------------------- paths

case "$PREFIX" in
    /*) ;;
    *) die "--prefix must be an absolute path (got '$PREFIX')" ;;
esac
PREFIX="${PREFIX%/}"
case "$PREFIX" in
    ""|/usr|/usr/local|/opt|/bin|/sbin|/etc|/var|/home|/root|/srv|/tmp)
        die "--prefix $PREFIX is a system folder; use a folder of its own such as $DEFAULT_PREFIX" ;;
esac
case "$ROOT" in
    /*) ;;
    *) ROOT="$(pwd)/$ROOT" ;;
esac
R="${ROOT%/}"            # "" for the live system
LIVE=0
[ -z "$R" ] && LIVE=1

DEST="$R$PREFIX"
VENV="$DEST/venv"
MANIFEST="$DEST/.edgelabel-install"
SHARE="$DEST/share"
UNIT="$R/etc/systemd/system/$SERVICE.service"
CONF_DIR="$R/etc/edgelabel"
CONF="$CONF_DIR/config.yaml"
ENV_FILE="$CONF_DIR/edgelabel.env"
STATE_DIR="$R/var/lib/edgelabel"
LOG_DIR="$R/var/log/edgelabel"

systemd_running() { [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; }

# systemctl ARGS...: only on a live system booted with systemd
sysctl_run() {
    if systemd_running; then
        run systemctl "$@" || warn "systemctl $* failed"
    fi
}

manifest_get() {  # manifest_get KEY: the value recorded by an earlier install ("" when none)
    [ -f "$MANIFEST" ] || return 0
    sed -n "s/^$1=//p" "$MANIFEST" | tail -n 1
}

# render SRC DEST: copy a template with the default prefix replaced by --prefix
render() { sed "s#$DEFAULT_PREFIX#$PREFIX#g" "$1" > "$2"; }

# put_file MODE TEMPLATE DEST: install a rendered template when DEST differs (prints what it did)
put_file() {
    local mode="$1" template="$2" dest="$3" tmp
    tmp="$(mktemp)"
    render "$template" "$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        say "unchanged: $dest"
        rm -f "$tmp"
        return 1
    fi
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ install -D -m %s %s %s\n' "$mode" "$template" "$dest"
    else
        install -D -m "$mode" "$tmp" "$dest"
        say "installed: $dest"
    fi
    rm -f "$tmp"
    return 0
}

# ----------------------------------------------------------------------------- platform

is_jetson() {
    case "$PLATFORM" in
        jetson) return 0 ;;
        generic) return 1 ;;
        auto) [ -f "$TEGRA_RELEASE" ] ;;
        *) die "--platform must be auto, jetson or generic (got '$PLATFORM')" ;;
    esac
}

# ----------------------------------------------------------------------------- install

install_python() {
    local jetson="$1" sys_site="$SYSTEM_SITE" ort="$ORT_PACKAGE" py="$PYTHON" target extra=""
    if [ "$jetson" = 1 ]; then
        py="${py:-/usr/bin/python3}"
        sys_site=1               # TensorRT, pycuda and GStreamer OpenCV live in the system Python
        ort="${ort:-onnxruntime-gpu}"
        extra="[jetson]"
    else
        py="${py:-python3}"
        [ "$sys_site" = auto ] && sys_site=0
        ort="${ort:-onnxruntime}"
    fi
    case "$ort" in
        onnxruntime|onnxruntime-gpu|none) ;;
        *) die "--ort-package must be onnxruntime, onnxruntime-gpu or none (got '$ort')" ;;
    esac
    command -v "$py" >/dev/null 2>&1 || die "python interpreter '$py' not found (use --python PATH)"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        die "$("$py" -c 'import platform; print(platform.python_version())') at $py is too old: edgelabel needs Python >= 3.10" \
            "(JetPack 5 ships Python 3.8; see docs/jetson.md)"
    fi

    if [ ! -x "$VENV/bin/python" ] && ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
        die "$py cannot create virtual environments: sudo apt install python3-venv"
    fi
    if [ -x "$VENV/bin/python" ]; then
        say "venv exists: $VENV"
        local want=false
        [ "$sys_site" = 1 ] && want=true
        if ! grep -qx "include-system-site-packages = $want" "$VENV/pyvenv.cfg" 2>/dev/null; then
            run sed -i "s/^include-system-site-packages = .*/include-system-site-packages = $want/" "$VENV/pyvenv.cfg"
        fi
    elif [ "$sys_site" = 1 ]; then
        run "$py" -m venv --system-site-packages "$VENV"
    else
        run "$py" -m venv "$VENV"
    fi

    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input install)
    local index_args=()
    if [ -n "$WHEELS" ]; then
        [ -d "$WHEELS" ] || die "--wheels $WHEELS: no such folder"
        index_args=(--no-index --find-links "$WHEELS")
    fi
    local dep_args=()
    [ "$NO_DEPS" = 1 ] && dep_args=(--no-deps)

    # what to install: a prebuilt wheel from the mirror, else this source tree
    local from_wheel=0
    if [ -n "$WHEELS" ] && compgen -G "$WHEELS/edgelabel-*.whl" >/dev/null; then
        target="edgelabel$extra"
        from_wheel=1
    else
        target="$SRC$extra"
        # offline, pip cannot fetch the build back end: use the venv's setuptools (and wheel)
        if [ -n "$WHEELS" ]; then dep_args+=(--no-build-isolation); fi
    fi

    if [ "$from_wheel" = 0 ] && [ -n "$WHEELS" ]; then
        # building this source tree offline: setuptools and wheel must come from the mirror (or be there already)
        run "${pip[@]}" "${index_args[@]}" "setuptools>=61" wheel \
            || warn "setuptools/wheel not in $WHEELS: put them there, or a prebuilt edgelabel-*.whl (pip wheel . -w DIR)"
    fi

    if [ "$jetson" = 1 ]; then
        if [ "$ort" != none ]; then
            if [ "$DRY_RUN" = 0 ] && "$VENV/bin/python" -c \
                'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
                say "onnxruntime with CUDA already installed: keeping it"
            elif [ -n "$WHEELS" ]; then
                run "${pip[@]}" "${index_args[@]}" "$ort"
            elif [ -n "$ORT_INDEX" ]; then
                run "${pip[@]}" --index-url "$ORT_INDEX" "$ort"
            else
                die "on a Jetson, $ort comes from a Jetson wheel index (PyPI has none): pass --ort-index URL" \
                    "(env EDGELABEL_ORT_INDEX) or --wheels DIR, or --ort-package none to keep what is installed"
            fi
        fi
        # keep JetPack's OpenCV (GStreamer) and the ONNX Runtime installed above
        run env EDGELABEL_SYSTEM_OPENCV=1 EDGELABEL_ORT_PACKAGE=none \
            "${pip[@]}" "${index_args[@]}" "${dep_args[@]}" "$target"
    else
        run env EDGELABEL_ORT_PACKAGE="$ort" "${pip[@]}" "${index_args[@]}" "${dep_args[@]}" "$target"
    fi
    if [ "$from_wheel" = 1 ]; then
        # same version number, new build: make sure the code in the mirror is what runs
        run "${pip[@]}" "${index_args[@]}" --no-deps --force-reinstall edgelabel
    fi

    if [ "$DRY_RUN" = 0 ] && [ "$jetson" = 1 ]; then
        "$VENV/bin/python" - <<'PY' || true
import sys
try:
    import cv2
    gst = any("GStreamer" in l and "YES" in l for l in cv2.getBuildInformation().splitlines())
    if not gst:
        print(f"install.sh: warning: {cv2.__file__} has no GStreamer (a pip OpenCV shadows JetPack's): "
              "pip uninstall opencv-python opencv-python-headless", file=sys.stderr)
except ImportError:
    print("install.sh: warning: OpenCV not importable: sudo apt install nvidia-opencv (JetPack)", file=sys.stderr)
try:
    import tensorrt  # noqa: F401
except ImportError:
    print("install.sh: warning: TensorRT Python bindings not importable: sudo apt install python3-libnvinfer", file=sys.stderr)
PY
    fi
}

ensure_user() {
    if [ "$LIVE" = 0 ]; then
        say "--root: not creating user $SERVICE_USER (at deployment: useradd --system --user-group --groups video $SERVICE_USER)"
        return 0
    fi
    if ! getent group video >/dev/null; then
        run groupadd --system video
    fi
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        local nologin
        nologin="$(command -v nologin || echo /usr/sbin/nologin)"
        run useradd --system --user-group --groups video --home-dir /var/lib/edgelabel --no-create-home \
            --shell "$nologin" --comment "edgelabel daemon" "$SERVICE_USER"
        USER_CREATED=1
    else
        say "user exists: $SERVICE_USER"
        if ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx video; then
            run usermod -a -G video "$SERVICE_USER"
        fi
    fi
}

do_install() {
    local jetson=0
    is_jetson && jetson=1
    if [ "$LIVE" = 1 ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
        die "installing into the live system needs root (sudo $0 ...); or use --root DIR / --dry-run"
    fi
    if [ "$jetson" = 1 ]; then
        say "platform: Jetson ($(head -n 1 "$TEGRA_RELEASE" 2>/dev/null || echo "forced with --platform"))"
    else
        say "platform: generic Linux ($(uname -m))"
    fi
    [ -z "$MODELS" ] || [ -d "$MODELS" ] || die "--models $MODELS: no such folder"

    USER_CREATED="$(manifest_get user_created)"
    USER_CREATED="${USER_CREATED:-0}"
    ensure_user

    run install -d -m 0755 "$DEST"
    install_python "$jetson"

    # templates kept with the install: uninstall compares against them
    put_file 0644 "$SRC/systemd/config.example.yaml" "$SHARE/config.example.yaml" || true
    put_file 0644 "$SRC/systemd/edgelabel.env.example" "$SHARE/edgelabel.env.example" || true
    if [ -f "$SRC/docs/jetson.md" ]; then
        put_file 0644 "$SRC/docs/jetson.md" "$DEST/docs/jetson.md" || true
    fi

    local unit_changed=0
    put_file 0644 "$SRC/systemd/edgelabel.service" "$UNIT" && unit_changed=1

    run install -d -m 0755 "$CONF_DIR"
    if [ -e "$CONF" ]; then
        say "kept existing config: $CONF"
    else
        put_file 0640 "$SRC/systemd/config.example.yaml" "$CONF" || true
        if [ "$LIVE" = 1 ]; then run chgrp "$SERVICE_USER" "$CONF"; fi
    fi
    if [ -e "$ENV_FILE" ]; then
        say "kept existing secrets file: $ENV_FILE"
    else
        put_file 0600 "$SRC/systemd/edgelabel.env.example" "$ENV_FILE" || true
    fi

    local models_list=""
    if [ -n "$MODELS" ]; then
        local f
        for f in "$MODELS"/*; do
            [ -f "$f" ] || continue
            if [ -f "$DEST/models/${f##*/}" ] && cmp -s "$f" "$DEST/models/${f##*/}"; then
                say "unchanged: $DEST/models/${f##*/}"
            else
                run install -D -m 0644 "$f" "$DEST/models/${f##*/}"
            fi
            models_list="$models_list ${f##*/}"
        done
    fi
    # models copied by earlier runs stay listed (uninstall removes them)
    local previous
    previous="$(manifest_get models)"
    # shellcheck disable=SC2086  # word splitting of the space-separated lists is intended
    models_list="$(printf '%s\n' $previous $models_list | sort -u | tr '\n' ' ')"

    # state and logs: systemd creates them at start (StateDirectory=, LogsDirectory=); creating them
    # now lets `edgelabel doctor` run before the first start
    if [ "$LIVE" = 1 ]; then
        run install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE_DIR" "$STATE_DIR/engines" "$LOG_DIR"
    else
        run install -d -m 0750 "$STATE_DIR" "$STATE_DIR/engines" "$LOG_DIR"
    fi

    if [ "$DRY_RUN" = 0 ]; then
        {
            echo "# written by scripts/install.sh; read by 'install.sh uninstall'"
            echo "prefix=$PREFIX"
            echo "platform=$([ "$jetson" = 1 ] && echo jetson || echo generic)"
            echo "user_created=$USER_CREATED"
            echo "models=${models_list% }"
        } > "$MANIFEST"
    else
        say "would record the install in $MANIFEST"
    fi

    if systemd_running; then
        sysctl_run daemon-reload
        sysctl_run enable "$SERVICE.service"
        if [ "$START" = 1 ]; then
            sysctl_run restart "$SERVICE.service"
        else
            # pick up new code or unit if it is running; a stopped service stays stopped
            sysctl_run try-restart "$SERVICE.service"
            say "start it with: sudo systemctl start $SERVICE"
        fi
    else
        say "systemd is not running here (no /run/systemd/system or --root): systemctl skipped;" \
            "later: sudo systemctl daemon-reload && sudo systemctl enable --now $SERVICE"
    fi
    if [ "$DRY_RUN" = 1 ]; then
        say "dry run: nothing was changed"
        return 0
    fi
    if [ "$unit_changed" = 1 ] && systemd_running; then
        say "the unit changed: systemd has reloaded it"
    fi
    say "installed in $DEST; edit $CONF and $ENV_FILE, then check with: sudo $PREFIX/venv/bin/edgelabel doctor -c /etc/edgelabel/config.yaml"
}

# ----------------------------------------------------------------------------- uninstall

# remove_if_pristine FILE TEMPLATE: remove FILE when it is still the installed template
remove_if_pristine() {
    local file="$1" template="$2"
    [ -e "$file" ] || return 0
    if [ "$PURGE" = 1 ]; then
        run rm -f "$file"
    elif [ -f "$template" ] && cmp -s "$file" "$template"; then
        run rm -f "$file"
    else
        say "kept $file (changed since install; --purge removes it)"
    fi
}

rmdir_if_empty() {
    local d
    for d in "$@"; do
        if [ -d "$d" ] && [ -z "$(ls -A "$d")" ]; then run rmdir "$d"; fi
    done
}

do_uninstall() {
    if [ "$LIVE" = 1 ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
        die "uninstalling from the live system needs root (sudo $0 uninstall)"
    fi
    [ -f "$MANIFEST" ] || warn "no install record at $MANIFEST: removing the unit and $VENV only"
    if systemd_running; then
        sysctl_run disable --now "$SERVICE.service"
    fi
    if [ -e "$UNIT" ]; then run rm -f "$UNIT"; fi

    remove_if_pristine "$CONF" "$SHARE/config.example.yaml"
    remove_if_pristine "$ENV_FILE" "$SHARE/edgelabel.env.example"

    local m
    for m in $(manifest_get models); do
        [ -e "$DEST/models/$m" ] && run rm -f "$DEST/models/$m"
    done
    [ -d "$VENV" ] && run rm -rf "$VENV"
    [ -d "$SHARE" ] && run rm -rf "$SHARE"
    [ -d "$DEST/docs" ] && run rm -rf "$DEST/docs"
    local created
    created="$(manifest_get user_created)"
    [ -f "$MANIFEST" ] && run rm -f "$MANIFEST"
    rmdir_if_empty "$DEST/models" "$DEST"
    [ -d "$DEST" ] && say "kept $DEST (files not installed by this script are in it)"

    if [ "$PURGE" = 1 ]; then
        [ -d "$CONF_DIR" ] && run rm -rf "$CONF_DIR"
        [ -d "$STATE_DIR" ] && run rm -rf "$STATE_DIR"
        [ -d "$LOG_DIR" ] && run rm -rf "$LOG_DIR"
        if [ "$LIVE" = 1 ] && [ "$created" = 1 ] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
            run userdel "$SERVICE_USER"
        fi
    else
        rmdir_if_empty "$STATE_DIR/engines" "$STATE_DIR" "$LOG_DIR" "$CONF_DIR"
        [ -d "$STATE_DIR" ] && say "kept $STATE_DIR (dataset and state; --purge removes it)"
    fi
    if [ "$LIVE" = 0 ]; then
        # a staging root: leave it as empty as it was
        rmdir_if_empty "$R/etc/systemd/system" "$R/etc/systemd" "$R/etc" "$R/var/lib" "$R/var/log" "$R/var" \
            "$R$(dirname "$PREFIX")"
    fi
    sysctl_run daemon-reload
    if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing was changed"; else say "uninstalled"; fi
}

if [ "$ACTION" = install ]; then
    do_install
else
    do_uninstall
fi

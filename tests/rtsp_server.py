"""A real RTSP server on loopback for the fault tests: GStreamer's RTSP server serving a video file.

Run it with the system Python, which has PyGObject (the test's virtual environment may not):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --path /cam --file video.mp4

Debian packages: python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base
gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav.

The H.264 track of the file is sent as it is (no re-encoding: cheap on a 2-core CI machine), paced in
real time, over RTP/TCP or UDP as the client asks.  Every client gets its own pipeline from the start
of the file, so a test that uses a clip longer than its own run (``bottle-detection.mp4``, 40 s) sees
the stream end only when it kills this process, like a camera losing power.

Prints ``READY rtsp://127.0.0.1:<port><path>`` on stdout once it listens; exits 3 with a reason on
stderr when GStreamer or an element is missing, so the test can skip with that reason.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/cam")
    ap.add_argument("--file", required=True, help="an MP4 with an H.264 video track")
    ap.add_argument("--host", default="127.0.0.1", help="loopback only, by default")
    args = ap.parse_args()
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as exc:
        print(f"GStreamer RTSP server not available: {exc}", file=sys.stderr)
        return 3
    Gst.init(None)
    for element in ("qtdemux", "h264parse", "rtph264pay", "filesrc"):
        if Gst.ElementFactory.find(element) is None:
            print(f"GStreamer element {element} not installed", file=sys.stderr)
            return 3
    if not os.path.isfile(args.file):
        print(f"{args.file}: not found", file=sys.stderr)
        return 3

    location = args.file.replace("\\", "\\\\").replace('"', '\\"')
    launch = (f'( filesrc location="{location}" ! qtdemux ! h264parse config-interval=-1 '
              "! rtph264pay name=pay0 pt=96 config-interval=1 )")

    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(False)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 3
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    print(f"READY rtsp://{args.host}:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

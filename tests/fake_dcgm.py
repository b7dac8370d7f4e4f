"""A stand-in NVIDIA DCGM exporter on loopback: ``/metrics`` in the exporter's Prometheus text
format (``DCGM_FI_DEV_*`` gauges labelled ``gpu``, ``UUID``, ``device``, ``modelName``,
``Hostname``, ``DCGM_FI_DRIVER_VERSION``, as dcgm-exporter 3.x/4.x writes them) for two GPUs.
Power rises by 1 W per scrape; GPU 1 publishes no memory-copy utilization (a gap)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GAUGES = {"DCGM_FI_DEV_SM_CLOCK": 1710, "DCGM_FI_DEV_GPU_TEMP": 41,
          "DCGM_FI_DEV_POWER_USAGE": 60.0, "DCGM_FI_DEV_GPU_UTIL": 35,
          "DCGM_FI_DEV_MEM_COPY_UTIL": 12, "DCGM_FI_DEV_FB_USED": 20480}


def _text(scrape: int) -> str:
    lines = []
    for name, value in GAUGES.items():
        lines += [f"# HELP {name} {name}.", f"# TYPE {name} gauge"]
        for gpu in (0, 1):
            if gpu == 1 and name == "DCGM_FI_DEV_MEM_COPY_UTIL":
                continue
            v = value + scrape + 100 * gpu if name == "DCGM_FI_DEV_POWER_USAGE" else value
            lines.append(f'{name}{{gpu="{gpu}",UUID="GPU-{gpu:08d}",device="nvidia{gpu}",'
                         f'modelName="NVIDIA A10",Hostname="node",'
                         f'DCGM_FI_DRIVER_VERSION="550.54.15"}} {v}')
    return "\n".join(lines) + "\n"


def start() -> tuple[ThreadingHTTPServer, str, list]:
    """Start it on 127.0.0.1 (a free port); returns the server, its ``/metrics`` URL and the
    list of scrape times."""
    scrapes: list = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            import time

            scrapes.append(time.time())
            body = _text(len(scrapes)).encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics", scrapes

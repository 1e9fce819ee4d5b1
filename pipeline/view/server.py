"""The viewer's HTTP server (standard library ``ThreadingHTTPServer``): read-only, localhost by default.

Routes (everything else is 404, and so is any path with a ``.``/``..`` segment)::

    /                                          the page (static/viewer.html)
    /static/<bundled file>                     the page's script and style, OpenSeadragon and its button images
    /api/run                                   the slide list (status, label, prediction, probability) and metrics
    /api/slides/<id>                           one slide: details, failure, layers with their legends, Deep Zoom sizes
    /api/slides/<id>/regions                   the slide's GeoJSON regions (CAM hot regions, annotations)
    /slides/<id>/image/<level>/<col>_<row>.jpeg    a Deep Zoom tile of the slide (OpenSlide's DeepZoomGenerator)
    /slides/<id>/<layer>/<level>/<col>_<row>.png   a Deep Zoom tile of an overlay, rendered from the store

A slide id must be a key of the run's manifest and a static file one of the files bundled in the package: no part
of a URL is ever joined to a filesystem path.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import threading
from collections import OrderedDict
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..core.errors import NoRunError, PipelineError, PortInUseError
from ..core.outputs import MANIFEST_NAME
from ..slides.tiling import TileGrid
from ..report.records import failures_of
from .catalog import RunCatalog, SlideEntry, scalar_details
from .layers import (DZ_OVERLAP_PX, DZ_TILE_PX, LAYERS, available_layers, dz_tile_box, dzi_info, layer_legend,
                     layer_table, png_tile, render_cells)

log = logging.getLogger("pipeline")
STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}
TILE_RE = re.compile(r"^(\d{1,2})/(\d{1,6})_(\d{1,6})\.(jpeg|png)$")
OPEN_SLIDES_MAX = 8
JPEG_QUALITY = 85


def bundled_files() -> dict[str, Path]:
    """The files the server may send under ``/static/``: what the package ships, by relative name."""
    return {p.relative_to(STATIC_DIR).as_posix(): p for p in STATIC_DIR.rglob("*")
            if p.is_file() and p.suffix in CONTENT_TYPES}


class NotFound(Exception):
    """A request for something the run does not hold (sent as 404 with the message)."""


class ViewerApp:
    """The run being viewed: its catalog, the slides opened for Deep Zoom (a few at a time) and the overlay tables."""

    def __init__(self, out_dir: str | Path):
        out_dir = Path(out_dir)
        if not (out_dir / MANIFEST_NAME).is_file():
            raise NoRunError(f"no {MANIFEST_NAME}: not the output directory of a run", path=out_dir)
        self.catalog = RunCatalog(out_dir)
        self.static = bundled_files()
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple] = OrderedDict()  # slide id -> (DeepZoomGenerator, slide handle)
        self.layer_table = lru_cache(maxsize=64)(self._layer_table)

    # --- slides ------------------------------------------------------------------------------------------------

    def entry(self, slide_id: str) -> SlideEntry:
        entry = self.catalog.get(slide_id)
        if entry is None:
            raise NotFound(f"no slide '{slide_id}' in this run")
        return entry

    def deep_zoom(self, entry: SlideEntry):
        """The slide's DeepZoomGenerator (opened once, the least recently used closed past OPEN_SLIDES_MAX);
        raises ``PipelineError`` when the file is gone or unreadable."""
        from openslide.deepzoom import DeepZoomGenerator

        from ..slides.open import open_handle

        with self._lock:
            if entry.slide_id in self._open:
                self._open.move_to_end(entry.slide_id)
                return self._open[entry.slide_id][0]
        path, recorded = self.catalog.slide_file(entry)
        if path is None:
            raise PipelineError(f"the slide file is no longer where the run read it ({recorded or 'no path recorded'})",
                                fix="Move the file back, or rerun the pipeline on its new place; the overlays still "
                                    "show on their own.")
        handle, _ = open_handle(path)
        dz = DeepZoomGenerator(handle, tile_size=DZ_TILE_PX, overlap=DZ_OVERLAP_PX, limit_bounds=False)
        with self._lock:
            if entry.slide_id in self._open:  # another request opened it meanwhile
                handle.close()
                return self._open[entry.slide_id][0]
            self._open[entry.slide_id] = (dz, handle)
            while len(self._open) > OPEN_SLIDES_MAX:
                self._open.popitem(last=False)[1][1].close()
        return dz

    def slide_state(self, entry: SlideEntry) -> dict:
        try:
            dz = self.deep_zoom(entry)
        except PipelineError as err:
            return {"available": False, "message": str(err)}
        width, height = dz.level_dimensions[-1]
        return {"available": True, "width": width, "height": height, "dzi": dzi_info(width, height, "jpeg")}

    def slide_tile(self, entry: SlideEntry, level: int, col: int, row: int) -> bytes:
        import io

        try:
            dz = self.deep_zoom(entry)
        except PipelineError as err:
            raise NotFound(str(err)) from None
        if not (0 <= level < dz.level_count) or not (col < dz.level_tiles[level][0] and row < dz.level_tiles[level][1]):
            raise NotFound(f"no tile {level}/{col}_{row}")
        buf = io.BytesIO()
        dz.get_tile(level, (col, row)).convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    # --- overlays ----------------------------------------------------------------------------------------------

    def _layer_table(self, slide_id: str, layer: str):
        entry = self.entry(slide_id)
        table = layer_table(entry.store, layer) if entry.store is not None else None
        if table is None:
            raise NotFound(f"slide '{slide_id}' has no {layer} layer")
        return table, TileGrid.from_dict(entry.attrs["tile_grid"])

    def overlay_tile(self, entry: SlideEntry, layer: str, level: int, col: int, row: int) -> bytes:
        table, grid = self.layer_table(entry.slide_id, layer)
        box = dz_tile_box(grid.slide_width_px, grid.slide_height_px, level, col, row)
        if box is None:
            raise NotFound(f"no tile {level}/{col}_{row}")
        x0, y0, w, h, downsample = box
        return png_tile(render_cells(table, grid, x0, y0, w, h, downsample))

    # --- JSON --------------------------------------------------------------------------------------------------

    def run_json(self) -> dict:
        keys = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "n_slides")
        metrics = {k: self.catalog.metrics[k] for k in keys if isinstance(self.catalog.metrics.get(k), (int, float))}
        # the run folder's name, not its absolute path: the page may be served beyond this machine (``--host``)
        return {"run_name": self.catalog.out_dir.name, "metrics": metrics,
                "slides": [e.summary() for e in self.catalog.slides.values()]}

    def slide_json(self, entry: SlideEntry) -> dict:
        out = {**entry.summary(), "failures": failures_of(entry.record), "details": scalar_details(entry.record),
               "slide": self.slide_state(entry),
               "layers": [], "regions": len(self.catalog.regions(entry))}
        if entry.store is not None:
            from ..core.store import array_attrs

            grid = TileGrid.from_dict(entry.attrs["tile_grid"])
            out["grid"] = {"width": grid.slide_width_px, "height": grid.slide_height_px,
                           "rows": grid.rows, "cols": grid.cols}
            components = int((array_attrs(entry.store, "feature_map") or {}).get("components") or 1)
            cam_attrs = array_attrs(entry.store, "cam")
            if cam_attrs and cam_attrs.get("probabilities"):
                out["details"]["cam.probabilities"] = ", ".join(f"{p:.3f}" for p in cam_attrs["probabilities"])
            for name in available_layers(entry.store):
                out["layers"].append({"name": name, "legend": layer_legend(name, entry.store, components, cam_attrs),
                                      "dzi": dzi_info(grid.slide_width_px, grid.slide_height_px, "png")})
        return out

    def close(self) -> None:
        with self._lock:
            for _, handle in self._open.values():
                handle.close()
            self._open.clear()


def route(app: ViewerApp, raw_path: str) -> tuple[bytes, str]:
    """(body, content type) of a GET request; ``NotFound`` for anything the run does not hold."""
    path = unquote(urlsplit(raw_path).path)
    parts = path.split("/")[1:]
    if any(p in (".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise NotFound("no such path")
    if path in ("/", "/index.html"):
        return app.static["viewer.html"].read_bytes(), CONTENT_TYPES[".html"]
    if parts[0] == "static":
        name = "/".join(parts[1:])
        if name not in app.static:
            raise NotFound(f"no bundled file '{name}'")
        return app.static[name].read_bytes(), CONTENT_TYPES[app.static[name].suffix]
    if parts == ["api", "run"]:
        return _json(app.run_json())
    if len(parts) >= 3 and parts[:2] == ["api", "slides"]:
        entry = app.entry(parts[2])
        if len(parts) == 3:
            return _json(app.slide_json(entry))
        if parts[3:] == ["regions"]:
            return _json(app.catalog.regions(entry))
    if len(parts) == 5 and parts[0] == "slides":
        entry = app.entry(parts[1])
        match = TILE_RE.match("/".join(parts[3:]))
        if match:
            level, col, row = (int(match.group(i)) for i in (1, 2, 3))
            if parts[2] == "image" and match.group(4) == "jpeg":
                return app.slide_tile(entry, level, col, row), "image/jpeg"
            if parts[2] in LAYERS and match.group(4) == "png":
                return app.overlay_tile(entry, parts[2], level, col, row), "image/png"
    raise NotFound("no such path")


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def host_allowed(bound_address: str, host_header: str) -> bool:
    """A server bound to this machine only answers requests addressed to it (``Host: localhost``/``127.0.0.1``):
    a web page that rebinds its own domain name to 127.0.0.1 cannot read the run through the user's browser."""
    if bound_address not in LOOPBACK_NAMES and not bound_address.startswith("127."):
        return True
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return name in LOOPBACK_NAMES or name.startswith("127.")


def _json(data) -> tuple[bytes, str]:
    return json.dumps(data, default=str).encode("utf-8"), "application/json"


class Handler(BaseHTTPRequestHandler):
    server_version = "wsi-pipeline-view"

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        app: ViewerApp = self.server.app  # type: ignore[attr-defined]
        try:
            if not host_allowed(self.server.server_address[0], self.headers.get("Host", "")):
                raise NotFound("unknown host")
            body, ctype = route(app, self.path)
            status = 200
        except NotFound as err:
            body, ctype, status = str(err).encode("utf-8"), CONTENT_TYPES[".txt"], 404
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("view: %s failed", self.path)
            body, ctype, status = f"{type(err).__name__}: {err}".encode(), CONTENT_TYPES[".txt"], 500
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache" if ctype.startswith(("application", "text")) else "max-age=3600")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the http.server signature
        log.debug("view: " + format, *args)


class ViewerServer:
    """The server of one run; ``start`` serves from a background thread (tests), ``serve_forever`` in this one."""

    def __init__(self, out_dir: str | Path, host: str = "127.0.0.1", port: int = 8765):
        self.app = ViewerApp(out_dir)
        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PortInUseError(f"port {port} on {host} is already in use",
                                     fix=f"Choose another port with --port (e.g. --port {port + 1}), or stop the "
                                         "program that holds it.") from None
            raise PortInUseError(f"cannot listen on {host}:{port} ({err.strerror})",
                                 fix="Check --host and --port: the host must be an address of this machine.") from None
        self.httpd.daemon_threads = True
        self.httpd.app = self.app  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "ViewerServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="wsi-pipeline-view", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def stop(self) -> None:
        """Stop serving, wait for the server thread, free the port and close the slides."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.close()

    def close(self) -> None:
        self.httpd.server_close()
        self.app.close()

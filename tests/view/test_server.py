"""The viewer's server over HTTP: the run's JSON, Deep Zoom tiles of the slide and of its overlays, 404 for anything
outside the run, a moved slide file, a port in use, and a clean stop (also from the command line)."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pipeline.cam.heatmaps import CMAP_NAME
from pipeline.cli import main
from pipeline.core.errors import NoRunError, PortInUseError
from pipeline.core.pictures import colormap_lut
from pipeline.view.layers import DZ_TILE_PX, dz_level_count
from pipeline.view.server import ViewerServer


@pytest.fixture(scope="module")
def server(view_run):
    srv = ViewerServer(view_run["out"], port=0).start()
    yield srv
    srv.stop()


def get(server, path: str) -> tuple[int, bytes, str]:
    """A GET with the path sent exactly as given (no client-side normalisation of '..')."""
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, resp.getheader("Content-Type", "")


def test_run_lists_every_slide_of_the_manifest(server):
    status, body, ctype = get(server, "/api/run")
    assert status == 200 and ctype == "application/json"
    run = json.loads(body)
    slides = {s["slide_id"]: s for s in run["slides"]}
    assert set(slides) == {"lesion", "moved", "broken"}
    assert "/" not in run["run_name"] and run["run_name"] and body.count(b'"/') == 0  # no absolute path goes out
    assert (slides["lesion"]["label"], slides["lesion"]["prediction"], slides["lesion"]["probability"]) == ("1", "1", 0.9)
    assert slides["moved"]["prediction"] == "1" and slides["moved"]["label"] == "0"
    assert slides["broken"]["status"] == "failed" and slides["broken"]["failure"] == "describe: corrupt_slide"


def test_slide_json_has_layers_legends_and_sizes(server, view_run):
    info = json.loads(get(server, "/api/slides/lesion")[1])
    assert info["slide"]["available"] and (info["slide"]["width"], info["slide"]["height"]) == (1536, 1152)
    assert [layer["name"] for layer in info["layers"]] == ["cam", "feature_map", "tissue"]
    legends = {layer["name"]: layer["legend"] for layer in info["layers"]}
    assert legends["cam"]["kind"] == "gradient" and legends["cam"]["stops"][-1] == "#fcffa4"  # inferno's top
    assert ["#e63232", "excluded: pen"] in legends["tissue"]["items"]  # the QC code's reason
    assert info["regions"] == 2 and info["details"]["tiles"] == int(view_run["tissue"].sum())
    regions = json.loads(get(server, "/api/slides/lesion/regions")[1])
    assert [r["name"] for r in regions] == ["CAM hot regions", "annotations"]
    assert regions[1]["collection"]["features"][0]["properties"]["classification"]["name"] == "Tumor"


@pytest.mark.parametrize("path", ["/api/slides/nope", "/api/slides/..", "/api/slides/%2e%2e/regions",
                                  "/slides/../../etc/passwd", "/static/../server.py", "/static/..%2fserver.py",
                                  "/static/../../../../etc/passwd", "/slides/nope/image/0/0_0.jpeg",
                                  "/slides/lesion/image/99/0_0.jpeg", "/slides/lesion/cam/11/99_0.png",
                                  "/slides/lesion/secret/11/0_0.png", "/etc/passwd", "/api/slides/broken/../lesion"])
def test_anything_outside_the_run_is_404(server, path):
    assert get(server, path)[0] == 404


def test_requests_for_another_host_name_are_refused(server):
    """DNS rebinding: a page of evil.example whose name now points to 127.0.0.1 cannot read the run."""
    host, port = server.httpd.server_address[:2]
    for name, status in ((f"evil.example:{port}", 404), (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200)):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/api/run", headers={"Host": name})
        assert conn.getresponse().status == status, name
        conn.close()


def test_slide_tiles_at_several_levels(server):
    top = dz_level_count(1536, 1152) - 1
    for level in (top, top - 2, top - 5):
        status, body, ctype = get(server, f"/slides/lesion/image/{level}/0_0.jpeg")
        assert status == 200 and ctype == "image/jpeg"
        with Image.open(io.BytesIO(body)) as tile:
            scale = 2 ** (top - level)
            assert tile.size == (min(DZ_TILE_PX + 1, -(-1536 // scale)), min(DZ_TILE_PX + 1, -(-1152 // scale)))


def test_cam_tile_is_hot_on_the_lesion_and_cold_on_other_tissue(server, view_run):
    grid, lesion, tissue = view_run["grid"], view_run["lesion"], view_run["tissue"]
    top = dz_level_count(1536, 1152) - 1
    lut = colormap_lut(CMAP_NAME)
    for (r, c), expected in ((np.argwhere(lesion)[0], lut[255]), (np.argwhere(tissue & ~lesion)[-1], lut[0])):
        x, y = (c + 0.5) * grid.stride_l0_px, (r + 0.5) * grid.stride_l0_px  # the tile's centre, level 0
        col, row = int(x // DZ_TILE_PX), int(y // DZ_TILE_PX)
        status, body, ctype = get(server, f"/slides/lesion/cam/{top}/{col}_{row}.png")
        assert status == 200 and ctype == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(body)))
        px, py = int(x - col * DZ_TILE_PX + (1 if col else 0)), int(y - row * DZ_TILE_PX + (1 if row else 0))
        assert pixels.shape[2] == 4 and tuple(pixels[py, px]) == (*expected, 255)


def test_moved_slide_file_is_a_message_not_a_server_error(server):
    info = json.loads(get(server, "/api/slides/moved")[1])
    assert info["slide"]["available"] is False
    assert "no longer where the run read it" in info["slide"]["message"] and "moved.svs" in info["slide"]["message"]
    assert get(server, "/slides/moved/image/8/0_0.jpeg")[0] == 404
    assert get(server, "/slides/moved/cam/8/0_0.png")[0] == 200  # the overlays still show


def test_failed_slide_reports_its_reason(server):
    info = json.loads(get(server, "/api/slides/broken")[1])
    assert info["failures"] == [{"stage": "describe", "code": "corrupt_slide",
                                 "message": "broken.svs: truncated. Fix: re-copy the slide."}]
    assert info["layers"] == [] and info["slide"]["available"] is False


def test_port_in_use_is_a_typed_error(server, view_run, capsys):
    port = server.httpd.server_address[1]
    with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use") as err:
        ViewerServer(view_run["out"], port=port)
    assert err.value.code == "port_in_use" and "--port" in err.value.fix
    assert main(["view", str(view_run["out"]), "--port", str(port)]) == 2  # the command line: exit 2, one line
    assert f"error: port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


def test_a_directory_without_a_run_is_a_typed_error(tmp_path):
    with pytest.raises(NoRunError, match="manifest.json"):
        ViewerServer(tmp_path, port=0)


def test_server_stops_cleanly_and_frees_its_port(view_run):
    srv = ViewerServer(view_run["out"], port=0).start()
    port = srv.httpd.server_address[1]
    assert get(srv, "/api/slides/lesion")[0] == 200  # opens the slide
    srv.stop()
    assert srv._thread is None and srv.app._open == {}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    ViewerServer(view_run["out"], port=port).close()  # the port is free again


def test_command_line_serves_until_interrupted(view_run):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "view", str(view_run["out"]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("view: 3 slides of ") and "http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "api/run", timeout=30) as resp:
            assert len(json.loads(resp.read())["slides"]) == 3
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "api/slides/nope", timeout=30)
        assert err.value.code == 404
        proc.send_signal(signal.SIGINT)
        out, errors = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "view: stopped" in out, errors
    no_run = subprocess.run([sys.executable, "-m", "pipeline", "view", str(view_run["out"] / "nothing")],
                            capture_output=True, text=True, timeout=60)
    assert no_run.returncode == 2 and "no manifest.json" in no_run.stderr

"""`slidechat serve` end to end on small synthetic slides and a tiny model built here: the API (slides, deep-zoom
tiles, overlays, chat with heatmaps, preprocessing from the page, the model queue), that no path from a
request reaches the filesystem, the command's errors, and the page driven in headless Chromium."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="slidechat serve needs the `serve` extra (pip install -e '.[serve]')")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from preprocessing.extract import extract_slide  # noqa: E402
from preprocessing.stores import load_features  # noqa: E402
from preprocessing.synthetic import Scene, write_blank_svs, write_synthetic_svs  # noqa: E402
from preprocessing.tiling import tile_slide  # noqa: E402
from preprocessing.tissue import segment_slide  # noqa: E402
from slidechat.checkpoint import new_model, save_model  # noqa: E402
from slidechat.cli import main as cli  # noqa: E402
from slidechat.model import SlideChatConfig  # noqa: E402
from slidechat.serve.app import bind_socket, build_parser, build_state, create_app  # noqa: E402

QUESTION = "Which tissue type is shown in this whole slide image?"
FEATURE_SET = "conch_tiny-slidechat-0.5um-224px"
SECRET = "do-not-serve-this-file"
SIZE = 2048  # level-0 px at 0.25 µm/px: a 4 x 4 grid of 224 px patches at 0.5 µm/px


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llm_one_layer):
    """Slides (one preprocessed into a results folder, three not), a tiny model, the state and the app."""
    root = tmp_path_factory.mktemp("serve")
    slides = root / "slides"
    slides.mkdir()
    for n, (name, cls) in enumerate([("ready-1", "lymphoid"), ("new-api", "adenocarcinoma"),
                                     ("new-page", "stroma")]):
        write_synthetic_svs(slides / f"{name}.svs", Scene.random(SIZE, SIZE, cls, seed=n), mpp=0.25,
                            downsamples=(4,))
    write_blank_svs(slides / "blank.svs", 1024, 1024)  # glass only: preprocessing finds no tissue
    (root / "secret.txt").write_text(SECRET)
    (slides / "notes.txt").write_text(SECRET)  # in the slides folder, but not a slide
    results = root / "results"
    segment_slide(slides / "ready-1.svs", results / "segmentation")
    coords = tile_slide(slides / "ready-1.svs", results / "patches", seg_dir=results / "segmentation")
    extract_slide(slides / "ready-1.svs", coords, results / "features" / FEATURE_SET, encoder="conch_tiny",
                  transform="slidechat", num_workers=0)

    llm = tiny_llm_one_layer
    torch.manual_seed(0)
    cfg = SlideChatConfig(encoder_layers=1, encoder_ffn_dim=64, encoder_heads=4, segment_lengths=[16, 32],
                          dilated_ratios=[1, 2])
    model_dir = save_model(new_model(llm, cfg), root / "model")
    (model_dir / "features.json").write_text(json.dumps({"feature_encoder": "conch_tiny", "feature_transform": "slidechat",
                                                         "feature_target_mpp": 0.5, "feature_patch_size": 224}))
    args = build_parser().parse_args([
        "--model", str(model_dir), "--slides", str(slides), "--results", str(results), "--cache-dir",
        str(root / "cache"), "--max-new-tokens", "6", "--attribution-steps", "2", "--device", "cpu"])
    state = build_state(args)
    yield SimpleNamespace(root=root, slides=slides, results=results, model_dir=model_dir, state=state,
                          client=TestClient(create_app(state), base_url="http://127.0.0.1"))
    state.worker.shutdown()
    state.preprocessor.shutdown()


def wait_for_job(client, slide_id: str, timeout: float = 300.0) -> list[dict]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/slides/{slide_id}/job").json()
        seen.append(job)
        if job["state"] in ("done", "failed"):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"preprocessing {slide_id} did not finish in {timeout} s: {seen[-1]}")


def test_slide_list_comes_from_the_configured_slides_and_results(served):
    slides = {s["id"]: s for s in served.client.get("/api/slides").json()}
    assert sorted(slides) == ["blank", "new-api", "new-page", "ready-1"]  # notes.txt is not a slide
    assert slides["ready-1"]["stage"] == "ready" and slides["new-api"]["stage"] == "new"
    status = served.client.get("/api/status").json()
    assert status["preprocess"] and status["attribution"] and status["waiting"] == 0


def test_deep_zoom_tiles_come_from_openslide(served):
    client = served.client
    dzi = client.get("/api/slides/ready-1/image.dzi")
    assert dzi.status_code == 200 and f'Width="{SIZE}"' in dzi.text and 'TileSize="254"' in dzi.text
    top = 11  # levels 0..11: the last one is 2048 px = 2 ** 11
    tile = client.get(f"/api/slides/ready-1/image_files/{top}/0_0.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    img = np.asarray(Image.open(BytesIO(tile.content)))
    assert img.shape == (255, 255, 3)  # 254 + 1 px overlap on the inner side
    import openslide

    with openslide.OpenSlide(str(served.slides / "ready-1.svs")) as slide:
        truth = np.asarray(slide.read_region((0, 0), 0, (255, 255)).convert("RGB"), np.float32)
    assert np.abs(img.astype(np.float32) - truth).mean() < 6  # the slide's pixels, JPEG-compressed
    assert client.get(f"/api/slides/ready-1/image_files/{top + 1}/0_0.jpeg").status_code == 404
    assert client.get(f"/api/slides/ready-1/image_files/{top}/99_0.jpeg").status_code == 404
    assert client.get(f"/api/slides/ready-1/image_files/{top}/-1_0.jpeg").status_code == 404


def test_overlays_are_the_segmentation_and_the_feature_store_patches(served):
    tissue = served.client.get("/api/slides/ready-1/tissue").json()
    assert tissue["type"] == "FeatureCollection" and tissue["features"]
    assert tissue == json.loads((served.results / "segmentation" / "ready-1.geojson").read_text())
    patches = served.client.get("/api/slides/ready-1/patches").json()
    store = load_features(served.results / "features" / FEATURE_SET / "ready-1.zarr")
    assert patches["source"] == "features" and patches["coords"] == store.coords.tolist()
    assert patches["size"] == [448.0, 448.0]  # 224 px at 0.5 µm/px on a 0.25 µm/px slide
    assert served.client.get("/api/slides/new-api/tissue").status_code == 404


def test_chat_answers_with_a_heatmap_over_the_kept_patches_and_encodes_a_slide_once(served):
    client, worker = served.client, served.state.worker
    before = worker.encodings
    first = client.post("/api/slides/ready-1/chat", json={"question": QUESTION}).json()
    n = len(client.get("/api/slides/ready-1/patches").json()["coords"])
    assert isinstance(first["answer"], str) and first["answer"]
    assert len(first["heat"]) == len(first["display"]) == n
    display = np.asarray(first["display"])
    assert display.min() >= 0 and np.isclose(display.max(), 1.0)
    assert first["top"] and first["top"][0] == int(np.argmax(first["heat"]))
    second = client.post("/api/slides/ready-1/chat", json={
        "question": "Is there necrosis?", "history": [[QUESTION, first["answer"]]]}).json()
    assert second["answer"] and len(second["heat"]) == n
    assert worker.encodings == before + 1  # the slide was encoded once for both questions
    bad = client.post("/api/slides/ready-1/chat", json={"question": ""})
    assert bad.status_code == 422
    assert client.post("/api/slides/new-api/chat", json={"question": QUESTION}).status_code == 409


@pytest.mark.parametrize("path", [
    "/api/slides/..%2Fsecret.txt/tissue",
    "/api/slides/%2e%2e%2fsecret.txt/image.dzi",
    "/api/slides/%2E%2E/patches",
    "/api/slides/..%5Csecret.txt/image.dzi",
    "/api/slides/%252e%252e%252fsecret.txt/image.dzi",
    "/api/slides/notes/image.dzi",
    "/api/slides/ready-1.svs/image.dzi",
    "/api/slides/ready-1%2F..%2F..%2Fsecret.txt/image.dzi",
    "/api/slides/ready-1/image_files/0/0_0.jpeg%2F..%2F..%2Fsecret.txt",
    "/static/..%2F..%2F..%2Fsecret.txt",
    "/static/%2e%2e/%2e%2e/app.py",
    "/static/..%5capp.py",
])
def test_no_path_from_a_request_reaches_the_filesystem(served, path):
    r = served.client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert SECRET not in r.text and "def create_app" not in r.text


def test_literal_dot_dot_segments_over_a_raw_socket(live):
    """Clients normalise `../` away before sending; a raw request keeps it."""
    for target in ("/api/slides/../../secret.txt/image.dzi", "/api/slides/../../../secret.txt",
                   "/static/../../secret.txt", "/static/../app.py", "/api/slides/..%2f..%2fsecret.txt/tissue"):
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head = data.split(b"\r\n", 1)[0]
        assert b" 404 " in head, (target, head)
        assert SECRET.encode() not in data and b"def create_app" not in data


def test_preprocessing_from_the_page_runs_the_cached_stages_with_progress(served):
    client = served.client
    job = client.post("/api/slides/new-api/preprocess").json()
    assert job["state"] in ("queued", "running")
    again = client.post("/api/slides/new-api/preprocess").json()  # a second click joins the same job
    assert again.get("started", job["started"]) == job["started"]
    seen = wait_for_job(client, "new-api")
    assert seen[-1]["state"] == "done", seen[-1]
    assert seen[-1]["total"] > 0 and seen[-1]["done"] == seen[-1]["total"]
    cache = served.root / "cache" / "new-api"  # the layout of `slidechat ask --work-dir`
    assert (cache / "segmentation" / "new-api.geojson").is_file()
    assert list(cache.glob("features-conch_tiny-*/new-api.zarr"))
    slides = {s["id"]: s for s in client.get("/api/slides").json()}
    assert slides["new-api"]["stage"] == "ready"
    reply = client.post("/api/slides/new-api/chat", json={"question": QUESTION}).json()
    assert len(reply["heat"]) == len(client.get("/api/slides/new-api/patches").json()["coords"])
    assert client.post("/api/slides/new-api/preprocess").json()["state"] == "done"  # nothing left to do


def test_a_slide_that_fails_preprocessing_says_why_and_the_server_goes_on(served):
    client = served.client
    client.post("/api/slides/blank/preprocess")
    job = wait_for_job(client, "blank")[-1]
    assert job["state"] == "failed" and "no tissue" in job["message"], job
    slides = {s["id"]: s for s in client.get("/api/slides").json()}
    assert slides["blank"]["job"]["state"] == "failed" and slides["blank"]["stage"] != "ready"
    assert client.get("/api/slides/ready-1/patches").status_code == 200


def test_questions_queue_for_the_one_model(served, live):
    import httpx

    model = served.state.worker.model
    generate = model.generate
    running, overlap = [0], [0]
    lock = threading.Lock()

    def timed(*args, **kwargs):
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        try:
            time.sleep(0.2)  # long enough for the other requests to arrive meanwhile
            return generate(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    model.generate = timed
    try:
        def ask(k: int) -> int:
            r = httpx.post(f"{live.url}/api/slides/ready-1/chat", json={"question": f"{QUESTION} {k}"}, timeout=120)
            return r.status_code

        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(ask, range(4)))
    finally:
        model.generate = generate
    assert codes == [200] * 4
    assert overlap[0] == 1  # never two at once


def test_command_errors_are_one_line(served, tmp_path, capsys):
    base = ["serve", "--slides", str(served.slides), "--model", str(served.model_dir), "--port", "0"]
    assert cli(["serve", "--slides", str(served.slides), "--model", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli(["serve", "--slides", str(tmp_path / "none"), "--model", str(served.model_dir), "--port", "0"]) == 2
    assert "--slides" in capsys.readouterr().err
    assert cli(base + ["--results", str(tmp_path / "none")]) == 2
    assert "--results" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["serve", "--slides", str(tmp_path / "empty"), "--model", str(served.model_dir), "--port", "0"]) == 2
    assert "no slide files" in capsys.readouterr().err
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert cli(base[:-2] + ["--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"127.0.0.1:{port}" in err and "--port" in err and err.count("\n") == 1
    finally:
        taken.close()


def test_sample_sheet_names_the_slides(tmp_path, served):
    from slidechat.serve.slides import read_slide_table
    from wsicore.errors import InputError

    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide_id,path,mpp\ncase-7,{served.slides / 'ready-1.svs'},0.25\n")
    table = read_slide_table(sheet)
    assert list(table) == ["case-7"] and table["case-7"].mpp == 0.25
    sheet.write_text("slide_id,path\na,x.svs\na,y.svs\n")
    with pytest.raises(InputError, match="duplicate slide_id 'a'"):
        read_slide_table(sheet)
    sheet.write_text("id,file\na,x.svs\n")
    with pytest.raises(InputError, match="slide_id and path"):
        read_slide_table(sheet)


# ------------------------------------------------------------------------------------ hostile or clumsy use


def client_over(served, slides: dict, results: Path | None = None, **changes) -> TestClient:
    """The app over another slide table (and results folder), sharing the loaded model."""
    import dataclasses

    from slidechat.serve.slides import OutputFinder

    finder = OutputFinder(results, served.root / "cache", served.state.finder.wanted)
    state = dataclasses.replace(served.state, slides=slides, finder=finder, **changes)
    return TestClient(create_app(state), base_url="http://127.0.0.1")


def test_a_slide_id_with_glob_characters_finds_only_its_own_outputs(served):
    """`ready-[1]` is a glob pattern that matches `ready-1`: another slide's features must never be its own."""
    from slidechat.serve.slides import SlideEntry

    for name in ("ready-[1]", "ready-?", "*"):
        found = served.state.finder.find(SlideEntry(name, served.slides / f"{name}.svs"))
        assert found.store is None and found.coords is None and found.geojson is None, (name, found)


def test_other_sites_cannot_reach_the_page(served):
    """A page on another site may point a browser at 127.0.0.1 (a cross-site POST, or DNS rebinding of its own
    name to 127.0.0.1): the server answers only requests addressed to this machine, from its own page."""
    client = served.client
    assert client.get("/api/slides", headers={"host": "evil.example.com"}).status_code == 403
    assert client.get("/", headers={"host": "evil.example.com:8000"}).status_code == 403
    assert client.get("/api/slides/ready-1/image.dzi", headers={"host": "[::1]:8000"}).status_code == 200
    before = served.state.preprocessor.job("new-page")
    r = client.post("/api/slides/new-page/preprocess", headers={"origin": "http://evil.example.com"})
    assert r.status_code == 403 and served.state.preprocessor.job("new-page") is before
    r = client.post("/api/slides/ready-1/chat", json={"question": QUESTION}, headers={"origin": "null"})
    assert r.status_code == 403
    same = client.post("/api/slides/ready-1/chat", json={"question": QUESTION}, headers={"origin": "http://127.0.0.1"})
    assert same.status_code == 200
    # bound to every interface on purpose (--host 0.0.0.0): other names reach it, other sites still cannot POST
    open_client = client_over(served, served.state.slides, served.results, loopback_only=False)
    assert open_client.get("/api/slides", headers={"host": "pathology-box.lan:8000"}).status_code == 200
    assert open_client.post("/api/slides/new-page/preprocess", headers={"origin": "http://evil.example.com"}
                            ).status_code == 403


def test_long_and_empty_questions_and_histories(served):
    client = served.client
    assert client.post("/api/slides/ready-1/chat", json={"question": "  \n\t "}).status_code == 422
    huge = [["Is there necrosis?", "x" * 200_000]]
    r = client.post("/api/slides/ready-1/chat", json={"question": QUESTION, "history": huge})
    assert r.status_code == 422 and "history" in r.text
    # a long conversation keeps its latest turns within the history budget, and says how many it used
    from slidechat.serve.app import MAX_HISTORY_CHARS

    turn = ["Is there necrosis?", "y" * 3000]
    n = MAX_HISTORY_CHARS // 3000 + 5
    reply = client.post("/api/slides/ready-1/chat", json={"question": QUESTION, "history": [turn] * n}).json()
    assert reply["answer"] and 0 < reply["history_used"] < n
    assert reply["history_used"] * sum(map(len, turn)) <= MAX_HISTORY_CHARS
    short = client.post("/api/slides/ready-1/chat", json={"question": QUESTION, "history": [turn]}).json()
    assert short["history_used"] == 1


def test_slides_without_patches_damaged_or_too_large_are_clear_errors(served, tmp_path, monkeypatch):
    import zarr

    from slidechat.serve.slides import SlideEntry

    slides, results = tmp_path / "slides", tmp_path / "results"
    slides.mkdir()
    write_blank_svs(slides / "glass.svs", 1024, 1024)
    segment_slide(slides / "glass.svs", results / "segmentation")
    coords = tile_slide(slides / "glass.svs", results / "patches", seg_dir=results / "segmentation")
    empty = extract_slide(slides / "glass.svs", coords, results / "features" / FEATURE_SET, encoder="conch_tiny",
                          transform="slidechat", num_workers=0)
    assert len(load_features(empty)) == 0  # what the workflow leaves for a slide with no tissue
    damaged = results / "features" / FEATURE_SET / "broken.zarr"
    shutil.copytree(served.results / "features" / FEATURE_SET / "ready-1.zarr", damaged)
    zarr.open_group(str(damaged), mode="r+")["features"][0] = np.full(512, 7.0, np.float16)  # checksum now wrong
    shutil.copy(served.slides / "ready-1.svs", slides / "broken.svs")
    Image.new("RGB", (64, 64), "white").save(slides / "plain.tif")
    table = {s: SlideEntry(s, slides / f"{s}.{ext}")
             for s, ext in (("glass", "svs"), ("broken", "svs"), ("plain", "tif"))}
    client = client_over(served, table, results)
    r = client.post("/api/slides/glass/chat", json={"question": QUESTION})
    assert r.status_code == 409 and "no tissue patches" in r.json()["detail"], r.text
    r = client.post("/api/slides/broken/chat", json={"question": QUESTION})
    assert r.status_code == 422 and "broken.zarr" in r.json()["detail"], r.text
    assert client.post("/api/slides/ready-1/chat", json={"question": QUESTION}).status_code == 404
    # a plain (not pyramidal) image beyond Pillow's decompression-bomb limit: refused with the reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    r = client.get("/api/slides/plain/image.dzi")
    assert r.status_code == 422 and "plain.tif" in r.json()["detail"], r.text


def test_slides_option_takes_one_slide_file_and_checks_sample_sheets(served, tmp_path):
    from slidechat.serve.slides import read_slide_table
    from wsicore.errors import InputError

    table = read_slide_table(served.slides / "ready-1.svs")
    assert list(table) == ["ready-1"] and table["ready-1"].path == served.slides / "ready-1.svs"
    sheet = tmp_path / "sheet.csv"
    for bad_id in ("../../etc", "a/b", ".hidden", "x y"):
        sheet.write_text(f"slide_id,path\n{bad_id},{served.slides / 'ready-1.svs'}\n")
        with pytest.raises(InputError, match="slide_id"):
            read_slide_table(sheet)
    sheet.write_bytes(f"\ufeffslide_id,path\ncase-7,{served.slides / 'ready-1.svs'}\n".encode())  # Excel's UTF-8 BOM
    assert list(read_slide_table(sheet)) == ["case-7"]
    sheet.write_bytes("slide_id,path\ncase-\u00e9,x.svs\n".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        read_slide_table(sheet)
    (tmp_path / "notes.txt").write_text("not a sheet")
    with pytest.raises(InputError, match="slide_id and path"):
        read_slide_table(tmp_path / "notes.txt")


def test_a_port_out_of_range_is_a_usage_error():
    from wsicore.errors import UsageError

    for port in (99999, -1):
        with pytest.raises(UsageError, match="--port"):
            bind_socket("127.0.0.1", port)


# ----------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def live(served):
    """The app on a real socket (uvicorn in a thread), as `slidechat serve` runs it."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(served.state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = sock.getsockname()[1]
    yield SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(timeout=10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("headless Chromium not found: install the Debian packages chromium and chromium-driver "
                    "(make test does where apt-get works)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the `test` extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def drawn(driver) -> dict:
    return json.loads(driver.find_element("id", "overlay").get_attribute("data-drawn") or "{}")


def test_the_page_in_headless_chromium(served, live, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 60)
    d.get(live.url + "/")
    wait.until(lambda d: d.execute_script("return document.body.dataset.loaded") == "1")
    assert len(d.find_elements(By.CSS_SELECTOR, "#slide-list li")) == 4

    # load a slide: tiles drawn, tissue contours on top
    d.find_element(By.CSS_SELECTOR, '#slide-list li[data-id="ready-1"]').click()
    wait.until(lambda d: drawn(d).get("tissue", 0) > 0)
    wait.until(lambda d: d.execute_script("return viewer.world.getItemAt(0) && viewer.world.getItemAt(0).getFullyLoaded()"))
    zoom0 = d.execute_script("return viewer.viewport.getZoom(true)")
    center0 = d.execute_script("const c = viewer.viewport.getCenter(true); return [c.x, c.y]")

    # zoom with the mouse wheel, pan by dragging
    viewer_el = d.find_element(By.ID, "viewer")
    ActionChains(d).scroll_from_origin(ScrollOrigin.from_element(viewer_el), 0, -300).perform()
    wait.until(lambda d: d.execute_script("return viewer.viewport.getZoom(true)") > zoom0 * 1.1)  # one wheel notch: x1.2
    ActionChains(d).move_to_element(viewer_el).click_and_hold().move_by_offset(-120, -80).release().perform()
    wait.until(lambda d: d.execute_script("const c = viewer.viewport.getCenter(true); return [c.x, c.y]") != center0)
    center1 = d.execute_script("const c = viewer.viewport.getCenter(true); return [c.x, c.y]")
    assert center1[0] > center0[0] and center1[1] > center0[1]  # dragging left/up moves the view right/down
    d.execute_script("viewer.viewport.goHome(true)")

    # overlays switch on and off
    n_patches = len(served.client.get("/api/slides/ready-1/patches").json()["coords"])
    d.find_element(By.ID, "show-patches").click()
    wait.until(lambda d: drawn(d).get("patches") == n_patches)
    d.find_element(By.ID, "show-tissue").click()
    wait.until(lambda d: drawn(d).get("tissue") == 0 and drawn(d).get("patches") == n_patches)
    d.find_element(By.ID, "show-patches").click()
    d.find_element(By.ID, "show-tissue").click()
    wait.until(lambda d: drawn(d).get("patches") == 0 and drawn(d).get("tissue", 0) > 0)

    # ask: the answer appears, with the heatmap on the viewer
    d.find_element(By.ID, "question").send_keys(QUESTION)
    d.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages li.assistant .top-patches"))
    answer = d.find_element(By.CSS_SELECTOR, "#messages li.assistant").text
    assert answer.strip() and "error" not in answer
    wait.until(lambda d: drawn(d).get("heat", 0) > 0)
    hottest = int(d.find_element(By.CSS_SELECTOR, ".top-patch").get_attribute("data-patch"))
    # the hottest patch is painted: read the overlay canvas at its centre
    colour = d.execute_script("""
        const i = arguments[0], p = state.patches, img = viewer.world.getItemAt(0);
        const c = img.imageToViewerElementCoordinates(new OpenSeadragon.Point(
            p.coords[i][0] + p.size[0] / 2, p.coords[i][1] + p.size[1] / 2));
        const dpr = window.devicePixelRatio || 1, cv = document.getElementById('overlay');
        return Array.from(cv.getContext('2d').getImageData(Math.round(c.x * dpr), Math.round(c.y * dpr), 1, 1).data);
    """, hottest)
    assert colour[3] > 150 and colour[0] > colour[2], colour  # opaque, red rather than blue
    d.save_screenshot(str(tmp_path / "serve.png"))

    # clicking a hot patch on the slide zooms there
    zoom_home = d.execute_script("return viewer.viewport.getZoom(true)")
    x, y, w, h = d.execute_script("""
        const i = arguments[0], p = state.patches, img = viewer.world.getItemAt(0);
        const c = img.imageToViewerElementCoordinates(new OpenSeadragon.Point(
            p.coords[i][0] + p.size[0] / 2, p.coords[i][1] + p.size[1] / 2));
        const r = document.getElementById('viewer').getBoundingClientRect();
        return [c.x, c.y, r.width, r.height];
    """, hottest)
    ActionChains(d).move_to_element_with_offset(viewer_el, int(x - w / 2), int(y - h / 2)).click().perform()
    wait.until(lambda d: d.execute_script("return document.body.dataset.focus") == str(hottest))
    wait.until(lambda d: d.execute_script("return viewer.viewport.getZoom(true)") > zoom_home * 1.5)

    # a slide without features: preprocess it from the page, with progress shown
    d.find_element(By.CSS_SELECTOR, '#slide-list li[data-id="new-page"] button.preprocess').click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#slide-list li[data-id="new-page"] .progress'))
    WebDriverWait(d, 300).until(lambda d: d.execute_script(
        "const li = document.querySelector('#slide-list li[data-id=\"new-page\"]'); return li && li.dataset.stage"
    ) == "ready")
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_chat_on_an_empty_or_damaged_store_is_refused_naming_it(served, tmp_path, monkeypatch):
    from preprocessing.stores import write_zarr_store
    from wsicore.errors import InputError

    empty = write_zarr_store(tmp_path / "empty.zarr", np.zeros((0, 512), np.float32), np.zeros((0, 2), np.int64),
                             None, {"slide_id": "empty"})
    with pytest.raises(InputError, match=r"empty.zarr has no tissue patches"):
        served.state.worker.slide(empty)
    wide = write_zarr_store(tmp_path / "wide.zarr", np.ones((3, 16), np.float32), np.arange(6).reshape(3, 2), None,
                            {"slide_id": "wide"})
    with pytest.raises(InputError, match=rf"{wide} holds 16-d features"):
        served.state.worker.slide(wide)
    # through the page: the slide's problem is answered as one, not as a server error
    monkeypatch.setattr(served.state.worker, "answer", lambda *a: served.state.worker.slide(empty))
    r = served.client.post("/api/slides/ready-1/chat", json={"question": QUESTION})
    assert r.status_code == 409 and "empty.zarr has no tissue patches" in r.json()["detail"]

"""What the report and the terminal show: slide overviews (legend, scale bar, byte budget), the slide table,
training curves with readable axes, progress lines, the model card and its demo notice, chat's commands."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing.overview import (
    PATCH_RGB, REPORT_MAX_BYTES, annotate, format_length, load_overview, save_annotated_png, save_report_jpeg,
    scale_bar_um,
)
from preprocessing.summary import main as summary_main
from preprocessing.tiling import draw_patches, tile_slide
from slidechat.model_card import SYNTHETIC_KEY, demo_notice, render_markdown, training_card, write_model_card
from wsicore.progress import Progress, format_duration


def test_scale_bar_is_a_round_length_within_a_quarter_of_the_width():
    assert scale_bar_um(8.0, 1000) == 2000  # 8 mm wide: 2 mm
    assert scale_bar_um(0.5, 640) == 50
    assert scale_bar_um(0.96, 555) == 100
    assert format_length(2000) == "2 mm" and format_length(500) == "500 µm"


def test_overview_of_a_real_slide_has_legend_scale_and_counts_within_the_budget(cmu_small, tmp_path):
    coords_h5 = tile_slide(cmu_small, tmp_path)
    thumb = tmp_path / "CMU-1-Small-Region_thumbnail.png"
    with Image.open(thumb) as im:
        height = int(im.text["overview_height"])
        assert im.height > height  # the legend strip below the overview
        strip = np.asarray(im.convert("RGB"))[height:]
    assert (strip < 100).all(axis=2).any()  # black text and scale bar on the white strip
    assert load_overview(thumb).shape[0] == height
    jpg = tmp_path / "CMU-1-Small-Region_patches.jpg"
    assert jpg.stat().st_size <= REPORT_MAX_BYTES
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and max(im.size) <= 1024
    tiling = json.loads((tmp_path / "CMU-1-Small-Region_tiling.json").read_text())
    assert tiling["n_patches"] > 0 and coords_h5.exists()


def test_a_busy_overview_is_shrunk_to_the_byte_budget(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (1500, 1200, 3), dtype=np.uint8)  # incompressible
    n = save_report_jpeg(noise, 1.0, [("tissue", (0, 160, 0), "line")], "noise", tmp_path / "x.jpg")
    assert n == (tmp_path / "x.jpg").stat().st_size <= REPORT_MAX_BYTES
    with Image.open(tmp_path / "x.jpg") as im:
        assert max(im.size) < 1024 and im.size[0] >= 256


def test_kept_patches_are_tinted_and_outlined_one_by_one_or_as_an_area():
    overview = np.full((400, 400, 3), 255, np.uint8)
    big = draw_patches(overview, np.array([[0, 0], [1000, 0]]), (4000, 4000), (1000.0, 1000.0))  # 100 px each
    assert (big[50, 50] != 255).any() and (big[50, 250] == 255).all()  # the kept patch tinted, the gap not
    assert tuple(big[0, 50]) == PATCH_RGB and tuple(big[50, 99]) == PATCH_RGB  # its own outline
    grid = np.array([[x, y] for x in range(0, 2000, 20) for y in range(0, 2000, 20)])  # 2 px patches
    small = draw_patches(overview, grid, (4000, 4000), (20.0, 20.0))
    inner = small[100, 100]
    assert tuple(inner) != PATCH_RGB and (inner != 255).any()  # tinted, no grid of outlines inside
    assert (small[:210, 198:202] == PATCH_RGB).all(axis=2).any()  # the kept area's outline


def test_annotated_png_round_trip(tmp_path):
    image = np.zeros((80, 300, 3), np.uint8)
    out = annotate(image, 2.0, [("tissue", (0, 160, 0), "line"), ("kept patches (3)", PATCH_RGB, "box")], "s1")
    save_annotated_png(out, 80, tmp_path / "t.png")
    assert out.shape[0] > 80 and out.shape[1] == 300
    assert (load_overview(tmp_path / "t.png") == image).all()


def test_slide_table_page_from_a_partial_run(tmp_path):
    seg, patches, feats, bench = (tmp_path / d for d in ("seg", "patches", "feats", "bench"))
    for d in (seg, patches, feats, bench / "extract_features"):
        d.mkdir(parents=True)
    for sid, n in (("S1", 12), ("S2", 0)):
        (patches / f"{sid}_tiling.json").write_text(json.dumps({
            "slide_id": sid, "status": "ok" if n else "no_tissue", "n_patches": n, "read_level": 0, "read_size": 224,
            "mpp_level0": [0.2505, 0.2505], "params": {"patch_size": 224, "target_mpp": 0.5}}))
    (seg / "S1_segmentation.json").write_text(json.dumps({"tissue_area_mm2": 1.23456, "n_tissue_regions": 2}))
    (bench / "extract_features" / "S1.tsv").write_text("s\th:m:s\n4.0\t0:00:04\n")
    (feats / "S1.zarr").mkdir()
    rc = summary_main(["--seg-dir", str(seg), "--patch-dir", str(patches), "--features-dir", str(feats),
                       "--bench-dir", str(bench), "--out", str(tmp_path / "t.tsv"), "--html", str(tmp_path / "t.html")])
    assert rc == 0
    page = (tmp_path / "t.html").read_text()
    assert "<td>S1</td>" in page and "<td class=num>0.2505</td>" in page and "<td class=num>1.235</td>" in page
    assert "<td class=num>3.0</td>" in page  # 12 patches in 4 s
    assert "<tr class=empty><td>S2</td>" in page  # no segmentation summary, no store: blanks, highlighted
    assert "2 slides, 12 patches, 1.2 mm² of tissue, 1 slide(s) without patches" in page
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.tsv").read_text()), delimiter="\t"))
    assert rows[0]["slide"] == "S1" and rows[1]["tissue_mm2"] == ""


def _plotted_axes(tmp_path, loss: list[float], monkeypatch):
    import matplotlib.pyplot as plt

    from slidechat.plots import plot_training_curves

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    with open(tmp_path / "log.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "loss", "lr"])
        w.writerows([i + 1, v, 1e-3] for i, v in enumerate(loss))
    plot_training_curves(tmp_path / "log.csv", tmp_path / "c.png")
    fig = figures[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    return ax.get_yscale(), labels


def test_training_curves_have_readable_loss_axes(tmp_path, monkeypatch):
    flat = [6.58 - 0.001 * i + 0.01 * math.sin(i) for i in range(60)]
    scale, labels = _plotted_axes(tmp_path, flat, monkeypatch)
    assert scale == "linear" and labels and not any("10^" in t or "\\times" in t or "×" in t for t in labels)
    falling = [10 * math.exp(-i / 8) + 0.01 for i in range(60)]
    scale, labels = _plotted_axes(tmp_path, falling, monkeypatch)
    assert scale == "log" and "1" in labels and "0.1" in labels
    assert not any("10^" in t or "\\times" in t for t in labels)


def test_progress_in_a_log_is_one_line_per_update_with_information():
    out = io.StringIO()  # not a terminal: plain lines
    p = Progress(4, "stage 1", "step", stream=out, every_s=3600)
    p.update(1, loss=6.5)
    p.update(1)  # no information, within every_s: no line
    p.update(2, loss=6.25)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("stage 1: step 1/4 (25%), loss 6.5,") and "ETA" in lines[0]
    assert lines[1].startswith("stage 1: step 4/4 (100%), loss 6.25,") and "done in" in lines[1]
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s" and format_duration(7.2) == "7s"


def test_model_card_marks_the_synthetic_demo_and_its_descendants(tmp_path):
    data = tmp_path / "stage1.json"
    records = [{"id": "a", "slide_id": "demo-000", SYNTHETIC_KEY: True}, {"id": "b", "slide_id": "demo-001"}]
    data.write_text(json.dumps(records))
    attrs = {"encoder": "conch_tiny", "transform": "slidechat", "target_mpp": 0.5, "patch_size": 224}
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    card = training_card(1, str(data), records, {"epochs": 2, "lr": 1e-3}, 10, "llm", None, "slidechat 0", attrs)
    write_model_card(stage1, card)
    assert card["synthetic_demo"] and card["trained_on"]["synthetic_demo_records"] == 1
    assert card["trained_on"]["slides"] == 2
    assert "Trained on the synthetic demo data" in (stage1 / "MODEL_CARD.md").read_text()
    assert "synthetic demo" in demo_notice(stage1)
    # stage 2 on real-looking records still says so: it started from the demo's stage 1
    real = [{"id": "c", "slide_id": "TCGA-1"}]
    card2 = training_card(2, str(data), real, {}, 5, "llm", str(stage1), "slidechat 0", attrs)
    assert card2["synthetic_demo"] and card2["started_from"]["card"]["stage"] == 1
    assert "The model it started from" in render_markdown(card2)
    clean = training_card(1, str(data), real, {}, 5, "llm", None, "slidechat 0", attrs)
    write_model_card(tmp_path / "clean", clean)
    assert demo_notice(tmp_path / "clean") is None and demo_notice(tmp_path / "absent") is None


def test_chat_commands_and_help(tiny_llm, tmp_path, capsys):
    import torch

    from slidechat.checkpoint import new_model
    from slidechat.cli import main as cli
    from slidechat.inference import CHAT_HELP, chat_loop
    from slidechat.model import SlideChatConfig

    torch.manual_seed(0)
    model = new_model(tiny_llm, SlideChatConfig(feature_dim=32, encoder_layers=1, encoder_ffn_dim=32,
                                                encoder_heads=4, segment_lengths=[16], dilated_ratios=[1]))
    out = io.StringIO()
    n = chat_loop(model, torch.randn(5, 32), 4, stdin=io.StringIO("/help\n/reset\n/frobnicate\n/exit\nnever\n"),
                  stdout=out)
    text = out.getvalue()
    assert n == 0 and text.count(CHAT_HELP) == 2 and "conversation reset" in text and "unknown command /frobnicate" in text
    assert chat_loop(model, torch.randn(5, 32), 4, stdin=io.StringIO(""), stdout=io.StringIO()) == 0  # Ctrl-D
    with pytest.raises(SystemExit):
        cli(["chat", "--help"])
    assert "/exit" in capsys.readouterr().out.replace("\n", " ")

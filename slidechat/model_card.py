"""The model card of a model directory: what it was trained on, how, when, and whether that was the demo.

Training writes `model_card.json` (for programs) and `MODEL_CARD.md` (for people) into the model directory.
A card of stage 2 holds the card of the model it started from, so a stage-2 model built on a demo stage 1
says so too. `ask`, `chat` and `serve` print `demo_notice` when the model learnt from the synthetic demo
data (`slidechat demo-instructions` marks its records with SYNTHETIC_KEY, which build-instructions keeps).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from preprocessing.stores import PROVENANCE_KEYS
from wsicore.files import write_json, write_text

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
SYNTHETIC_KEY = "synthetic_demo"  # a record of the synthetic demo cohort carries `"synthetic_demo": true`


def training_card(stage: int, data: str, records: list[dict], settings: dict[str, Any], steps: int,
                  base_llm: str | None, started_from: str | None, software: str,
                  store_attrs: dict[str, Any]) -> dict[str, Any]:
    """The card of a training run; `records` are the training JSON's records (slides and demo marks counted),
    `store_attrs` the attributes of one of its feature stores (how a new slide must be preprocessed: `ask`
    reads them from the card's `features`)."""
    parent = read_model_card(started_from) if started_from else None
    n_synthetic = sum(1 for r in records if r.get(SYNTHETIC_KEY) is True)
    manifest = Path(data).with_name(Path(data).stem + ".manifest.json")
    inputs = None
    if manifest.is_file():
        try:
            inputs = json.loads(manifest.read_text()).get("inputs")
        except ValueError:
            inputs = None
    return {
        "stage": stage,
        "trained_on": {
            "data": str(data),
            "records": len(records),
            "slides": len({r.get("slide_id") or str(r.get("image")) for r in records}),
            "synthetic_demo_records": n_synthetic,
            "instruction_sources": inputs,  # from build-instructions' manifest: files, sha256, record counts
        },
        "synthetic_demo": n_synthetic > 0 or bool(parent and parent.get("synthetic_demo")),
        # how its stores were made: `ask` preprocesses new slides this way, `evaluate` refuses other stores
        "features": {k: store_attrs.get(k) for k in PROVENANCE_KEYS},
        "optimizer_steps": steps,
        "epochs": settings.get("epochs"),
        "learning_rate": settings.get("lr"),
        "lora": settings.get("lora"),
        "base_llm": base_llm,
        "started_from": {"path": str(started_from), "card": parent} if started_from else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "software": software,
    }


def render_markdown(card: dict[str, Any]) -> str:
    """MODEL_CARD.md: the card for people."""
    t = card["trained_on"]
    lines = [f"# SlideChat model, stage {card['stage']}", ""]
    if card["synthetic_demo"]:
        lines += ["> **Trained on the synthetic demo data** (`slidechat demo-instructions`: generated slides and "
                  "questions). Its answers say nothing about real tissue; it exists to test the pipeline.", ""]
    rows = [
        ("training data", f"`{t['data']}`: {t['records']} records, {t['slides']} slides"
                          + (f", {t['synthetic_demo_records']} from the synthetic demo" if t["synthetic_demo_records"]
                             else "")),
        ("instruction sources", "; ".join(f"`{i['path']}` ({i.get('records', '?')} records)"
                                          for i in t.get("instruction_sources") or []) or "not recorded"),
        ("stage", f"{card['stage']} ({'captions, LLM frozen' if card['stage'] == 1 else 'instructions'})"),
        ("optimizer steps", str(card["optimizer_steps"])),
        ("epochs", str(card["epochs"])),
        ("peak learning rate", str(card["learning_rate"])),
        ("LoRA", "yes" if card.get("lora") else "no"),
        ("patch features", ", ".join(f"{k} {v}" for k, v in card["features"].items())),
        ("base LLM", f"`{card['base_llm']}`"),
        ("started from", f"`{card['started_from']['path']}`" if card.get("started_from") else "a new slide encoder"),
        ("trained", card["date"]),
        ("software", card["software"]),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    parent = (card.get("started_from") or {}).get("card")
    if parent:
        lines += ["## The model it started from", "", render_markdown(parent).split("\n", 2)[2]]
    return "\n".join(lines)


def write_model_card(model_dir: str | os.PathLike, card: dict[str, Any]) -> None:
    write_json(Path(model_dir) / CARD_JSON, card)
    write_text(Path(model_dir) / CARD_MD, render_markdown(card) + "\n")


def read_model_card(model_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The card of a model directory; None when it has none (released weights, older runs) or it is unreadable."""
    if not model_dir:
        return None
    path = Path(model_dir) / CARD_JSON
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def trained_on_features(model_dir: str | os.PathLike | None) -> tuple[str, dict[str, Any]] | None:
    """(model_dir, how its training stores were made) from its card; None without a card (released weights)."""
    card = read_model_card(model_dir)
    features = card.get("features") if card else None
    return (str(model_dir), features) if isinstance(features, dict) else None


def demo_notice(model_dir: str | os.PathLike | None) -> str | None:
    """One line for the user when the model learnt from the synthetic demo data, else None."""
    card = read_model_card(model_dir)
    if not card or not card.get("synthetic_demo"):
        return None
    return (f"note: {model_dir} was trained on the synthetic demo data (see its {CARD_MD}); its answers say "
            "nothing about real tissue")

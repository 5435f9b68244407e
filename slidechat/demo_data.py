"""Demo instruction data from the synthetic cohort's known contents.

The synthetic slides (preprocessing/synthetic.py) come in three tissue appearances. From the labels file
(`slide_id,path,class_name,split,mpp`) this writes, for the train split, stage-1 captions and stage-2 VQA in
SlideInstruction format, and for the test split a SlideBench-VQA (TCGA)-format CSV. Nothing but the slide's
features can tell the answer: captions use varied words, multiple-choice options are shuffled with the
correct letter balanced over A-D (so always answering one letter scores about 25%), and test questions use
the same styles on held-out slides.

Multiple-choice replies name the chosen option's text ("Lymphoid tissue."), not its letter: the scorer
maps option text to the letter, and a tiny random LLM trained for minutes on a CPU learns to recognise
the tissue far sooner than to look up which letter stands before the matching option.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

from slidechat.model_card import SYNTHETIC_KEY
from slidechat.template import IMAGE_TOKEN
from wsicore.cli import command_parser
from wsicore.errors import InputError
from wsicore.files import atomic_path, input_file, output_folder, write_json, write_text

LETTERS = "ABCD"


@dataclass(frozen=True)
class ClassText:
    """Words for one tissue class: its diagnosis option, its morphology option, and caption phrases."""

    diagnosis: str
    morphology: str
    phrases: tuple[str, ...]
    findings: tuple[str, ...]


CLASS_TEXT: dict[str, ClassText] = {
    "adenocarcinoma": ClassText(
        diagnosis="Adenocarcinoma",
        morphology="Glands lined by crowded large nuclei",
        phrases=("an adenocarcinoma", "a gland-forming carcinoma", "a glandular malignant tumour"),
        findings=(
            "Round glands with open lumens are lined by crowded, enlarged, dark nuclei.",
            "Neoplastic glands with large hyperchromatic nuclei fill the tissue.",
            "The epithelium forms back-to-back glands and the nuclei are large and crowded.",
        ),
    ),
    "lymphoid": ClassText(
        diagnosis="Lymphoid tissue",
        morphology="Dense sheets of small round lymphocytes",
        phrases=("lymphoid tissue", "a dense lymphocytic infiltrate", "a lymphoid proliferation"),
        findings=(
            "Sheets of small, round, dark blue lymphocytes are packed closely together.",
            "The tissue is densely cellular with small uniform round nuclei and no glands.",
            "Countless small lymphocytes with scant cytoplasm crowd the field.",
        ),
    ),
    "stroma": ClassText(
        diagnosis="Fibrous stroma",
        morphology="Wavy collagen fibres with sparse nuclei",
        phrases=("fibrous stroma", "collagenous connective tissue", "a fibrotic stromal tissue"),
        findings=(
            "Pink wavy collagen fibres dominate and only a few thin nuclei are scattered between them.",
            "The tissue is paucicellular, made of eosinophilic fibres with sparse spindle nuclei.",
            "Bands of wavy collagen run through the tissue with scattered slender nuclei.",
        ),
    ),
}
# Wrong options that no slide shows, so every question has four choices A-D.
DISTRACTORS_DIAGNOSIS = ("Necrosis", "Adipose tissue", "Squamous cell carcinoma", "Normal liver")
DISTRACTORS_MORPHOLOGY = ("Sheets of fat cells with empty vacuoles", "Keratin pearls", "Extensive necrotic debris")

CAPTION_PROMPTS = (
    "Describe this whole slide image.",
    "Give a short pathology description of this slide.",
    "What does the whole slide image show?",
    "Summarise the main findings in this slide.",
)
CAPTION_OPENERS = ("The slide shows {p}.", "This whole slide image contains {p}.", "Findings are consistent with {p}.")
DIAGNOSIS_QUESTIONS = (
    "Which tissue type is shown in this whole slide image?",
    "What is the most likely diagnosis for this slide?",
    "Based on the histological features, what does this slide show?",
)
MORPHOLOGY_QUESTIONS = (
    "Which feature dominates the tissue in this slide?",
    "What is the most prominent microscopic finding?",
)
OPEN_QUESTIONS = ("What kind of tissue does this slide show?", "What is seen on this slide?")
CATEGORIES = {"diagnosis": ("Diagnosis", "Disease Classification"), "morphology": ("Microscopy", "Tissue Morphology")}


def read_labels(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of the demo labels CSV; unknown classes are an error naming the class."""
    with open(input_file(path, "labels CSV of `python -m preprocessing synth`", "--labels"), newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    missing = {"slide_id", "class_name", "split"} - set(reader.fieldnames or [])
    if missing:
        raise InputError(f"{path}: not the labels CSV of `python -m preprocessing synth` (no column(s) "
                         f"{', '.join(sorted(missing))}) (option --labels)")
    for r in rows:
        if r["class_name"] not in CLASS_TEXT:
            raise InputError(f"{path}: class {r['class_name']!r} of {r['slide_id']} has no demo texts "
                             f"(known: {sorted(CLASS_TEXT)})")
        if r["split"] not in {"train", "test"}:
            raise InputError(f"{path}: split of {r['slide_id']} must be train or test, got {r['split']!r}")
    return rows


def multiple_choice(class_name: str, kind: str, letter: str, rng: random.Random) -> tuple[list[str], str]:
    """Four options with the right one at `letter`, the others shuffled; returns (options, correct text)."""
    attr = "diagnosis" if kind == "diagnosis" else "morphology"
    right = getattr(CLASS_TEXT[class_name], attr)
    others = [getattr(t, attr) for c, t in CLASS_TEXT.items() if c != class_name]
    distractors = DISTRACTORS_DIAGNOSIS if kind == "diagnosis" else DISTRACTORS_MORPHOLOGY
    wrong = others + [rng.choice(distractors)]
    rng.shuffle(wrong)
    options = wrong[:]
    options.insert(LETTERS.index(letter), right)
    return options[:4], right


def format_mc_prompt(question: str, options: list[str]) -> str:
    """The SlideBench prompt the original evaluation builds: `<image>`, question, then `A. ...` lines."""
    return IMAGE_TOKEN + "\n" + question + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _balanced_letters(n: int, rng: random.Random) -> list[str]:
    """n letters, each of A-D used n/4 times (+-1), in random order."""
    letters = [LETTERS[i % 4] for i in range(n)]
    rng.shuffle(letters)
    return letters


def _caption(class_name: str, rng: random.Random) -> str:
    t = CLASS_TEXT[class_name]
    return rng.choice(CAPTION_OPENERS).format(p=rng.choice(t.phrases)) + " " + rng.choice(t.findings)


def make_demo_instructions(
    labels: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    captions_per_slide: int = 6,
    mc_per_slide: int = 12,
    open_per_slide: int = 2,
    test_questions_per_slide: int = 4,
) -> dict[str, Path]:
    """Write stage1_captions.json, stage2_vqa.json, slidebench_demo.csv and corpus.txt into `out_dir`."""
    rows = read_labels(labels)
    out = output_folder(out_dir, "--out")
    rng = random.Random(seed)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]

    captions, vqa = [], []
    mc_letters = _balanced_letters(mc_per_slide * len(train), rng)
    for r in train:
        sid, cls = r["slide_id"], r["class_name"]
        for k in range(captions_per_slide):
            prompt = CAPTION_PROMPTS[k % len(CAPTION_PROMPTS)]
            captions.append({"id": f"{sid}::caption{k}", "image": [f"{sid}.zarr"], SYNTHETIC_KEY: True, "conversations": [
                {"from": "human", "value": IMAGE_TOKEN + "\n" + prompt},
                {"from": "gpt", "value": _caption(cls, rng)}]})
        for k in range(mc_per_slide):
            kind = "diagnosis" if k % 2 == 0 else "morphology"
            pool = DIAGNOSIS_QUESTIONS if kind == "diagnosis" else MORPHOLOGY_QUESTIONS
            letter = mc_letters.pop()
            options, right = multiple_choice(cls, kind, letter, rng)
            vqa.append({"id": f"{sid}::mc{k}", "image": [f"{sid}.zarr"], SYNTHETIC_KEY: True, "conversations": [
                {"from": "human", "value": format_mc_prompt(rng.choice(pool), options)},
                {"from": "gpt", "value": f"{right}."}]})
        for k in range(open_per_slide):
            t = CLASS_TEXT[cls]
            vqa.append({"id": f"{sid}::open{k}", "image": [f"{sid}.zarr"], SYNTHETIC_KEY: True, "conversations": [
                {"from": "human", "value": IMAGE_TOKEN + "\n" + OPEN_QUESTIONS[k % len(OPEN_QUESTIONS)]},
                {"from": "gpt", "value": f"{t.diagnosis}. {rng.choice(t.findings)}"}]})
    rng.shuffle(vqa)

    bench = []
    test_letters = _balanced_letters(test_questions_per_slide * len(test), rng)
    for r in test:
        for k in range(test_questions_per_slide):
            kind = "diagnosis" if k % 2 == 0 else "morphology"
            pool = DIAGNOSIS_QUESTIONS if kind == "diagnosis" else MORPHOLOGY_QUESTIONS
            letter = test_letters.pop()
            options, _ = multiple_choice(r["class_name"], kind, letter, rng)
            broad, narrow = CATEGORIES[kind]
            bench.append({"ID": len(bench), "Slide": r["slide_id"], "Tumor": "DEMO", "Broad Category": broad,
                          "Narrow Category": narrow, "Question": pool[k // 2 % len(pool)],
                          **dict(zip(LETTERS, options)), "Answer": letter})

    paths = {
        "stage1": out / "stage1_captions.json",
        "stage2": out / "stage2_vqa.json",
        "benchmark": out / "slidebench_demo.csv",
        "corpus": out / "corpus.txt",
    }
    write_json(paths["stage1"], captions)
    write_json(paths["stage2"], vqa)
    columns = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", *LETTERS, "Answer"]
    with atomic_path(paths["benchmark"]) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(bench)
    texts = [t["value"].replace(IMAGE_TOKEN + "\n", "") for rec in captions + vqa for t in rec["conversations"]]
    texts += [format_mc_prompt(b["Question"], [b[x] for x in LETTERS]).replace(IMAGE_TOKEN + "\n", "") for b in bench]
    write_text(paths["corpus"], "\n".join(texts) + "\n")
    return paths


def main(argv: list[str]) -> int:
    parser = command_parser("slidechat demo-instructions", __doc__,
                            "slidechat demo-instructions --labels results/demo/slides/labels.csv --out demo/instructions")
    parser.add_argument("--labels", required=True, help="labels.csv from `python -m preprocessing synth`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the wording, options and letter order")
    parser.add_argument("--captions-per-slide", type=int, default=6, help="stage-1 captions per train slide")
    parser.add_argument("--mc-per-slide", type=int, default=12, help="multiple-choice questions per train slide")
    parser.add_argument("--open-per-slide", type=int, default=2, help="open questions per train slide")
    parser.add_argument("--test-questions-per-slide", type=int, default=4,
                        help="benchmark questions per held-out slide")
    args = parser.parse_args(argv)
    paths = make_demo_instructions(args.labels, args.out, args.seed, args.captions_per_slide, args.mc_per_slide,
                                   args.open_per_slide, args.test_questions_per_slide)
    for p in paths.values():
        print(p)
    return 0

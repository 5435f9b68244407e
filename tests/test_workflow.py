"""The Snakemake workflow: config -> commands without loss, keys checked by the rules that use them, what `all`
builds, quoting of slide names, sample-sheet ids, jobs without an activated venv, lint, SLURM profile."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
import yaml

from wsicore import settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES_SCHEMA = REPO / "workflow" / "schemas" / "stages.schema.yaml"
CONFIG_SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def path_without_venv() -> str:
    """PATH without the folder of this interpreter: the venv is not activated."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != BIN.resolve())


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    """`.venv/bin/snakemake` as a user without an activated venv runs it: jobs must still find our commands."""
    env = dict(os.environ, PATH=path_without_venv())
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def real_config(tmp_path: Path, **blocks: dict) -> dict:
    """A user's config (no demo): one dummy slide; `blocks` are added as given."""
    slides = tmp_path / "slides"
    slides.mkdir(exist_ok=True)
    (slides / "a.svs").write_bytes(b"x")
    return {"results_dir": str(tmp_path / "results"), "slides": {"dir": str(slides)},
            "features": {"encoder": "conch_tiny"}, **blocks}


def commands(output: str, command: str) -> list[list[str]]:
    """The argv after `python -m <command>` of every printed shell command that runs it."""
    found = []
    for line in output.splitlines():
        marker = f"python -m {command} "
        if line.startswith("Shell command:") and marker in line:
            words = shlex.split(line.split(marker, 1)[1])
            found.append(words[: words.index(">")] if ">" in words else words)
    return found


# ------------------------------------------------------------------------------------------- wsicore.settings


@dataclass
class Toy:
    """A toy stage."""

    size: int = settings.setting(4, help="a size", minimum=1)
    ratio: float = settings.setting(0.5, help="a ratio", minimum=0, maximum=1)
    name: str | None = settings.setting(None, help="a name")
    mode: Literal["a", "b"] = settings.setting("a", help="a mode")
    flag: bool = settings.setting(True, help="a flag")
    maybe: bool | None = settings.setting(None, help="on, off or auto")
    pair: tuple[float, float] = settings.setting((0.9, 0.99), help="two numbers")
    path: str = settings.setting("", help="a path the rule supplies", config=False)


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser, Toy)
    return parser


def test_settings_round_trip_config_to_argv_to_dataclass():
    block = {"size": 7, "ratio": 0.25, "name": "it's $(x)", "mode": "b", "flag": False, "maybe": False,
             "pair": [0.5, 0.75]}
    argv = settings.config_argv(block)
    assert "--no-flag" in argv and "--no-maybe" in argv and "--size=7" in argv
    assert shlex.split(settings.shell_args(block)) == argv  # quoted for the shell, unchanged by it
    got = settings.from_arguments(Toy, toy_parser().parse_args(argv))
    assert got == Toy(size=7, ratio=0.25, name="it's $(x)", mode="b", flag=False, maybe=False, pair=(0.5, 0.75))
    # None is the command's default and is left out; keys outside `keys` are not passed
    assert settings.config_argv({"name": None, "size": 2, "other": 1}, keys=["name", "size"]) == ["--size=2"]
    # flags not given stay absent, so the dataclass defaults (or a preset / YAML underneath) apply
    assert settings.given(Toy, toy_parser().parse_args([])) == {}


def test_settings_schema_block_and_refusals():
    block = settings.schema_block(Toy)
    props = block["properties"]
    assert "path" not in props  # config=False
    assert props["size"] == {"type": "integer", "minimum": 1, "default": 4, "description": "a size"}
    assert props["name"]["type"] == ["string", "null"] and props["mode"]["enum"] == ["a", "b"]
    assert props["pair"]["minItems"] == props["pair"]["maxItems"] == 2 and props["pair"]["default"] == [0.9, 0.99]
    with pytest.raises(argparse.ArgumentError, match="out of range"):
        toy_parser().parse_args(["--ratio", "1.5"])
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        toy_parser().parse_args(["--mode", "c"])

    @dataclass
    class NoHelp:
        x: int = 1

    @dataclass
    class OptionalWithDefault:
        x: int | None = settings.setting(3, help="x")

    for cls, message in ((NoHelp, "needs metadata help"), (OptionalWithDefault, "defaults to None")):
        with pytest.raises(TypeError, match=message):
            settings.options(cls)


def test_stage_blocks_are_generated_from_the_dataclasses():
    """A field added to a stage's dataclass appears in workflow/schemas/stages.schema.yaml, or this fails."""
    assert settings.main([str(STAGES_SCHEMA), "--check"]) == 0, (
        f"regenerate with: python -m wsicore.settings {STAGES_SCHEMA.relative_to(REPO)}")
    defs = yaml.safe_load(STAGES_SCHEMA.read_text())["$defs"]
    assert set(defs) == {"segmentation", "tiling", "features", "instructions", "train_stage", "evaluation"}


STAGE_BLOCKS = [("segmentation",), ("tiling",), ("features",), ("instructions",), ("train", "stage1"),
                ("train", "stage2"), ("evaluation",)]


@pytest.mark.parametrize("path", STAGE_BLOCKS, ids=".".join)
def test_unknown_stage_key_is_refused(path):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    cfg = demo_config()
    block = cfg
    for key in path:
        block = block.setdefault(key, {})
    block["learning_rate"] = 1
    with pytest.raises(WorkflowError) as err:
        validate(cfg, str(CONFIG_SCHEMA))
    assert "'learning_rate' was unexpected" in str(err.value.args)


# ---------------------------------------------------------------------------------------------- config -> argv


def other_value(key: str, prop: dict, tmp_path: Path):
    """A valid value for a stage key that differs from its default (strings with quotes and `$(...)`)."""
    default = prop.get("default")
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    if "enum" in prop:
        return next(v for v in prop["enum"] if v is not None and v != default)
    if "boolean" in types:
        return not default
    if "array" in types:
        return [0.5, 0.75]
    lo, hi = prop.get("minimum", prop.get("exclusiveMinimum", float("-inf"))), prop.get("maximum", float("inf"))
    candidates = {"integer": [3, 5, 17, 33], "number": [0.25, 0.75, 3.5, 17.5]}
    for kind, values in candidates.items():
        if kind in types:
            return next(v for v in values if lo <= v <= hi and v != default and v != prop.get("exclusiveMinimum"))
    if key == "checkpoint":
        weights = tmp_path / "weights it's.bin"
        weights.write_bytes(b"w")
        return str(weights)
    return "cuda:1" if key == "device" else f"{key} it's $(touch X)"


def _stage_parsers():
    from preprocessing import extract, tiling, tissue
    from slidechat import evaluate, instructions, train

    def parse(build, cls):
        return lambda argv: settings.from_arguments(cls, build().parse_args(argv))

    return {
        "segmentation": ("preprocessing segment", tissue.SegmentationParams,
                         lambda argv: tissue.params_from_args(tissue.build_parser().parse_args(argv))),
        "tiling": ("preprocessing tile", tiling.TilingParams, parse(tiling.build_parser, tiling.TilingParams)),
        "features": ("preprocessing extract", extract.ExtractOptions,
                     parse(extract.build_parser, extract.ExtractOptions)),
        "instructions": ("slidechat build-instructions", instructions.InstructionSettings,
                         parse(instructions.build_parser, instructions.InstructionSettings)),
        "train_stage": ("slidechat train", train.TrainConfig, lambda argv: train.config_from_args(argv)[0]),
        "evaluation": ("slidechat evaluate", evaluate.EvalSettings, parse(evaluate.build_parser, evaluate.EvalSettings)),
    }


def test_every_stage_key_reaches_its_command_unchanged(tmp_path):
    """Every key of every stage block, set to a value other than its default, arrives in the command's
    dataclass as written: false as --no-x, integers as integers, strings with quotes and $(...) intact."""
    defs = yaml.safe_load(STAGES_SCHEMA.read_text())["$defs"]
    cfg = demo_config()
    cfg["results_dir"] = str(tmp_path / "results")
    wanted = {}
    for path in STAGE_BLOCKS:
        name = "train_stage" if path[0] == "train" else path[0]
        values = {k: other_value(k, prop, tmp_path) for k, prop in defs[name]["properties"].items()}
        block = cfg
        for key in path:
            block = block.setdefault(key, {})
        block.update(values)
        wanted[path] = values
    # bf16 / gradient_checkpointing default to auto (None): stage 1 turns them off, stage 2 on.
    cfg["train"]["stage1"].update(bf16=False, gradient_checkpointing=False)
    wanted[("train", "stage1")].update(bf16=False, gradient_checkpointing=False)
    res = snakemake("-n", "-p", "all", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for path, values in wanted.items():
        name = "train_stage" if path[0] == "train" else path[0]
        command, cls, parse = _stage_parsers()[name]
        runs = commands(res.stdout, command)
        if path[0] == "train":
            runs = [argv for argv in runs if argv[argv.index("--stage") + 1] == path[1][-1]]
        assert runs, f"no `{command}` job for {'.'.join(path)}"
        got = parse(runs[0])
        by_key = {opt.key: opt.name for opt in settings.options(cls)}
        for key, value in values.items():
            if key == "preset":
                continue  # applied under the other keys, all of which are given here
            field = getattr(got, by_key[key])
            assert field == (tuple(value) if isinstance(field, tuple) else value), f"{'.'.join(path)}.{key}"
    stage1 = next(a for a in commands(res.stdout, "slidechat train") if "--no-bf16" in a)
    assert "--no-gradient-checkpointing" in stage1


def test_readme_config_is_complete_and_valid(tmp_path):
    """The README's config for a real run validates as written, and with its paths made real it plans `all`
    with every stage."""
    from snakemake.utils import validate

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running on your slides", 1)[1]
    cfg = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    validate(dict(cfg), str(CONFIG_SCHEMA))
    # The same config on this machine: its files replaced by stand-ins, nothing else changed.
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "s.svs").write_bytes(b"x")
    for name in ("weights.bin", "captions.json", "vqa.json", "bench.csv"):
        (tmp_path / name).write_text("x")
    (tmp_path / "llm").mkdir()
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["slides"]["dir"] = str(tmp_path / "slides")
    cfg["features"]["checkpoint"] = str(tmp_path / "weights.bin")
    cfg["llm"]["path"] = str(tmp_path / "llm")
    cfg["instructions"].update(stage1=str(tmp_path / "captions.json"), stage2=str(tmp_path / "vqa.json"))
    cfg["evaluation"]["benchmarks"] = {name: str(tmp_path / "bench.csv") for name in cfg["evaluation"]["benchmarks"]}
    res = snakemake("-n", "all", "--configfile", str(write_config(tmp_path / "my.yaml", cfg)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert {"extract_features_slide", "train_stage2", "evaluate_benchmark"} <= set(
        re.findall(r"^rule (\w+):$", res.stdout, flags=re.M))
    assert "leaves out" not in res.stdout + res.stderr


def test_wrongly_typed_value_is_refused_at_load_naming_the_key(tmp_path):
    cfg = demo_config()
    cfg["train"]["stage1"]["epochs"] = 1.5
    res = snakemake("-n", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)),
                    "--config", f"results_dir={tmp_path}")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "1.5 is not of type 'integer'" in out
    assert "['train']['stage1']['epochs']" in out


def test_bad_config_value_is_a_clear_error(tmp_path):
    cfg = demo_config()
    cfg["tiling"]["min_tissue_fraction"] = 2
    res = snakemake("-n", "--configfile", str(write_config(tmp_path / "bad.yaml", cfg)),
                    "--config", f"results_dir={tmp_path}")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "['tiling']['min_tissue_fraction']" in out and "2 is greater than the maximum of 1" in out


def test_even_kernel_is_refused_as_a_flag_and_at_config_load(tmp_path):
    """median_kernel must be odd (cv2.medianBlur): refused by the flag, by the schema and so before any job."""
    from preprocessing.tissue import SegmentationParams

    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser, SegmentationParams)
    assert settings.given(SegmentationParams, parser.parse_args(["--median-kernel", "7"])) == {"median_kernel": 7}
    with pytest.raises(argparse.ArgumentError, match="even"):
        parser.parse_args(["--median-kernel", "4"])
    cfg = demo_config()
    cfg["segmentation"]["median_kernel"] = 4
    res = snakemake("-n", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)),
                    "--config", f"results_dir={tmp_path}")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "['segmentation']['median_kernel']" in out
    assert "rule " not in out  # refused at load: no job was planned


# ------------------------------------------------------------------------------------------ DAG and targets


def test_lint_is_clean():
    res = snakemake("--lint")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr


def test_snakefmt_is_clean():
    res = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_default_config_has_every_stage(tmp_path):
    res = snakemake("-n", "all", "--quiet", "rules", "--config", f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    for rule in ("make_demo_slides", "segment_tissue_slide", "tile_slide", "extract_features_slide",
                 "build_instructions_stage", "train_stage1", "train_stage2", "evaluate_benchmark"):
        assert rule in res.stdout, rule
    assert "leaves out" not in res.stdout + res.stderr  # the demo configures every stage


def test_stage_targets_are_wildcard_free_rules():
    res = snakemake("--list-target-rules")
    assert res.returncode == 0, res.stderr
    listed = set(res.stdout.split())
    for target in ("all", "segment_tissue", "tile", "extract_features", "build_instructions", "train_stage1",
                   "train_stage2", "evaluate"):
        assert target in listed, target


def test_preprocessing_starts_without_llm_or_instructions(tmp_path):
    """Keys are checked by the rules that use them: no LLM, instructions or checkpoint is needed to tile."""
    path = write_config(tmp_path / "c.yaml", real_config(tmp_path))
    for target in ("segment_tissue", "tile", "extract_features"):
        res = snakemake("-n", target, "--configfile", str(path))
        assert res.returncode == 0, target + res.stdout[-2000:] + res.stderr[-2000:]
    res = snakemake("-n", "train_stage1", "--configfile", str(path))
    assert res.returncode != 0 and "llm.path is required" in res.stdout + res.stderr
    cfg = real_config(tmp_path, features={"encoder": "conch_v1"})
    res = snakemake("-n", "extract_features", "--configfile", str(write_config(tmp_path / "v1.yaml", cfg)))
    assert res.returncode != 0 and "features.checkpoint is required" in res.stdout + res.stderr


def test_all_trains_without_benchmarks_and_says_what_it_leaves_out(tmp_path):
    llm = tmp_path / "llm"
    llm.mkdir()
    for name in ("captions.json", "vqa.json"):
        (tmp_path / name).write_text("[]")
    cfg = real_config(tmp_path, llm={"path": str(llm)},
                      instructions={"stage1": str(tmp_path / "captions.json"), "stage2": str(tmp_path / "vqa.json")})
    res = snakemake("-n", "-p", "all", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    jobs = set(re.findall(r"^rule (\w+):$", res.stdout, flags=re.M))
    assert {"build_instructions_stage", "train_stage1", "train_stage2"} <= jobs
    assert "evaluate_benchmark" not in jobs
    assert "`all` leaves out evaluate: evaluation.benchmarks is empty" in res.stdout + res.stderr
    # --configfile replaces the shipped demo config: its training values do not leak into this run
    stage2 = next(a for a in commands(res.stdout, "slidechat train") if "2" == a[a.index("--stage") + 1])
    assert not [a for a in stage2 if a.startswith(("--lr", "--epochs", "--grad-accum"))], stage2
    res = snakemake("-n", "all", "--configfile", str(write_config(tmp_path / "p.yaml", real_config(tmp_path))))
    assert res.returncode == 0
    assert "`all` leaves out train_stage1, train_stage2: llm.path is not set" in res.stdout + res.stderr


def test_slides_discovered_from_folder_and_sample_sheet(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("b.svs", "a.ndpi", "c.SVS", "notes.txt"):
        (slides / name).write_bytes(b"x")
    cfg = {"results_dir": str(tmp_path / "results"), "slides": {"dir": str(slides)},
           "features": {"encoder": "conch_tiny"}}
    path = write_config(tmp_path / "c.yaml", cfg)
    res = snakemake("-n", "tile", "--configfile", str(path))
    assert res.returncode == 0, res.stderr
    jobs = re.findall(r"wildcards: slide=(\S+)", res.stdout)
    assert sorted(set(jobs)) == ["a", "b", "c"]
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide_id,path,mpp,split\nfirst,{slides / 'b.svs'},0.25,train\nsecond,{slides / 'a.ndpi'},,test\n")
    cfg["slides"]["sample_sheet"] = str(sheet)
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "-p", "tile", "--configfile", str(path))
    assert res.returncode == 0, res.stderr
    assert sorted(set(re.findall(r"wildcards: slide=(\S+)", res.stdout))) == ["first", "second"]
    first = next(a for a in commands(res.stdout, "preprocessing tile") if "--slide-id=first" in a)
    assert "--mpp=0.25" in first  # the sheet's id and mpp
    sheet.write_text("slide_id,path\nbad id,x.svs\n")
    res = snakemake("-n", "tile", "--configfile", str(path))
    assert res.returncode != 0 and "slide_id" in res.stdout + res.stderr
    sheet.write_text(f"slide_id,path\ngone,{slides / 'missing.svs'}\n")
    res = snakemake("-n", "tile", "--configfile", str(path))
    assert res.returncode != 0 and "slide gone: path" in res.stdout + res.stderr


def test_broken_link_in_slides_dir_is_skipped_with_a_warning(tmp_path):
    """One dangling link or a folder named like a slide must not stop the cohort: skipped, and named."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "good.svs").write_bytes(b"x")
    (slides / "gone.svs").symlink_to(tmp_path / "nowhere.svs")
    (slides / "folder.svs").mkdir()
    cfg = {"results_dir": str(tmp_path / "results"), "slides": {"dir": str(slides)},
           "features": {"encoder": "conch_tiny"}}
    res = snakemake("-n", "tile", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert sorted(set(re.findall(r"wildcards: slide=(\S+)", res.stdout))) == ["good"]
    assert f"skipping {slides / 'gone.svs'}" in out and f"skipping {slides / 'folder.svs'}" in out


# -------------------------------------------------------------------------------------------- real jobs


def test_hostile_and_spaced_slide_names_run_without_a_shell_injection(tmp_path, cmu_small):
    """Real segmentation and tiling of `p$(touch X).svs` and `with space.svs`, from slides.dir, with
    `.venv/bin/snakemake` and no activated venv: every job succeeds and `touch X` never runs."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("p$(touch X).svs", "with space.svs"):
        shutil.copy(cmu_small, slides / name)
    work = tmp_path / "work"
    work.mkdir()
    cfg = {"results_dir": str(tmp_path / "results"), "slides": {"dir": str(slides)}}
    res = snakemake("--cores", "2", "tile", "--directory", str(work), "--configfile",
                    str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for slide in ("p$(touch X)", "with space"):
        assert (tmp_path / "results" / "patches" / f"{slide}.h5").is_file()
    assert not [p for p in (work, tmp_path, slides, REPO) if (p / "X").exists()]


def test_sample_sheet_id_names_every_output(tmp_path, cmu_small):
    """A sheet whose slide_id differs from the file name (here a hostile one): segmentation, tiling and
    extraction run for real and name their outputs after the sheet's id."""
    from preprocessing.stores import load_features

    slide = tmp_path / "p$(touch X).svs"
    shutil.copy(cmu_small, slide)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide_id,path\nrenamed,{slide}\n")
    work = tmp_path / "work"
    work.mkdir()
    cfg = {"results_dir": str(tmp_path / "results"), "slides": {"sample_sheet": str(sheet)},
           "features": {"encoder": "conch_tiny", "device": "cpu", "num_workers": 0}}
    res = snakemake("--cores", "2", "extract_features", "--directory", str(work), "--configfile",
                    str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = tmp_path / "results"
    assert (results / "segmentation" / "renamed_mask.png").is_file()
    store = next((results / "features").glob("*/renamed.zarr"))
    fs = load_features(store)
    assert fs.attrs["slide_id"] == "renamed" and len(fs.features) > 0
    assert not (work / "X").exists() and not (tmp_path / "X").exists()


# ----------------------------------------------------------------------------------------------------- SLURM


def test_slurm_profile_dry_run(tmp_path):
    res = snakemake("-n", "--profile", "profiles/slurm", "all", "--config", f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "extract_features_slide" in res.stdout


def _sbatch_for(rule: str, threads: int, rule_resources: dict) -> str:
    """The plugin's own sbatch string for a rule, with the SLURM profile's resources applied."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    resources = dict(profile["default-resources"])
    resources.update(rule_resources)
    resources.update(profile["set-resources"][rule])

    class Resources(dict):
        __getattr__ = dict.get

    job = SimpleNamespace(resources=Resources(resources), threads=threads, name=rule, is_group=lambda: False)
    params = dict(run_uuid="uuid", slurm_logfile="log", comment_str=rule, workdir="/w",
                  account=f"-A {resources['slurm_account']}", partition=f"-p {resources['slurm_partition']}")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    return get_submit_command(job, params) + set_gres_string(job)


def test_slurm_sbatch_for_extraction_and_stage2():
    extract = _sbatch_for("extract_features_slide", threads=1, rule_resources={"gpu": 1, "mem_mb": 8000})
    assert "--gpus=1" in extract and "--cpus-per-gpu=8" in extract
    assert "-p CHANGE_ME_gpu_partition" in extract and "--mem 32000" in extract
    stage2 = _sbatch_for("train_stage2", threads=2, rule_resources={"gpu": 0, "mem_mb": 32000})
    assert "--nodes=2" in stage2 and "--ntasks-per-node=8" in stage2
    assert "--ntasks-per-gpu" not in stage2 and "--gpus-per-node=8" in stage2
    assert "--cpus-per-task=8" in stage2
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["set-resources"]["train_stage2"]["mpi"] == "srun"
    assert profile["groups"]["extract_features_slide"] in profile["group-components"]

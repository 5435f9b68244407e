"""A new user's path through the workflow, as the README tells it: the README's own commands, sample sheets as
spreadsheets write them, slide names Snakemake cannot take, config keys that must reach the job that needs them,
input files switched in the config, and the SLURM profile's real submissions (sbatch replaced by a stand-in
that records them)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_workflow import BIN, REPO, commands, path_without_venv, real_config, snakemake, write_config


def readme_commands() -> list[list[str]]:
    """The `snakemake` command lines of the README section "Running on your slides"."""
    section = (REPO / "README.md").read_text().split("## Running on your slides", 1)[1].split("\n## ", 1)[0]
    found = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("snakemake "):
                found.append(shlex.split(line)[1:])
    return found


def test_readme_commands_run_as_written(tmp_path):
    """Every command of "Running on your slides", as written (with -n added), plans its target with the user's
    config: `--configfile` takes several files, so a target written after it would be read as a config file."""
    cfg = real_config(tmp_path, llm={"path": str(tmp_path)},
                      instructions={"stage1": str(tmp_path / "c.json"), "stage2": str(tmp_path / "c.json")})
    (tmp_path / "c.json").write_text("[]")
    write_config(tmp_path / "my.yaml", cfg)
    lines = readme_commands()
    assert len(lines) >= 5 and all("--configfile" in argv for argv in lines)
    for argv in lines:
        argv = [str(tmp_path / a) if a == "my.yaml" else a for a in argv if a != "--use-conda"]  # no conda here
        res = snakemake("-n", *argv, timeout=300)
        assert res.returncode == 0, f"{shlex.join(argv)}\n{(res.stdout + res.stderr)[-2000:]}"
        assert "rule segment_tissue_slide:" in res.stdout, shlex.join(argv)


def sheet_config(tmp_path: Path, sheet_text: str, **blocks) -> Path:
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(sheet_text)
    cfg = {"results_dir": str(tmp_path / "results"), "slides": {"sample_sheet": str(sheet)},
           "features": {"encoder": "conch_tiny"}, **blocks}
    return write_config(tmp_path / "c.yaml", cfg)


def test_sample_sheet_empty_mpp_cell_is_no_override(tmp_path):
    """A sheet whose optional mpp column is filled for some slides only (as spreadsheets write it: BOM, CRLF): the
    empty cells mean "from the file", not NaN; the filled ones reach every command of their slide."""
    for name in ("a.svs", "b.svs"):
        (tmp_path / name).write_bytes(b"x")
    path = sheet_config(tmp_path, f"\ufeffslide_id,path,mpp\r\nwith_mpp,{tmp_path / 'a.svs'},0.25\r\n"
                                  f"from_file,{tmp_path / 'b.svs'},\r\n")
    res = snakemake("-n", "-p", "extract_features", "--configfile", str(path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for command in ("preprocessing segment", "preprocessing tile", "preprocessing extract"):
        runs = {a.split("=", 1)[1]: argv for argv in commands(res.stdout, command) for a in argv
                if a.startswith("--slide-id=")}
        assert set(runs) == {"with_mpp", "from_file"}, command
        assert "--mpp=0.25" in runs["with_mpp"], command
        assert not [a for a in runs["from_file"] if a.startswith("--mpp")], (command, runs["from_file"])
    # the same slide's pixel size twice, differently: which one is meant is the user's to say
    cfg = yaml.safe_load(path.read_text())
    cfg["mpp_overrides"] = {"with_mpp": 0.5}
    res = snakemake("-n", "tile", "--configfile", str(write_config(path, cfg)))
    assert res.returncode != 0 and "slide with_mpp: mpp 0.25 in slides.sample_sheet" in res.stdout + res.stderr


def test_empty_sample_sheet_names_the_sheet(tmp_path):
    path = sheet_config(tmp_path, "slide_id,path\n")
    res = snakemake("-n", "tile", "--configfile", str(path))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and f"slides.sample_sheet {tmp_path / 'sheet.csv'} lists no slides" in out, out[-2000:]


def test_sample_sheet_columns_the_workflow_does_not_use_are_named(tmp_path):
    """A `split` column (or any other) does not keep slides out of training: the load says so, once, naming them."""
    (tmp_path / "a.svs").write_bytes(b"x")
    path = sheet_config(tmp_path, f"slide_id,path,split,case\nfirst,{tmp_path / 'a.svs'},test,c1\n")
    res = snakemake("-n", "tile", "--configfile", str(path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-2000:]
    assert "columns split, case are not used" in out and "evaluation.benchmarks" in out, out[-2000:]


def test_slide_names_starting_with_a_dash_run(tmp_path, cmu_crop_16):
    """`-x.svs` in slides.dir (slide id `-x`) and a sheet path `-y.svs` (relative to the working directory) reach
    the commands as values, not as options: segmentation, tiling and extraction run for real."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_crop_16, slides / "-x.svs")
    shutil.copy(cmu_crop_16, tmp_path / "-y.svs")
    features = {"encoder": "conch_tiny", "device": "cpu", "num_workers": 0}
    for name, slides_cfg in (("-x", {"dir": str(slides)}), ("y", {"sample_sheet": str(tmp_path / "sheet.csv")})):
        (tmp_path / "sheet.csv").write_text("slide_id,path\ny,-y.svs\n")
        results = tmp_path / f"results{name}"
        cfg = {"results_dir": str(results), "slides": slides_cfg, "features": features}
        res = snakemake("--cores", "1", "extract_features", "--directory", str(tmp_path), "--configfile",
                        str(write_config(tmp_path / "c.yaml", cfg)))
        logs = "".join(p.read_text() for p in (results / "logs").rglob("*.log")) if (results / "logs").is_dir() else ""
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + logs
        assert next((results / "features").glob(f"*/{name}.zarr")).is_dir()

@pytest.mark.parametrize("where", ["dir", "sample_sheet"])
def test_braces_in_a_slide_file_name_are_refused_naming_the_file(tmp_path, where):
    """Snakemake reads `{...}` in a file name as a wildcard, whatever the quoting: the workflow refuses such a slide
    at load with one line naming it, instead of a WildcardError about rule segment_tissue."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "ok.svs").write_bytes(b"x")
    (slides / "a{b}.svs").write_bytes(b"x")
    if where == "dir":
        path = write_config(tmp_path / "c.yaml", {"results_dir": str(tmp_path / "r"), "slides": {"dir": str(slides)}})
    else:
        path = sheet_config(tmp_path, f"slide_id,path\nfine,{slides / 'a{b}.svs'}\n")
    res = snakemake("-n", "segment_tissue", "--configfile", str(path))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "WildcardError" not in out, out[-2000:]
    assert f"{slides / 'a{b}.svs'}: Snakemake cannot take '{{' or '}}' in a file name" in out, out[-2000:]
    for key in ("results_dir", "dir") if where == "dir" else ():  # folders: refused by the schema
        cfg = {"results_dir": str(tmp_path / "r"), "slides": {"dir": str(slides)}}
        (cfg if key == "results_dir" else cfg["slides"])[key] = str(tmp_path / "{x}")
        res = snakemake("-n", "segment_tissue", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
        assert res.returncode != 0 and "does not match '^[^{}]*$'" in res.stdout + res.stderr, key


def test_mpp_override_for_no_slide_is_refused(tmp_path):
    """An mpp_overrides key that names no slide (a typo, an id from another naming scheme) would be ignored while
    the slide it meant goes on with its file's pixel size: refused at load, naming the key and the known ids."""
    cfg = real_config(tmp_path, mpp_overrides={"A": 0.25})
    res = snakemake("-n", "tile", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "mpp_overrides: no slide has the id 'A'" in out and "'a'" in out, out[-2000:]
    cfg["mpp_overrides"] = {"a": 0.25}
    res = snakemake("-n", "-p", "tile", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0 and "--mpp=0.25" in commands(res.stdout, "preprocessing tile")[0]


def test_slide_extensions_are_written_without_a_dot(tmp_path):
    cfg = real_config(tmp_path)
    cfg["slides"]["extensions"] = [".svs"]
    res = snakemake("-n", "tile", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "'.svs' does not match" in out and "['slides']['extensions']" in out, out[-2000:]


def test_allow_unusual_slide_reaches_tiling_too(tmp_path, cmu_small):
    """`segmentation.allow_unusual_slide: true` (an mpp outside 0.05-20 µm/px, here a real slide claimed at 25
    µm/px) lets segmentation and tiling through; without it both refuse, saying which key to set."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_small, slides / "coarse.svs")
    cfg = {"results_dir": str(tmp_path / "results"), "slides": {"dir": str(slides)}, "mpp_overrides": {"coarse": 25.0},
           "segmentation": {"seg_mpp": 50.0}, "tiling": {"target_mpp": 50.0, "patch_size": 16}}
    res = snakemake("--cores", "1", "tile", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode != 0
    log = (tmp_path / "results" / "logs" / "segment_tissue" / "coarse.log").read_text()
    assert "segmentation.allow_unusual_slide: true" in log  # the workflow hint names the config key
    cfg["segmentation"]["allow_unusual_slide"] = True
    res = snakemake("--cores", "1", "tile", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + "".join(
        p.read_text() for p in (tmp_path / "results" / "logs").rglob("*.log"))
    assert (tmp_path / "results" / "patches" / "coarse.h5").is_file()


def test_a_wrong_deepspeed_path_stops_the_run_before_any_job(tmp_path):
    """A typo in train.deepspeed is reported when the run is planned, not when training starts after the features
    are extracted (and on SLURM, after the queue)."""
    (tmp_path / "llm").mkdir()
    (tmp_path / "c.json").write_text("[]")
    cfg = real_config(tmp_path, llm={"path": str(tmp_path / "llm")}, instructions={"stage1": str(tmp_path / "c.json")},
                      train={"deepspeed": str(tmp_path / "zero2.jsn")})
    res = snakemake("-n", "train_stage1", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and f"train.deepspeed: file not found: {tmp_path / 'zero2.jsn'}" in out, out[-2000:]
    res = snakemake("-n", "tile", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0  # checked by the rules that use it only
    cfg["train"]["deepspeed"] = str(REPO / "configs" / "deepspeed" / "zero2.json")
    res = snakemake("-n", "-p", "train_stage1", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0 and f"--deepspeed={cfg['train']['deepspeed']}" in res.stdout, res.stdout[-2000:]

def finished_up_to(target: str, cfg_path: Path, work: Path) -> None:
    """As after a finished run up to `target`: every output of its jobs exists (stand-ins) and Snakemake has
    recorded the jobs (`--touch --forcerun`), so nothing is left to do for it."""
    res = snakemake("-n", target, "--configfile", str(cfg_path), "--directory", str(work))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for line in res.stdout.splitlines():
        if line.strip().startswith("output:"):
            for out in map(Path, line.split(":", 1)[1].strip().split(", ")):
                out.parent.mkdir(parents=True, exist_ok=True)
                out.mkdir() if out.suffix in ("", ".zarr") else out.write_text("x")
    res = snakemake(target, "--touch", "--forceall", "--cores", "1", "--configfile", str(cfg_path),
                    "--directory", str(work))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    res = snakemake("-n", target, "--configfile", str(cfg_path), "--directory", str(work))
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout[-2000:]


def test_switching_an_input_file_in_the_config_rebuilds(tmp_path):
    """Under the default profile, pointing instructions.stage1 at another (older) file rebuilds the instructions,
    and nothing upstream: mtime alone would keep those built from the previous file."""
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    for path in (first, second):
        path.write_text("[]")
    os.utime(second, (0, 0))
    cfg = real_config(tmp_path, instructions={"stage1": str(first)})
    path = write_config(tmp_path / "c.yaml", cfg)
    target = str(Path(cfg["results_dir"]) / "instructions" / "stage1.json")
    finished_up_to(target, path, tmp_path)
    cfg["instructions"]["stage1"] = str(second)
    res = snakemake("-n", target, "--configfile", str(write_config(path, cfg)), "--directory", str(tmp_path))
    assert res.returncode == 0 and "Set of input files has changed" in res.stdout, res.stdout[-2000:]
    assert re.findall(r"^rule (\w+):$", res.stdout, flags=re.M) == ["build_instructions_stage"]


# ------------------------------------------------------------------------------------------------ SLURM, for real


STAND_IN = """#!/bin/sh
# {name} as a SLURM cluster without jobs answers it; sbatch records its argv and gives a job id.
if [ "{name}" = sbatch ]; then printf '%s\\n' "$*" >> "{log}"; echo $$; fi
exit 0
"""


def submissions(tmp_path: Path, cfg_path: Path, *args: str, expected: int) -> list[str]:
    """The sbatch argv (up to the wrapped command) of each job that `snakemake --profile profiles/slurm *args`
    submits, once `expected` are in (Snakemake then waits on SLURM, so it is stopped)."""
    fake = tmp_path / "slurm-bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "sbatch.log"
    log.unlink(missing_ok=True)
    for name in ("sbatch", "squeue", "sacct", "sacctmgr", "sshare", "sinfo", "scontrol", "scancel"):
        (fake / name).write_text(STAND_IN.format(name=name, log=log))
        (fake / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{path_without_venv()}")
    proc = subprocess.Popen([str(BIN / "snakemake"), "--profile", "profiles/slurm", "--directory", str(tmp_path),
                             *args, "--configfile", str(cfg_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= expected:
                time.sleep(3)  # a further submission would show up now
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    shutil.rmtree(tmp_path / ".snakemake" / "locks", ignore_errors=True)  # the stopped run's
    lines = log.read_text().splitlines() if log.is_file() else []
    assert len(lines) == expected, output[-3000:]
    return [line.split(" --wrap", 1)[0] for line in lines]


def cohort(tmp_path: Path, n: int, **blocks) -> tuple[dict, Path]:
    """A user's config with `n` slides, segmented and tiled (stand-ins)."""
    cfg = real_config(tmp_path, **blocks)
    slides = Path(cfg["slides"]["dir"])
    for i in range(n):
        shutil.copy(slides / "a.svs", slides / f"s{i}.svs")
    (slides / "a.svs").unlink()
    cfg["features"]["device"] = "cuda"
    path = write_config(tmp_path / "c.yaml", cfg)
    finished_up_to("tile", path, tmp_path)
    return cfg, path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stand-in SLURM commands are shell scripts")
def test_slurm_extraction_groups_take_one_gpu_each_and_run_at_once(tmp_path):
    """The workflow profile's gpu=1 limit holds per submission: a group of slides asks for one GPU and the sum of
    its slides' times; groups are submitted together (with the limit global, one GPU job ran on the cluster)."""
    _, path = cohort(tmp_path, 3)
    (group,) = submissions(tmp_path, path, "extract_features", expected=1)
    assert "--gpus=1" in group and " -t 45 " in group, group  # 3 slides x 15 min, one after another
    singles = submissions(tmp_path, path, "extract_features", "--group-components", "extract_features=1", expected=3)
    assert all("--gpus=1" in s and " -t 15 " in s for s in singles), singles


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stand-in SLURM commands are shell scripts")
def test_slurm_training_asks_for_gpus_per_node_only(tmp_path):
    """train.gpus_per_node: 8 (the README's config): stage 1 asks SLURM for 8 GPUs per node, without the
    contradicting --gpus total that the rule's gpu count (capped to the workflow profile's 1) would add."""
    (tmp_path / "llm").mkdir()
    (tmp_path / "c.json").write_text("[]")
    cfg, path = cohort(tmp_path, 1, llm={"path": str(tmp_path / "llm")},
                       instructions={"stage1": str(tmp_path / "c.json")},
                       train={"gpus_per_node": 8, "deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")})
    results = Path(cfg["results_dir"])
    finished_up_to(str(results / "instructions" / "stage1.json"), path, tmp_path)
    (train,) = submissions(tmp_path, path, str(results / "models" / "stage1"), expected=1)
    assert "--gpus-per-node=8" in train and "--nodes=1" in train and "--gpus=" not in train, train


# ---------------------------------------------------------------------------------------------- --use-conda


CONDA_STAND_IN = """#!{python}
# conda as Snakemake calls it; `env create` makes an empty prefix, and the stand-in `activate` puts the
# environment {env} (the pinned dependencies, without this package) on PATH.
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["info", "--json"]:
    print(json.dumps({{"conda_prefix": {root!r}, "platform": "linux-64"}}))
elif args == ["--version"]:
    print("conda 25.1.1")
elif args[:2] == ["config", "--get"]:
    print(json.dumps({{"get": {{"channel_priority": "strict"}}}}))
elif args[:2] == ["env", "create"]:
    prefix = " ".join(args).split("--prefix ", 1)[1].split(" ")[0].strip('"')
    os.makedirs(prefix, exist_ok=True)
elif args[:1] == ["clean"]:
    pass
else:
    sys.exit(f"conda stand-in: {{args}} not supported")
"""


def test_use_conda_jobs_import_the_checkout(tmp_path, cmu_crop_16):
    """Under --use-conda Snakemake clears PYTHONPATH and the environment holds only the pinned dependencies
    (conda cannot install the checkout from envs/slidechat.yaml: it runs pip from a copy of the file under
    .snakemake/conda/): the jobs still run this checkout's commands. conda is a stand-in here (none on this
    machine) whose environment is the test interpreter's packages without ours."""
    import site
    import venv

    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    (next(env.glob("lib/python*/site-packages")) / "deps.pth").write_text(
        "\n".join(p for p in site.getsitepackages() if "site-packages" in p) + "\n")  # plain paths: no editable finder
    res = subprocess.run([str(env / "bin" / "python"), "-c", "import cv2, openslide, preprocessing"],
                         capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert "No module named 'preprocessing'" in res.stderr, res.stderr  # the stand-in env lacks our package
    conda = tmp_path / "conda"
    (conda / "bin").mkdir(parents=True)
    (conda / "bin" / "conda").write_text(CONDA_STAND_IN.format(python=sys.executable, env=env, root=str(conda)))
    (conda / "bin" / "conda").chmod(0o755)
    (conda / "bin" / "activate").write_text(f'export PATH="{env / "bin"}:$PATH"\n')
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_crop_16, slides / "tiny.svs")
    cfg = {"results_dir": str(tmp_path / "results"), "slides": {"dir": str(slides)}}
    env_vars = dict(os.environ, PATH=f"{conda / 'bin'}{os.pathsep}{path_without_venv()}")
    env_vars.pop("PYTHONPATH", None)
    res = subprocess.run([str(BIN / "snakemake"), "--use-conda", "--cores", "1", "segment_tissue", "--directory",
                          str(tmp_path), "--configfile", str(write_config(tmp_path / "c.yaml", cfg))],
                         cwd=REPO, env=env_vars, capture_output=True, text=True, timeout=300)
    log = tmp_path / "results" / "logs" / "segment_tissue" / "tiny.log"
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + (log.read_text() if log.exists() else "")
    assert "Activating conda environment" in res.stdout + res.stderr
    assert (tmp_path / "results" / "segmentation" / "tiny_segmentation.json").is_file()


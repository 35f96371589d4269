"""The shared skeleton: one copy in every script, the same sections, the same CLI contract and errors, and a
failed run that leaves an earlier run's folder byte-identical."""
import ast
import difflib
import hashlib
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ALL_SCRIPTS = ["mm1.py", "mm15.py", "dpo_bdhs.py", "mia_bench.py", "clip_caption.py", "jitter.py", "neu.py"]
SCRIPTS = [s for s in ALL_SCRIPTS if (ROOT / s).is_file()]
BEGIN, END = "skeleton: begin", "skeleton: end"
SECTIONS = ["config", "data", "model", "losses", "train", "eval", "main"]
HEADER = "# " + "-" * 77 + " "
# model code repeated across scripts must be identical copies: top-level classes / functions with these names
SHARED_PREFIXES = ("CLIP", "Llama", "RMSNorm", "rotate_half", "apply_rope", "AvgPoolConnector",
                   "AttnPoolConnector", "LayerNorm2d", "RegBlock", "CAbstractor", "MoEMLP", "MM1",
                   "count_params", "plan_tiles", "slot_ids", "tile_pixels", "box_to_canvas", "box_in_tiles",
                   "fit", "place")
# per script: a flag whose file is read late (after config, device and out_dir checks), for the bad-run test
LATE_INPUT = {"mm1.py": ("train_data", "llava.json"), "clip_caption.py": ("data", "pairs.csv"),
              "jitter.py": ("data", "jointbert"), "neu.py": ("data", "jointbert"),
              "mm15.py": ("init", "model.safetensors"), "dpo_bdhs.py": ("init", "model.safetensors"),
              "mia_bench.py": ("init", "model.safetensors")}
# scripts that start from another script's checkpoint: the script that makes it (smoke size, recursively)
START_POINT = {"mm15.py": "mm1.py", "dpo_bdhs.py": "mm15.py", "mia_bench.py": "mm15.py"}


def skeleton_of(text: str, name: str) -> str:
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{name}: one pair of skeleton markers"
    return text[text.index(BEGIN):text.index(END)]


def drift(a: str, b: str, name_a: str, name_b: str) -> str:
    """The unified diff between two scripts' skeletons ("" when identical)."""
    lines_a, lines_b = skeleton_of(a, name_a).splitlines(), skeleton_of(b, name_b).splitlines()
    return "\n".join(difflib.unified_diff(lines_a, lines_b, name_a, name_b, lineterm="", n=0))


def test_skeleton_is_identical_in_every_script():
    reference = (ROOT / SCRIPTS[0]).read_text()
    assert len(skeleton_of(reference, SCRIPTS[0]).splitlines()) > 100
    for script in SCRIPTS[1:]:
        diff = drift(reference, (ROOT / script).read_text(), SCRIPTS[0], script)
        assert not diff, f"skeleton drifted:\n{diff}"


def test_skeleton_check_sees_one_character():
    text = (ROOT / SCRIPTS[0]).read_text()
    i = text.index("def lr_at") + len("def lr_")
    assert drift(text, text[:i] + "A" + text[i + 1:], "a", "b")


@pytest.mark.parametrize("script", SCRIPTS)
def test_sections_in_order(script):
    lines = (ROOT / script).read_text().splitlines()
    assert all(len(line) <= 110 for line in lines), f"{script}: a line over 110 columns"
    assert len(lines) <= 1000, f"{script}: {len(lines)} lines (at most 1000)"
    headers = [line[len(HEADER):] for line in lines if line.startswith(HEADER)]
    bare = [h for h in headers if h in SECTIONS]
    assert bare == SECTIONS, f"{script}: top-level sections {bare}, expected {SECTIONS}"
    order = [SECTIONS.index(h.split(":")[0]) for h in headers if h.split(":")[0] in SECTIONS]
    assert order == sorted(order), f"{script}: sub-sections out of order: {headers}"
    assert lines[0].startswith('"""'), f"{script}: starts with its docstring"


def top_level_sources(script: str) -> dict:
    text = (ROOT / script).read_text()
    tree = ast.parse(text)
    return {node.name: ast.get_source_segment(text, node) for node in tree.body
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name.startswith(SHARED_PREFIXES)}


def test_shared_model_modules_are_identical_copies():
    sources = {s: top_level_sources(s) for s in SCRIPTS}
    vit = {s for s, defs in sources.items() if any(name.startswith("CLIP") for name in defs)}
    assert {"mm1.py", "clip_caption.py"} <= vit, "mm1.py and clip_caption.py both hold the CLIP ViT classes"
    for name in sorted({n for defs in sources.values() for n in defs}):
        copies = {s: defs[name] for s, defs in sources.items() if name in defs}
        first = next(iter(copies))
        for script, source in copies.items():
            assert source == copies[first], f"{name}: {script} differs from {first}"


@pytest.fixture(scope="module")
def modules():
    return {s: importlib.import_module(s[:-3]) for s in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_field(script, modules, capsys):
    module = modules[script]
    with pytest.raises(SystemExit) as exit_info:
        module.parse_config(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for field in module.dataclasses.fields(module.Config):
        assert re.search(rf"^  --{field.name}=", shown, re.M), f"{script}: --{field.name} missing from --help"


def bad_argvs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {"bad key": ["--no_such_key=1"], "bad value": ["--seed=abc"], "bad device": ["--device=tpu"],
             "unwritable out_dir": [f"--out_dir={a_file}/run"]}
    if not torch.cuda.is_available():
        cases["absent device"] = ["--device=cuda"]
    return cases


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_is_one_line_and_exit_2(script, modules, tmp_path, monkeypatch, capsys):
    module = modules[script]
    for case, argv in bad_argvs(tmp_path).items():  # the last --out_dir wins
        monkeypatch.setattr(sys, "argv", [script, "--preset=smoke", f"--out_dir={tmp_path}/out", *argv])
        with pytest.raises(SystemExit) as exit_info:
            module.run_main(module.main)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2, f"{script} {case}: exit {exit_info.value.code}"
        assert err.startswith(f"{script}: error: ") and "\n" not in err, f"{script} {case}: {err!r}"
    assert not (tmp_path / "out").exists(), f"{script}: a rejected run created its out_dir"


def non_utf8_input(tmp_path: Path, kind: str) -> Path:
    """A user file (or JointBERT folder) with a Latin-1 byte where UTF-8 is expected."""
    bad = "caf\xe9".encode("latin-1")
    if kind == "jointbert":
        for split in ("train", "dev", "test"):
            folder = tmp_path / "jointbert" / split
            folder.mkdir(parents=True)
            (folder / "seq.in").write_bytes(b"play " + bad + b"\n")
            (folder / "seq.out").write_bytes(b"O B-artist\n")
            (folder / "label").write_bytes(b"PlayMusic\n")
        return tmp_path / "jointbert"
    path = tmp_path / kind
    if kind.endswith(".safetensors"):
        path.write_bytes(b"\xe9" * 64)  # not a safetensors header
    elif kind.endswith(".json"):
        path.write_bytes(b'[{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "'
                         + bad + b'"}]}]')
    else:
        path.write_bytes(b"filepath,caption\na.png," + bad + b"\n")
    return path


def folder_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def start_point(script: str, tmp_path: Path) -> list:
    """The --init flag of a script that continues another's checkpoint, after making the chain (smoke)."""
    if script not in START_POINT:
        return []
    before = START_POINT[script]
    made = smoke_run(before, tmp_path / before[:-3], *start_point(before, tmp_path))
    assert made.returncode == 0, made.stderr[-2000:]
    return [f"--init={tmp_path / before[:-3] / 'model.safetensors'}"]


def smoke_run(script: str, out_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, "--preset=smoke", f"--out_dir={out_dir}", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_failed_run_leaves_a_finished_run_untouched(script, tmp_path):
    run_dir, start = tmp_path / "finished", start_point(script, tmp_path)
    done = smoke_run(script, run_dir, *start)
    assert done.returncode == 0, done.stderr[-2000:]
    before = folder_hashes(run_dir)
    assert "config.json" in before and "log.jsonl" in before
    flag, kind = LATE_INPUT[script]
    bad_file = non_utf8_input(tmp_path, kind)
    cases = {"non-UTF-8 data file": [f"--{flag}={bad_file}"],
             "another seed and a bad data file": ["--seed=7", f"--{flag}={bad_file}"],
             "resume with another seed": ["--resume=True", "--seed=7"],
             "unknown key": ["--no_such_key=1"]}
    for case, argv in cases.items():
        failed = smoke_run(script, run_dir, *start, *argv)  # a later --init wins
        err = failed.stderr.strip().splitlines()
        assert failed.returncode == 2, f"{script} {case}: exit {failed.returncode}: {failed.stderr[-2000:]}"
        assert len(err) == 1 and err[0].startswith(f"{script}: error: "), f"{script} {case}: {err}"
        assert folder_hashes(run_dir) == before, f"{script} {case}: the finished run's folder changed"
        if "data file" in case:
            assert bad_file.name in err[0], f"{script}: the decode error names no file: {err[0]}"

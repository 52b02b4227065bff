"""python -m clip_us.reproduce: the plan of a whole table, its Slurm form, and a sweep on the
phantom that is killed and started again."""
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, exit_status

from clip_us.config import SupervisedConfig, parse_config
from clip_us.metrics import seed_summary
from clip_us.reproduce import DATA, ReproduceConfig, plan, rows_markdown, table_rows
from clip_us.reproduce.__main__ import main
from clip_us.reproduce.slurm import stages
from clip_us.runs import dataset_name
from clip_us.tables import PENDING, collect, render_sweep

TABLE2_SETS = ["LN-1", "LN-2", "BUSI", "DDTI", "TN3K", "Prostate"]


@pytest.fixture
def data_tree(tmp_path):
    """An empty folder tree laid out like the data sets (nothing in them)."""
    for name in TABLE2_SETS:
        (tmp_path / "data" / name).mkdir(parents=True)
    return tmp_path / "data"


def dry_run(capsys, *args) -> list[str]:
    main([*map(str, args), "--dry-run"])
    return capsys.readouterr().out.splitlines()


def test_table2_plan_has_one_command_per_row_dataset_and_seed(data_tree, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = dry_run(capsys, "table2", "--data-root", data_tree)
    rows = [r.name for r in table_rows("table2")]
    assert len(rows) == 10
    # the contrastive stage twice (LoRA, Mona), then 10 rows x 6 data sets x 3 seeds
    assert len(lines) == 2 + 10 * 6 * 3
    assert all(line.startswith("python ") for line in lines)
    assert [shlex.split(line)[1] for line in lines[:2]] == ["train_contrastive.py"] * 2
    seen = set()
    for line in lines[2:]:
        argv = shlex.split(line)
        out = argv[argv.index("--out-dir") + 1]
        assert argv[1] == "train_seg.py" and out not in seen
        seen.add(out)
    stage_at = {k: i for i, line in enumerate(lines) for k in ("ft/lora", "ft/mona")
                if line.endswith(f"/{k}")}
    for i, line in enumerate(lines):  # every ft. row comes after the stage it starts from
        for kind in ("lora", "mona"):
            if f"ft/{kind}/best.pt" in line:
                assert i > stage_at[f"ft/{kind}"]
    assert sorted(p.name for p in data_tree.iterdir()) == sorted(TABLE2_SETS)  # untouched


def test_dry_run_and_emit_never_look_at_the_data(tmp_path, capsys):
    args = ["table2", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]
    assert exit_status(lambda: main([*args, "--dry-run"])) == 0
    assert exit_status(lambda: main([*args, "--emit", "slurm", str(tmp_path / "s.sh")])) == 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "nowhere").exists()


def test_every_planned_command_is_one_the_docs_show(data_tree, monkeypatch):
    """docs/reproducing.md holds rows_markdown() verbatim, and each command of the plan is the
    docs' command of its row with only the data set, seed and folders changed."""
    monkeypatch.chdir(ROOT)
    docs = (ROOT / "docs" / "reproducing.md").read_text()
    assert rows_markdown() in docs
    shown = re.findall(r"`((?:python|torchrun) [^`]+)`", rows_markdown())
    def template(cmd):  # the command without what differs between data sets and seeds
        cmd = re.sub(r"--(data-root|out-dir|checkpoint|seeds|seed) \S+", "", cmd)
        for d in DATA.values():
            cmd = cmd.replace(shlex.join(d.flags), "")
        return " ".join(cmd.split())
    templates = {template(c) for c in shown}
    for table in ("table2", "table3", "echocare"):
        for job in plan(ReproduceConfig(table=table, data_root=str(data_tree)))[0]:
            assert template(job.command().replace(str(data_tree), "data")) in templates, job.key


def test_table3_and_echocare_plans(data_tree, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = dry_run(capsys, "table3", "--data-root", data_tree)
    # stage x2; supervised 9 rows x 3 data sets x 3 seeds; zero-shot 5 rows x 3 data sets, no seed
    assert len(lines) == 2 + 9 * 3 * 3 + 5 * 3
    zs = [line for line in lines if "zeroshot.py" in line]
    assert len(zs) == 15 and not any("--seeds" in line for line in zs)
    lines = dry_run(capsys, "echocare", "--data-root", data_tree)
    trains = [line for line in lines if "train_contrastive.py" in line]
    assert len(trains) == 4 and all("--model echocare" in line for line in trains)
    # one evaluation of every model on the held-out BUSI captions: one split, one test set
    evaluate = shlex.split(lines[-1])
    assert len(lines) == 5 and evaluate[1] == "evaluate.py"
    assert evaluate[evaluate.index("--manifest") + 1].endswith("echocare/busi.csv")
    assert evaluate.count("--checkpoint") == 4 and evaluate.count("--weights") == 2
    assert evaluate.count("--name") == 6
    jobs = plan(ReproduceConfig(table="echocare", data_root=str(data_tree)))[0]
    assert jobs[-1].needs == [j.key for j in jobs[:4]]
    assert jobs[-1].results[0].endswith("evaluate-seed42/echocare-clip-clip-text-heads/results.json")


def test_ln2_is_evaluated_with_ln1s_checkpoints(data_tree):
    jobs, notes = plan(ReproduceConfig(table="table2", data_root=str(data_tree),
                                       datasets=["LN-1", "LN-2"], rows=["CLIP (Mona)"], seeds=[2]))
    ln1, ln2 = jobs
    assert "--eval-only" in ln2.args and ln2.needs == [ln1.key]
    assert ln2.args[ln2.args.index("--checkpoint") + 1] == f"{ln1.out_dir}/seed2/best.pt"
    assert ln2.args[ln2.args.index("--nextgen-name") + 1] == "LN-2"
    assert any("LN-2" in n for n in notes)


def test_small_settings_reach_only_what_they_name(data_tree):
    """--arch/--image-size reach the CLIP rows only (DINOv2 stays ViT-B/14 at 518 px);
    --weights none reaches every row with weights; --epochs every training run and nothing
    else; --nproc-per-node makes torchrun commands (evaluate.py has no DDP)."""
    cfg = ReproduceConfig(table="table2", data_root=str(data_tree), datasets=["BUSI", "LN-2"],
                          arch="tiny", weights="none", image_size=64, epochs=3, seeds=[1])
    jobs, notes = plan(cfg)
    by = {(j.row, j.dataset): j.args for j in jobs}
    dino, mona, unet = by["DINOv2", "BUSI"], by["CLIP (Mona)", "BUSI"], by["UNet", "BUSI"]
    assert "--arch" not in dino and dino[dino.index("--image-size") + 1] == "518"
    assert mona[mona.index("--arch") + 1] == "tiny" and "--image-size" in mona
    assert "--weights" not in unet and dino[dino.index("--weights") + 1] == "none"
    assert "--clipseg-weights" in by["CLIPSeg", "BUSI"]
    assert all(a[a.index("--epochs") + 1] == "3" for (_, d), a in by.items() if d == "BUSI")
    assert not any("--epochs" in a for (_, d), a in by.items() if d == "LN-2")  # --eval-only
    assert any("DINOv2 (ViT-B/14 at 518 px)" in n for n in notes)
    assert jobs[0].command(2).startswith("torchrun --standalone --nproc-per-node 2 ")
    echo = plan(ReproduceConfig(table="echocare", data_root=str(data_tree), weights="none"))[0]
    assert all(j.command(2).startswith("python ") for j in echo if j.script == "evaluate.py")
    assert not any("biomedclip" in j.command() for j in echo)  # no random-weights form


def test_slurm_array_runs_the_plans_commands(data_tree, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    common = ["table2", "--data-root", str(data_tree), "--nproc-per-node", "2"]
    planned = dry_run(capsys, *common)
    script = tmp_path / "t2.sh"
    main([*common, "--emit", "slurm", str(script)])
    text = script.read_text()
    runs = re.search(r"^RUNS=\(\n(.*?)\n\)", text, re.S | re.M).group(1).splitlines()
    emitted = [shlex.split(line.split("  # ")[0])[0] for line in runs]
    assert emitted == planned and all(c.startswith("torchrun ") for c in emitted)
    jobs = plan(ReproduceConfig(table="table2", data_root=str(data_tree)))[0]
    at = stages(jobs)
    for job, s in zip(jobs, at):  # ft. rows after the stage; LN-2 after LN-1's run
        ft, ln2 = "-ft-" in job.key, job.dataset == "LN-2"
        assert s == (0 if job.key.startswith("ft/") else int(ft) + int(ln2)), job.key
    assert re.search(r'^STAGES=\("0-\d+(,\d+(-\d+)?)*" "\d', text, re.M)
    assert "#SBATCH --gres=gpu:2" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_bad_rows_and_missing_data_stop_before_anything_runs(tmp_path, capsys):
    assert exit_status(lambda: main(["table2", "--rows", "CLIP (Monaa)"])) == 2
    assert "its rows: UNet, CLIP (LoRA)" in capsys.readouterr().err
    (tmp_path / "data" / "BUSI").mkdir(parents=True)
    args = ["table2", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--rows", "CLIP (Mona)", "CLIP (LoRA)", "--seeds", "1", "2"]
    assert exit_status(lambda: main(args)) == 2
    err = capsys.readouterr().err
    for name in ("LN-1", "LN-2", "DDTI", "TN3K", "Prostate"):
        assert err.count(f"{tmp_path / 'data' / name}: missing") == 1  # once, not per run
    assert "BUSI: missing" not in err and err.count("NOT PUBLIC") == 2
    assert not (tmp_path / "out").exists()


def test_dataset_name_of_the_nextgen_layout(tmp_path, run_script):
    """A run on the NextGen-UIA layout names its data set by --nextgen-name, so the tables file
    an LN-1 run under LN-1 (not under "nextgen", where no paper number sits)."""
    from test_data import make_nextgen

    from clip_us.phantom import PhantomConfig, write_dataset
    assert dataset_name("nextgen", "LN-1") == "LN-1"
    assert dataset_name("nextgen", "") == "nextgen"
    busi = write_dataset(tmp_path / "busi", PhantomConfig(size=64, n=30, seed=0))
    make_nextgen(tmp_path / "LN-1", busi, "LN-1")
    run_script("zeroshot.py", ["--dataset", "nextgen", "--data-root", tmp_path / "LN-1",
                               "--nextgen-name", "LN-1", "--arch", "tiny", "--weights", "none",
                               "--image-size", "32", "--workers", "0", "--out-dir",
                               tmp_path / "runs" / "zs"], {"CLIP_US_CACHE": tmp_path / "cache"})
    assert json.loads((tmp_path / "runs" / "zs" / "results.json").read_text())["dataset"] == "LN-1"
    assert ("zeroshot", "ln1", "CLIP (vanilla)") in collect(tmp_path / "runs")[0]


def _fake_result(folder: Path, seed: int, dice: float, epochs: int = 2):
    folder.mkdir(parents=True)
    res = {"task": "seg", "dataset": "phantom", "row": "CLIP (Mona)", "seeds": [seed],
           "metrics": {"dice": {"mean": dice, "std": 0.0, "per_seed": [dice]}},
           "n_dropped": {"dice": [0]}, "config": {"epochs": epochs, "seeds": [seed],
                                                  "out_dir": str(folder)}}
    (folder / "results.json").write_text(json.dumps(res))


def test_tables_join_the_seeds_of_one_row_and_mark_missing_cells(tmp_path):
    _fake_result(tmp_path / "a", 1, 0.5)
    _fake_result(tmp_path / "b", 2, 0.7)
    chosen, _ = collect(tmp_path)
    m = chosen["seg", "phantom", "CLIP (Mona)"]["metrics"]["dice"]
    assert m["per_seed"] == [0.5, 0.7] and m["mean"] == pytest.approx(0.6)
    assert m == seed_summary([0.5, 0.7])  # as one run of the two seeds reports them
    _fake_result(tmp_path / "c", 3, 0.9, epochs=5)  # another config: not joined, newest wins
    chosen, notes = collect(tmp_path)
    assert chosen["seg", "phantom", "CLIP (Mona)"]["metrics"]["dice"]["per_seed"] == [0.9]
    assert notes
    job = type("Job", (), {"cells": [("seg", "phantom", "CLIP (LoRA)")]})
    text = render_sweep(tmp_path, "table2", [job])
    assert re.search(rf"\| CLIP \(LoRA\) \| {PENDING} \|", text) and "Table 3" not in text


def test_a_finished_run_of_another_config_is_reported_not_overwritten(tmp_path, capsys):
    from clip_us.reproduce.sweep import state
    job = plan(ReproduceConfig(table="table2", datasets=["phantom"], rows=["CLIP (Mona)"],
                               seeds=[1], epochs=3, out=str(tmp_path)))[0][0]
    _fake_result(Path(job.out_dir), 1, 0.5, epochs=2)
    results = Path(job.out_dir) / "results.json"
    res = json.loads(results.read_text())  # the config the script would have saved, epochs 2
    saved = dataclasses.asdict(parse_config(SupervisedConfig, [*job.args, "--out-dir", "x"]))
    res["config"] = {**saved, "epochs": 2}
    results.write_text(json.dumps(res))
    assert state(job).startswith("conflict") and "epochs: 2 there, 3 planned" in state(job)
    job.args[job.args.index("--epochs") + 1] = "2"
    assert state(job) == "done"


SMALL = ["--datasets", "phantom", "--rows", "CLIP (Mona)", "CLIP (Mona, ft.)", "--arch", "tiny",
         "--weights", "none", "--image-size", "64", "--phantom-n", "40", "--eval-every", "1",
         "--seeds", "1"]


def _sweep(out, epochs, **kw):
    cmd = [sys.executable, "-m", "clip_us.reproduce", "table2", *SMALL, "--epochs", str(epochs),
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_phantom_sweep_killed_and_started_again(tmp_path):
    """The sweep on the phantom end to end: killed (SIGKILL to the sweep and its run, as a
    preempted node) in the middle of the Mona row; the same command then skips the finished
    contrastive stage, resumes the killed run, runs the rest and renders the table."""
    out = tmp_path / "sweep"
    proc = _sweep(out, 15, start_new_session=True)
    mona = out / "table2" / "phantom" / "clip-mona-seed1" / "seed1" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not mona.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert mona.exists(), proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=60)
    assert "[1/3] contrastive stage (Mona) · phantom ... ok" in stdout
    assert not (mona.parent.parent / "results.json").exists()
    proc = _sweep(out, 15)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    assert "3 runs: 1 finished before or in conflict, 1 to resume, 1 to start" in stdout
    assert "[1/2] CLIP (Mona) · phantom · seed 1 (resumed) ... ok" in stdout
    table = (out / "table2.md").read_text()
    assert re.search(r"\| CLIP \(Mona\) \| \d+\.\d\d \| — \|", table)  # ours; no paper number
    assert re.search(r"\| CLIP \(Mona, ft\.\) \| \d+\.\d\d \|", table) and PENDING not in table
    log = (out / "logs" / "table2__phantom__clip-mona-seed1.log").read_text()
    assert log.count("\n$ ") == 2 and "--resume" in log.split("\n$ ")[2].splitlines()[0]


def test_a_failed_run_is_reported_and_the_rest_go_on(tmp_path):
    """An empty BUSI folder fails its run (one error line, in its log); the phantom's run still
    goes; the summary names the failure and its log; the exit status says a run failed."""
    (tmp_path / "data" / "BUSI").mkdir(parents=True)
    cmd = [sys.executable, "-m", "clip_us.reproduce", "table3", "--rows", "CLIP (vanilla)",
           "--datasets", "BUSI", "phantom", "--data-root", str(tmp_path / "data"), "--arch",
           "tiny", "--weights", "none", "--image-size", "32", "--phantom-n", "12", "--out",
           str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[1/2] CLIP (vanilla) · BUSI ... FAILED (exit 2)" in done.stdout
    assert "[2/2] CLIP (vanilla) · phantom ... ok" in done.stdout
    log = tmp_path / "out" / "logs" / "table3__busi__zeroshot-clip-vanilla.log"
    error = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
    assert error and f"FAILED CLIP (vanilla) · BUSI: {error[-1]}" in done.stdout
    assert f"log: {log}" in done.stdout and "1 ran" in done.stdout and "1 failed" in done.stdout
    table = (tmp_path / "out" / "table3.md").read_text()
    assert re.search(rf"\| Zero-shot \| CLIP \(vanilla\) \| {PENDING} \| 57\.50 \|", table)


def test_slurm_file_submits_stages_in_order_and_skips_finished_runs(tmp_path, monkeypatch):
    """The emitted file run by bash: submitting calls sbatch once per stage, each later one
    waiting for the one before; a task whose results exist says so and runs nothing."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "e.sh"
    main(["echocare", "--data-root", str(tmp_path / "d"), "--emit", "slurm", str(script)])
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\necho "$@" >> sbatch.calls\necho 10$RANDOM\n')
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, second = (tmp_path / "sbatch.calls").read_text().splitlines()
    assert first.startswith("--parsable --array=0-3 ") and "--dependency" not in first
    assert re.match(r"--parsable --array=4 --dependency=afterok:10\d+ ", second)
    assert (tmp_path / "runs" / "reproduce" / "logs").is_dir()
    job = plan(ReproduceConfig(table="echocare", data_root=str(tmp_path / "d")))[0][0]
    Path(job.results[0]).parent.mkdir(parents=True)
    Path(job.results[0]).write_text("{}")
    done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "0"},
                          capture_output=True, text=True)
    assert done.returncode == 0 and f"finished before: {job.out_dir}" in done.stdout


def test_ln2_alone_needs_ln1s_checkpoints_before_anything_runs(tmp_path, capsys):
    (tmp_path / "data" / "LN-2").mkdir(parents=True)
    args = ["table2", "--data-root", str(tmp_path / "data"), "--datasets", "LN-2", "--rows",
            "UNet", "--seeds", "1", "--out", str(tmp_path / "out")]
    assert exit_status(lambda: main(args)) == 2
    err = capsys.readouterr().err
    assert "ln-1/unet-seed1/seed1/best.pt: missing; UNet on LN-2 evaluates it" in err
    assert exit_status(lambda: main([*args, "--dry-run", "--emit", "slurm", "x.sh"])) == 2


def test_a_smoke_run_is_not_taken_for_the_full_run(tmp_path):
    """results.json records the command line: a finished --arch tiny run in the folder of a
    full run is a conflict, not a finished full run (its config alone cannot say which flags
    were left at their defaults)."""
    from clip_us.reproduce.sweep import state
    full = ReproduceConfig(table="table2", datasets=["phantom"], rows=["CLIP (Mona)"], seeds=[1],
                           out=str(tmp_path))
    smoke = dataclasses.replace(full, arch="tiny", weights="none", epochs=2)
    job, small = plan(full)[0][0], plan(smoke)[0][0]
    _fake_result(Path(job.out_dir), 1, 0.5)
    results = Path(job.out_dir) / "results.json"
    res = json.loads(results.read_text())
    results.write_text(json.dumps({**res, "argv": [*small.args, "--out-dir", small.out_dir]}))
    assert "arch: 'tiny' there, 'the default' planned" in state(job)
    assert state(small) == "done"


def test_zero_shot_results_are_not_joined(tmp_path):
    """Zero-shot runs have no seeds: two of one row are the newest, never a crash."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"task": "zeroshot", "dataset": "busi", "row": "CLIP (vanilla)", "seeds": [],
             "metrics": {"acc": {"mean": 0.5, "std": 0.0, "per_seed": [0.5]}}, "config": {}}))
    chosen, notes = collect(tmp_path)
    assert chosen["zeroshot", "busi", "CLIP (vanilla)"]["seeds"] == [] and notes


def test_nproc_per_node_runs_each_training_run_under_torchrun(tmp_path):
    """--nproc-per-node 2: the run is launched by torch.distributed.run with two processes (its
    log says so), and finishes like a single-process one."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "clip_us.reproduce", "table2", "--datasets", "phantom", "--rows",
           "CLIP (Mona)", "--arch", "tiny", "--weights", "none", "--image-size", "32",
           "--phantom-n", "20", "--epochs", "1", "--seeds", "1", "--nproc-per-node", "2",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "logs" / "table2__phantom__clip-mona-seed1.log").read_text()
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 train_seg.py" in log
    assert "2 process(es)" in log and (out / "table2" / "phantom" / "clip-mona-seed1" /
                                       "results.json").is_file()


def test_the_estimate_goes_by_row_then_script():
    from clip_us.reproduce.sweep import Sweep
    job = lambda row, script="train_seg.py": type("Job", (), {"row": row, "script": script})  # noqa: E731
    sweep = Sweep([], Path("logs"))
    sweep.seconds = {"DINOv2": [600.0], "CLIP (Mona)": [20.0], "train_seg.py": [600.0, 20.0]}
    assert sweep.estimate([job("DINOv2"), job("CLIP (Mona)")]) == "about 10.3 min to go"
    assert sweep.estimate([job("UNet")]) == "about 5.2 min to go"  # its script's mean
    assert sweep.estimate([job("x", "zeroshot.py")]) == "about 5.2 min to go"  # all runs' mean
    assert sweep.estimate([]) == "the last run"


def test_run_flags_reach_every_command_they_name():
    """--device and --precision reach every run; --phantom-n the phantom's runs (stage too);
    --eval-every the seg/cls runs only (the contrastive stage validates every epoch)."""
    cfg = ReproduceConfig(table="table3", datasets=["phantom"], rows=["CLIP (Mona, ft.)"],
                          seeds=[1], device="cpu", precision="bf16", phantom_n=30, eval_every=2)
    jobs = {j.script: j.args for j in plan(cfg)[0]}
    assert set(jobs) == {"train_contrastive.py", "train_cls.py", "zeroshot.py"}
    for script, args in jobs.items():
        assert args[args.index("--device") + 1] == "cpu", script
        assert args[args.index("--precision") + 1] == "bf16", script
        assert args[args.index("--phantom-n") + 1] == "30", script
    assert jobs["train_cls.py"][jobs["train_cls.py"].index("--eval-every") + 1] == "2"
    assert "--eval-every" not in jobs["train_contrastive.py"] + jobs["zeroshot.py"]

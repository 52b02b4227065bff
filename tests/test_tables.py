"""Tests for clip_us/tables.py: Tables 2/3 from fake results.json files, paper numbers, units, CSV."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import exit_status

from clip_us import tables

ROOT = Path(__file__).resolve().parents[1]


def _metric(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": list(values)}


def _seg(dataset="ln1", row="CLIP (Mona)", dice=(0.49, 0.50, 0.51)):
    return {"script": "train_seg.py", "task": "seg", "dataset": dataset, "row": row,
            "backbone": "clip", "adapter": "mona", "init": None, "seeds": [1, 2, 3],
            "metrics": {"dice": _metric(dice), "iou": _metric([0.4, 0.4, 0.4]),
                        "hd95": _metric([12.0, 13.0, 14.0]), "asd_directed": _metric([3.0, 3.0, 3.0]),
                        "assd": _metric([4.5, 4.5, 4.5])},
            "units": {"dice": "fraction", "hd95": "px"}, "n_test": 20,
            "n_dropped": {"dice": 0, "hd95": 2}, "config": {}, "version": "0.1.0"}


def _cls(task="cls", dataset="busi", row="CLIP (Mona)", acc=0.875, auc=0.9):
    return {"script": "train_cls.py", "task": task, "dataset": dataset, "row": row, "seeds": [1],
            "metrics": {"acc": _metric([acc]), "auc": _metric([auc]),
                        "sensitivity": _metric([0.7])}, "n_test": 40, "n_dropped": 0}


def _write(root, name, results, mtime=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    if mtime is not None:
        os.utime(folder / "results.json", (mtime, mtime))


def _row_cells(text, heading, method, skip_group=False):
    """Cells of the table line for `method` in the first section `heading` of text."""
    body = text[text.index(heading):].split("\n### ")[0]
    for ln in (ln for ln in body.splitlines() if ln.startswith("| ")):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        name = cells[1] if skip_group else cells[0]
        if name.split(" [^")[0] == method:
            return cells
    raise AssertionError(f"no row {method} under {heading}")


def test_table2_ours_beside_paper_in_percent(tmp_path):
    _write(tmp_path, "a", _seg())
    _write(tmp_path, "b", _seg("phantom", "CLIP (vanilla)"))
    text = tables.render(*tables.collect(tmp_path))
    cells = _row_cells(text, "### LN-1", "CLIP (Mona)")
    # Method, Dice, Dice (paper), IoU, IoU (paper), HD95, HD95 (paper), ASD dir, ASD (paper), ASSD, seeds, n
    assert cells[1] == "50.00 ± 0.82" and cells[2] == "83.12"       # fraction x100 vs the paper
    assert cells[3] == "40.00 ± 0.00" and cells[4] == "75.41"
    assert cells[5] == "13.00 ± 0.82" and cells[6] == "16.71"       # pixels: not scaled
    assert cells[7] == "3.00 ± 0.00" and cells[8] == "5.70" and cells[9] == "4.50 ± 0.00"
    assert cells[10] == "3" and cells[11] == "20 (2 dropped)"
    assert _row_cells(text, "### LN-1", "DINOv2")[1:3] == ["—", "63.02"]  # paper-only row
    assert _row_cells(text, "### Phantom", "CLIP (vanilla)")[2] == "—"    # no paper numbers
    assert "### BUSI" not in text                                       # no results there
    assert "not directly comparable" in text and "×100" in text
    assert "ASD (directed) px" in text and "| ASD |" not in text


def test_all_datasets_flag_and_row_aliases(tmp_path):
    _write(tmp_path, "a", _seg("LN-2", "BiomedCLIP"))   # loose spellings map to the paper's
    text = tables.render(*tables.collect(tmp_path), all_datasets=True)
    assert _row_cells(text, "### LN-2", "BioMedCLIP")[1:3] == ["50.00 ± 0.82", "67.63"]
    assert _row_cells(text, "### Prostate", "CLIP (Mona)")[1:3] == ["—", "92.58"]
    assert _row_cells(text[text.index("## Table 3"):], "### LN-1", "ResNet18", skip_group=True)[3] == "85.30"


def test_table3_groups_and_zero_shot_mona_note(tmp_path):
    _write(tmp_path, "zs", _cls("zeroshot", "busi", "CLIP (Mona)", 0.6, 0.55))
    _write(tmp_path, "sup", _cls("cls", "busi", "CLIP (Mona)", 0.875, 0.9))
    _write(tmp_path, "al", {"task": "align", "dataset": "busi", "row": "CLIP (Mona)", "metrics": {}})
    text = tables.render(*tables.collect(tmp_path))
    zs = [ln for ln in text.splitlines() if ln.startswith("| Zero-shot | CLIP (Mona) |")]
    sup = [ln for ln in text.splitlines() if ln.startswith("| Supervised | CLIP (Mona) |")]
    assert [c.strip() for c in zs[0].strip("|").split("|")][2:6] == ["60.00", "57.50", "55.00", "50.73"]
    assert [c.strip() for c in sup[0].strip("|").split("|")][2:6] == ["87.50", "83.33", "90.00", "87.57"]
    assert "equal CLIP (vanilla) exactly" in text and "evaluation evidently ran without" in text
    assert "## EchoCare-CLIP evaluation" in text and "| CLIP (Mona) | ours (BUSI) | — |" in text
    assert "## Table 2" in text and "_No segmentation results found._" in text


def test_duplicate_rows_take_newest_and_footnote(tmp_path):
    _write(tmp_path, "old", _seg(dice=(0.2, 0.2, 0.2)), mtime=1_000_000)
    _write(tmp_path, "new", _seg(dice=(0.7, 0.7, 0.7)), mtime=2_000_000)
    chosen, notes = tables.collect(tmp_path)
    assert len(chosen) == 1 and len(notes) == 1
    text = tables.render(chosen, notes)
    cells = _row_cells(text, "### LN-1", "CLIP (Mona)")
    assert cells[0] == "CLIP (Mona) [^d1]" and cells[1] == "70.00 ± 0.00"
    note = next(ln for ln in text.splitlines() if ln.startswith("[^d1]:"))
    assert os.path.join("new", "results.json") in note.split("ignored")[0]
    assert os.path.join("old", "results.json") in note.split("ignored")[1]


def _eval_only(res, trained_on=None, size=224):
    res = {**res, "config": {"eval_only": True, "image_size": size}}
    return {**res, "trained_on": trained_on} if trained_on else res


def _note(text, mark):
    return next(ln for ln in text.splitlines() if ln.startswith(f"[^{mark}]:"))


def test_eval_only_never_replaces_the_trained_row(tmp_path):
    _write(tmp_path, "trained", {**_seg(dice=(0.6,) * 3), "config": {"image_size": 128}},
           mtime=1_000_000)
    _write(tmp_path, "evalonly", _eval_only(_seg(dice=(0.9,) * 3), size=128), mtime=2_000_000)
    chosen, notes = tables.collect(tmp_path)
    assert chosen[("seg", "ln1", "CLIP (Mona)")]["_path"] == os.path.join("trained", "results.json")
    text = tables.render(chosen, notes)
    assert _row_cells(text, "### LN-1", "CLIP (Mona)")[1] == "60.00 ± 0.00"   # the trained run
    own = _row_cells(text, "### LN-1", "CLIP (Mona) (eval-only)")
    assert own[0] == "CLIP (Mona) (eval-only) [^d1]" and own[1] == "90.00 ± 0.00"
    assert "not in place of the trained one" in _note(text, "d1")
    body = text[text.index("### LN-1"):].split("\n\n")[1].splitlines()        # the table's lines
    names = [ln.split("|")[1].strip() for ln in body[2:]]
    assert names.index("CLIP (Mona) (eval-only) [^d1]") == names.index("CLIP (Mona)") + 1


def test_eval_only_on_its_training_data_gets_its_own_row_even_alone(tmp_path):
    _write(tmp_path, "e", _eval_only(_seg(), trained_on="LN-1"))
    chosen, notes = tables.collect(tmp_path)
    assert list(chosen) == [("seg", "ln1", "CLIP (Mona) (eval-only)")]
    text = tables.render(chosen, notes)
    assert _row_cells(text, "### LN-1", "CLIP (Mona)")[1] == "—"
    assert "the data its checkpoint was trained on" in _note(text, "d1")


def test_eval_only_on_an_external_set_fills_the_row(tmp_path):
    _write(tmp_path, "ext", _eval_only(_seg("ln2"), trained_on="ln1"))
    _write(tmp_path, "zs", {**_cls("cls", "busi"), "config": {"eval_only": True, "image_size": 224}})
    chosen, notes = tables.collect(tmp_path)
    text = tables.render(chosen, notes)
    cells = _row_cells(text, "### LN-2", "CLIP (Mona)")
    assert cells[0] == "CLIP (Mona) [^d1]" and cells[1] == "50.00 ± 0.82"
    assert "trained on LN-1" in _note(text, "d1")
    assert "training data not recorded" in _note(text, "d2")    # no trained BUSI run: it fills
    assert ("cls", "busi", "CLIP (Mona)") in chosen
    _write(tmp_path, "trained2", _seg("ln2"))                      # a trained LN-2 run keeps its row
    chosen, _ = tables.collect(tmp_path)
    assert chosen[("seg", "ln2", "CLIP (Mona)")]["_path"] == os.path.join("trained2", "results.json")
    assert ("seg", "ln2", "CLIP (Mona) (eval-only)") in chosen


def test_distances_state_each_runs_mask_size(tmp_path):
    _write(tmp_path, "a", {**_seg(), "config": {"image_size": 128}})
    _write(tmp_path, "b", {**_seg(row="DINOv2"), "config": {"image_size": 518}})
    _write(tmp_path, "c", {**_cls(), "config": {"image_size": 224}})
    text = tables.render(*tables.collect(tmp_path))
    assert tables.SEG_HEADER[-1] == "Masks px" and tables.CLS_HEADER[-1] == "Input px"
    assert _row_cells(text, "### LN-1", "CLIP (Mona)")[12] == "128×128"
    assert _row_cells(text, "### LN-1", "DINOv2")[12] == "518×518"
    assert _row_cells(text, "### LN-1", "UNet")[12] == "—"
    sup = next(ln for ln in text.splitlines() if ln.startswith("| Supervised | CLIP (Mona) |"))
    assert sup.strip("| ").split(" | ")[8] == "224×224"
    assert "224×224 masks" not in text and "each run's own masks" in text


def test_dropped_counts_per_seed_lists(tmp_path):
    _write(tmp_path, "a", {**_seg(), "n_dropped": {"dice": [0, 0, 0], "hd95": [1, 3, 2]}})
    _write(tmp_path, "b", {**_seg("ln2"), "n_dropped": {"dice": [0], "hd95": [0]}})
    text = tables.render(*tables.collect(tmp_path))
    assert _row_cells(text, "### LN-1", "CLIP (Mona)")[11] == "20 (3 dropped)"
    assert _row_cells(text, "### LN-2", "CLIP (Mona)")[11] == "20"


def test_contrastive_results_are_listed_not_tabled(tmp_path):
    _write(tmp_path, "a", _seg())
    _write(tmp_path, "c", {"task": "contrastive", "dataset": "phantom", "row": "CLIP (Mona) contrastive",
                           "metrics": {"loss": _metric([1.2]), "i2t_R@1": _metric([0.3])}})
    text = tables.render(*tables.collect(tmp_path))
    assert "### Phantom" not in text                     # no table section for it
    assert "(contrastive, train_contrastive.py: not a table row): `c/results.json`" in text


def test_dinov2_rows_say_which_model_they_used(tmp_path):
    cfg = {"backbone": "dinov2", "image_size": 518, "head": "official"}
    _write(tmp_path, "a", {**_seg(row="DINOv2"), "config": cfg})
    _write(tmp_path, "b", {**_seg("ln2", row="DINOv2"), "config": {**cfg, "dinov2_official": True}})
    _write(tmp_path, "c", {**_seg(), "config": {"backbone": "clip", "image_size": 224}})
    text = tables.render(*tables.collect(tmp_path))
    one, two = (_row_cells(text, f"### {ds}", "DINOv2")[0] for ds in ("LN-1", "LN-2"))
    notes = {ln.split("]:")[0][2:]: ln for ln in text.splitlines() if ln.startswith("[^")}
    assert "with its layer-scale" in notes[one.split("[^")[1].rstrip("]")]
    assert "--dinov2-official" in notes[two.split("[^")[1].rstrip("]")]
    assert "518 px" in notes[one.split("[^")[1].rstrip("]")]
    assert "[^" not in _row_cells(text, "### LN-1", "CLIP (Mona)")[0]  # no note on other rows


def test_bad_results_files_raise_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        tables.collect(tmp_path)
    _write(tmp_path, "pct", _seg(dice=(83.0, 84.0, 85.0)))
    with pytest.raises(ValueError, match=r"pct.*fractions"):
        tables.collect(tmp_path)
    (tmp_path / "pct" / "results.json").write_text('{"task": "seg"')
    with pytest.raises(ValueError, match="not valid JSON"):
        tables.collect(tmp_path)
    (tmp_path / "pct" / "results.json").write_text('{"task": "seg", "dataset": "ln1"}')
    with pytest.raises(ValueError, match=r"lacks \['row', 'metrics'\]"):
        tables.collect(tmp_path)
    (tmp_path / "pct" / "results.json").write_text(json.dumps({**_seg(), "task": "detect"}))
    with pytest.raises(ValueError, match="unknown task"):
        tables.collect(tmp_path)


def test_cli_writes_markdown(tmp_path, capsys):
    _write(tmp_path / "runs", "a", _seg())
    out = tmp_path / "report" / "tables.md"
    tables.main([str(tmp_path / "runs"), "--out", str(out)])
    assert out.read_text() == tables.render(*tables.collect(tmp_path / "runs"))
    assert out.read_text().startswith('# clip_us results beside Tables 2 and 3 of Qu et al., "Adapting')
    tables.main([str(tmp_path / "runs")])
    assert "## Table 2" in capsys.readouterr().out
    assert exit_status(lambda: tables.main([str(tmp_path / "missing")])) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing'} is not a folder")


def test_cli_bad_results_file_is_one_line_not_a_traceback(tmp_path):
    _write(tmp_path / "runs", "a", {"task": "seg", "dataset": "ln1"})
    command = [sys.executable, "-m", "clip_us.tables", str(tmp_path / "runs")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: {tmp_path / 'runs' / 'a' / 'results.json'}: results.json lacks ['row', 'metrics']; it "
        "was not written by a clip_us script (train_seg.py, train_cls.py, zeroshot.py, "
        "train_contrastive.py, evaluate.py): move it out of the folder"]
    debug = subprocess.run(command + ["--debug"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "load_result" in debug.stderr


def test_row_csv_columns_and_units():
    seg = list(csv.reader(io.StringIO(tables.row_csv(_seg(row="CLIP (Mona, ft.)")))))
    assert seg[0] == ["dataset", "row", "Dice", "IoU", "HD95", "ASD (directed)", "ASSD"]
    assert seg[1] == ["ln1", "CLIP (Mona, ft.)", "50.0000", "40.0000", "13.0000", "3.0000", "4.5000"]
    for task in ("cls", "zeroshot"):
        rows = list(csv.reader(io.StringIO(tables.row_csv(_cls(task)))))
        assert rows == [["dataset", "row", "Acc", "AUC"], ["busi", "CLIP (Mona)", "87.5000", "90.0000"]]
    assert [tables.COLUMN_NAMES[k] for k in tables.ROW_CSV_COLUMNS["seg"]] == seg[0][2:]
    with pytest.raises(ValueError, match="lack metrics"):
        tables.row_csv({**_cls(), "metrics": {"acc": _metric([0.5])}})
    with pytest.raises(ValueError, match="lack metrics"):
        tables.row_csv({"task": "align", "metrics": {}})
    with pytest.raises(ValueError, match="no table row"):
        tables.row_csv({"task": "contrastive", "metrics": {}})


def test_write_results(tmp_path):
    res = _seg()
    res["metrics"]["dice"]["mean"] = np.float32(0.5)   # numpy scalars from the scripts
    paths = tables.write_results(tmp_path / "run", res)
    assert [os.path.basename(p) for p in paths] == ["results.json", "row.csv"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["dice"]["mean"] == 0.5
    assert (tmp_path / "run" / "row.csv").read_text() == tables.row_csv(res)
    other = {"task": "contrastive", "dataset": "busi", "row": "x", "metrics": {}}
    assert len(tables.write_results(tmp_path / "al", other)) == 1
    assert sorted(os.listdir(tmp_path / "al")) == ["results.json"]  # no temp files, no row.csv


def _align(row="CLIP (heads ft.)"):
    m = {k: _metric([0.5]) for k in tables.ROW_CSV_COLUMNS["align"]}
    m["paired"], m["cross"] = _metric([0.7]), _metric([0.6])
    return {"task": "align", "dataset": "busi", "row": row, "metrics": m, "n_test": 117,
            "ci": {"paired": {"low": 0.65, "high": 0.75}}}


def test_echocare_table_beside_the_papers_rows(tmp_path):
    rows = list(csv.reader(io.StringIO(tables.row_csv(_align()))))
    assert rows[0][:5] == ["dataset", "row", "paired", "cross", "gap"]  # cosines: not x100
    assert rows[1][:4] == ["busi", "CLIP (heads ft.)", "0.7000", "0.6000"]
    _write(tmp_path, "al", _align())
    text = tables.render(*tables.collect(tmp_path))
    lines = text[text.index("## EchoCare-CLIP evaluation"):].splitlines()
    paper = [ln for ln in lines if ln.startswith("| OpenAI CLIP (ViT-B/32) | paper |")]
    assert 'evaluation: "Ultrasound Vision-Language Alignment via Contrastive Learning"' in text
    assert paper and "0.329" in paper[0] and "0.855" in paper[0] and "0.943" in paper[0]
    ours = [c.strip() for c in next(ln for ln in lines if "| ours (BUSI) |" in ln).strip("|").split("|")]
    assert ours[:4] == ["CLIP (heads ft.)", "ours (BUSI)", "0.700 [0.650, 0.750]", "0.600"]
    assert ours[-1] == "117" and "0.014" in text  # the abstract's cross score is noted


def test_paper_numbers_shape():
    for ds, rows in tables.PAPER_TABLE2.items():
        assert ds in tables.DATASETS and len(rows) == 10 and set(rows) <= set(tables.ROWS)
    assert tables.PAPER_TABLE2["ln2"]["DINOv2"][2] == 332.36   # exceeds the 317 px diagonal
    zs = tables.PAPER_TABLE3["zeroshot"]
    assert zs["CLIP (Mona)"] == zs["CLIP (Mona, ft.)"] == zs["CLIP (vanilla)"]  # the note's premise
    assert set(tables.PAPER_TABLE3["cls"]) <= set(tables.ROWS)

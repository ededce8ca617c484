"""``squeezer finetune DIR`` on a run folder: the fine-tuned model replaces the PTQ one (and
reloads to the metric it reports), the PTQ metrics stay beside it, the report shows the training
curve; bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest

from squeezer.cli import main
from squeezer.data import evaluate
from squeezer.runfolder import load_compressed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path, trained_digits_cnn):
    from squeezer.models import save_weights

    w = tmp_path / "w.safetensors"
    save_weights(trained_digits_cnn[0], w)
    out = tmp_path / "run"
    rc = main(["compress", "zoo:digits_cnn", "--weights", str(w), "--data", "digits", "--out",
               str(out), "--quiet", "--budget", "bits=3", "--method", "uniform", "--act-bits", "4",
               "--threads", "1"])  # fmt: skip
    assert rc == 0
    return out


def test_finetune_a_run_folder_in_place_with_its_curve_in_the_report(run, capsys):
    ptq = json.loads((run / "metrics.json").read_text())["after"]["metric"]
    assert main(["finetune", str(run), "--epochs", "2", "--lr", "1e-3", "--threads", "1"]) == 0
    assert "PTQ" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    rec = m["finetune"]
    assert rec["ptq"] == ptq and rec["ptq_after"]["metric"] == ptq
    assert [h["epoch"] for h in rec["history"]] == [0, 1, 2]
    assert all(h["val_loss"] is not None for h in rec["history"])
    assert m["after"]["name"].endswith("+ QAT (2 ep)") and m["after"]["metric"] == rec["after"]
    # the folder's model is the fine-tuned one: reloaded, it scores what the record says
    _, q, _, data = load_compressed(run)
    assert evaluate(q, data.test_batches(), data.task) == pytest.approx(rec["after"])
    assert not (run / "finetune.ckpt").exists()
    md = (run / "report.md").read_text()
    assert "## Fine-tuning" in md and "| epoch | train loss | held-out loss" in md
    assert md.index("## Fine-tuning") < md.index("## Layers")
    # fine-tuned again: the PTQ row it started from is kept, one "+ QAT" variant only
    assert main(["finetune", str(run), "--epochs", "1", "--quiet", "--threads", "1"]) == 0
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["finetune"]["ptq"] == ptq
    assert sum("+ QAT" in v["name"] for v in m2["variants"]) == 1


def test_bad_finetune_input_exits_2_with_one_line(tmp_path, run, capsys):
    assert main(["finetune", str(tmp_path / "missing"), "--quiet"]) == 2
    assert main(["finetune", str(run), "--epochs", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "epochs=0" in err[1]


def test_cli_leaves_the_recipe_to_the_trainer_unless_told():
    # the command line passes None for what the user did not set, so a quantized BN classifier
    # gets BN_CLASSIFIER_RECIPE from the CLI as from Python; explicit flags win
    import argparse

    from squeezer.cli.finetune import finetune_args, finetune_options

    p = argparse.ArgumentParser()
    finetune_args(p)
    opts = finetune_options(p.parse_args([]))
    assert opts["lr"] is None and opts["batch_size"] is None
    assert opts["lsq"] is None and opts["freeze_bn"] is None
    told = finetune_options(p.parse_args(["--no-lsq", "--freeze-bn", "--batch-size", "16"]))
    assert told["lsq"] is False and told["freeze_bn"] is True and told["batch_size"] == 16

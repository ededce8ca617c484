"""The run folder: the run spec round-trips through manifest.json, a failed stage leaves nothing,
foreign folders are refused, and a compression run reads back into the same analysis and plan."""

from __future__ import annotations

import json

import pytest

from squeezer.budget import Budget
from squeezer.errors import ConfigError
from squeezer.pipeline import compress
from squeezer.runfolder import (
    RunSpec,
    Stage,
    check_output_dir,
    load_compressed,
    read_run,
    update_metrics,
    write_compress_run,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "spec",
    [
        RunSpec("compress", "zoo:digits_cnn", data="digits", budget=Budget.parse("size=40kB")),
        RunSpec("compress", "zoo:digits_cnn", calib="zeroshot", budget=Budget.parse("bits=4"),
                input_shape=(1, 8, 8), act_bits=None),  # fmt: skip
        RunSpec("train", "mymodels:make", weights="model.safetensors", data="x.npz",
                method=None, seed=3),  # fmt: skip
    ],
    ids=["compress", "zeroshot", "train"],
)
def test_spec_round_trips_through_the_manifest(spec):
    man = spec.manifest(timings={"total": 1.0})
    assert man["tool"] == "squeezer" and man["model"] == spec.model
    assert RunSpec.from_manifest(json.loads(json.dumps(man))) == spec


def test_a_failed_stage_leaves_nothing_and_foreign_folders_are_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), Stage(out) as st:
        st.write_json("metrics.json", {"a": 1})
        raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(ConfigError, match="did not write"):
        check_output_dir(tmp_path / "mine")
    with pytest.raises(ConfigError, match="not a squeezer run folder"):
        read_run(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


def test_a_compression_run_reads_back(tmp_path, trained_digits_cnn, digits):
    from squeezer.models import save_weights

    net, _ = trained_digits_cnn
    save_weights(net, tmp_path / "w.safetensors")
    spec = RunSpec("compress", "zoo:digits_cnn", weights=str(tmp_path / "w.safetensors"),
                   data="digits", budget=Budget(bits=4), hessian_samples=128)  # fmt: skip
    r = compress(net, digits, spec.budget, hessian_samples=128)
    with Stage(tmp_path / "run") as st:
        write_compress_run(st, spec, r, digits)
    run = read_run(tmp_path / "run")
    assert run.spec == spec and run.plan == r.plan and run.calib_inputs is None
    a = run.analysis
    assert a.sensitivity == r.analysis.sensitivity and a.costs == r.analysis.costs
    assert a.ties == r.analysis.ties and a.template == r.analysis.template
    assert [p.to_dict() for p in a.frontier] == [p.to_dict() for p in r.analysis.frontier]
    model, qmodel, inputs, data = load_compressed(tmp_path / "run")
    assert data.name == "digits" and inputs.shape == digits.x_test.shape
    m = update_metrics(tmp_path / "run", export={"path": "model.onnx"})
    assert m["export"] == {"path": "model.onnx"} and m["after"]["avg_bits"] <= 4 + 1e-9
    assert (tmp_path / "run" / "report.html").is_file()
    assert run.redo(Budget(bits=3)).replanned and run.redo(Budget(bits=3)).budget == Budget(bits=3)

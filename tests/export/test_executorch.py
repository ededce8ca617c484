"""ExecuTorch export (``squeezer.export.executorch``): a quantized model lowered to a ``.pte``
through PT2E and XNNPACK with squeezer's own scales, run in the ExecuTorch runtime.

Oracles: squeezer's fake-quant outputs (the program must agree within its tolerance: one extra
int8 rounding of the logits, which XNNPACK's static kernels quantize and squeezer does not), the
lowered graph (every quantized layer inside the XNNPACK delegate), and a model whose scales were
moved by hand (the program must follow squeezer's scales, not re-calibrate its own).

Skipped where executorch is not installed (the optional extra ``squeezer[executorch]``).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from squeezer import LayerQuant, Plan, quantize
from squeezer.errors import ExportError
from squeezer.export.executorch import (
    FLOAT_ROW,
    ROW,
    executorch_available,
    export_executorch,
)
from squeezer.templates import uniform_plan

needs_executorch = pytest.mark.skipif(
    not executorch_available(),
    reason="executorch is not installed (optional extra: pip install 'squeezer[executorch]')",
)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_cnn(one_thread, digits):
    from squeezer.train import fit
    from squeezer.zoo import create

    net, _ = fit(create("digits_cnn"), digits, epochs=6, seed=0)
    return net


def _quantized(net, digits, bits=8, **kw):
    return quantize(
        net, uniform_plan(net, bits, act_bits=8, **kw), calib=digits.calibration_batches()
    )


@needs_executorch
@pytest.mark.parametrize("bits", [8, 4])
def test_digits_cnn_runs_int8_with_squeezer_scales(trained_cnn, digits, tmp_path, bits):
    q = _quantized(trained_cnn, digits, bits)
    path = tmp_path / "model.pte"
    r = export_executorch(q, path, digits.x_test[:64], float_model=trained_cnn, runs=3, warmup=1,
                          batches=(1, 32))  # fmt: skip
    assert path.is_file() and path.stat().st_size == r.size_bytes
    assert (tmp_path / "model.b32.pte").is_file() and r.batches == [1, 32]
    # every conv and linear on XNNPACK's int8 kernels, BatchNorm folded into the convs
    assert set(r.layers) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert all(s.startswith(f"xnnpack-int8-w{bits}") for s in r.layers.values())
    assert "folded" in r.layers["conv1"] and r.outside_delegate == []
    # squeezer's weight and input scales for each of the 5 layers; only the logits observed
    assert (r.squeezer_qparams, r.observed) == (10, 1)
    assert r.max_abs_error <= 2 * r.atol and r.median_sample_error <= r.atol
    assert r.median_sample_error <= 1.0 * r.output_step  # about half a step: the logits' rounding
    assert r.argmax_agreement >= 0.95
    # int8 storage: about a quarter of the FP32 program, whatever the codes' width
    assert r.size_bytes < 0.35 * r.float_size_bytes
    assert set(r.latency) == {"batch_1", "batch_32"}
    for b in (1, 32):
        rows = r.latency[f"batch_{b}"]
        assert set(rows) == {ROW, FLOAT_ROW}
        assert all(v["median_ms"] > 0 and v["batch"] == b for v in rows.values())
    # the batch-32 program runs 32 samples and agrees with the batch-1 program sample by sample
    from squeezer.export.executorch import PteModule

    m = PteModule.load(path)
    assert m.batches == [1, 32]
    x = digits.x_test[:32]
    one = torch.cat([m(x[i : i + 1]) for i in range(32)])
    assert torch.allclose(m(x), one, atol=1e-5)
    with pytest.raises(ExportError, match="no ExecuTorch program for batch 3"):
        m(x[:3])
    assert r.versions["executorch"] and r.versions["torch"] == torch.__version__


@needs_executorch
def test_follows_squeezer_scales_not_a_recalibration(trained_cnn, digits, tmp_path):
    q = _quantized(trained_cnn, digits, 8)
    # a coarser input grid on fc1 and a clipped one on conv2: squeezer's outputs move, and a
    # program calibrated afresh would not follow them
    q.fc1.input_quantizer.scale *= 4
    q.conv2.input_quantizer.scale *= 0.5
    x = digits.x_test[:64]
    r = export_executorch(q, tmp_path / "m.pte", x, runs=0)
    assert r.median_sample_error <= r.output_step

    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(tmp_path / "m.pte")).load_method("forward")
    got = torch.cat([method.execute([x[i : i + 1]])[0] for i in range(16)])
    with torch.no_grad():
        moved = q(x[:16])
        honest = _quantized(trained_cnn, digits, 8)(x[:16])
    assert (got - moved).abs().median() < 0.5 * (got - honest).abs().median()


@needs_executorch
def test_weight_only_layers_stay_float(trained_cnn, digits, tmp_path):
    plan = uniform_plan(trained_cnn, 8, act_bits=8)
    layers = dict(plan.layers)
    layers["fc2"] = LayerQuant(bits=4)  # weight-only
    q = quantize(trained_cnn, Plan(layers), calib=digits.calibration_batches())
    r = export_executorch(q, tmp_path / "m.pte", digits.x_test[:32], runs=0)
    assert r.layers["fc2"].startswith("float (weight-only")
    assert r.layers["fc1"].startswith("xnnpack-int8-w8")
    assert r.max_abs_error <= 2 * r.atol


@needs_executorch
def test_refuses_what_xnnpack_cannot_run_with_squeezer_parameters(trained_cnn, digits, tmp_path):
    q = quantize(
        trained_cnn, uniform_plan(trained_cnn, 8, act_bits=4), calib=digits.calibration_batches()
    )
    with pytest.raises(ExportError, match="4-bit activations"):
        export_executorch(q, tmp_path / "m.pte", digits.x_test[:8], runs=0)
    layers = dict(uniform_plan(trained_cnn, 8, act_bits=8).layers)
    layers["fc1"] = LayerQuant(bits=4, granularity="group", group_size=16, act_bits=8)
    qg = quantize(trained_cnn, Plan(layers), calib=digits.calibration_batches())
    with pytest.raises(ExportError, match="group-wise"):
        export_executorch(qg, tmp_path / "m.pte", digits.x_test[:8], runs=0)
    with pytest.raises(ExportError, match="a tensor or a dict of tensors"):
        export_executorch(q, tmp_path / "m.pte", [digits.x_test[:8]], runs=0)
    assert not (tmp_path / "m.pte").exists()


@needs_executorch
def test_run_folder(tmp_path):
    """What ``squeezer export DIR --format executorch`` does: the run's models and test inputs."""
    from squeezer.cli import main
    from squeezer.runfolder import load_compressed

    run = tmp_path / "run"
    argv = ["compress", "zoo:digits_cnn", "--data", "digits", "--budget", "bits=8"]
    assert main([*argv, "--method", "uniform", "--out", str(run), "--quiet"]) == 0
    fmodel, qmodel, inputs, _ = load_compressed(run)
    r = export_executorch(
        qmodel, run / "model.pte", inputs[:64], samples=16, float_model=fmodel, runs=2, warmup=1
    )
    assert (run / "model.pte").stat().st_size == r.size_bytes
    assert r.samples == 16 and r.max_abs_error <= 2 * r.atol
    json.dumps(r.to_dict())  # what the caller records in metrics.json


@needs_executorch
def test_bench_and_report_include_the_program(tmp_path):
    """``squeezer export --format executorch`` then ``squeezer bench``: the .pte is timed at the
    batch sizes it has programs for, beside ONNX Runtime, and the report's runtime table shows
    both runtimes' sizes, latencies and agreement."""
    from squeezer.cli import main
    from squeezer.runfolder import read_metrics

    run = tmp_path / "run"
    argv = ["compress", "zoo:digits_cnn", "--data", "digits", "--budget", "bits=8"]
    assert main([*argv, "--method", "uniform", "--out", str(run), "--quiet"]) == 0
    assert main(["export", str(run), "--format", "executorch", "--samples", "32"]) == 0
    assert (run / "model.pte").is_file() and (run / "model.b32.pte").is_file()
    assert main(["export", str(run), "--samples", "32"]) == 0
    assert main(["bench", str(run), "--batch", "1", "32", "--runs", "3", "--warmup", "1"]) == 0
    m = read_metrics(run)
    for b in (1, 32):
        assert m["latency"][f"batch_{b}"][ROW]["median_ms"] > 0
        assert m["latency"][f"batch_{b}"][ROW]["batch"] == b
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    et, ort = (next(ln for ln in md.splitlines() if ln.startswith(f"| {k}")) for k in
               ("ExecuTorch (XNNPACK)", "ONNX Runtime"))  # fmt: skip
    assert "model.pte" in et and "model.onnx" in ort
    et_b32 = m["latency"]["batch_32"][ROW]["median_ms"]
    assert f"{et_b32:.4g} ms" in et
    assert f"{m['executorch']['max_abs_error']:.3g}" in et


def test_missing_executorch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    assert not executorch_available()
    with pytest.raises(ExportError, match=r"squeezer\[executorch\]"):
        export_executorch(torch.nn.Linear(2, 2), tmp_path / "m.pte", torch.zeros(1, 2))


@needs_executorch
def test_bert_with_attention_mask_lowers(tmp_path):
    """A BERT encoder with dict inputs (ids and attention mask) lowers and agrees: XNNPACK's
    quantizer turned the ``+ 0`` of transformers' mask arithmetic into a float constant (float
    mask indices: "tensors used as indices must be long ..."), and quantized the attention-mask
    sum with its observed range (float's minimum in it: every attention score flattened)."""
    pytest.importorskip("transformers")
    from tiny_bert import tiny_encoder, token_data

    enc = tiny_encoder()
    data = token_data(48, seed=0)
    q = quantize(enc, uniform_plan(enc, 8, act_bits=8), calib=[(data, None)])
    r = export_executorch(q, tmp_path / "m.pte", data, samples=16, float_model=enc, runs=2,
                          warmup=1, batches=(1, 4))  # fmt: skip
    linears = {k: v for k, v in r.layers.items() if "embeddings" not in k}
    assert len(linears) == 12 and all(v == "xnnpack-int8-w8" for v in linears.values())
    # squeezer's weight scales on the 12 Linears and input scales on the 8 tensors they read
    # (query, key and value read one); only the Linears' outputs observed
    assert (r.squeezer_qparams, r.observed) == (20, 12)
    assert not any("linear" in op or "mm" in op for op in r.outside_delegate)
    assert r.max_abs_error <= 2 * r.atol and r.median_sample_error <= r.atol
    # the masked padding matters: the program follows each sentence's own mask
    from squeezer.export.executorch import PteModule

    m = PteModule.load(tmp_path / "m.pte")
    x = {k: v[:4] for k, v in data.items()}
    full = {"input_ids": x["input_ids"], "attention_mask": torch.ones_like(x["attention_mask"])}
    with torch.no_grad():
        want, unmasked = q(**x), q(**full)
    assert (m(**x) - want).abs().max() < (m(**x) - unmasked).abs().max()


def _outlier_encoder(factor: float = 40.0):
    """The tiny BERT with two outlier channels in its residual stream, as trained transformers
    have (MiniLM's FFN output spans [-3, 195] while most channels stay within a few units, and
    the LayerNorm after it scales them back): each FFN output Linear's rows 3 and 17 times
    ``factor``, the LayerNorm's gains on them divided by it."""
    from tiny_bert import tiny_encoder

    enc = tiny_encoder()
    with torch.no_grad():
        for layer in enc.model.encoder.layer:
            layer.output.dense.weight[[3, 17]] *= factor
            layer.output.dense.bias[[3, 17]] *= factor
            layer.output.LayerNorm.weight[[3, 17]] /= factor
    return enc


@needs_executorch
def test_bert_outlier_channels_agree_with_squeezer(tmp_path):
    """XNNPACK's static int8 Linear writes an int8 output, which squeezer keeps in float: with
    outlier channels that grid is coarse for every channel (the program was 2.7x farther from
    squeezer than squeezer from FP32, as on MiniLM). The outlier channels now run in float on
    squeezer's own input grid: the program agrees within the check's tolerance."""
    pytest.importorskip("transformers")
    from tiny_bert import token_data

    enc = _outlier_encoder()
    data = token_data(64, seed=1)
    q = quantize(enc, uniform_plan(enc, 8, act_bits=8), calib=[(data, None)])
    r = export_executorch(q, tmp_path / "m.pte", data, samples=32, runs=0)
    # before: median 0.0325 against a tolerance of 0.0119 (= max |squeezer − FP32|), the
    # export refused; now about 2 output steps, as on the tiny BERT without outliers
    assert r.median_sample_error <= r.atol and r.max_abs_error <= 2 * r.atol
    split = {k: v for k, v in r.layers.items() if "wide output channels in float" in v}
    assert set(split) == {f"model.encoder.layer.{i}.output.dense" for i in (0, 1)}
    assert all(v.startswith("xnnpack-int8-w8 (2 wide") for v in split.values())
    assert not any("linear" in op or "mm" in op for op in r.outside_delegate)


class _Lookup(torch.nn.Module):
    """A large embedding table read by a Linear: most of the model's bytes are the table."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(4000, 16)
        self.out = torch.nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


@needs_executorch
def test_embedding_table_is_stored_as_codes(tmp_path):
    """An 8-bit embedding table goes into the program as int8 codes and row scales, not FP32:
    the whole program is smaller than the FP32 table alone (MiniLM's word table was 47 MB of a
    59 MB program), and its lookups still agree with squeezer's."""
    net = _Lookup().eval()
    ids = torch.randint(0, 4000, (48, 6))
    q = quantize(net, uniform_plan(net, 8, act_bits=8), calib=[(ids, None)])
    r = export_executorch(q, tmp_path / "m.pte", ids, samples=16, runs=0)
    assert r.layers["emb"].startswith("int8 codes")
    table = 4000 * 16
    assert table < r.size_bytes < 4 * table  # the codes are there, the FP32 table is not
    assert r.median_sample_error <= r.atol and r.max_abs_error <= 2 * r.atol
    from squeezer.export.executorch import PteModule

    with torch.no_grad():  # rows the check did not see
        x = torch.randint(0, 4000, (1, 6))
        assert (PteModule.load(tmp_path / "m.pte")(x) - q(x)).abs().max() <= 2 * r.atol

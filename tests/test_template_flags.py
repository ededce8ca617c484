"""``--template`` and ``--bits``: the layer template and the planner's integer widths chosen on the
command line (and in the API), recorded in the run folder and used again by every re-plan."""

from __future__ import annotations

import json

import pytest
import torch

from squeezer.budget import Budget
from squeezer.cli import main
from squeezer.errors import ConfigError
from squeezer.graph import quantizable_layers
from squeezer.hf import load_hf
from squeezer.qbert import qbert_plan
from squeezer.runfolder import RunSpec, load_compressed
from squeezer.runs import warn_grouped_linears
from squeezer.templates import TEMPLATES, check_widths, template_for, with_bits

transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "big", "small", "red", "blue"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A random 1-layer BERT whose rows (256) hold two groups of 128, so the "qbert" template's
    Linears are group-wise and "qbert-channel"'s are not; and a corpus of sentences."""
    d = tmp_path_factory.mktemp("bert256")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(str(d / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=32,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.BertModel(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    corpus = d / "corpus.txt"
    lines = [f"{a} {b} {c} on a mat." for a in WORDS for b in WORDS for c in WORDS[:2]]
    corpus.write_text("\n".join(lines) + "\n")
    return d


def compress_argv(bert_dir, out, *extra: str) -> list[str]:
    return ["compress", f"hf:{bert_dir}", "--data", str(bert_dir / "corpus.txt"), "--budget",
            "bits=5", "--max-len", "12", "--hessian-samples", "4", "--hessian-probes", "2",
            "--out", str(out), "--quiet", "--threads", "1", *extra]  # fmt: skip


def linear_granularity(run) -> set[str]:
    plan = json.loads((run / "plan.json").read_text())
    return {v["granularity"] for k, v in plan["layers"].items() if "embeddings" not in k}


@pytest.fixture(scope="module")
def channel_run(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "channel"
    assert main(compress_argv(bert_dir, out, "--template", "qbert-channel", "--bits", "7,4")) == 0
    return out


def test_the_flags_reach_the_run_folder(channel_run):
    man = json.loads((channel_run / "manifest.json").read_text())
    assert man["template"] == "qbert-channel" and man["bits"] == [4, 7]
    assert RunSpec.from_manifest(man).bits == (4, 7)
    costs = json.loads((channel_run / "costs.json").read_text())
    assert costs["template_name"] == "qbert-channel"
    assert json.loads((channel_run / "sensitivity.json").read_text())["bits"] == [4, 7]
    plan = json.loads((channel_run / "plan.json").read_text())
    assert plan["meta"]["template"] == "qbert-channel"
    assert {v["bits"] for v in plan["layers"].values()} <= {4, 7}
    assert linear_granularity(channel_run) == {"channel"}
    # the compressed model as read back is quantized the same way
    _, qmodel, _, _ = load_compressed(channel_run)
    specs = {k: m.spec for k, m in qmodel.named_modules() if hasattr(m, "spec")}
    assert specs and all(s.granularity == "channel" for s in specs.values())


def test_without_the_flags_the_matching_template_groups_the_linears(bert_dir, tmp_path):
    """The oracle the flags are measured against: the default for an encoder is "qbert", whose
    Linears (rows of 256) are in groups of 128, at the template's widths."""
    out = tmp_path / "default"
    assert main(compress_argv(bert_dir, out)) == 0
    assert json.loads((out / "costs.json").read_text())["template_name"] == "qbert"
    assert linear_granularity(out) == {"group"}
    assert json.loads((out / "sensitivity.json").read_text())["bits"] == [2, 3, 4, 5, 6, 8]


def test_replan_and_quantize_use_the_recorded_template_and_bits(channel_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(channel_run, run)
    assert main(["plan", str(run), "--budget", "bits=6", "--threads", "1"]) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["meta"]["template"] == "qbert-channel"
    assert plan["meta"]["name"] == "Q-BERT mixed, per channel (bits=6)"
    assert {v["bits"] for v in plan["layers"].values()} == {4, 7}  # 6 average: both widths
    assert linear_granularity(run) == {"channel"}
    man = json.loads((run / "manifest.json").read_text())
    assert (man["template"], man["bits"], man["replanned"]) == ("qbert-channel", [4, 7], True)
    assert main(["quantize", str(run), "--threads", "1"]) == 0
    assert json.loads((run / "plan.json").read_text())["layers"] == plan["layers"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--template", "nope"], "unknown layer template 'nope'"),
        (["--template", "qbert"], "does not apply to this model"),
        (["--bits", "4,9"], "each integer width must be 2..8"),
        (["--bits", "1"], "each integer width must be 2..8"),
        (["--bits", ","], "each integer width must be 2..8"),
        (["--bits", "4.5"], "is not a comma list"),
    ],
)
def test_bad_template_or_bits_exit_2_with_one_line(extra, says, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["compress", "zoo:digits_cnn", "--data", "digits", "--budget", "bits=4",
            "--out", str(out), "--quiet", "--threads", "1", *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_encoder_template_refuses_a_cnn_and_auto_skips_qbert_channel(bert_dir):
    model, _ = load_hf(f"hf:{bert_dir}")
    assert template_for(model).name == "qbert"  # qbert-channel is chosen by name only
    assert template_for(model, "qbert-channel").name == "qbert-channel"
    assert template_for(model, "default").name == "default"  # per channel fits any model
    with pytest.raises(ConfigError, match="does not apply"):
        template_for(torch.nn.Sequential(torch.nn.Linear(2, 2)), "qbert-channel")
    assert with_bits(TEMPLATES["qbert"], [7, 4, 7]).bits == (4, 7)
    assert with_bits(TEMPLATES["qbert"], None) is TEMPLATES["qbert"]
    assert check_widths((2, 8)) == (2, 8)
    with pytest.raises(ConfigError):
        check_widths(())


def test_grouped_linears_warn_under_a_latency_budget_on_onnxruntime(bert_dir, capsys):
    model, _ = load_hf(f"hf:{bert_dir}")
    grouped, channel = qbert_plan(model, 8, group_size=128), qbert_plan(model, 8, group_size=None)
    lat = Budget.parse("latency=5ms")
    assert warn_grouped_linears(model, grouped, lat, "onnxruntime")
    err = capsys.readouterr().err.strip().splitlines()
    n = sum(isinstance(m, torch.nn.Linear) for m in quantizable_layers(model).values())
    assert len(err) == 1 and f"{n} Linear layers" in err[0] and "qbert-channel" in err[0]
    assert not warn_grouped_linears(model, channel, lat, "onnxruntime")
    assert not warn_grouped_linears(model, grouped, lat, "proxy")
    assert not warn_grouped_linears(model, grouped, Budget.parse("bits=4"), "onnxruntime")
    assert capsys.readouterr().err == ""


def test_the_api_takes_template_and_bits(bert_dir):
    from squeezer.data import load_data
    from squeezer.pipeline import compress

    model, tokenizer = load_hf(f"hf:{bert_dir}")
    data = load_data(str(bert_dir / "corpus.txt"), model=model, tokenizer=tokenizer, max_len=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = compress(model, data, "bits=5", template="qbert-channel", bits=(4, 7), hessian_samples=4,
                 hessian_probes=2)  # fmt: skip
    assert r.analysis.template_name == "qbert-channel" and r.analysis.sensitivity.bits == (4, 7)
    assert {s.granularity for s in r.analysis.template.layers.values()} == {"channel"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

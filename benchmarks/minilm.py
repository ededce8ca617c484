"""all-MiniLM-L6-v2: Q-BERT group-wise and Hessian mixed precision, I-BERT integer-only inference.

Fidelity of each compressed encoder to the FP32 one on held-out sentences of the ``sentences``
corpus (mean cosine of the embeddings, Spearman correlation of the pairwise similarities, top-10
retrieval overlap) and its size (``squeezer.measure.model_bytes``: packed codes + float32 scales +
everything left in float):

- FP32;
- W8A8 fake-quant: per-channel int8 weights, per-tensor uint8 activations on every Linear, int8
  per-row embedding tables (:func:`squeezer.qbert.qbert_plan` with ``group_size=None``);
- W8A8 integer-only: the same model compiled by :func:`squeezer.integer.to_integer_encoder`
  (I-BERT kernels; every intermediate an integer tensor);
- W4 per-channel and W4 in groups of 128 (every table and matrix, weights only, as in FACTS.md);
- Q-BERT template at 4 bits (groups of 128, position/token-type tables at 8 bits), W4A8;
- Hessian mixed precision at 4.5 average weight bits (per layer, and per block as in Q-BERT):
  Gauss–Newton traces of the embedding loss (the pipeline's analysis stage with the Q-BERT
  template, :func:`squeezer.pipeline.analyse`), HAWQ-V2 Ω,
  ILP planner; with A8 activations and weights-only;
- ``--granularity``: the 4-bit granularity study (Linear weights only: per tensor, Q-BERT's
  per-head row groups, per channel, groups of 128/64/32 along the input);
- ``--ort``: ONNX Runtime ``quantize_dynamic`` int8 per-channel on the same sentences.

Batches are sorted by length and cut to their longest sentence (padding never changes a BERT
sentence embedding, see :func:`squeezer.text.token_batches`), so the cost follows real lengths.

Run:  python benchmarks/minilm.py --n-test 512 --granularity --ort --json minilm.json
      (about 30 minutes on 2 loaded CPU cores; the Hessian analysis is ~half of it)
      python benchmarks/minilm.py --n-test 64 --probes 4 --hessian-samples 16   (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from squeezer.config import Budget, LayerQuant, Plan
from squeezer.costs import plan_costs
from squeezer.graph import copy_model, quantizable_layers
from squeezer.hf import load_hf
from squeezer.integer import to_integer_encoder
from squeezer.measure import average_bits, model_bytes
from squeezer.pipeline import analyse
from squeezer.plan import plan as ilp_plan
from squeezer.qbert import MIXED_BITS, block_ties, block_traces, describe_bits, qbert_plan
from squeezer.quant.apply import quantize
from squeezer.quant.primitives import quantize_weight
from squeezer.sensitivity import sensitivity
from squeezer.spectrum import Spectrum
from squeezer.templates import TEMPLATES
from squeezer.text import (
    EmbeddingTask,
    TokenDataset,
    embed,
    embedding_metrics,
    split_sentences,
    stdlib_sentences,
    token_batches,
    tokenize,
)


def mixed_precision_plan(model, sens, budget, tpl, *, per_block=False):
    """The planner stage of the pipeline for an encoder: per-layer template, block ties if asked."""
    costs = plan_costs(model, sens.bits, template=tpl)
    ties = block_ties(model) if per_block else ()
    return ilp_plan(sens, budget, costs=costs, ties=ties, template=tpl)


def uniform(model: nn.Module, bits: int, granularity: str, group_size: int | None) -> Plan:
    """Every quantizable layer (tables included) at ``bits``, weights only."""
    spec = LayerQuant(bits=bits, granularity=granularity, group_size=group_size)
    return Plan({k: spec for k in quantizable_layers(model)}, meta={"name": f"W{bits}"})


def weights_only(plan: Plan) -> Plan:
    return Plan({k: replace(v, act_bits=None) for k, v in plan.layers.items()}, meta=plan.meta)


def head_rows(w: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Q-BERT's row groups: ``rows`` consecutive output rows (one head) share one range."""
    g = w.reshape(w.shape[0] // rows, -1)
    return quantize_weight(g, bits, granularity="channel")[0].reshape(w.shape)


def granularity_variant(model: nn.Module, how: str, bits: int = 4) -> nn.Module:
    """A copy of ``model`` with every Linear weight fake-quantized at ``bits`` as ``how`` says."""
    m = copy_model(model)
    head = m.model.config.hidden_size // m.model.config.num_attention_heads
    with torch.no_grad():
        for fqn, layer in quantizable_layers(m).items():
            if not isinstance(layer, nn.Linear):
                continue
            w = layer.weight
            if how == "head-rows":  # per head: rows of Q/K/V, input heads of the output proj.
                if fqn.endswith(("query", "key", "value")):
                    wq = head_rows(w, bits, head)
                elif fqn.endswith("attention.output.dense"):
                    wq = quantize_weight(w, bits, granularity="group", group_size=head)[0]
                else:  # the feed-forward matrices: per channel
                    wq = quantize_weight(w, bits, granularity="channel")[0]
            elif how.startswith("group"):
                wq = quantize_weight(w, bits, granularity="group", group_size=int(how[5:]))[0]
            else:
                wq = quantize_weight(w, bits, granularity=how)[0]
            w.copy_(wq)
    return m


def ort_dynamic(model: nn.Module, inputs: dict, calib_dir: Path) -> torch.Tensor:
    """Embeddings from ONNX Runtime ``quantize_dynamic`` (int8, per channel) of ``model``."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp = calib_dir / "minilm.onnx"
    q8 = calib_dir / "minilm.int8.onnx"
    ex = {k: v[:2, :16] for k, v in inputs.items()}
    torch.onnx.export(
        model,
        (ex["input_ids"], ex["attention_mask"]),
        str(fp),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence"],
        dynamic_axes={k: {0: "b", 1: "t"} for k in ("input_ids", "attention_mask")},
        dynamo=False,
    )
    quantize_dynamic(str(fp), str(q8), per_channel=True, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(q8), opts, providers=["CPUExecutionProvider"])
    outs = []
    batches = token_batches(inputs, batch_size=32)
    for b in batches:
        feed = {k: v.numpy() for k, v in b.items()}
        outs.append(torch.from_numpy(sess.run(None, feed)[0]))
    from squeezer.text import restore_order

    return restore_order(outs, inputs), q8.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--hessian-samples", type=int, default=64)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--budget", type=float, default=4.5)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--spectrum", type=Path, help="reuse (or write) the Hessian analysis here")
    ap.add_argument("--granularity", action="store_true", help="also the 4-bit granularity study")
    ap.add_argument("--ort", action="store_true", help="also ONNX Runtime quantize_dynamic")
    ap.add_argument("--measured", action="store_true", help="also a plan from measured Ω")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    model, tok = load_hf("hf:minilm")
    train, test = split_sentences(stdlib_sentences(), seed=0)
    x_test = tokenize(tok, test[: args.n_test], args.max_len)
    x_cal = tokenize(tok, train[: args.n_calib], args.max_len)
    x_hes = {k: v[: args.hessian_samples] for k, v in x_cal.items()}
    calib = token_batches(x_cal, batch_size=32)
    lens = x_test["attention_mask"].sum(1).float()
    log(
        f"{len(test[: args.n_test])} test sentences, {args.n_calib} calibration; tokens per "
        f"sentence mean {lens.mean():.1f}, max {int(lens.max())} (max_len {args.max_len})"
    )
    e_fp32 = embed(model, x_test)
    rows: list[dict] = []

    def record(name: str, emb: torch.Tensor, plan: Plan | None, extra: dict | None = None):
        m = embedding_metrics(e_fp32, emb)
        row = {
            "variant": name,
            **{k: round(v, 4) for k, v in m.items()},
            "size_mb": round(model_bytes(model, plan) / 1e6, 2),
            "avg_bits": round(average_bits(model, plan), 3) if plan else 32.0,
            **(extra or {}),
        }
        rows.append(row)
        log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "variant"))
        return row

    def fake(name: str, plan: Plan) -> nn.Module:
        qm = quantize(model, plan, calib=calib)
        record(name, embed(qm, x_test), plan)
        return qm

    record("FP32", e_fp32, None)

    # W8A8 fake-quant and integer-only.
    plan8 = qbert_plan(model, 8, group_size=None)
    q8 = fake("W8A8 per-channel (fake-quant)", plan8)
    t0 = time.perf_counter()
    imodel = to_integer_encoder(q8, calib)
    t1 = time.perf_counter()
    e_int = embed(imodel, x_test)
    t2 = time.perf_counter()
    e_q8 = embed(q8, x_test)
    t3 = time.perf_counter()
    vs_fake = embedding_metrics(e_q8, e_int)
    record(
        "W8A8 integer-only (I-BERT kernels)",
        e_int,
        plan8,
        {
            "vs_fakequant": {k: round(v, 4) for k, v in vs_fake.items()},
            "build_s": round(t1 - t0, 1),
            "run_s": round(t2 - t1, 1),
            "fakequant_run_s": round(t3 - t2, 1),
        },
    )
    del imodel, q8

    if args.ort:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            e_ort, size = ort_dynamic(model, x_test, Path(d))
        row = record("ORT quantize_dynamic int8 per-channel", e_ort, None)
        row["size_mb"], row["avg_bits"] = round(size / 1e6, 2), 8.0

    # Uniform 4 bits.
    fake("W4 per-channel, weights only", uniform(model, 4, "channel", None))
    fake("W4 groups of 128, weights only", uniform(model, 4, "group", 128))
    gs = args.group_size
    tpl = qbert_plan(model, 8, group_size=gs)
    for b in (4, 5):
        fake(
            f"W{b}A8 Q-BERT template (groups of {gs}, pos/type tables 8-bit)",
            qbert_plan(model, b, group_size=gs),
        )

    if args.granularity:
        for how in ("tensor", "head-rows", "channel", "group128", "group64", "group32"):
            emb = embed(granularity_variant(model, how), x_test)
            record(f"granularity study: Linear W4 {how}, tables float", emb, None)

    # Hessian analysis and mixed precision.
    if args.spectrum is not None and args.spectrum.exists():
        spec = Spectrum.load(args.spectrum)
        log(f"loaded the Hessian analysis from {args.spectrum}")
    else:
        t0 = time.perf_counter()
        n = x_hes["input_ids"].shape[0]
        settings = replace(TEMPLATES["qbert"].analysis, samples=n, max_probes=args.probes,
                           min_probes=args.probes, top_k=1)  # fmt: skip
        hes = TokenDataset("hessian", x_hes, embed(model, x_hes), x_hes,
                           embed(model, x_hes), EmbeddingTask())  # fmt: skip
        spec = analyse(model, hes, replace(TEMPLATES["qbert"], analysis=settings))
        log(
            f"Hessian analysis: {spec.samples} sentences, {spec.probes} probes, "
            f"{spec.hvp_count} HVPs, {time.perf_counter() - t0:.0f} s; top eigenvalue "
            f"{spec.top_eigenvalues[0]:.3g}, trace {spec.trace:.4g} ± {spec.trace_stderr:.2g}"
        )
        if args.spectrum is not None:
            spec.save(args.spectrum)
    blocks = block_traces(spec, model)
    log("block traces: " + ", ".join(f"{k} {v:.3g}" for k, v in blocks.items()))
    sens = sensitivity(model, spec, bits=MIXED_BITS, template=tpl)
    budget = Budget(bits=args.budget)
    plans = {}
    for per_block in (False, True):
        p = mixed_precision_plan(model, sens, budget, tpl, per_block=per_block)
        plans[per_block] = p
        kind = "per block (Q-BERT)" if per_block else "per layer"
        fake(f"mixed {args.budget} bits {kind}, A8, groups of {gs}", p)
        log("  bits: " + json.dumps(describe_bits(p, model)))
    fake(f"mixed {args.budget} bits per layer, weights only", weights_only(plans[False]))
    if args.measured:
        t0 = time.perf_counter()
        msens = sensitivity(
            model, None, bits=MIXED_BITS, method="measured", template=tpl,
            data=token_batches(x_hes, embed(model, x_hes), 32),
            loss_fn=EmbeddingTask().loss,
        )  # fmt: skip
        log(f"measured sensitivity: {time.perf_counter() - t0:.0f} s")
        p = mixed_precision_plan(model, msens, budget, tpl)
        plans["measured"] = p
        fake(f"mixed {args.budget} bits per layer (measured Ω), A8, groups of {gs}", p)
        log("  bits: " + json.dumps(describe_bits(p, model)))

    result = {
        "command": "python benchmarks/minilm.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k}"
            for k, v in vars(args).items()
            if v not in (None, False) and k not in ("json",)
        ),
        "n_test": int(x_test["input_ids"].shape[0]),
        "max_len": args.max_len,
        "rows": rows,
        "block_traces": blocks,
        "layer_traces": dict(spec.layer_trace),
        "plans": {
            {True: "block", False: "layer"}.get(k, k): describe_bits(p, model)
            for k, p in plans.items()
        },
        "seconds": round(time.perf_counter() - t_start),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print()
    print("| variant | cosine | Spearman | top-10 | size MB | avg bits |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['cosine']:.4f} | {r['spearman']:.4f} | {r['top10']:.3f} | "
            f"{r['size_mb']} | {r['avg_bits']} |"
        )


if __name__ == "__main__":
    main()

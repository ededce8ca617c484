"""Pruning benchmark, the encoder half of issue #13: all-MiniLM-L6-v2, structured head + FFN-neuron
pruning (``squeezer.prune.heads``) and Learned Token Pruning (``squeezer.prune.tokens``), each
recovered by distillation on the ``sentences`` corpus with squeezer's one trainer
(``squeezer.train.finetune``).

For each point of the curve: the cosine to the FP32 embeddings on the held-out test sentences (and
on 128-token passages), and the batch-32, 128-token latency of PyTorch and ONNX Runtime FP32,
timed round-robin in one run with the unpruned model (so load changes hit all alike; the machine
is shared, quote the ratios).

Head pruning is gradual: each stage re-scores the current (fine-tuned) model with the Hessian gate
scores, removes heads and neurons up to the next MACs target, and fine-tunes again.

Training and timing can be separate runs, so that the variants of several training runs are timed
together, round-robin, in ONE run: ``--no-time`` trains, writes ``pruning_encoder.json`` and the
pruned models (``models/NAME.pt``, a state dict; the head architecture and the token thresholds
are in the JSON); ``--time DIR,DIR`` rebuilds every model of those folders and times them with the
unpruned model.

Usage:
    python benchmarks/pruning_encoder.py --out bench-prune-enc          # the full run
    python benchmarks/pruning_encoder.py --quick --out /tmp/x           # a minute: does it run
    python benchmarks/pruning_encoder.py --methods heads --stages 0.25,0.4 --epochs 1,2 \
        --no-time --out runs/heads
    python benchmarks/pruning_encoder.py --time runs/heads,runs/tokens --out runs/timed
    python benchmarks/pruning_encoder.py --methods heads --extra-text torch,transformers \
        --no-time --out runs/heads-more     # more training text: those packages' docstrings
    python benchmarks/pruning_encoder.py --methods heads --resume runs/heads/heads+ffn0.40 \
        --stages 0.4 --epochs 2 --no-time --out runs/heads-on   # two more epochs at 40%

``--extra-text PKG,PKG`` adds the docstring sentences of those installed packages (parsed, not
imported, as the ``sentences`` corpus parses the standard library) to the TRAINING split only;
every sentence that is also in the standard library's corpus (train or test) is dropped from them,
so the test sentences stay unseen. The package versions are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from squeezer.data import load_data
from squeezer.export import export_float_onnx, latency_table, ort_session
from squeezer.graph import copy_model
from squeezer.hf import load_hf
from squeezer.measure import param_count
from squeezer.prune import PruneSpec, prune
from squeezer.prune.heads import architecture, encoder_blocks, encoder_macs, rebuild
from squeezer.prune.tokens import TokenPruned
from squeezer.text import embed, embedding_dataset, mean_cosine, stdlib_sentences, tokenize
from squeezer.train.finetune import finetune

SEQ = 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def passages(tokenizer: Any, sentences: list[str], n: int) -> dict[str, torch.Tensor]:
    """``n`` texts of at least SEQ tokens, each made of consecutive sentences, cut at SEQ tokens:
    real 128-token inputs with no padding (token pruning must not get its speed from padding)."""
    texts, cur = [], []
    for s in sentences:
        cur.append(s)
        if len(tokenizer(" ".join(cur))["input_ids"]) >= SEQ:
            texts.append(" ".join(cur))
            cur = []
            if len(texts) == n:
                break
    x = tokenize(tokenizer, texts, SEQ)
    assert bool((x["attention_mask"] == 1).all()), "a passage is shorter than SEQ tokens"
    return x


def with_extra_text(data, fp32, tok, packages: list[str]):
    """``data`` with the docstring sentences of installed ``packages`` added to its training split
    (sentences of the standard-library corpus, train or test, are left out), and the record of
    what was added."""
    site = Path(sysconfig.get_paths()["purelib"])
    known = set(data.meta["train_text"]) | set(data.meta["test_text"]) | set(stdlib_sentences())
    extra: set[str] = set()
    record = {}
    for name in packages:
        root = site / name
        if not root.is_dir():
            raise SystemExit(f"--extra-text: {name!r} is not an installed package folder")
        found = set(stdlib_sentences(str(root))) - known
        dist = {"sklearn": "scikit-learn"}.get(name, name)
        record[name] = {"version": importlib.metadata.version(dist), "sentences": len(found - extra)}
        extra |= found
    g = torch.Generator().manual_seed(0)  # sorted then shuffled: a function of the set only
    ordered = sorted(extra)
    extra_list = [ordered[i] for i in torch.randperm(len(ordered), generator=g).tolist()]
    train = list(data.meta["train_text"]) + extra_list
    out = embedding_dataset("sentences+docstrings", train, list(data.meta["test_text"]),
                            model=fp32, tokenizer=tok, max_len=SEQ, n_train=None, n_test=None,
                            meta={"extra_text": record})  # fmt: skip
    return out, record


def fidelity(model, data, pas, pas_ref) -> dict[str, float]:
    return {
        "cosine": mean_cosine(data.y_test, embed(model, data.x_test)),
        "cosine_passages": mean_cosine(pas_ref, embed(model, pas)),
    }


def head_curve(fp32, data, pas, pas_ref, stages, args, start=None) -> list[dict[str, Any]]:
    """Gradual head + neuron pruning: one point per MACs target (fraction of encoder MACs removed).

    ``start``: a pruned model to go on from (``--resume``); a stage at the MACs it already has
    removed only fine-tunes it further."""
    rows, model, macs0 = [], start or fp32, encoder_macs(fp32)
    done = 1 - encoder_macs(model) / macs0
    epochs = per_stage(args.epochs, len(stages))
    for target, n_epochs in zip(stages, epochs, strict=True):
        if target < done - 1e-3:
            raise SystemExit(f"--stages: {target} is below the {done:.3f} already removed")
        t0 = time.perf_counter()
        if target <= done + 1e-3:  # nothing more to remove: fine-tune the model as it is
            pruned = model
        else:
            spec = PruneSpec(
                "heads",
                ratio=1 - (1 - target) / (1 - done),  # of the current model's MACs
                importance=args.importance,
                options={"samples": args.samples, "probes": 4, "min_heads": 1, "min_neurons": 32},
            )
            pruned = prune(model, spec, data).model
        score_s = time.perf_counter() - t0
        oneshot = fidelity(pruned, data, pas, pas_ref)
        log(
            f"heads {target:.2f}: one-shot cosine {oneshot['cosine']:.4f} ({score_s:.0f} s scoring)"
        )
        # distilled from the unpruned model: its embeddings, and with --hidden its hidden states
        r = finetune(pruned, data, teacher=fp32, epochs=n_epochs, lr=args.lr, batch_size=32,
                     steps_per_epoch=args.steps, progress=False, seed=0,
                     hidden_weight=args.hidden, hidden_loss=args.hidden_loss,
                     hidden_attention=args.hidden_attention)  # fmt: skip
        model = r.model
        fid = fidelity(model, data, pas, pas_ref)
        log(f"heads {target:.2f}: cosine {fid['cosine']:.4f} after {r.seconds:.0f} s fine-tuning")
        done = 1 - encoder_macs(model) / macs0
        rows.append({
            "method": "heads+ffn", "target": target, "macs_removed": done,
            "heads": [b.heads for b in encoder_blocks(model)],
            "neurons": [b.neurons for b in encoder_blocks(model)],
            "params": param_count(model), "oneshot": oneshot, **fid,
            "finetune_s": r.seconds, "score_s": score_s, "epochs": n_epochs,
            "hidden": args.hidden, "best_epoch": r.best_epoch,
            "arch": architecture(model), "history": [dict(h) for h in r.history], "model": model,
        })  # fmt: skip
    return rows


def passage_data(fp32, tok, data, n_train: int, n_test: int):
    """A data set of 128-token passages (train passages from the training sentences, test from
    the test sentences), targets the FP32 embeddings: what token pruning is trained and judged on."""
    from squeezer.text import EmbeddingTask, TokenDataset

    xtr = passages(tok, list(data.meta["train_text"]), n_train)
    xte = passages(tok, list(data.meta["test_text"]), n_test)
    ytr, yte = embed(fp32, xtr), embed(fp32, xte)
    meta = {"n_train": len(ytr), "n_test": len(yte)}
    return TokenDataset("passages", xtr, ytr, xte, yte, EmbeddingTask(), meta)


def token_curve(fp32, data, pdata, ratios, args) -> list[dict[str, Any]]:
    """LTP at each ratio (fraction of token positions removed over the blocks): thresholds
    calibrated and soft-trained, then the weights recovered on the hard model."""
    from squeezer.prune.tokens import kept_fractions

    rows = []
    for ratio, n_epochs in zip(ratios, per_stage(args.ltp_epochs, len(ratios)), strict=True):
        spec = PruneSpec("tokens", ratio=ratio,
                         options={"steps": args.ltp_steps, "samples": 128})  # fmt: skip
        t0 = time.perf_counter()
        p = prune(fp32, spec, pdata)
        thr_s = time.perf_counter() - t0
        oneshot = mean_cosine(pdata.y_test, embed(p.model, pdata.x_test))
        log(f"tokens {ratio:.2f}: cosine {oneshot:.4f} after {thr_s:.0f} s threshold training")
        r = finetune(p.model, pdata, epochs=n_epochs, lr=args.lr, batch_size=32,
                     steps_per_epoch=args.steps, progress=False, seed=0)  # fmt: skip
        model = r.model
        fid = {"cosine_passages": mean_cosine(pdata.y_test, embed(model, pdata.x_test)),
               "cosine": mean_cosine(data.y_test, embed(model, data.x_test))}  # fmt: skip
        kept = kept_fractions(model, pdata.test_batches(32))
        log(f"tokens {ratio:.2f}: passages cosine {fid['cosine_passages']:.4f} after "
            f"{r.seconds:.0f} s fine-tuning; kept {[round(k, 2) for k in kept]}")  # fmt: skip
        rows.append({
            "method": "tokens", "target": ratio, "macs_removed": 1 - sum(kept) / len(kept),
            "kept": kept, "thresholds": [float(t) for t in model.thresholds],
            "oneshot": {"cosine_passages": oneshot}, **fid, "threshold_s": thr_s,
            "finetune_s": r.seconds, "epochs": n_epochs,
            "soft_kept": [p.stats.get("soft_kept_first"), p.stats.get("soft_kept_last")],
            "history": [dict(h) for h in r.history], "model": model,
        })  # fmt: skip
    return rows


def per_stage(spec: str, n: int) -> list[int]:
    """``"2"`` -> [2] * n; ``"1,2"`` -> [1, 2] (one number of epochs per stage)."""
    v = [int(e) for e in str(spec).split(",")]
    return v * n if len(v) == 1 else v


def rebuild_variant(fp32, row: dict, path: Path) -> torch.nn.Module:
    """The pruned model ``row`` describes, rebuilt from ``fp32``'s shapes and its saved weights."""
    model = rebuild(fp32, row["arch"]) if row["method"] == "heads+ffn" else copy_model(fp32)
    if row["method"] == "tokens":
        model = TokenPruned(model, torch.tensor(row["thresholds"]))
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def resumed(fp32, spec: str) -> torch.nn.Module:
    """The saved heads model ``DIR/NAME`` (a row of an earlier run), to go on from."""
    d, _, name = spec.rpartition("/")
    try:
        rows = json.loads((Path(d) / "pruning_encoder.json").read_text())["rows"]
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume: cannot read {d}/pruning_encoder.json ({e})") from None
    row = next((r for r in rows if r["name"] == name and r["method"] == "heads+ffn"), None)
    if row is None:
        names = [r["name"] for r in rows if r["method"] == "heads+ffn"]
        raise SystemExit(f"--resume: no heads model {name!r} in {d} (there: {names})")
    return rebuild_variant(fp32, row, Path(d) / "models" / f"{name}.pt")


def latencies(
    variants: dict[str, torch.nn.Module], example: dict, runs: int, threads: int
) -> dict[str, Any]:
    """Batch-32 median latency of every variant in PyTorch and ONNX Runtime FP32, in one run."""
    timed: dict[str, Any] = {}
    for name, m in variants.items():
        timed[f"pt:{name}"] = m.eval()
        if not isinstance(m, TokenPruned):  # token pruning is PyTorch only
            timed[f"ort:{name}"] = ort_session(export_float_onnx(m, example), threads=threads)
    t = latency_table(timed, {32: example}, threads=threads, warmup=2, runs=runs)["batch_32"]
    return {k: v["median_ms"] for k, v in t.items()}


def print_table(rows: list[dict], lat: dict[str, float]) -> None:
    print("| method | MACs removed | heads | FFN | cosine (one-shot) | cosine passages | "
          "PT ms (×) | ORT ms (×) | fine-tune s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| FP32 | 0 | 72 | 9216 | 1 | 1 | {lat['pt:fp32']:.0f} | {lat['ort:fp32']:.0f} | — |")
    for r in rows:
        print(
            f"| {r['method']} | {r['macs_removed']:.2f} | {sum(r.get('heads', [72]))} | "
            f"{sum(r.get('neurons', [9216]))} | {r['cosine']:.4f} "
            f"({next(iter(r['oneshot'].values())):.3f}) | {r['cosine_passages']:.4f} | "
            f"{r['pt_ms']:.0f} ({r['pt_speedup']:.2f}×) | {r['ort_ms']:.0f} "
            f"({r['ort_speedup']:.2f}×) | {r['finetune_s']:.0f} |"
        )


def time_rows(fp32, rows: list[dict], variants: dict, example: dict, args) -> dict[str, float]:
    """Time the unpruned model and every variant together; write the figures into ``rows``."""
    log(f"timing {len(variants)} variants, {args.runs} round-robin runs ...")
    lat = latencies({"fp32": fp32, **variants}, example, args.runs, args.time_threads)
    for r in rows:
        name = r["name"]
        r["pt_ms"], r["ort_ms"] = lat[f"pt:{name}"], lat.get(f"ort:{name}", float("nan"))
        r["pt_speedup"] = lat["pt:fp32"] / r["pt_ms"]
        r["ort_speedup"] = lat["ort:fp32"] / r["ort_ms"]
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    ap.add_argument("--stages", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--epochs", default="1", help="epochs per head stage: N or N1,N2,...")
    ap.add_argument("--ltp-epochs", default="2", help="hard-model epochs per token ratio")
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (default: all)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--hidden", type=float, default=0.0,
                    help="hidden-state distillation weight for head pruning "
                         "(0: embeddings only)")  # fmt: skip
    ap.add_argument("--hidden-loss", choices=("mse", "cosine"), default="mse")
    ap.add_argument("--hidden-attention", action="store_true",
                    help="--hidden also matches every block's attention output")  # fmt: skip
    ap.add_argument("--importance", default="hessian")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--extra-text", default="",
                    help="PKG,PKG: add these installed packages' docstring sentences to the "
                         "training split")  # fmt: skip
    ap.add_argument("--methods", default="heads,tokens")
    ap.add_argument("--ratios", default="0.3,0.45,0.55", help="token-pruning ratios")
    ap.add_argument("--ltp-steps", type=int, default=50, help="soft threshold-training steps")
    ap.add_argument("--passages", type=int, default=1024, help="training passages for LTP")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    ap.add_argument("--time-threads", type=int, default=2, help="threads for the timing")
    ap.add_argument("--no-time", action="store_true", help="train and save; time later")
    ap.add_argument("--time", default=None, help="DIR,DIR: time the saved models of these runs")
    ap.add_argument("--resume", default=None,
                    help="DIR/NAME: head stages go on from that saved model of an earlier run "
                         "(e.g. runs/heads/heads+ffn0.40); a stage at its MACs only fine-tunes")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.steps, args.samples, args.runs, args.n_train = 3, 32, 2, 256
        args.stages, args.ratios, args.ltp_steps = "0.3", "0.4", 2

    fp32, tok = load_hf("hf:minilm")
    machine = {"platform": platform.platform(), "torch": torch.__version__,
               "threads": args.threads, "time_threads": args.time_threads,
               "note": "2 cores shared with other jobs: compare the ratios"}  # fmt: skip
    if args.time:  # time the saved models of earlier runs, all in one round-robin
        rows, variants, example = [], {}, None
        for d in (Path(x) for x in args.time.split(",")):
            res = json.loads((d / "pruning_encoder.json").read_text())
            for r in res["rows"]:
                r["run"] = str(d)
                variants[r["name"]] = rebuild_variant(fp32, r, d / "models" / f"{r['name']}.pt")
                rows.append(r)
            example = example or torch.load(d / "example.pt", weights_only=True)
        lat = time_rows(fp32, rows, variants, example, args)
        result = {"machine": machine, "args": vars(args), "rows": rows,
                  "fp32_ms": {"pt": lat["pt:fp32"], "ort": lat["ort:fp32"]}}  # fmt: skip
        (out / "timing.json").write_text(json.dumps(result, indent=1))
        print_table(rows, lat)
        return

    t0 = time.perf_counter()
    data = load_data("sentences", model=fp32, tokenizer=tok, max_len=SEQ,
                     n_train=args.n_train, n_test=512)  # fmt: skip
    log(f"data: {data.n_train} train / 512 test sentences ({time.perf_counter() - t0:.0f} s)")
    extra = {}
    if args.extra_text:
        t0 = time.perf_counter()
        data, extra = with_extra_text(data, fp32, tok, args.extra_text.split(","))
        log(f"data + docstrings: {data.n_train} train sentences {extra} "
            f"({time.perf_counter() - t0:.0f} s)")
    pas = passages(tok, list(data.meta["test_text"]) + list(data.meta["train_text"]), 128)
    pas_ref = embed(fp32, pas)

    rows = []
    if "heads" in args.methods:
        start = resumed(fp32, args.resume) if args.resume else None
        rows += head_curve(
            fp32, data, pas, pas_ref, [float(s) for s in args.stages.split(",")], args, start
        )
    if "tokens" in args.methods:
        n_tr, n_te = (64, 32) if args.quick else (args.passages, 128)
        pdata = passage_data(fp32, tok, data, n_tr, n_te)
        log(f"passages: {pdata.n_train} train / {n_te} test")
        # Timed on held-out passages: what a token-pruned model keeps depends on them.
        pas = pdata.x_test
        rows += token_curve(fp32, data, pdata, [float(s) for s in args.ratios.split(",")], args)

    example = {k: v[:32] for k, v in pas.items()}
    (out / "models").mkdir(exist_ok=True)
    torch.save(example, out / "example.pt")
    variants = {}
    for r in rows:
        r["name"] = f"{r['method']}{r['target']:.2f}"
        variants[r["name"]] = model = r.pop("model")
        torch.save(model.state_dict(), out / "models" / f"{r['name']}.pt")
    result = {"machine": machine, "args": vars(args), "macs_fp32": encoder_macs(fp32),
              "params_fp32": param_count(fp32), "extra_text": extra,
              "n_train": data.n_train, "rows": rows}  # fmt: skip
    if not args.no_time:
        lat = time_rows(fp32, rows, variants, example, args)
        result["fp32_ms"] = {"pt": lat["pt:fp32"], "ort": lat["ort:fp32"]}
        print_table(rows, lat)
    (out / "pruning_encoder.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

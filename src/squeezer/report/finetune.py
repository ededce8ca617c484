"""The report's fine-tuning section: the metric before and after quantization-aware training
(``metrics.json["finetune"]``, written by ``squeezer finetune``) and its training curve."""

from __future__ import annotations

from typing import Any

from .render import Run, figure, fmt_num, section, table


@section("Fine-tuning", 27)
def _finetune(run: Run) -> tuple[str, str] | None:
    rec = (run.get("metrics") or {}).get("finetune")
    if not rec or not rec.get("history"):
        return None
    name = rec.get("metric_name") or "metric"
    hist: list[dict[str, Any]] = rec["history"]
    opts = rec.get("options") or {}
    recipe = ", ".join(f"{k} {opts[k]}" for k in ("optimizer", "lr", "batch_size", "distill",
                                                     "lsq", "select") if k in opts)  # fmt: skip
    rows = [
        [f"{name} (test split)", f"FP32 {fmt_num(rec.get('fp32'))}, PTQ {fmt_num(rec.get('ptq'))} "
         f"→ fine-tuned {fmt_num(rec.get('after'))}"],
        ["epochs", f"{len(hist) - 1} (best held-out: epoch {rec.get('best_epoch')}"
         + (", stopped early)" if rec.get("stopped_early") else ")")],
        ["time", f"{rec.get('seconds', 0.0):.1f} s on {rec.get('world_size', 1)} process(es)"],
        ["settings", recipe],
    ]  # fmt: skip
    md, body = table(["", ""], rows)
    curve = [[h["epoch"], h.get("train_loss"), h.get("val_loss"), h.get("val_metric"), h["lr"]]
             for h in hist]  # fmt: skip
    m2, b2 = table(["epoch", "train loss", "held-out loss", f"held-out {name}", "lr"], curve)
    md, body = md + "\n" + m2, body + b2
    if len(hist) > 1 and all(h.get("val_metric") is not None for h in hist):

        def draw(ax: Any) -> None:
            ep = [h["epoch"] for h in hist]
            ax.plot(ep, [h["val_metric"] for h in hist], "o-", label=f"held-out {name}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            losses = [
                (h["epoch"], h["train_loss"]) for h in hist if h.get("train_loss") is not None
            ]
            if losses:
                ax2 = ax.twinx()
                ax2.plot(*zip(*losses, strict=True), "s--", color="tab:orange", label="train loss")
                ax2.set_ylabel("train loss")
                ax2.legend(loc="lower right", fontsize=8)
            ax.legend(loc="lower left", fontsize=8)
            ax.set_title("fine-tuning")

        body += figure(draw, height=3.0)
    return md, body

"""BatchNorm folding before quantization (HAWQ-V3, arXiv:2011.10680, Sec. 3.3):
:func:`fold_batchnorm` folds each BatchNorm that directly follows a conv/linear into that layer's
float weight and bias, so the weight codes quantized afterwards already include it and no BatchNorm
bias is rounded at inference.

Also the pieces :func:`squeezer.integer.to_integer` shares with it: the fx trace that keeps
squeezer's quantized layers as leaves (:func:`_trace`), the layer and BatchNorm types involved,
and a BatchNorm as a per-channel affine map (:func:`_bn_factors`), which ``to_integer`` turns into
a change of scale and an integer bias where a BatchNorm was left unfolded.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..errors import UnsupportedModelError
from ..graph import copy_model, get_module, set_module
from ..quant.modules import QuantMixin


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps squeezer's quantized layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantMixin) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types on dynamic control flow
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}); integer conversion needs "
            "a forward without data-dependent control flow"
        ) from exc
    return torch.fx.GraphModule(model, graph)


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _bn_factors(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, t) in float64 such that ``bn(y) = k · y + t`` per channel (eval mode)."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError(
            "BatchNorm without running statistics cannot be folded; build it with "
            "track_running_stats=True"
        )
    c = bn.running_mean.numel()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(c).double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(c).double()
    k = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    return k, beta - k * bn.running_mean.double()


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm that directly follows a conv/linear folded into it.

    The conv's weight becomes ``w · γ/σ`` (per output channel) and its bias
    ``(b − μ) · γ/σ + β``; the BatchNorm becomes ``nn.Identity``, so layer names (and plans keyed
    by them) are unchanged. Folding uses the running statistics: the result equals ``model`` in eval
    mode (to float round-off). Quantize the folded model, as HAWQ-V3 does, so the weight codes
    already include the BatchNorm.

    Example:
        >>> from squeezer.zoo import create
        >>> net = create("digits_cnn").eval()
        >>> folded = fold_batchnorm(net)
        >>> type(folded.bn1).__name__, folded.conv1.bias is not None
        ('Identity', True)
    """
    out = copy_model(model)
    gm = _trace(out)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(get_module(out, node.target), _BATCHNORMS):
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"):
            continue
        layer = get_module(out, prev.target)
        if type(layer) not in _FOLDABLE or len(prev.users) != 1:
            continue  # only plain float layers whose output feeds this BN alone
        k, t = _bn_factors(get_module(out, node.target))
        w = layer.weight.detach().double()
        layer.weight.copy_((w * k.reshape(-1, *([1] * (w.dim() - 1)))).to(layer.weight.dtype))
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(k)
        layer.bias = nn.Parameter((b * k + t).to(layer.weight.dtype))
        set_module(out, node.target, nn.Identity())
    return out

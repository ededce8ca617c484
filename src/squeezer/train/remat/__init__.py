"""Optimal tensor rematerialization of a training step (Checkmate, arXiv:1910.02653).

Trace a model's forward and backward into a graph of measured segments
(:func:`~squeezer.train.remat.graph.trace_step`), solve Checkmate's MILP for the cheapest schedule
under a peak-memory budget with HiGHS (:func:`~squeezer.train.remat.solve.solve`, with the LP
rounding as fallback), and train by it (:func:`remat` returns a :class:`Rematerialized` model).

Example:
    >>> import torch
    >>> from torch import nn
    >>> g = TrainGraph.chain([1.0, 1.0, 1.0], [10, 10, 10], grads=[2, 2, 2])
    >>> s = solve(g, budget=28)           # below store-all's peak of 32
    >>> s.compute[4]                      # F0 recomputed for B1
    (0, 4)
"""

from .execute import Rematerialized, remat
from .graph import Node, TrainGraph, allocation_peak, trace_step
from .solve import Schedule, simulate, solve, store_all

__all__ = [
    "Node",
    "Rematerialized",
    "Schedule",
    "TrainGraph",
    "allocation_peak",
    "remat",
    "simulate",
    "solve",
    "store_all",
    "trace_step",
]

"""Routers: tokens [G, S, D] -> (routing decision, metrics). Chosen by name from ROUTERS.

A router never touches the experts: it returns a routing object of vmoe/nn/routing.py and
a dict of per-group metrics ([G] arrays). 'auxiliary_loss' [G] is the weighted sum of the
router's losses that the trainer adds to the classification loss. Every router is called
as router(x, train=..., tokens_per_image=T, labels=None|int [B]).
"""
import dataclasses

from vmoe.nn.routers.common import (DISPATCHER_KEYS, capacity_from_config,
                                    expert_choice_metrics, gshard_loss, importance_loss,
                                    load_loss, routing_metrics)
from vmoe.nn.routers.per_image import PerImageRouter
from vmoe.nn.routers.soft import SoftRouter
from vmoe.nn.routers.softmax import NoisyTopExpertsPerItemRouter, NoisyTopItemsPerExpertRouter
from vmoe.nn.routers.transport import (SinkhornTopExpertsPerItemRouter,
                                       SinkhornTopItemsPerExpertRouter,
                                       SparseTransportTopItemsPerExpertRouter)

ROUTERS = {cls.__name__: cls for cls in (
    NoisyTopExpertsPerItemRouter, NoisyTopItemsPerExpertRouter,
    SinkhornTopExpertsPerItemRouter, SinkhornTopItemsPerExpertRouter,
    SparseTransportTopItemsPerExpertRouter, SoftRouter, PerImageRouter)}
# Routers whose slots per expert come from dispatcher.capacity / capacity_factor (Soft MoE
# sizes its slots with its own num_slots / capacity_factor, as in the reference).
HARD_ROUTERS = tuple(n for n in ROUTERS if n != 'SoftRouter')


def router_fields(name: str) -> tuple[str, ...]:
  """Config keys a router accepts (its dataclass fields, plus 'name')."""
  return ('name',) + tuple(f.name for f in dataclasses.fields(ROUTERS[name])
                           if f.name not in ('parent', 'name', 'num_experts', 'num_classes'))

"""Routers: tokens [G, S, D] -> (routing decision, metrics). Chosen by name from ROUTERS.

A router never touches the experts: it returns a routing object of vmoe/nn/routing.py and
a dict of per-group metrics ([G] arrays). 'auxiliary_loss' [G] is the weighted sum of the
router's losses that the trainer adds to the classification loss. Every router is called
as router(x, train=..., labels=None | int [B]); only super-class guided routing reads the
labels.

Its attributes are its config options (vmoe.nn.models fills in the defaults) and what
vmoe.nn.models resolves for it: `num_experts`, `capacity` (slots per expert), and where
the router has them, `batch_priority` and `tokens_per_image`. The class attribute SLOTS
says what fills the slots, hence how the capacity is counted: 'choices' (the S x K
choices of the tokens of a group), 'tokens' (experts choose among the S tokens),
'images' (the K choices of each of the S / T images), 'soft' (Soft MoE's mixed slots).
"""
import dataclasses

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
# Attributes filled in from the resolved model config, not config options.
RESOLVED = ('num_experts', 'capacity', 'batch_priority', 'tokens_per_image')


def attributes(name: str) -> dict[str, object]:
  """{attribute: default (dataclasses.MISSING if none)} of router `name`."""
  return {f.name: f.default for f in dataclasses.fields(ROUTERS[name])
          if f.name not in ('parent', 'name')}


def options(name: str) -> dict[str, object]:
  """{config option: default} of router `name`: its attributes less the resolved ones."""
  return {k: v for k, v in attributes(name).items() if k not in RESOLVED}

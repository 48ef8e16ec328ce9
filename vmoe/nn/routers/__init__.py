"""Routers: tokens [G, S, D] -> (routing decision, metrics). Chosen by name from ROUTERS.

A router never touches the experts: it returns a routing object of vmoe/nn/routing.py and
a dict of per-group metrics ([G] arrays). 'auxiliary_loss' [G] is the weighted sum of the
router's losses that the trainer adds to the classification loss. Every router is called
as router(x, train=..., labels=None | int [B]); only super-class guided routing reads the
labels. PerImageRouter returns a routing.ImageRouting (its choices, and their token-level
SparseRouting with the capacity applied).

Its attributes are its config options (vmoe.nn.models fills in the defaults; the common
ones are those of common.Router) and what vmoe.nn.models resolves for it: `num_experts`,
`capacity` (slots per expert), and where the router has them, `batch_priority`,
`tokens_per_image` and `class_token`. The class attribute SLOTS says what fills the
slots, hence how the capacity is counted: 'choices' (the S x K choices of the tokens of
a group), 'tokens' (experts choose among the S tokens), 'images' (the K choices of each
of the S / T images), 'soft' (Soft MoE's mixed slots).

The reference's class names are aliases (ALIASES), and the reference's options that
mean nothing here are accepted with no effect (INERT, docs/routers.md).
"""
import dataclasses

from vmoe.nn.routers.per_image import PerImageRouter
from vmoe.nn.routers.soft import SoftRouter
from vmoe.nn.routers.softmax import NoisyTopExpertsPerItemRouter, NoisyTopItemsPerExpertRouter
from vmoe.nn.routers.transport import (KSparseTransportTopExpertsPerItemRouter,
                                       KSparseTransportTopItemsPerExpertRouter,
                                       SinkhornTopExpertsPerItemRouter,
                                       SinkhornTopItemsPerExpertRouter,
                                       SparseTransportTopItemsPerExpertRouter)

ROUTERS = {cls.__name__: cls for cls in (
    NoisyTopExpertsPerItemRouter, NoisyTopItemsPerExpertRouter,
    SinkhornTopExpertsPerItemRouter, SinkhornTopItemsPerExpertRouter,
    SparseTransportTopItemsPerExpertRouter, KSparseTransportTopItemsPerExpertRouter,
    KSparseTransportTopExpertsPerItemRouter, SoftRouter, PerImageRouter)}
# The reference's names (google-research/vmoe, projects/sparsity_constrained_ot).
ALIASES = {
    'KLProjectionNoisyTopExpertsPerItemRouter': 'SinkhornTopExpertsPerItemRouter',
    'KLProjectionNoisyTopItemsPerExpertRouter': 'SinkhornTopItemsPerExpertRouter',
    'SparseProjectionTransportTopItemsPerExpertRouter':
        'SparseTransportTopItemsPerExpertRouter',
    'KSparseProjectionTransportTopItemsPerExpertRouter':
        'KSparseTransportTopItemsPerExpertRouter',
    'KSparseProjectionTransportTopExpertsPerItemRouter':
        'KSparseTransportTopExpertsPerItemRouter',
}
# Attributes filled in from the resolved model config, not config options.
RESOLVED = ('num_experts', 'capacity', 'batch_priority', 'tokens_per_image', 'class_token')
# Options of the reference's routers that have no meaning here: accepted with no effect
# (and logged once at start-up), {option: why}.
INERT = {
    'partition_spec': 'sharding comes from config.mesh: the MoE layer pins the groups and '
                      'the expert buffers to the mesh itself',
    'use_lbfgs': 'the entropic plan is always solved by Sinkhorn iterations',
    'use_implicit_differentiation': 'gradients through a plan differentiate the unrolled '
                                    'solver iterations',
    'adam_lr': 'this L2 plan is solved exactly (block-coordinate ascent), without Adam',
}
INERT_OPTIONS = {
    'SinkhornTopExpertsPerItemRouter': ('use_lbfgs', 'use_implicit_differentiation'),
    'SinkhornTopItemsPerExpertRouter': ('use_implicit_differentiation',),
    'SparseTransportTopItemsPerExpertRouter': ('adam_lr',),
    'SoftRouter': ('partition_spec',),
}


def canonical(name: str) -> str:
  """A router class name of ROUTERS for `name` (itself or the reference's alias)."""
  return ALIASES.get(name, name)


def attributes(name: str) -> dict[str, object]:
  """{attribute: default (dataclasses.MISSING if none)} of router `name`."""
  return {f.name: f.default for f in dataclasses.fields(ROUTERS[name])
          if f.name not in ('parent', 'name')}


def options(name: str) -> dict[str, object]:
  """{config option: default} of router `name`: its attributes less the resolved ones."""
  return {k: v for k, v in attributes(name).items() if k not in RESOLVED}

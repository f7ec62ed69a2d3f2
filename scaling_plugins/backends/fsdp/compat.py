"""Everything the FSDP2 backend touches beyond ``torch.distributed.fsdp``'s public API, for the versions checked here.

torch 2.13 is the version this is verified against; importing this module with another minor version raises
``ImportError`` naming the supported ones, instead of an ``AttributeError`` inside a step. What lives here:

- the ``ReduceScatter`` interface that ``FSDPModule.set_custom_reduce_scatter`` takes (torch exports the method,
  not the class) and the default one torch installs, to tell a reduce-scatter the user set;
- each FSDP unit's parameter groups (``FSDPParamGroup``) and what the backend reads of them: the sharded
  parameters they manage, their mixed-precision policy, the factor their gradients are divided by before the
  reduce-scatter, and whether the user changed the gradient divide factor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from ..shared.versions import require_supported_version

SUPPORTED_VERSIONS = ("2.13.",)     # version prefixes
VERIFIED = "2.13.0"

require_supported_version("torch", torch.__version__, SUPPORTED_VERSIONS, VERIFIED, by="scaling_plugins' FSDP2 backend")

from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter  # noqa: E402  (after the version check)
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (  # noqa: E402
    DefaultReduceScatter, _get_gradient_divide_factors)
from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, FSDPMeshInfo  # noqa: E402

__all__ = ["ReduceScatter", "param_groups", "managed_parameters", "has_custom_reduce_scatter", "reduce_dtype",
           "predivide_factor", "divides_by_custom_factor"]


def param_groups(unit: FSDPModule) -> list[Any]:
    """The ``FSDPParamGroup``s of one FSDP unit (none when ``fully_shard`` got no parameters for it)."""
    return list(unit._get_fsdp_state()._fsdp_param_groups)


def managed_parameters(group: Any) -> list[torch.nn.Parameter]:
    """The sharded parameters (DTensors) a parameter group reduces."""
    return [fsdp_param.sharded_param for fsdp_param in group.fsdp_params]


def has_custom_reduce_scatter(group: Any) -> bool:
    """Whether the group's reduce-scatter is not torch's default (the user, or another library, set one)."""
    return type(group._reduce_scatter_comm) is not DefaultReduceScatter


def reduce_dtype(group: Any) -> torch.dtype:
    """The dtype the group's gradients are reduced in: the policy's ``reduce_dtype``, else its ``param_dtype``,
    else the parameters' own."""
    policy = group.mp_policy
    return policy.reduce_dtype or policy.param_dtype or group.fsdp_params[0].sharded_param.dtype


def predivide_factor(group: Any) -> float:
    """The factor FSDP divides a parameter group's packed gradients by before their reduce-scatter (its own rule,
    ``_get_gradient_divide_factors``: about √W for fp16 reduction, against overflow; 1 for fp32 and bf16, which
    ``ReduceOp.AVG`` averages)."""
    reduce_scatter = group._reduce_scatter_process_group if isinstance(group.mesh_info, FSDPMeshInfo) else None
    all_reduce = group._all_reduce_process_group if isinstance(group.mesh_info, DDPMeshInfo) else None
    factor, *_ = _get_gradient_divide_factors(reduce_scatter, all_reduce, reduce_dtype(group), group.device.type,
                                              group.gradient_divide_factor, group.force_sum_reduction_for_comms)
    return float(factor or 1.0)


def divides_by_custom_factor(group: Any) -> bool:
    """Whether the user set a gradient divide factor (``set_gradient_divide_factor``): the reduction is then not
    the average over ranks."""
    return group.gradient_divide_factor is not None

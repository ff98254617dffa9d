"""Find the model inside the wrappers that training puts around it.

``DistributedDataParallel`` (and ``DataParallel``) keep the model in ``.module``; a module compiled
with ``torch.compile`` is an ``OptimizedModule`` keeping it in ``._orig_mod``; the two nest in
either order. A curvature product differentiates the model itself: DDP's forward would
synchronise buffers and register gradient hooks (hooks that ``torch.func`` transforms bypass
anyway; DDP's buffer broadcast breaks them, pytorch#130932), and a compiled module would be
traced once per transform. Compile the product instead, as the rest of hessfunc does.

Only modules whose classes are already imported are looked for, so this never imports
``torch._dynamo`` or ``torch.distributed.fsdp``.
"""

from __future__ import annotations

import sys

from torch import nn


def _optimized_module() -> type | None:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def fsdp2_module(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) was sharded with ``fully_shard`` (FSDP2)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and any(isinstance(m, cls) for m in module.modules())


def unwrap_module(module: nn.Module, where: str, *, allow_sharded: bool = False) -> nn.Module:
    """The innermost model: strips DDP / DataParallel and ``torch.compile`` wrappers."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    for _ in range(64):  # wrappers nest a few levels at most; a cycle would be a bug elsewhere
        optimized = _optimized_module()
        if isinstance(module, parallel):
            module = module.module
        elif optimized is not None and isinstance(module, optimized):
            module = module._orig_mod
        else:
            break
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    fsdp1_cls = getattr(fsdp1, "FullyShardedDataParallel", None)
    if fsdp1_cls is not None and any(isinstance(m, fsdp1_cls) for m in module.modules()):
        raise TypeError(
            f"{where}: the module is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
            "parameters torch.func cannot differentiate. Shard it with "
            "torch.distributed.fsdp.fully_shard (FSDP2) and use "
            "hessfunc.distributed.from_sharded(module), or differentiate an unsharded copy."
        )
    if not allow_sharded and fsdp2_module(module):
        raise TypeError(
            f"{where}: the module is sharded with fully_shard (FSDP2); its forward hooks gather "
            "and swap the parameters, which functional_call cannot replace. Use "
            "hessfunc.distributed.from_sharded(module) instead, and mode='rev-rev' for its "
            "products."
        )
    return module

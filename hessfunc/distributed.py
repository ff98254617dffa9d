r"""Curvature across processes with ``torch.distributed``: data parallel and sharded models.

**Data parallel (DDP, or any per-rank data).** Each rank sums the products of its own batches,
then one all-reduce adds the ranks' sums (and counts), and the mean divides once::

    apply, params = hessfunc.from_module(ddp_model)   # DDP / torch.compile wrappers unwrapped
    loss = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")
    op = hessfunc.data.linear_operator(
        lambda v, X, y: hessfunc.hvp(loss, params, v, X, y), local_loader,
        count=lambda X, y: len(y), reduce=hessfunc.distributed.AllReduce())
    Hv = op(v)   # the full-data mean Hessian-vector product, identical on every rank

Ranks may hold different numbers of examples and of batches: each product is exactly one
collective per rank, whatever happened locally.

**Why the collective stays outside every transform and compiled region.** A reduction inside
``fn`` would run under ``grad`` / ``jvp`` / ``vmap``, and on torch 2.13 collectives there are
wrong or fail: the functional all-reduce raises under ``grad`` (its autograd function has no
``setup_context``), returns a *zero tangent* under ``jvp``, and under ``vmap`` has no
batching rule: the fallback stacks buffers it never waits for (the un-reduced inputs, in probes
here); the deprecated ``torch.distributed.nn.functional.all_reduce`` raises under all
three (pinned in ``tests/dist_checks.py``). The sum over ranks of the products equals the product
of the summed loss, so nothing is lost by reducing afterwards, and the reduction then costs one
collective per product instead of one per layer and per transform level. :class:`AllReduce`
refuses to run inside a transform or while compiling, so a misplaced reduction fails loudly.

**Sharded parameters (FSDP2 ``fully_shard``, tensor parallel ``DTensor``).**
:func:`from_sharded` gives ``(apply, params)`` with ``params`` the ``DTensor`` parameters and
``apply`` a hook-free copy of the module whose own parameters live on the ``meta`` device, so
the products differentiate the ``DTensor`` parameters directly and DTensor's sharding rules do
the communication, inside the transforms, with their own derivatives. Batches enter as
``DTensor`` too: :func:`replicate_batch` (the same batch on every rank, tensor-parallel style)
or :func:`shard_batch` (each rank its slice, data-parallel style). Use ``mode="rev-rev"``:
forward-mode AD has no DTensor sharding rules on torch 2.13 (the FSDP2 report is
pytorch#182641), and the products raise a ``NotImplementedError`` that says so.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._base import _tree
from ._base._types import PyTree
from ._base._unwrap import unwrap_module
from .products.module import from_module

__all__ = ["AllReduce", "from_sharded", "replicate_batch", "shard_batch", "unwrap"]


def _transforms() -> list[str]:
    """Names of the ``torch.func`` transforms active around the caller (innermost first)."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # the private module moved: fall back to the C++ stack's top
        top = torch._C._functorch.peek_interpreter_stack()
        return [] if top is None else [str(top.key())]
    return [str(i.key()).rsplit(".", 1)[-1] for i in retrieve_all_functorch_interpreters()]


def _is_dtensor(x: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(x, cls)


def _require_process_group(where: str) -> None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{where}: torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group(...) in every process first, or pass "
            "reduce=None in a single process."
        )


@dataclass(frozen=True)
class AllReduce:
    """Sum a pytree of tensors over the processes of a group: the ``reduce=`` of hessfunc.data.

    Every leaf is flattened into one buffer, all-reduced with one ``SUM`` collective and split
    back, so a dataset product (its sum and its count together) costs one collective. The
    buffer has the leaves' common floating dtype, at least float32; integer leaves (example
    counts) travel in it and are rounded back, exact up to :math:`2^{24}` in a float32 buffer
    and :math:`2^{53}` in float64 (beyond that, a relative error of float32's precision, as in
    the products themselves).

    It must run outside ``torch.func`` transforms and compiled regions (see the module
    docstring) and refuses otherwise; products of sharded ``DTensor`` parameters already span
    the mesh, and it refuses those too.

    Args:
        group: the process group (``None``: the default group).

    Returns:
        Called on a pytree, a pytree of the same structure, dtypes and devices: the sum over
        the group's processes, identical on every rank.

    Cost:
        One all-reduce of the total number of elements (plus one per call for a count), and a
        copy into and out of the buffer.

    Example:
        In a world of one process the sum is the input itself:

        >>> import os, tempfile, torch, torch.distributed as dist, hessfunc
        >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "rendezvous"), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> hessfunc.distributed.AllReduce()({"g": torch.ones(2), "n": torch.tensor(3)})
        {'g': tensor([1., 1.]), 'n': tensor(3)}
        >>> dist.destroy_process_group()
    """

    group: Any = None

    def __call__(self, tree: PyTree) -> PyTree:
        """All-reduce ``tree`` (sum) in one collective."""
        where = "hessfunc.distributed.AllReduce(group)(tree)"
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{where}: called while compiling. Keep the reduction outside compiled code: "
                "compile the per-batch product and run the data loop eagerly."
            )
        active = _transforms()
        if active:
            raise RuntimeError(
                f"{where}: called inside torch.func transform(s) {', '.join(active)}, where "
                "collectives are wrong or fail on current torch (a zero tangent under jvp, "
                "un-reduced values under vmap). Reduce outside: pass reduce= to "
                "hessfunc.data.sum_over / mean_over / linear_operator, which reduce after the "
                "products."
            )
        _require_process_group(where)
        leaves, spec = _tree.tree_flatten(tree)
        paths = _tree.tree_paths(tree)
        for path, leaf in zip(paths, leaves, strict=True):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{where}: leaf {path} is {type(leaf).__name__}, not a tensor.")
            if _is_dtensor(leaf):
                raise TypeError(
                    f"{where}: leaf {path} is a DTensor. Products of sharded parameters "
                    "(from_sharded) already span the mesh; use reduce=None for them."
                )
            if leaf.dtype == torch.bool or leaf.is_complex():
                raise TypeError(f"{where}: leaf {path} has dtype {leaf.dtype}; cannot sum it.")
            if leaf.device != leaves[0].device:
                raise ValueError(
                    f"{where}: leaf {path} is on {leaf.device}, the first on {leaves[0].device}; "
                    "move every leaf to one device."
                )
        if not leaves:
            return tree
        dtype = torch.float32
        for leaf in leaves:
            if leaf.is_floating_point():
                dtype = torch.promote_types(dtype, leaf.dtype)
        buffer = torch.cat([leaf.detach().reshape(-1).to(dtype) for leaf in leaves])
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM, group=self.group)
        parts = torch.split(buffer, [leaf.numel() for leaf in leaves])
        out = []
        for part, leaf in zip(parts, leaves, strict=True):
            part = part.reshape(leaf.shape)
            out.append(
                part.to(leaf.dtype) if leaf.is_floating_point() else part.round().to(leaf.dtype)
            )
        return _tree.tree_unflatten(spec, out)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers.

    :func:`hessfunc.from_module` does this itself, so products differentiate the model, not
    DDP's forward (which synchronises buffers and registers hooks, pytorch#130932) or a
    compiled module (traced again under every transform: compile the product instead). The
    wrappers nest in either order.

    Args:
        module: a module, possibly wrapped.

    Returns:
        The innermost module (the same object the wrappers hold, not a copy).

    Cost:
        Free.

    Example:
        >>> import torch, hessfunc
        >>> net = torch.nn.Linear(2, 1)
        >>> hessfunc.distributed.unwrap(torch.compile(net)) is net
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"hessfunc.distributed.unwrap(module): expected an nn.Module, got "
            f"{type(module).__name__}."
        )
    return unwrap_module(module, "hessfunc.distributed.unwrap(module)", allow_sharded=True)


# ----------------------------------------------------------------------------- sharded models

_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_FSDP_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
_HOOK_FLAGS = {
    "_forward_pre_hooks_with_kwargs": "_forward_pre_hooks",
    "_forward_hooks_with_kwargs": "_forward_hooks",
    "_forward_hooks_always_called": "_forward_hooks",
}


def _from_torch_distributed(obj: Any) -> bool:
    fn = getattr(obj, "__func__", obj)  # bound method
    fn = getattr(fn, "func", fn)  # functools.partial
    return (getattr(fn, "__module__", None) or "").startswith("torch.distributed")


def _plain_class(cls: type) -> type:
    """The user's class behind FSDP2's generated ``FSDP<Name>(FSDPModule, Name)`` class."""
    for c in cls.__mro__:
        if not (c.__module__ or "").startswith("torch.distributed"):
            return c
    return nn.Module


def _replicated(buf: Any, mesh: Any) -> Any:
    """A plain buffer as a ``Replicate()`` DTensor on ``mesh`` (no communication, no copy)."""
    if mesh is None or not isinstance(buf, torch.Tensor) or _is_dtensor(buf):
        return buf
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(buf, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _hook_free_copy(module: nn.Module, memo: dict[int, Any], mesh: Any = None) -> nn.Module:
    """A copy of ``module`` without torch.distributed's hooks, trainable parameters on meta.

    The copy shares everything else (frozen parameters, attributes, user hooks) with the
    original; only dictionaries are new, so nothing of the original changes. ``memo`` keeps
    shared submodules and tied parameters shared. With a ``mesh`` (the parameters' own), plain
    buffers enter the copy as ``Replicate()`` DTensors viewing the same memory: FSDP2 leaves
    buffers unsharded because its forward all-gathers the parameters into plain tensors, but
    here the parameters stay DTensors, and DTensor refuses to mix them with a plain tensor
    (eval-mode BatchNorm statistics, a registered scale or mask).
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = _plain_class(type(module))
    copy = cls.__new__(cls)
    memo[id(module)] = copy
    state = {
        k: v
        for k, v in module.__dict__.items()
        if not (k.startswith("__composable_api_state_key") or k in _FSDP_FLAGS)
    }
    for key in _HOOKS:
        if key in state:
            state[key] = OrderedDict(
                (i, h) for i, h in state[key].items() if not _from_torch_distributed(h)
            )
    for key, hooks in _HOOK_FLAGS.items():
        if key in state:
            state[key] = type(state[key])(
                (i, f) for i, f in state[key].items() if i in state[hooks]
            )
    params = {}
    for name, p in module._parameters.items():
        if p is None or not p.requires_grad:
            params[name] = p
        elif id(p) in memo:
            params[name] = memo[id(p)]
        else:
            memo[id(p)] = params[name] = nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=True
            )
    state["_parameters"] = params
    state["_buffers"] = {name: _replicated(b, mesh) for name, b in module._buffers.items()}
    state["_modules"] = {
        name: None if m is None else _hook_free_copy(m, memo, mesh)
        for name, m in module._modules.items()
    }
    copy.__dict__.update(state)
    return copy


def from_sharded(module: nn.Module) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    r"""``(apply, params)`` for a model with sharded parameters (FSDP2, tensor parallel).

    ``params`` are the module's trainable ``DTensor`` parameters (detached, not copied), in
    ``named_parameters()`` order. ``apply(params, *args)`` runs a copy of the module without
    torch.distributed's hooks, its own parameters on the ``meta`` device, through
    :func:`hessfunc.from_module`'s strict ``functional_call``. FSDP2's hooks would all-gather
    and swap the parameters under the transforms, and tensor parallelism's input hooks convert
    tensors with ``DTensor.from_local``, an autograd function that ``torch.func`` refuses; here
    DTensor's sharding rules do all communication, with derivatives, and products come out as
    ``DTensor``\ s on the parameters' mesh (their placements are those DTensor's propagation
    chose, e.g. ``Shard(1)`` where the parameter is ``Shard(0)``; ``.full_tensor()`` or
    ``.redistribute(mesh, placements)`` when a layout matters).

    Buffers the forward reads (eval-mode BatchNorm statistics, a registered scale or mask),
    which FSDP2 leaves as plain tensors, enter the copy as ``Replicate()`` DTensors on the
    parameters' mesh, viewing the same memory; the module's own buffers are not touched.

    Inputs must be ``DTensor``\ s on the same mesh: :func:`replicate_batch` when every rank
    passes the same batch, :func:`shard_batch` when each rank passes its slice (the product is
    then over the concatenated batch). Targets in the loss too. Products need
    ``mode="rev-rev"``; ``ggn_vp`` also needs a :mod:`hessfunc.losses` object (its output-space
    product is closed-form; an autodiff loss uses forward mode there). Do not pass
    ``reduce=AllReduce()`` to data loops over these products: they already span the mesh.

    Args:
        module: a module whose parameters are ``DTensor``\ s, after ``fully_shard`` and/or
            ``parallelize_module`` (wrappers as in :func:`unwrap` are looked through).

    Returns:
        ``(apply, params)`` as from :func:`hessfunc.from_module`. A product with
        ``mode="fwd-rev"`` raises ``NotImplementedError`` naming the fix.

    Cost:
        A shallow copy of the module structure; no parameter is gathered or copied. ``apply``
        costs one sharded forward, with DTensor's collectives.

    Example:
        On an unsharded module ``params`` are plain tensors and the products as usual:

        >>> import torch, hessfunc
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> apply, params = hessfunc.distributed.from_sharded(lin)
        >>> X = torch.eye(2, dtype=torch.float64)
        >>> f = lambda p, X: apply(p, X).pow(2).sum()
        >>> v = {"weight": torch.ones(1, 2, dtype=torch.float64)}
        >>> hessfunc.hvp(f, params, v, X, mode="rev-rev")["weight"].tolist()
        [[2.0, 2.0]]
    """
    where = "hessfunc.distributed.from_sharded(module)"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(module).__name__}.")
    module = unwrap_module(module, where, allow_sharded=True)
    mesh = next((p.device_mesh for p in module.parameters() if _is_dtensor(p)), None)
    template = _hook_free_copy(module, {}, mesh)
    plain_apply, _ = from_module(template)
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def apply(params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        try:
            return plain_apply(params, *args, **kwargs)
        except RuntimeError as err:
            if "mixed torch.Tensor and DTensor" not in str(err):
                raise
            active = _transforms()
            if "Jvp" in active:
                # under forward mode (hvps's default vmaps a jvp) the plain tensor is a
                # tangent, not the user's batch: the fix is the mode, as for hvp and ggn_vp
                raise NotImplementedError(
                    f"{where} apply: forward-mode AD has no DTensor sharding rules on current "
                    "torch (pytorch#182641), so mode='fwd-rev' cannot run on sharded "
                    f"parameters ({' / '.join(active)} active). Pass "
                    "mode='rev-rev'."
                ) from err
            raise RuntimeError(
                f"{where} apply: the parameters are DTensors but an input is a plain tensor. "
                "Convert each batch (inputs and targets) outside the product: "
                "hessfunc.distributed.replicate_batch(batch, mesh) when every rank passes the "
                "same batch, shard_batch(batch, mesh) when each passes its slice."
            ) from err

    return apply, params


def _mesh_of(where: str, mesh: Any) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"{where}: mesh must be a DeviceMesh (e.g. next(iter(params.values())).device_mesh), "
            f"got {type(mesh).__name__}."
        )
    return mesh


def replicate_batch(batch: PyTree, mesh: Any) -> PyTree:
    """Every tensor of ``batch`` as a ``DTensor`` replicated on ``mesh`` (no communication).

    For products through :func:`from_sharded` when every rank passes the *same* batch (as in
    tensor parallelism). Nothing checks that the ranks agree: a rank with different data makes
    the product meaningless. Call it outside the product (``DTensor.from_local`` cannot run
    inside ``torch.func`` transforms).

    Args:
        batch: a pytree (tuple, dict, ...) whose tensor leaves are this rank's copy.
        mesh: the ``DeviceMesh`` of the parameters.

    Returns:
        ``batch`` with every tensor leaf a ``DTensor`` placed ``Replicate()`` on every mesh
        dimension; other leaves unchanged.

    Cost:
        Free (a view of each tensor).

    Example:
        >>> import os, tempfile, torch, torch.distributed as dist, hessfunc
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "rendezvous"), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> X, y = hessfunc.distributed.replicate_batch(
        ...     (torch.ones(3, 2), torch.zeros(3)), init_device_mesh("cpu", (1,)))
        >>> X.placements, tuple(y.shape)
        ((Replicate(),), (3,))
        >>> dist.destroy_process_group()
    """
    from torch.distributed.tensor import DTensor, Replicate

    where = "hessfunc.distributed.replicate_batch(batch, mesh)"
    mesh = _mesh_of(where, mesh)
    placements = [Replicate()] * mesh.ndim

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or _is_dtensor(x):
            return x
        return DTensor.from_local(x, mesh, placements, run_check=False)

    return _tree.tree_map(one, batch)


def shard_batch(batch: PyTree, mesh: Any, *, dim: int = 0) -> PyTree:
    """The local slice of a batch as a ``DTensor`` sharded along ``dim`` over a 1-D ``mesh``.

    For products through :func:`from_sharded` when each rank holds part of the batch (data
    parallel with sharded parameters): the product is then over the concatenation of the
    slices, in rank order. DTensor lays shards out as ``torch.chunk`` does, so the slice sizes
    must be ``torch.chunk``'s for the total (e.g. 6 and 5 for 11 on two ranks); other splits are
    refused with the sizes to use.

    Args:
        batch: a pytree whose tensor leaves share this rank's batch size along ``dim``.
        mesh: a one-dimensional ``DeviceMesh`` (the parameters').
        dim: the batch axis of every tensor leaf.

    Returns:
        ``batch`` with every tensor leaf a ``DTensor`` placed ``Shard(dim)`` with the global
        shape; other leaves unchanged.

    Cost:
        One small all-gather (the slice sizes); no data moves.

    Example:
        >>> import os, tempfile, torch, torch.distributed as dist, hessfunc
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "rendezvous"), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> batch = {"x": torch.ones(3, 2), "y": torch.zeros(3)}
        >>> sharded = hessfunc.distributed.shard_batch(batch, init_device_mesh("cpu", (1,)))
        >>> sharded["x"].placements, tuple(sharded["x"].shape)
        ((Shard(dim=0),), (3, 2))
        >>> dist.destroy_process_group()
    """
    from torch.distributed.tensor import DTensor, Shard

    where = "hessfunc.distributed.shard_batch(batch, mesh)"
    mesh = _mesh_of(where, mesh)
    if mesh.ndim != 1:
        raise ValueError(
            f"{where}: mesh has {mesh.ndim} dimensions; pass the 1-D data-parallel sub-mesh "
            "(e.g. mesh['dp'])."
        )
    _require_process_group(where)
    leaves, spec = _tree.tree_flatten(batch)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor) and not _is_dtensor(x)]
    if not tensors:
        return batch
    sizes = {x.shape[dim] for x in tensors}
    if len(sizes) != 1:
        raise ValueError(f"{where}: the tensors disagree on the batch size along {dim}: {sizes}.")
    world = mesh.size()
    local = torch.tensor([sizes.pop()], dtype=torch.int64, device=tensors[0].device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local, group=mesh.get_group())
    counts = [int(c) for c in torch.cat(gathered).cpu()]
    total = sum(counts)
    layout = [len(c) for c in torch.arange(total).chunk(world)]
    layout += [0] * (world - len(layout))
    if counts != layout:
        raise ValueError(
            f"{where}: the ranks hold {counts} examples; DTensor's layout for {total} on "
            f"{world} ranks is {layout} (torch.chunk). Split the batch that way, or give every "
            "rank the same number."
        )

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or _is_dtensor(x):
            return x
        shape = list(x.shape)
        shape[dim] = total
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            x, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride
        )

    return _tree.tree_unflatten(spec, [one(x) for x in leaves])

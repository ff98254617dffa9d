r"""The output covariance :math:`J \Sigma J^\top` of a Laplace posterior, structure by structure.

For inputs :math:`x_n` the linearised predictive needs, per sample, the ``C x C`` matrix
:math:`J_n \Sigma J_n^\top` with :math:`J_n = \partial f(x_n) / \partial \theta` (``C`` outputs,
``n`` parameters) and :math:`\Sigma = P^{-1}`. Forming the per-sample Jacobians costs ``m C n``
numbers; this module avoids them where the structure of :math:`\Sigma` allows.

**Layers.** For a layer :math:`z = W a` found by the K-FAC recorder (``F.linear``, ``F.conv*d``,
``x @ W``), the Jacobian of output :math:`c` of sample :math:`n` with respect to :math:`W` is
:math:`\sum_t b_{nct} a_{nt}^\top`, summed over the positions :math:`t` where the weight is
shared (one position for a plain linear layer), with :math:`a_{nt}` the layer's input and
:math:`b_{nct} = \partial f_c / \partial z_{nt}` its output gradient. One forward pass and ``C``
pullbacks of the output basis (vectorised) give every :math:`a` and :math:`b` for the whole
batch: the layer inputs and ``C`` output-gradient vectors per layer, never a ``(C, n)`` row.
A bias is the same with :math:`a = 1`.

**K-FAC.** On a block with eigenbases :math:`Q_A, Q_G`, eigenvalues :math:`\lambda, \mu` and
prior :math:`\delta`, with :math:`p = Q_A^\top a` and :math:`q_c = Q_G^\top b_c`,

.. math:: (J \Sigma J^\top)_{cc'} = \sum_{ij} \frac{\tilde J_{c,ij} \tilde J_{c',ij}}{f \mu_i
   \lambda_j + \delta}, \qquad \tilde J_c = \sum_t q_{ct} p_t^\top,

which for one position is :math:`\sum_i q_{ci} q_{c'i} \sum_j p_j^2 / (f\mu_i\lambda_j +
\delta)`: ``O(out x in)`` per sample plus ``O(C^2 out)``, and nothing of size ``C x in x out``.
With several positions :math:`\tilde J_c` (``out x in`` per sample and output, the size of the
layer alone) is formed.

**Diagonal** :math:`\Sigma = \operatorname{diag}(\sigma)`: the same sums with :math:`Q = I` and
:math:`\sigma` in place of the inverse eigenvalues. **Low rank** :math:`P = P_0 + W W^\top`:
Woodbury gives :math:`J P_0^{-1} J^\top - (J U) C^{-1} (J U)^\top` with :math:`U = P_0^{-1} W`;
:math:`J U` is ``k`` forward-mode products (``jvp``) over the batch and the first term is the
diagonal case. **Full** and **matrix-free** need the rows :math:`J_n` themselves (a dense or CG
:math:`\Sigma`); they are assembled from the layers' :math:`b \otimes a`, which for
``subset="last_layer"`` is the closed form :math:`e_c \otimes a` plus the bias.

Leaves no layer covers (a normalisation's scale, a bare parameter, an embedding) take the
per-sample Jacobian with respect to those leaves only. Samples are axis 0 of every covered
layer's input and of the outputs, and do not interact (as in :func:`hessfunc.kfac`); where a
layer's rows are not the samples, or the layers found on the inputs differ from the fitted
ones, :func:`rows` and :func:`variance` return ``None`` and the caller uses the per-sample
Jacobians.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.func import jacrev, jvp, vjp, vmap

from .._base import _context, _tree
from ..kron._kron import gather
from ..kron._layers import Call, Layout, Recorder, block_grads, block_inputs, plan
from . import _problem, evidence
from .structures import Diag, Kron, LowRank

if TYPE_CHECKING:
    from .posterior import LaplacePosterior

Tensor = torch.Tensor
WHERE = "hessfunc.laplace.LaplacePosterior.predictive(*inputs)"


class Layers(NamedTuple):
    """What the layers of the posterior's subset see on one batch of inputs."""

    layout: Layout
    inputs: tuple[Tensor, ...]
    """Per block ``(m, P, groups, size)``: every call's positions concatenated."""
    grads: tuple[Tensor, ...]
    """Per block ``(C, m, P, groups, out)``: the output gradients of the ``C`` outputs."""
    uncovered: tuple[int, ...]
    """Subset leaves no block covers."""


def subset_leaves(problem: _problem.Problem) -> tuple[Tensor, ...]:
    leaves = _tree.tree_leaves(problem.params)
    return tuple(leaves[i].detach() for i in problem.index)


def layers(problem: _problem.Problem, inputs: tuple) -> Layers | None:
    """Inputs and output gradients of every covered layer, or ``None`` where rows are not samples.

    One forward pass finds the layers; a second, with a zero probe added to each layer output,
    runs under ``vjp``, and pulling back the ``C`` output basis vectors (vectorised) gives each
    layer's output gradients for every sample at once.
    """
    sub = subset_leaves(problem)
    leaves = list(sub)
    calls: list[Call] = []
    others: dict[int, str] = {}
    with _context.attention_fastpath_off(), Recorder(leaves, calls, others):
        out = problem.model_tree(sub, *inputs)
    if not isinstance(out, Tensor) or out.dim() == 0:
        return None
    layout, block_calls = plan(WHERE, calls, others, leaves, list(problem.names), True)
    covered = {i for b in layout.blocks for i in (b.weight, b.bias) if i is not None}
    uncovered = tuple(i for i in range(len(sub)) if i not in covered)
    if not layout.blocks:
        return Layers(layout, (), (), uncovered)
    m = out.shape[0]
    probes = [torch.zeros(c.out_shape, dtype=c.x.dtype, device=c.x.device) for c in calls]

    def forward(pr: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        again: list[Call] = []
        with _context.attention_fastpath_off(), Recorder(leaves, again, {}, pr):
            y = problem.model_tree(sub, *inputs)
        return y, [c.x for c in again]

    y, pull, xs = vjp(forward, probes, has_aux=True)
    if len(xs) != len(calls):
        return None  # a model that runs other layers on a second call: use the Jacobians
    c = y[0].numel()
    basis = torch.eye(c, dtype=y.dtype, device=y.device).reshape(c, 1, *y.shape[1:])
    per_call = vmap(pull)(basis.expand(c, *y.shape))[0]
    calls = [k._replace(x=x) for k, x in zip(calls, xs, strict=True)]
    ins, grads = [], []
    for block, ks in zip(layout.blocks, block_calls, strict=True):
        a = [block_inputs(block, calls[k]) for k in ks]
        g = [block_grads(block, calls[k], per_call[k]) for k in ks]
        if any(t.shape[0] != m for t in a):
            return None  # this layer's rows are not the samples
        ins.append(torch.cat(a, 1) if len(a) > 1 else a[0])
        grads.append(torch.cat(g, 2) if len(g) > 1 else g[0])
    return Layers(layout, tuple(ins), tuple(grads), uncovered)


def leaf_jacobians(problem: _problem.Problem, inputs: tuple, which: tuple[int, ...]) -> list:
    """Per-sample Jacobians ``(m, C, numel)`` with respect to the subset leaves ``which`` only."""
    if not which:
        return []
    sub = subset_leaves(problem)

    def one(some: tuple[Tensor, ...], *xs: Any) -> Tensor:
        full = list(sub)
        for i, t in zip(which, some, strict=True):
            full[i] = t
        return problem.model_tree(tuple(full), *(x.unsqueeze(0) for x in xs))[0].reshape(-1)

    jac = vmap(jacrev(one), in_dims=(None, *([0] * len(inputs))))
    out = jac(tuple(sub[i] for i in which), *inputs)
    return [j.reshape(j.shape[0], j.shape[1], -1) for j in out]


def _block_gram(a: Tensor, g: Tensor, w: Tensor, qa: Tensor | None, qg: Tensor | None) -> Tensor:
    r"""``(m, C, C)``: :math:`\sum_{ij} \tilde J_{c,ij} \tilde J_{c',ij} w_{ij}` per group, summed.

    ``a`` ``(m, P, G, S)``, ``g`` ``(C, m, P, G, O)``, ``w`` ``(G, O, S)``; ``qa`` ``(G, S, S)``
    and ``qg`` ``(G, O, O)`` rotate into an eigenbasis (``None``: the identity).
    """
    if qa is not None:
        a = torch.einsum("npgs,gst->npgt", a, qa)
    if qg is not None:
        g = torch.einsum("cnpgo,gor->cnpgr", g, qg)
    if a.shape[1] == 1:  # one position: J~_c = q_c p^T, never formed
        v = torch.einsum("ngs,gos->ngo", a[:, 0].square(), w)
        q = g[:, :, 0]  # (C, m, G, O)
        return torch.einsum("cngo,dngo->ncd", q * v, q)
    J = torch.einsum("cnpgo,npgs->ncgos", g, a)  # (m, C, G, O, S): the layer's rows only
    return torch.einsum("ncgos,ndgos->ncd", J * w, J)


def _leaf_gram(J: Tensor, w: Tensor) -> Tensor:
    return torch.einsum("mcn,mdn->mcd", J * w, J)


def _kron_matches(kron: Kron, lay: Layers) -> bool:
    got = tuple(
        (b.weight if b.weight is not None else b.bias, b.groups, b.out_features, b.size,
         b.transposed, b.expert)
        for b in lay.layout.blocks
    )  # fmt: skip
    want = tuple((b.leaf, b.groups, b.out, b.size, b.transposed, b.expert) for b in kron.blocks)
    return got == want and tuple(kron.uncovered) == lay.uncovered


def diag_gram(problem: _problem.Problem, lay: Layers, inputs: tuple, var: Tensor) -> Tensor:
    r""":math:`J \operatorname{diag}(\sigma) J^\top` per sample, ``var`` the ``(n,)`` variances."""
    parts = torch.split(var, list(problem.sizes))
    sub = subset_leaves(problem)
    shaped = [p.reshape(t.shape) for p, t in zip(parts, sub, strict=True)]
    total = 0
    for block, a, g in zip(lay.layout.blocks, lay.inputs, lay.grads, strict=True):
        total = total + _block_gram(a, g, gather(block, shaped), None, None)
    for i, J in zip(lay.uncovered, leaf_jacobians(problem, inputs, lay.uncovered), strict=True):
        total = total + _leaf_gram(J, parts[i])
    return total


def kron_gram(post: LaplacePosterior, lay: Layers, inputs: tuple, f: Tensor) -> Tensor:
    r""":math:`J \Sigma J^\top` per sample for a K-FAC posterior (the eigenbasis form)."""
    kron, delta = post.curvature, post.prior
    total = 0
    for i, (b, a, g) in enumerate(zip(kron.blocks, lay.inputs, lay.grads, strict=True)):
        w = 1.0 / (f * kron._lam(i) + kron._d(delta, b.leaf))
        total = total + _block_gram(a, g, w, kron.input_bases[i], kron.grad_bases[i])
    jacs = leaf_jacobians(post.problem, inputs, lay.uncovered)
    for i, J in zip(lay.uncovered, jacs, strict=True):
        total = total + _leaf_gram(J, 1.0 / kron._d(delta, i))
    return total


def _low_rank(post: LaplacePosterior, lay: Layers, inputs: tuple, f: Tensor) -> Tensor:
    r"""Woodbury: :math:`J P_0^{-1} J^\top - (JU) C^{-1} (JU)^\top`, ``JU`` by ``k`` jvps."""
    problem, lr = post.problem, post.curvature
    p, W, C = lr._parts(f, post.prior)
    prior = diag_gram(problem, lay, inputs, 1.0 / p)
    U = W / p.unsqueeze(1)  # (n, k)

    def push(u: Tensor) -> Tensor:
        return jvp(lambda t: problem.model_flat(t, *inputs), (problem.theta,), (u,))[1]

    JU = vmap(push)(U.T)  # (k, m, *out)
    JU = JU.reshape(JU.shape[0], JU.shape[1], -1).permute(1, 2, 0)  # (m, C, k)
    right = torch.linalg.solve(C, JU.mT)  # (m, k, C)
    return prior - JU @ right


def variance(post: LaplacePosterior, inputs: tuple) -> Tensor | None:
    """``(m, C, C)`` without per-sample Jacobians of the layers, or ``None`` (not possible)."""
    curvature = post.curvature
    if not isinstance(curvature, (Kron, Diag, LowRank)):
        return None
    lay = layers(post.problem, inputs)
    if lay is None:
        return None
    f = evidence.factor(post, post.sigma_noise)
    if isinstance(curvature, Kron):
        return kron_gram(post, lay, inputs, f) if _kron_matches(curvature, lay) else None
    if isinstance(curvature, Diag):
        return diag_gram(post.problem, lay, inputs, 1.0 / curvature._p(f, post.prior))
    return _low_rank(post, lay, inputs, f)


def rows(problem: _problem.Problem, inputs: tuple) -> Tensor | None:
    """Per-sample Jacobians ``(m, C, n)`` assembled from the layers' :math:`b \\otimes a`.

    The same matrix as :meth:`Problem.jacobians`, built from one batched forward pass and ``C``
    pullbacks (plus per-sample Jacobians of uncovered leaves only); ``None`` where the layers
    cannot give it (a stacked expert weight, rows that are not samples).
    """
    lay = layers(problem, inputs)
    if lay is None or any(b.expert is not None for b in lay.layout.blocks):
        return None
    sub = subset_leaves(problem)
    parts: list[Tensor | None] = [None] * len(sub)
    for block, a, g in zip(lay.layout.blocks, lay.inputs, lay.grads, strict=True):
        J = torch.einsum("cnpgo,npgs->ncgos", g, a)  # (m, C, G, O, S)
        m, c = J.shape[:2]
        d = block.in_features
        if block.weight is not None:
            w = J[..., :d]
            if block.transposed:  # stored (in, out): ravel order is W.T's
                w = w.reshape(m, c, block.out_features, d).mT
            parts[block.weight] = w.reshape(m, c, -1)
        if block.bias is not None:
            parts[block.bias] = J[..., d].reshape(m, c, -1)
    for i, J in zip(lay.uncovered, leaf_jacobians(problem, inputs, lay.uncovered), strict=True):
        parts[i] = J
    return torch.cat(parts, dim=-1)

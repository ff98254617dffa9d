"""Optimizers on three workloads: steps and seconds to a target loss, time per step, state.

``--task autoencoder`` (default): the deep autoencoder of the K-FAC papers, scaled to
scikit-learn's digits. The 1797 8x8 digits scaled to [0, 1], an autoencoder
64-256-128-32-128-256-64 (tanh hidden layers, linear 32-unit code, sigmoid output through the
logits), binary cross-entropy averaged over pixels, float32, minibatches of 256 drawn from one
seeded permutation per epoch, the same initialisation and batches for every method. Every
``EVAL`` steps the loss on the whole training set is measured (outside the timed region); a
run stops when it reaches ``TARGET`` or after its step budget.

``--task cnn`` and ``--task charlm`` (workloads in ``optim_tasks.py``): a small CNN on the
digits and a character-level transformer (2 layers, d_model 64, context 64) on the Python
standard library's source; the target is a *validation* loss, measured every few steps on a
fixed held-out set, outside the timed region.

Methods, each with its learning rate (or, for K-FAC and Hessian-free, its initial damping)
tuned over a small grid (the best run is reported, the grid is printed):

- ``torch.optim.AdamW`` (defaults otherwise) and, on the autoencoder, ``torch.optim.SGD`` with
  momentum 0.9;
- ``hessfunc.optim.kfac`` with the exact quadratic model choosing step size and momentum
  (``lr=None``: the grid is the initial damping), one-sample Monte-Carlo Fisher, eager, and on
  the autoencoder also compiled with ``fullgraph=True``;
- ``hessfunc.optim.sophia`` (Sophia-G and Sophia-H, ``update_every=10``, no weight decay),
  ``hessfunc.optim.adahessian`` (a Hessian refresh every step; every 10 on the transformer)
  and ``hessfunc.optim.hessian_free`` (GGN, 10 CG iterations; not on the transformer), eager;
- on the autoencoder, kfac-jax's ``Optimizer`` (adaptive learning rate, momentum and damping,
  its default curvature estimator, jitted) on the same architecture, initialisation and
  batches, when ``jax`` and ``kfac_jax`` import.

Reported: steps and seconds to the target (seconds: the summed time of the steps alone), time
per step (median), per-step overhead over AdamW (ratio of times per step in this run), and
optimizer-state memory per parameter (bytes of every tensor the optimizer keeps between
steps, over the number of parameters).

    python benchmarks/bench_optim.py [--task autoencoder|cnn|charlm|all] [--threads 1]
        [--record] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import common
import optim_tasks
import torch
import torch.nn.functional as F

import hessfunc
import hessfunc.optim
from hessfunc.losses import BCEWithLogitsLoss

SIZES = (64, 256, 128, 32, 128, 256, 64)
BATCH = 256
EVAL = 10
TARGET = 0.221
SEED = 0


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data / 16.0, dtype=torch.float32)


def init_params(seed: int = SEED) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = {}
    for i, (d, o) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        p[f"w{i}"] = torch.randn(o, d, generator=g) / math.sqrt(d)
        p[f"b{i}"] = torch.zeros(o)
    return p


def model(p: dict, X: torch.Tensor) -> torch.Tensor:
    h = X
    last = len(SIZES) - 2
    for i in range(last + 1):
        h = F.linear(h, p[f"w{i}"], p[f"b{i}"])
        if i != last and i != 2:  # 2: the linear code layer
            h = torch.tanh(h)
    return h


def loss_value(p: dict, X: torch.Tensor) -> float:
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(model(p, X), X).item()


def batch_order(n: int, steps: int, seed: int = SEED) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
    return out[:steps]


def state_bytes(tree) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in torch.utils._pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    )


class Run:
    def __init__(self, name: str, setting: str, target: float = TARGET) -> None:
        self.name, self.setting, self.target = name, setting, target
        self.step_times: list[float] = []
        self.curve: list[tuple[int, float, float]] = []  # (step, seconds, full loss)
        self.reached: int | None = None
        self.state_bytes = 0

    def log(self, step: int, loss: float) -> bool:
        self.curve.append((step, sum(self.step_times), loss))
        if loss <= self.target and self.reached is None:
            self.reached = step
        return self.reached is not None or not math.isfinite(loss)

    @property
    def seconds(self) -> float:
        return sum(self.step_times)

    @property
    def per_step(self) -> float:
        t = self.step_times[1:] or self.step_times
        return sorted(t)[len(t) // 2]


def train_torch(name, make_opt, X, order, budget) -> Run:
    p = {k: v.clone().requires_grad_() for k, v in init_params().items()}
    opt = make_opt(list(p.values()))
    run = Run(name, "")
    run.log(0, loss_value(p, X))
    for t, idx in enumerate(order[:budget], 1):
        xb = X[idx]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(p, xb), xb).backward()
        opt.step()
        run.step_times.append(time.perf_counter() - t0)
        if t % EVAL == 0 and run.log(t, loss_value(p, X)):
            break
    run.state_bytes = state_bytes(opt.state_dict()["state"])
    return run


def train_hessfunc(name, opt, X, order, budget, mc: bool) -> Run:
    p = init_params()
    state = opt.init(p)
    run = Run(name, "")
    run.log(0, loss_value(p, X))
    g = torch.Generator().manual_seed(SEED)
    for t, idx in enumerate(order[:budget], 1):
        xb = X[idx]
        t0 = time.perf_counter()
        kw = {"generator": g} if mc else {}
        p, state, info = opt.step(p, state, xb, **kw)
        run.step_times.append(time.perf_counter() - t0)
        if t % EVAL == 0 and run.log(t, loss_value(p, X)):
            break
    run.state_bytes = state_bytes(state)
    return run


def train_hessfunc_compiled(
    name, opt, cstep, lam, X, order, budget, clock=time.perf_counter
) -> tuple[Run, float]:
    """The first step eager (it finds the layers), then one compiled graph for every step
    (``update_every=1``: every step refreshes, so the graph without the refresh never runs).
    ``clock`` times the steps (``time.process_time``: CPU time, steadier on a shared machine)."""
    p = init_params()
    state = opt.init(p)
    inner = state["kfac"]
    state = {"kfac": {**inner, "damping": torch.tensor(lam, dtype=inner["damping"].dtype)}}
    run = Run(name, "")
    run.log(0, loss_value(p, X))
    g = torch.Generator().manual_seed(SEED)
    first = 0.0
    for t, idx in enumerate(order[:budget], 1):
        xb = X[idx]
        noise = torch.rand((1, *xb.shape), generator=g)
        t0 = clock()
        p, state, info = (opt.step if t == 1 else cstep)(p, state, xb, noise=noise)
        dt = clock() - t0
        if t == 2:
            first = dt  # compilation included: kept out of the step times
        else:
            run.step_times.append(dt)
        if t % EVAL == 0 and run.log(t, loss_value(p, X)):
            break
    run.state_bytes = state_bytes(state)
    return run, first


def jax_autoencoder(p, x):
    """The autoencoder's logits in JAX, weights stored (in, out) as ``h @ w + b``: the form
    kfac-jax's layer matcher registers as a dense layer (with ``w.T`` it finds none)."""
    import jax.numpy as jnp

    last = len(SIZES) - 2
    h = x
    for i in range(last + 1):
        h = h @ p[f"w{i}"] + p[f"b{i}"]
        if i != last and i != 2:
            h = jnp.tanh(h)
    return h


def train_kfac_jax(
    X,
    order,
    budget,
    damping,
    *,
    mirror: bool = False,
    stats: list | None = None,
    clock=time.perf_counter,
) -> tuple[Run, float] | None:
    """kfac-jax's ``Optimizer`` on the same model, initialisation, batches and loss.

    The weights enter as ``h @ w + b`` with ``w`` stored ``(in, out)`` (the transpose of the
    torch initialisation, the same function): kfac-jax's graph matcher recognises a dense
    layer only in that form; with ``h @ w.T`` it finds no layer and falls back to diagonal
    blocks for every weight and bias (no K-FAC at all). The loss is registered as sigmoid
    cross-entropy on the logits with weight 1/64: kfac-jax divides the registered sum by the
    batch size, so the registered loss is the per-pixel mean the torch runs minimise.

    ``mirror=False`` configures it as kfac-jax's own deep-autoencoder example
    (``examples/autoencoder_mnist/pipeline.py``), with its loss-scaled constants divided by the
    64 pixels our per-pixel mean divides by: ``l2_reg`` 1e-5/64, curvature EMA 0.95, inverses
    (pi-adjusted factored damping) every 5 steps, damping adapted every 5 steps by 0.95^5 within
    [1e-5/64, 1000/64], 5 burn-in curvature passes (over the first 5 batches, before step 1),
    its default curvature estimator (``ggn_curvature_prop``). ``mirror=True`` sets what
    ``hessfunc.optim.kfac`` does instead: exact inverses (Tikhonov damping applied in the
    eigenbasis), damping adapted every step by 19/20 within [1e-8, 1e8], one-sample
    Monte-Carlo Fisher (``fisher_gradients``), no burn-in, inverses every 5 steps, EMA 0.95.

    ``stats``, if given, receives kfac-jax's statistics of every step (floats); ``clock``
    times the steps.
    """
    try:
        import jax
        import jax.numpy as jnp
        import kfac_jax
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", False)
    params = {k: jnp.asarray((v.T if k[0] == "w" else v).numpy()) for k, v in init_params().items()}
    pixels = SIZES[-1]
    l2 = 1e-5 / pixels
    forward = jax_autoencoder

    def loss_fn(p, batch):
        logits = forward(p, batch)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch, weight=1.0 / pixels)
        ce = jnp.logaddexp(0.0, logits) - batch * logits
        return ce.mean() + 0.5 * l2 * sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(p))

    common_settings = dict(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=l2,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=damping,
        curvature_ema=0.95,
        inverse_update_period=5,
        multi_device=False,
    )
    if mirror:
        settings = dict(
            use_exact_inverses=True,
            estimation_mode="fisher_gradients",
            damping_adaptation_interval=1,
            damping_adaptation_decay=19.0 / 20.0,
            min_damping=1e-8,
            max_damping=1e8,
            num_burnin_steps=0,
        )
    else:
        settings = dict(
            damping_adaptation_interval=5,
            damping_adaptation_decay=0.95,
            min_damping=1e-5 / pixels,
            max_damping=1000.0 / pixels,
            num_burnin_steps=5,
        )
    burnin = settings["num_burnin_steps"]
    opt = kfac_jax.Optimizer(**common_settings, **settings)
    Xj = jnp.asarray(X.numpy())

    def batch(idx):
        return Xj[jnp.asarray(idx.numpy())]

    def first_batches():  # the burn-in batches, then step 1's batch
        return iter([batch(idx) for idx in order[:burnin]] + [batch(order[0])])

    def run_steps(p, state, rng, steps, on_step=None):
        for t, idx in enumerate(order[:steps], 1):
            rng, key = jax.random.split(rng)
            t0 = clock()
            if t == 1 and burnin:
                p, state, st = opt.step(p, state, key, data_iterator=first_batches(),
                                        global_step_int=0)  # fmt: skip
            else:
                p, state, st = opt.step(p, state, key, batch=batch(idx), global_step_int=t - 1)
            jax.block_until_ready(p)
            if on_step is not None and on_step(t, p, st, clock() - t0):
                break
        return p, state

    # warm-up on a throwaway state: jit compiles each kind of step (first step with burn-in,
    # inversion, damping adaptation) once; the timed run below reuses the compiled functions
    t0 = time.perf_counter()
    rng = jax.random.PRNGKey(SEED)
    warm = jax.tree_util.tree_map(jnp.copy, params)  # the steps donate their inputs
    run_steps(warm, opt.init(warm, rng, batch(order[0])), rng, 12)
    compile_s = time.perf_counter() - t0

    what = "mirroring hessfunc's settings" if mirror else "as its autoencoder example"
    run = Run(f"kfac-jax ({what})", f"initial damping {damping}")
    full = jax.jit(lambda p, x: (jnp.logaddexp(0.0, forward(p, x)) - x * forward(p, x)).mean())
    run.log(0, float(full(params, Xj)))

    def on_step(t, p, st, dt):
        run.step_times.append(dt)
        if stats is not None:
            stats.append({k: float(v) for k, v in st.items() if jnp.ndim(v) == 0})
        return t % EVAL == 0 and run.log(t, float(full(p, Xj)))

    state = opt.init(params, rng, batch(order[0]))
    _, state = run_steps(params, state, rng, budget, on_step)
    run.state_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype")
    )
    return run, compile_s


def kfac_jax_agreement(X, order, steps: int = 3) -> dict[str, float] | None:
    """The largest relative differences between kfac-jax and ``hessfunc.optim.kfac`` over the
    first ``steps`` steps, float64, with every choice made identical: exact (type-2) GGN
    factors of the batch alone (EMA 0), exact inverses every step, damping 1e-3 adapted every
    step by 19/20, the same batches. Checks that kfac-jax sees the same loss (value and
    registration), curvature, quadratic model and update as hessfunc."""
    try:
        import jax
        import jax.numpy as jnp
        import kfac_jax
        import numpy as np
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    try:
        f64 = torch.float64
        X64 = X.to(f64)
        p = {k: v.to(f64) for k, v in init_params().items()}
        jp = {k: jnp.asarray((v.T if k[0] == "w" else v).numpy()) for k, v in p.items()}

        def loss_fn(q, x):
            h = jax_autoencoder(q, x)
            kfac_jax.register_sigmoid_cross_entropy_loss(h, x, weight=1.0 / SIZES[-1])
            return (jnp.logaddexp(0.0, h) - x * h).mean()

        jopt = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
            use_adaptive_learning_rate=True, use_adaptive_momentum=True,
            use_adaptive_damping=True, initial_damping=1e-3, multi_device=False,
            num_burnin_steps=0, include_registered_loss_in_stats=True,
            estimation_mode="ggn_exact", use_exact_inverses=True,
            damping_adaptation_interval=1, damping_adaptation_decay=19.0 / 20.0,
            curvature_ema=0.0, inverse_update_period=1,
        )  # fmt: skip
        hopt = hessfunc.optim.kfac(
            model, BCEWithLogitsLoss, damping=1e-3, fisher="type-2", ema=0.0, invert_every=1
        )
        rng = jax.random.PRNGKey(SEED)
        Xj = jnp.asarray(X64.numpy())
        jstate, hstate = jopt.init(jp, rng, Xj[jnp.asarray(order[0].numpy())]), hopt.init(p)
        worst = dict.fromkeys(("loss", "registered loss", "lr", "momentum", "predicted",
                               "rho", "damping", "params"), 0.0)  # fmt: skip

        def rel(a, b):
            return abs(a - b) / max(abs(b), 1e-300)

        for t in range(steps):
            idx = order[t]
            jp, jstate, st = jopt.step(
                jp, jstate, rng, batch=Xj[jnp.asarray(idx.numpy())], global_step_int=t
            )
            p, hstate, info = hopt.step(p, hstate, X64[idx])
            pairs = {
                "loss": (float(st["loss"]), info.loss.item()),
                "registered loss": (float(st["loss_registered"]), info.loss.item()),
                "lr": (float(st["learning_rate"]), info.lr.item()),
                "momentum": (float(st["momentum"]), info.momentum.item()),
                "predicted": (float(st["quad_model_change"]), info.predicted.item()),
                "rho": (float(st["rho"]), info.rho.item()),
                "damping": (float(jstate.damping), hstate["kfac"]["damping"].item()),
            }
            for k, (a, b) in pairs.items():
                worst[k] = max(worst[k], 0.0 if a == b else rel(a, b))
            for k, v in p.items():
                mine = (v.T if k[0] == "w" else v).numpy()
                diff = np.abs(np.asarray(jp[k]) - mine).max() / np.abs(mine).max()
                worst["params"] = max(worst["params"], float(diff))
        return worst
    finally:
        jax.config.update("jax_enable_x64", False)


def kfac_against_kfac_jax(threads: int, record: bool, quick: bool) -> None:
    """``hessfunc.optim.kfac`` compiled against kfac-jax, both K-FAC with adaptive step size,
    momentum and damping, on the same problem, over the same grid of initial damping.

    Three configurations: hessfunc with the settings kfac-jax's autoencoder example shares
    (curvature EMA 0.95, inverses every 5 steps, every step a new factor estimate, the same
    L2 term), kfac-jax as its example, and kfac-jax mirroring hessfunc (see
    :func:`train_kfac_jax`). Step times are CPU time (``time.process_time``) of one thread:
    on a machine shared with other work, wall-clock times of runs taken one after another are
    not comparable, CPU time of a single-threaded process is.
    """
    start = time.perf_counter()
    X = digits()
    budget = 60 if quick else 400
    order = batch_order(len(X), budget)
    grid = [1e-3] if quick else [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    agree = kfac_jax_agreement(X, order)
    if agree is None:
        print("kfac-jax comparison: jax / kfac_jax not importable, skipped")
        return
    l2 = 1e-5 / SIZES[-1]
    name = "hessfunc K-FAC compiled"
    opt = hessfunc.optim.kfac(
        model, BCEWithLogitsLoss, fisher="mc", ema=0.95, invert_every=5, weight_decay=l2
    )
    cstep = torch.compile(opt.step, fullgraph=True)
    methods = {
        name: lambda lam: train_hessfunc_compiled(
            name, opt, cstep, lam, X, order, budget, clock=time.process_time
        ),
        "kfac-jax, as its example": lambda lam: train_kfac_jax(
            X, order, budget, lam, clock=time.process_time
        ),
        "kfac-jax, mirroring hessfunc": lambda lam: train_kfac_jax(
            X, order, budget, lam, mirror=True, clock=time.process_time
        ),
    }
    rows, lines = [], []
    for method, fn in methods.items():
        runs = []
        for lam in grid:
            r, compile_s = fn(lam)
            r.setting = f"{lam:g}"
            runs.append(r)
            lines.append(
                f"{method}, initial damping {lam:g}: "
                + (f"target at step {r.reached}" if r.reached else "target not reached")
                + f", final {r.curve[-1][2]:.4f}, {1e3 * r.per_step:.2f} ms/step"
                + f" (compilation {compile_s:.1f} s)"
            )
            print(lines[-1], flush=True)
        b = best(runs)
        reached = [r.reached for r in runs]
        rows.append([
            method,
            b.setting,
            b.reached if b.reached is not None else f"not in {budget}",
            ", ".join("-" if x is None else str(x) for x in reached),
            f"{b.curve[-1][2]:.4f}",
            1e3 * b.per_step,
            1e3 * sum(b.step_times[1:]) / max(len(b.step_times) - 1, 1),
            1e3 * sorted(r.per_step for r in runs)[len(runs) // 2],
        ])  # fmt: skip
    ours = rows[0][7]
    for row in rows:
        row.append(ours / row[7])
    header = [
        "method", "best initial damping", "steps to target (best)",
        "steps to target over the grid " + ", ".join(f"{x:g}" for x in grid),
        "final train loss (best)", "CPU ms / step, median (best)",
        "CPU ms / step, mean (best)", "CPU ms / step, median (median over grid)",
        "hessfunc's step time / this one's",
    ]  # fmt: skip
    body = (
        f"Machine: {common.machine('cpu')}, {threads} thread(s), shared with other users; "
        "times are CPU time per step of the single-threaded process (median over the steps of "
        "a run).\n\nThe digits autoencoder of this script (float32, batch "
        f"{BATCH}, target {TARGET} checked every {EVAL} steps, budget {budget} steps, the same "
        "initialisation and batches). Float64 agreement over the first 3 steps with every "
        "choice identical (exact GGN factors of the batch, exact inverses, damping adapted "
        "every step), largest relative difference: "
        + ", ".join(f"{k} {v:.1e}" for k, v in agree.items())
        + ".\n\n"
        + common.table(header, rows)
        + "\n\n"
        + "\n".join(f"- {x}" for x in lines)
        + f"\n\nWhole run: {time.perf_counter() - start:.0f} s."
    )
    print(body)
    if record:
        common.record("bench_optim.py: K-FAC against kfac-jax", body)


def best(runs: list[Run]) -> Run:
    """Fewest seconds among the runs that reached the target, else the lowest final loss
    (a run that diverged to NaN counts as infinite)."""

    def key(r: Run):
        final = r.curve[-1][2]
        return (
            r.reached is None,
            r.seconds if r.reached else final if final == final else math.inf,
        )

    return min(runs, key=key)


HF = "Hessian-free (GGN, 10 CG)"
DIAG_GRIDS = {
    "Sophia-G": [3e-4, 1e-3, 3e-3],
    "Sophia-H": [3e-4, 1e-3, 3e-3],
    "AdaHessian": [0.03, 0.1, 0.3],
}


def second_order_methods(model_fn, loss_fn, *, hf: bool, ada_every: int = 1) -> dict:
    """Name -> (grid value -> hessfunc optimizer) for Sophia-G/H, AdaHessian, Hessian-free."""
    o = hessfunc.optim
    out = {
        "Sophia-G": lambda lr: o.sophia(model_fn, loss_fn, lr=lr, weight_decay=0.0),
        "Sophia-H": lambda lr: o.sophia(
            model_fn, loss_fn, lr=lr, weight_decay=0.0, estimator="hutchinson"
        ),
        "AdaHessian": lambda lr: o.adahessian(model_fn, loss_fn, lr=lr, update_every=ada_every),
    }
    if hf:
        out[HF] = lambda lam: o.hessian_free(model_fn, loss_fn, damping=lam, maxiter=10)
    return out


def sweep_into(results: dict, name: str, grid, fn) -> None:
    """Run ``fn(v)`` for every ``v`` of the grid; keep the runs and the best one."""
    runs = []
    if not grid:  # filtered out by --only
        return
    for v in grid:
        r = fn(v)
        if r is None:
            return
        r.setting = f"{v:g}"
        runs.append((v, r))
        print(
            f"{name} {v:g}: reached {r.reached} in {r.seconds:.1f} s, final "
            f"{r.curve[-1][2]:.4f}, {1e3 * r.per_step:.2f} ms/step",
            flush=True,
        )
    results[name] = (best([r for _, r in runs]), runs)


def header(final: str) -> list[str]:
    return [
        "method",
        "best setting (grid)",
        "steps to target",
        "seconds to target",
        final,
        "ms / step",
        "step time / AdamW's",
        "state bytes / param",
    ]


def table_rows(results: dict, n_params: int) -> list[list]:
    adam = results["AdamW"][0] if "AdamW" in results else None  # None: not run (--only)
    rows = []
    for name, (r, runs) in results.items():
        grid = ", ".join(x.setting for _, x in runs)
        rows.append(
            [
                name,
                f"{r.setting} (of {grid})",
                r.reached if r.reached is not None else f"not in {r.curve[-1][0]}",
                f"{r.seconds:.1f}" if r.reached is not None else "-",
                f"{r.curve[-1][2]:.4f}",
                1e3 * r.per_step,
                r.per_step / adam.per_step if adam is not None else "-",
                r.state_bytes / n_params,
            ]
        )
    return rows


def autoencoder(a) -> str:
    start = time.perf_counter()
    X = digits()
    n_params = sum(v.numel() for v in init_params().values())
    first_budget, second_budget = (300, 30) if a.quick else (3000, 400)
    diag_budget = 200 if a.quick else 2000
    order = batch_order(len(X), max(first_budget, second_budget, diag_budget))

    grids = {
        "AdamW": [1e-3, 3e-3, 1e-2],
        "SGD momentum 0.9": [0.3, 1.0, 3.0],
        "hessfunc K-FAC (adaptive lr, momentum)": [1e-4, 1e-3, 1e-2],  # initial damping
        **DIAG_GRIDS,
        HF: [0.01, 0.1, 1.0],  # initial damping
        "kfac-jax (adaptive lr, momentum)": [1e-4, 1e-3, 1e-2],  # initial damping
    }
    if a.quick:
        grids = {k: v[1:2] for k, v in grids.items()}
    results: dict[str, tuple[Run, list[tuple[float, Run]]]] = {}
    notes: list[str] = []

    def sweep(name, grid, fn):
        sweep_into(results, name, grid, fn)

    sweep(
        "AdamW",
        grids["AdamW"],
        lambda lr: train_torch(
            "AdamW", lambda ps: torch.optim.AdamW(ps, lr=lr), X, order, first_budget
        ),
    )
    sweep(
        "SGD momentum 0.9",
        grids["SGD momentum 0.9"],
        lambda lr: train_torch(
            "SGD", lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9), X, order, first_budget
        ),
    )

    def loss_fn(xb):
        return BCEWithLogitsLoss(xb)

    name = "hessfunc K-FAC (adaptive lr, momentum)"
    sweep(
        name,
        grids[name],
        lambda lam: train_hessfunc(
            name,
            hessfunc.optim.kfac(model, loss_fn, damping=lam, fisher="mc"),
            X,
            order,
            second_budget,
            mc=True,
        ),
    )
    name = "hessfunc K-FAC compiled (fullgraph)"
    compiled_opt = hessfunc.optim.kfac(model, loss_fn, fisher="mc")
    cstep = torch.compile(compiled_opt.step, fullgraph=True)
    compile_s = {}

    def compiled_run(lam):
        r, first = train_hessfunc_compiled(name, compiled_opt, cstep, lam, X, order, second_budget)
        compile_s[lam] = first
        return r

    sweep(name, grids["hessfunc K-FAC (adaptive lr, momentum)"], compiled_run)
    notes.append(
        "hessfunc K-FAC compiled: first compiled step (compilation) "
        + ", ".join(f"{v:.1f} s" for v in compile_s.values())
        + "; excluded from ms/step and seconds"
    )
    for name, make in second_order_methods(model, loss_fn, hf=True).items():
        budget = second_budget if name == HF else diag_budget
        sweep(
            name,
            grids[name],
            lambda v, name=name, make=make, budget=budget: train_hessfunc(
                name, make(v), X, order, budget, mc=True
            ),
        )
    jax_compile = {}

    def jax_run(lam):
        out = train_kfac_jax(X, order, second_budget, lam)
        if out is None:
            return None
        jax_compile[lam] = out[1]
        return out[0]

    sweep("kfac-jax (adaptive lr, momentum)", grids["kfac-jax (adaptive lr, momentum)"], jax_run)
    if "kfac-jax (adaptive lr, momentum)" not in results:
        notes.append("kfac-jax: jax / kfac_jax not importable, skipped")

    rows = table_rows(results, n_params)
    body = (
        f"Machine: {common.machine('cpu')}, {a.threads} thread(s); a 2-core machine shared "
        "with other users at the time, so absolute times are noisy and ratios are from the "
        "same run.\n\nDeep autoencoder 64-256-128-32-128-256-64 on sklearn digits "
        f"({len(X)} images, {n_params:,} parameters, float32, batch {BATCH}), target "
        f"training loss {TARGET} (per-pixel binary cross-entropy on the whole set, checked "
        f"every {EVAL} steps). Budgets: AdamW and SGD {first_budget} steps, Sophia and "
        f"AdaHessian {diag_budget}, K-FAC, Hessian-free and kfac-jax {second_budget}. For "
        "K-FAC the grid is the initial damping (step size and momentum come from the "
        "quadratic model), for Hessian-free too (Levenberg-Marquardt adapts it).\n\n"
        + common.table(header("final train loss"), rows)
    )
    if jax_compile:
        body += (
            "\n\n- kfac-jax warm-up, 12 steps on a throwaway state (jit compilation), not timed: "
            + ", ".join(f"{v:.1f} s (damping {k:g})" for k, v in jax_compile.items())
        )
    for n in notes:
        body += f"\n- {n}"
    body += f"\n\nWhole run: {time.perf_counter() - start:.0f} s."
    return body


# ------------------------------------------------------------------ cnn and charlm


def train_task(spec: dict, name: str, make, budget: int, torch_opt: bool) -> Run:
    """One run: ``make`` is a torch.optim factory (of a list of leaves) or a hessfunc optimizer."""
    model, loss, ev = spec["model"], spec["loss"], spec["eval"]
    p = spec["init"]()
    run = Run(name, "", spec["target"])
    run.log(0, optim_tasks.val_loss(spec, p))
    g = torch.Generator().manual_seed(SEED)
    if torch_opt:
        p = {k: v.requires_grad_() for k, v in p.items()}
        opt = make(list(p.values()))
    else:
        opt = make
        state = opt.init(p)
    for t, batch in enumerate(spec["batches"][:budget], 1):
        t0 = time.perf_counter()
        if torch_opt:
            opt.zero_grad(set_to_none=True)
            loss(*batch)(model(p, *batch)).backward()
            opt.step()
        else:
            p, state, _ = opt.step(p, state, *batch, generator=g)
        run.step_times.append(time.perf_counter() - t0)
        if t % ev == 0 and run.log(t, optim_tasks.val_loss(spec, p)):
            break
    run.state_bytes = state_bytes(opt.state_dict()["state"] if torch_opt else state)
    return run


def other_task(a, task: str) -> str:
    start = time.perf_counter()
    spec = optim_tasks.task_setup(task, a.quick)
    model, loss, b = spec["model"], spec["loss"], spec["budgets"]
    p0 = spec["init"]()
    n_params = sum(v.numel() for v in p0.values())
    batch0 = spec["batches"][0]
    coverage = hessfunc.kfac(model, loss(*batch0), p0, *batch0)
    grids = {
        "AdamW": [1e-3, 3e-3, 1e-2],
        "hessfunc K-FAC (adaptive lr, momentum)": [1e-4, 1e-3, 1e-2],  # initial damping
        **DIAG_GRIDS,
        HF: [0.01, 0.1, 1.0],  # initial damping
        **spec.get("grids", {}),
    }
    if a.quick:
        grids = {k: v[1:2] for k, v in grids.items()}
    if a.only:
        grids = {k: (v if a.only in k else []) for k, v in grids.items()}
    results: dict = {}
    sweep_into(
        results,
        "AdamW",
        grids["AdamW"],
        lambda lr: train_task(
            spec, "AdamW", lambda ps: torch.optim.AdamW(ps, lr=lr), b["first"], True
        ),
    )
    kname = "hessfunc K-FAC (adaptive lr, momentum)"
    sweep_into(
        results,
        kname,
        grids[kname],
        lambda lam: train_task(
            spec,
            kname,
            hessfunc.optim.kfac(model, loss, damping=lam, fisher="mc"),
            b["kfac"],
            False,
        ),
    )
    methods = second_order_methods(model, loss, hf=spec["hf"], ada_every=spec["ada_every"])
    for name, make in methods.items():
        budget = b["hf"] if name == HF else b["diag"]
        sweep_into(
            results,
            name,
            grids[name],
            lambda v, name=name, make=make, budget=budget: train_task(
                spec, name, make(v), budget, False
            ),
        )
    rows = table_rows(results, n_params)
    body = (
        f"Machine: {common.machine('cpu')}, {a.threads} thread(s); a 2-core machine shared "
        "with other users at the time, so absolute times are noisy and ratios are from the "
        f"same run.\n\n{spec['describe']}. {n_params:,} parameters, float32, eager steps. "
        f"Target validation loss {spec['target']} (checked every {spec['eval']} steps, outside "
        f"the timed steps). Budgets: AdamW {b['first']} steps, K-FAC {b['kfac']}, Sophia "
        f"(Hessian refresh every 10 steps) and AdaHessian (every {spec['ada_every']}) {b['diag']}"
        + (f", Hessian-free {b['hf']}" if spec["hf"] else "")
        + f". K-FAC covers {len(coverage.covered)} of {len(p0)} leaves; the others get a "
        "damped diagonal (running Gauss-Newton-Bartlett estimate): "
        + (", ".join(f"`{path}`" for path, _ in coverage.uncovered) or "none")
        + ".\n\n"
        + common.table(header("final val loss"), rows)
    )
    body += f"\n\nWhole run: {time.perf_counter() - start:.0f} s."
    return body


TITLES = {
    "autoencoder": "bench_optim.py: optimizers on the digits autoencoder",
    "cnn": "bench_optim.py --task cnn: optimizers on a small CNN (digits)",
    "charlm": "bench_optim.py --task charlm: optimizers on a character-level transformer",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--task", choices=["autoencoder", "cnn", "charlm", "all"], default="autoencoder"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smoke test: one grid point, short runs")
    ap.add_argument("--kfac-jax", action="store_true", help="only K-FAC against kfac-jax")
    ap.add_argument(
        "--only",
        default="",
        help="--task cnn|charlm: only the methods whose name contains this text (e.g. K-FAC)",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault(
        "XLA_FLAGS",
        f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={a.threads}",
    )
    if a.kfac_jax:
        kfac_against_kfac_jax(a.threads, a.record, a.quick)
        return
    tasks = ["autoencoder", "cnn", "charlm"] if a.task == "all" else [a.task]
    for task in tasks:
        body = autoencoder(a) if task == "autoencoder" else other_task(a, task)
        print(body, flush=True)
        if a.record:
            common.record(TITLES[task], body)


if __name__ == "__main__":
    main()

"""Diagonal and Hessian-free second-order optimizers against AdamW and SGD with momentum.

Workload: an autoencoder 64-32-8-32-64 (tanh) on scikit-learn's 8x8 digits (1797 images, pixels
scaled to [0, 1]), mean squared error, minibatches of 128 drawn by one seeded generator (the same
sequence for every run), float32, one intra-op thread, eager steps.

For each method and each value of its grid (learning rate; damping for Hessian-free) the script
runs until the full-data loss, evaluated every ``--every`` steps, reaches ``--target``, and reports
the steps and the seconds spent in optimizer steps (evaluation excluded) to reach it; "-" when
the budget ran out. The default target, 0.025, is just above the mean squared error of the best
rank-8 linear reconstruction (PCA with 8 components: 0.0239). The best setting of each method is
the one that reached the target in the fewest seconds.

Peer comparison (``--peers``): the ``SophiaH`` and ``AdaHessian`` of the ``pytorch-optimizer``
package (install it with ``pip install --no-deps pytorch-optimizer``), on the same autoencoder
and batch: the time of one step that refreshes the Hessian diagonal and of one that does not,
against hessfunc's; and whether each diagonal estimator is unbiased: the mean of ``--draws``
estimates at a fixed point of a 64-8-10 classifier (cross-entropy) against
``diag(hessfunc.hessian_matrix)``, as the largest z-score over the entries, with the average
variance per entry.

    python benchmarks/bench_optim_diag.py [--target 0.025] [--max-steps 1500] [--peers]
        [--draws 2000] [--record]
"""

from __future__ import annotations

import argparse
import math
import time

import common
import torch
from torch import nn

import hessfunc
from hessfunc.losses import CrossEntropyLoss, MSELoss


def digits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (
        torch.tensor(data.data / 16.0, dtype=dtype),
        torch.tensor(data.target, dtype=torch.long),
    )


def autoencoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(),
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 64),
    )  # fmt: skip


def batches(n: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, n, (size,), generator=g)


class TorchRunner:
    """A torch.optim optimizer on the module."""

    def __init__(self, net: nn.Module, make) -> None:
        self.net, self.opt = net, make(net.parameters())

    def step(self, x: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self.net(x), x)
        loss.backward()
        self.opt.step()


class HessfuncRunner:
    """A hessfunc.optim optimizer through its module driver."""

    def __init__(self, net: nn.Module, make, compile: bool = False) -> None:
        apply, _ = hessfunc.from_module(net)
        opt = make(lambda p, x: apply(p, x), lambda x: MSELoss(x))
        self.driver = hessfunc.optim.ModuleOptimizer(
            net, opt, generator=torch.Generator().manual_seed(0), compile=compile
        )

    def step(self, x: torch.Tensor) -> None:
        self.driver.step(x)


def methods() -> dict:
    o = hessfunc.optim
    return {
        "SGD-momentum": (
            [0.3, 1.0, 3.0, 10.0],
            lambda lr: (
                lambda net: TorchRunner(net, lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9))
            ),
        ),
        "AdamW": (
            [3e-3, 1e-2, 3e-2, 1e-1],
            lambda lr: (
                lambda net: TorchRunner(
                    net, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0)
                )
            ),
        ),
        "Sophia-G": (
            [3e-4, 1e-3, 3e-3, 1e-2],
            lambda lr: (
                lambda net: HessfuncRunner(
                    net, lambda m, lf: o.sophia(m, lf, lr=lr, weight_decay=0.0)
                )
            ),
        ),
        "Sophia-H": (
            [3e-4, 1e-3, 3e-3, 1e-2],
            lambda lr: (
                lambda net: HessfuncRunner(
                    net,
                    lambda m, lf: o.sophia(m, lf, lr=lr, weight_decay=0.0, estimator="hutchinson"),
                )
            ),
        ),
        "AdaHessian": (
            [0.03, 0.1, 0.3],
            lambda lr: lambda net: HessfuncRunner(net, lambda m, lf: o.adahessian(m, lf, lr=lr)),
        ),
        "Hessian-free (GGN, 10 CG)": (
            [0.01, 0.1, 1.0],
            lambda lam: (
                lambda net: HessfuncRunner(
                    net, lambda m, lf: o.hessian_free(m, lf, damping=lam, maxiter=10)
                )
            ),
        ),
    }


def train(make_runner, X, args) -> tuple[int | None, float | None, float]:
    net = autoencoder(0)
    runner = make_runner(net)
    idx = batches(X.shape[0], args.batch, 1)
    spent = 0.0
    loss = float("nan")
    for t in range(1, args.max_steps + 1):
        x = X[next(idx)]
        t0 = time.perf_counter()
        runner.step(x)
        spent += time.perf_counter() - t0
        if t % args.every == 0:
            with torch.no_grad():
                loss = float(torch.nn.functional.mse_loss(net(X), X))
            if not math.isfinite(loss):
                return None, None, loss
            if loss <= args.target:
                return t, spent, loss
    return None, None, loss


def race(X, args) -> str:
    rows, best_rows = [], []
    for name, (grid, factory) in methods().items():
        best = None
        for value in grid:
            steps, secs, last = train(factory(value), X, args)
            rows.append([name, value, steps if steps else "-", secs if secs else "-", last])
            print(rows[-1], flush=True)
            if secs is not None and (best is None or secs < best[2]):
                best = (value, steps, secs)
        best_rows.append([name, *(best if best else ("-", "-", "-"))])
    return (
        "Best setting per method (fewest seconds to the target):\n\n"
        + common.table(["method", "lr / damping", "steps", "seconds"], best_rows)
        + "\n\nEvery setting (final loss: at the target, or after the budget):\n\n"
        + common.table(["method", "lr / damping", "steps", "seconds", "final loss"], rows)
    )


# ------------------------------------------------------------------------------ peers


def peer_timing(X, args) -> str:
    from pytorch_optimizer import AdaHessian, SophiaH

    x = X[: args.batch]
    rows = []
    for label, ours_make, theirs_make in (
        (
            "SophiaH",
            lambda m, lf, k: hessfunc.optim.sophia(
                m, lf, lr=1e-3, estimator="hutchinson", update_every=k
            ),
            lambda ps, k: SophiaH(ps, lr=1e-3, update_period=k),
        ),
        (
            "AdaHessian",
            lambda m, lf, k: hessfunc.optim.adahessian(m, lf, lr=0.1, update_every=k),
            lambda ps, k: AdaHessian(ps, lr=0.1, update_period=k),
        ),
    ):
        for refresh, k in (("refresh", 1), ("no refresh", 10**9)):
            t0 = 0 if refresh == "refresh" else 1
            times = []
            for compiled in (False, True):
                net = autoencoder(0)
                ours = HessfuncRunner(
                    net, lambda m, lf, k=k, f=ours_make: f(m, lf, k), compile=compiled
                )

                def one(ours=ours, t0=t0):
                    ours.driver.t = t0  # pick the graph: refreshing or plain
                    ours.step(x)

                times.append(common.timeit(one))
            net2 = autoencoder(0)
            opt = theirs_make(net2.parameters(), k)
            torch.manual_seed(0)

            def theirs(opt=opt, net2=net2):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net2(x), x)
                loss.backward(create_graph=True)
                opt.step()

            if refresh == "no refresh":
                theirs()  # the first step always refreshes
            t_theirs = common.timeit(theirs)
            rows.append(
                [label, refresh, times[0] * 1e3, times[1] * 1e3, t_theirs * 1e3,
                 t_theirs / times[0], t_theirs / times[1]]
            )  # fmt: skip
            print(rows[-1], flush=True)
    return common.table(
        [
            "method", "step", "hessfunc eager (ms)", "hessfunc compiled (ms)",
            "pytorch-optimizer (ms)", "their / our eager", "their / our compiled",
        ],
        rows,
    )  # fmt: skip


def peer_bias(X, y, args) -> str:
    from pytorch_optimizer import AdaHessian, SophiaH

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    apply, params = hessfunc.from_module(net)
    xb, yb = X[:64].double(), y[:64]
    f = lambda p: torch.nn.functional.cross_entropy(apply(p, xb), yb)  # noqa: E731
    exact = torch.diagonal(hessfunc.hessian_matrix(f, params))

    def summary(draws: torch.Tensor) -> tuple[float, float]:
        mean = draws.mean(0)
        se = draws.std(0) / math.sqrt(draws.shape[0])
        return float(((mean - exact).abs() / se.clamp(min=1e-300)).max()), float(
            draws.var(0).mean()
        )

    rows = []
    ours = hessfunc.optim.sophia(
        lambda p, x, t: apply(p, x), lambda x, t: CrossEntropyLoss(t), lr=0.1,
        betas=(0.0, 0.0), estimator="hutchinson",
    )  # fmt: skip
    state = ours.init(params)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([
        hessfunc.ravel(
            ours.step(params, state, xb, yb, generator=g, refresh=True)[1]["sophia"]["h"]
        )[0]
        for _ in range(args.draws)
    ])  # fmt: skip
    rows.append(["hessfunc sophia(estimator='hutchinson')", "rademacher", *summary(draws)])
    print(rows[-1], flush=True)
    for label, make in (
        ("pytorch-optimizer SophiaH (default)", lambda ps: SophiaH(ps, lr=0.0)),
        ("pytorch-optimizer AdaHessian (default)", lambda ps: AdaHessian(ps, lr=0.0)),
    ):
        net_p = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
        net_p.load_state_dict(net.state_dict())
        opt = make(net_p.parameters())
        torch.manual_seed(2)
        estimates = []
        for _ in range(args.draws):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net_p(xb), yb)
            loss.backward(create_graph=True)
            for group in opt.param_groups:
                opt.init_group(group)
            opt.zero_hessian(opt.param_groups, opt.state)
            opt.compute_hutchinson_hessian(
                opt.param_groups, opt.state, num_samples=1, distribution=opt.distribution
            )
            estimates.append(
                torch.cat([opt.state[p]["hessian"].reshape(-1) for p in net_p.parameters()])
            )
        rows.append([label, opt.distribution, *summary(torch.stack(estimates).detach())])
        print(rows[-1], flush=True)
    return (
        f"Diagonal estimators at a fixed point ({args.draws} draws each; 64-8-10 tanh "
        "classifier, cross-entropy, 64 digits, float64): largest |mean - exact| / standard "
        "error over the 610 entries (about 4 or less for an unbiased estimator), and the "
        "variance of one draw averaged over entries.\n\n"
        + common.table(["estimator", "probes", "max z-score", "mean variance"], rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.025)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--no-race", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X, y = digits(torch.float32)
    parts = [
        f"Machine: {common.machine('cpu')}; {args.threads} thread(s). Autoencoder 64-32-8-32-64 "
        f"tanh on digits, MSE, batch {args.batch}, float32, eager; target full-data loss "
        f"{args.target}, checked every {args.every} steps, budget {args.max_steps} steps."
    ]
    if not args.no_race:
        parts.append(race(X, args))
    if args.peers:
        parts.append(
            "Per-step time against pytorch-optimizer (same batch):\n\n" + peer_timing(X, args)
        )
        parts.append(peer_bias(X, y, args))
    body = "\n\n".join(parts)
    print(body)
    if args.record:
        common.record("Second-order optimizers: Sophia, AdaHessian, Hessian-free", body)


if __name__ == "__main__":
    main()

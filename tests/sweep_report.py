"""Run the whole op and module sweeps and write their summary to ``docs/sweep.md``.

    PYTHONPATH=. python3 tests/sweep_report.py [--out docs/sweep.md] [--ops] [--modules]

Runs on one thread; the whole of both sweeps takes tens of minutes on a small CPU. The tests
(``tests/test_opinfo_sweep.py``, ``tests/test_module_sweep.py``) check the same verdicts.
"""

from __future__ import annotations

import argparse
import collections
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import hessfunc


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cell(text: str, limit: int = 200) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _progress(i: int, total: int, key: str, seconds: float) -> None:
    print(f"[{i}/{total}] {key} {seconds:.1f}s", file=sys.stderr, flush=True)


def op_section() -> tuple[list[str], float]:
    import sweep
    import sweep_ops
    from test_opinfo_sweep import KNOWN_FAILURES, ROUTED

    start = time.perf_counter()
    results = {}
    for i, key in enumerate(sorted(sweep_ops.OPS), 1):
        results[key] = sweep_ops.run_op(key)
        _progress(i, len(sweep_ops.OPS), key, results[key].seconds)
    elapsed = time.perf_counter() - start

    lines = [
        "## Ops",
        "",
        f"{len(results)} OpInfos of `op_db` with `supports_gradgrad`, float64 CPU samples. One "
        "state per (op, product, mode); a single failing sample makes the op fail.",
        "",
        "| product | mode | " + " | ".join(sweep.STATES) + " |",
        "|---|---|" + "---|" * len(sweep.STATES),
    ]
    for product in sweep.PRODUCTS:
        for mode in sweep.MODES:
            counts = collections.Counter(r.verdicts[product, mode].state for r in results.values())
            row = " | ".join(str(counts.get(s, 0)) for s in sweep.STATES)
            lines.append(f"| `{product}` | {mode} | {row} |")

    samples = collections.Counter()
    for r in results.values():
        for state, n in r.verdicts["hvp", "rev-rev"].counts.items():
            samples[state] += n
    lines += [
        "",
        f"Samples: {sum(r.samples for r in results.values())} in all. What happened to them "
        "(`hvp`, rev-rev; skips by reason):",
        "",
        "| samples | outcome |",
        "|---|---|",
    ]
    lines += [f"| {n} | {_cell(state)} |" for state, n in samples.most_common()]

    failing = [
        (key, product, mode, r.verdicts[product, mode])
        for key, r in sorted(results.items())
        for product in sweep.PRODUCTS
        for mode in sweep.MODES
        if r.verdicts[product, mode].state in sweep.FAILURES
    ]
    lines += [
        "",
        "### Failures",
        "",
        "`wrong`: relative error of the worst sample against the finite-difference reference; "
        "`raw-error`: first line of the torch error that escaped. Known failures are strict "
        "expected failures in `tests/test_opinfo_sweep.py` (`KNOWN_FAILURES`).",
        "",
        "| op | product | mode | state | sample | detail | known |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, product, mode, v in failing:
        known = "yes" if (key, product, mode) in KNOWN_FAILURES else "**no**"
        detail = _cell(v.detail)
        lines.append(
            f"| `{key}` | {product} | {mode} | {v.state} | {v.sample} | {detail} | {known} |"
        )

    lines += _value_section(results)

    refused = collections.defaultdict(list)
    for key, r in sorted(results.items()):
        for (product, mode), v in r.verdicts.items():
            if v.state == "clear-error":
                refused[product, mode].append(key)
    lines += ["", "### Refused with a hessfunc error", ""]
    for (product, mode), keys in sorted(refused.items()):
        lines.append(f"- `{product}` {mode} ({len(keys)}): " + ", ".join(f"`{k}`" for k in keys))
    skipped = collections.defaultdict(list)
    for key, r in sorted(results.items()):
        v = r.verdicts["hvp", "rev-rev"]
        if v.state == "skipped":
            skipped[v.detail].append(key)
    lines += ["", "### Ops with no usable sample (`hvp`, rev-rev), by the most frequent reason", ""]
    for reason, keys in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {_cell(reason)} ({len(keys)}): " + ", ".join(f"`{k}`" for k in keys))
    routed = ", ".join(
        f"`{k}`: {results[k].verdicts['hvp', 'fwd-rev'].state}" for k in sorted(ROUTED)
    )
    lines += [
        "",
        "Routed ops (exact, or refused only for what a sample does: batch norm writing its "
        f"running statistics in place): {routed}.",
    ]
    slow = sorted(results.values(), key=lambda r: -r.seconds)[:5]
    lines += [
        "",
        f"Run time: {elapsed / 60:.1f} min on one thread; slowest ops: "
        + ", ".join(f"`{r.key}` {r.seconds:.0f} s" for r in slow)
        + ".",
    ]
    return lines, elapsed


def _by_value(verdict) -> bool:
    return verdict.detail.startswith("by value")


def _value_section(results: dict) -> list[str]:
    """What the references built from values alone found (tests/sweep.py, 'by value')."""
    import sweep

    findings = [
        (key, product, mode, r.verdicts[product, mode])
        for key, r in sorted(results.items())
        for product in sweep.PRODUCTS
        for mode in sweep.MODES
        if r.verdicts[product, mode].state == "wrong" and _by_value(r.verdicts[product, mode])
    ]
    judged = sorted(
        key
        for key, r in results.items()
        if any(v.state == "exact" and _by_value(v) for v in r.verdicts.values())
    )
    lines = [
        "",
        "### Findings of the value-based references",
        "",
        "Besides finite differences of autograd's gradient, every sample is checked against "
        "references that no backward formula can leak into: second differences of the "
        "objective's value along two random directions `u, v` (`u^T H v`; for the GGN, `(J u)^T "
        "C (J v)` from differences of the outputs), symmetry `<u, Hv> = <Hu, v>` where those "
        "do not converge, and agreement of fwd-rev with rev-rev. A product that fails any of "
        "them is wrong even where it matches the differences of the gradient (a pseudo-gradient "
        "is inherited by both).",
        "",
    ]
    if findings:
        lines += [
            "| op | product | mode | sample | detail |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{k}` | {p} | {m} | {v.sample} | {_cell(v.detail)} |" for k, p, m, v in findings
        ]
    else:
        lines.append("No (op, product, mode) fails them in this run.")
    lines += [
        "",
        f"Ops where autograd's gradient is not the derivative of the value at some sample, so "
        f"only the value-based references can judge them, and every product agreed with them "
        f"({len(judged)}): " + (", ".join(f"`{k}`" for k in judged) or "none") + ".",
    ]
    return lines


def module_section() -> tuple[list[str], float]:
    import sweep
    import sweep_modules
    from test_module_sweep import KNOWN_FAILURES

    start = time.perf_counter()
    results = {}
    keys = sorted(sweep_modules.CASES)
    for i, key in enumerate(keys, 1):
        for mode in sweep_modules.MODES:
            results[key, mode] = sweep_modules.run_module(key, training=mode == "train")
        _progress(i, len(keys), key, sum(results[key, m].seconds for m in sweep_modules.MODES))
    elapsed = time.perf_counter() - start
    states = ("exact", "clear-error", "wrong", "mutates", "raw-error", "skipped")
    lines = [
        "## Modules",
        "",
        f"{len(keys)} cases (module_db, hand-written configurations, classes built with default "
        "arguments), each in training and evaluation mode, through `from_module` + `hvp`.",
        "",
        "| module mode | hvp mode | " + " | ".join(states) + " |",
        "|---|---|" + "---|" * len(states),
    ]
    for mode in sweep_modules.MODES:
        for ad in sweep.MODES:
            counts = collections.Counter(
                results[k, mode].verdicts[ad].state for k in keys if (k, mode) in results
            )
            row = " | ".join(str(counts.get(s, 0)) for s in states)
            lines.append(f"| {mode} | {ad} | {row} |")
    lines += [
        "",
        "### Failures",
        "",
        "| module | module mode | hvp mode | state | input | detail | known |",
        "|---|---|---|---|---|---|---|",
    ]
    for (key, mode), r in sorted(results.items()):
        for ad, v in r.verdicts.items():
            if v.state in sweep.FAILURES:
                known = "yes" if (key, mode) in KNOWN_FAILURES else "**no**"
                lines.append(
                    f"| `{key}` | {mode} | {ad} | {v.state} | {v.sample} | {_cell(v.detail)} "
                    f"| {known} |"
                )
    by_value = sorted(
        {k for (k, _), r in results.items() if any(_by_value(v) for v in r.verdicts.values())}
    )
    lines += [
        "",
        "Every `hvp` is also checked against second differences of the value, for symmetry "
        "where those do not converge, and fwd-rev against rev-rev (see the op section). Cases "
        "judged by value alone because autograd's gradient is not the derivative there, or "
        "found wrong by value: " + (", ".join(f"`{k}`" for k in by_value) or "none") + ".",
    ]
    lines += ["", "Classes without a case:", ""]
    lines += [f"- `{k}`: {why}" for k, why in sorted(sweep_modules.NOT_COVERED.items())]
    lines += ["", f"Run time: {elapsed / 60:.1f} min on one thread."]
    return lines, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/sweep.md")
    parser.add_argument("--ops", action="store_true", help="only the op sweep")
    parser.add_argument("--modules", action="store_true", help="only the module sweep")
    args = parser.parse_args()
    both = not (args.ops or args.modules)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    lines = [
        "# Exactness sweeps",
        "",
        "Generated by `PYTHONPATH=. python3 tests/sweep_report.py` (the same verdicts as "
        "`pytest tests/test_opinfo_sweep.py tests/test_module_sweep.py --full`). Every product is "
        "compared with Richardson-extrapolated central differences of plain autograd gradients "
        "and with references built from values of the objective only: second differences, "
        "symmetry, fwd-rev against rev-rev (`tests/sweep.py` describes the objective, the step "
        "ladder and the tolerances).",
        "",
        f"torch {torch.__version__}, hessfunc {hessfunc.__version__} (commit {_commit()}), "
        f"Python {platform.python_version()}, {platform.machine()} CPU.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    if args.ops or both:
        sections.append(op_section)
    if args.modules or both:
        sections.append(module_section)
    for section in sections:  # written after each section, so a long run keeps what it has
        lines += section()[0] + [""]
        out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

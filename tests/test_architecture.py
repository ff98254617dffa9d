"""The layers of hessfunc, checked on its import graph.

Layers, bottom to top: the private base (pytrees, input checks, the second-order context, kernel
routes, memory guards); beside each other above it, the products (automatic differentiation)
and the matvec algorithms (linear algebra on any ``matvec``, which differentiate nothing);
then what builds on products (Kronecker factors, checking tools); then influence, datasets and
processes, and anything new. A module may import its own layer and the layers below, never a
higher one, and never a sibling layer of the same height. Modules are named by their last
component, so the table holds whether the modules sit flat in ``hessfunc/`` or in sub-packages
by concern; a module missing from the table counts as the top layer.
"""

import ast
import importlib.util
from pathlib import Path

import hessfunc

PACKAGE = Path(hessfunc.__file__).parent

LAYERS = {
    "base": [
        "_tree",
        "_types",
        "_checks",
        "_context",
        "_decomp",
        "_memory",
        "_unwrap",
        "_progress",
        "_operator",
        "_outputs",
        "_pseudo",
        "_loss",
    ],
    "products": [
        "hvp", "hessian", "ggn", "fisher", "fd", "module", "losses", "_categorical", "gnb",
    ],  # fmt: skip
    "linalg": ["solvers", "inverse", "lanczos", "estimators", "slq", "blocks", "linop"],
    "kron": ["_kron", "_layers", "_eigenbasis", "kfac", "ekfac"],
    "checking": ["check", "_diagnoses", "check_compiled", "testing"],
    "top": ["influence", "_influence_solvers", "_influence_kron", "data", "_passes", "distributed"],
}
HEIGHT = {"base": 0, "products": 1, "linalg": 1, "kron": 2, "checking": 2, "top": 3}
# Sub-packages by concern (when the modules are grouped so) belong to the layer of that name.
PACKAGES = {
    "_base": "base",
    "products": "products",
    "linalg": "linalg",
    "kron": "kron",
    "checking": "checking",
    "influence": "top",
    "optim": "top",
    "laplace": "top",
}
LAYER_OF = {leaf: layer for layer, leaves in LAYERS.items() for leaf in leaves}

# torch.func transforms that differentiate (vmap and functional_call do not).
AD_TRANSFORMS = {"grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "linearize"}

# Known exceptions, each with its reason. newton_cg_step (a Newton step: it differentiates f)
# lives beside cg in solvers, and takes the Hessian product from hvp by default.
AD_ALLOWED = {"solvers"}
LAYER_ALLOWED = {("solvers", "hvp")}
# No cycle is allowed: KFAC.eigendecompose and ekfac both build the EKFAC of _eigenbasis.
CYCLES_ALLOWED: set[frozenset[str]] = set()


def modules():
    """{dotted name: path} of every module of the package, the root's __init__ excepted."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            found[".".join(parts)] = path
    return found


def layer(name):
    parts = name.split(".")
    # the sub-package a module sits in decides first (optim.module is not products' module)
    for part in parts[1:-1]:
        if part in PACKAGES:
            return PACKAGES[part]
    return LAYER_OF.get(parts[-1], PACKAGES.get(parts[-1], "top"))


def imports(name, path):
    """[(imported hessfunc module, deferred?, imported names)] of one module's source."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    out = []

    def visit(node, deferred):
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = importlib.util.resolve_name("." * child.level + base, package)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in known else base
                    out.append((target, inner, alias.name))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    out.append((alias.name, inner, None))
            visit(child, inner)

    visit(tree, False)
    return out


def hessfunc_edges():
    known = modules()
    edges = {}
    for name, path in known.items():
        for target, _, _ in imports(name, path):
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                edges.setdefault(name, set()).add(target)
    return edges


def short(name):
    return name.split(".")[-1]


def test_the_table_knows_the_modules_it_names():
    leaves = {short(n) for n in modules()}
    missing = set(LAYER_OF) - leaves
    assert not missing, f"the layer table names modules that do not exist: {sorted(missing)}"


def test_no_import_cycles():
    edges = hessfunc_edges()
    cycles = []

    def walk(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in on_stack:
                cycle = stack[stack.index(nxt) :]
                if frozenset(short(c) for c in cycle) not in CYCLES_ALLOWED:
                    cycles.append(cycle + [nxt])
            elif nxt not in done:
                walk(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done = set()
    for node in sorted(edges):
        if node not in done:
            walk(node, [], set(), done)
    assert not cycles, cycles


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for name, targets in hessfunc_edges().items():
        for target in targets:
            a, b = layer(name), layer(target)
            if a == b or (short(name), short(target)) in LAYER_ALLOWED:
                continue
            if HEIGHT[b] >= HEIGHT[a]:
                wrong.append(f"{name} ({a}) imports {target} ({b})")
    assert not wrong, wrong


def test_matvec_algorithms_import_no_automatic_differentiation():
    known = modules()
    wrong = []
    for name, path in known.items():
        if layer(name) != "linalg" or short(name) in AD_ALLOWED:
            continue
        for target, _, imported in imports(name, path):
            if target == "torch.func" and imported in AD_TRANSFORMS:
                wrong.append(f"{name} imports torch.func.{imported}")
            if target.startswith("torch.autograd"):
                wrong.append(f"{name} imports {target}")
            if target in known and layer(target) == "products":
                wrong.append(f"{name} imports {target}")
    source_uses = {
        name: [t for t in AD_TRANSFORMS if f"torch.func.{t}(" in known[name].read_text()]
        for name in known
        if layer(name) == "linalg" and short(name) not in AD_ALLOWED
    }
    wrong += [f"{n} calls torch.func.{t}" for n, ts in source_uses.items() for t in ts]
    assert not wrong, wrong


def test_the_checks_can_fail():
    # the cycle walk and the layer rule see a deliberate violation
    assert layer("pkg.hvp") == layer("pkg.products.hvp") == "products"  # flat or grouped
    assert layer("pkg.optim.sgd") == "top" and layer("pkg._base.new") == "base"
    edges = hessfunc_edges()
    assert "hessfunc" not in edges  # the root __init__ is not a module of any layer
    assert any(layer(t) == "base" for ts in edges.values() for t in ts)

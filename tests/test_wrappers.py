"""Single-process parts of hessfunc.distributed: unwrapping, and the hook-free module copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import hessfunc
from hessfunc.distributed import _hook_free_copy, from_sharded, unwrap


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_compile_and_data_parallel_wrappers_are_unwrapped_in_either_order():
    net = _net()
    X, y = torch.randn(5, 3), torch.randn(5, 2)
    apply, params = hessfunc.from_module(net)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    expected = hessfunc.hvp(lambda p: F.mse_loss(apply(p, X), y), params, v)
    for wrapped in (
        torch.compile(net),
        torch.nn.DataParallel(torch.compile(net)),
        torch.compile(torch.nn.DataParallel(net)),
    ):
        assert unwrap(wrapped) is net
        apply_w, params_w = hessfunc.from_module(wrapped)
        assert list(params_w) == list(params)
        assert_close(hessfunc.hvp(lambda p: F.mse_loss(apply_w(p, X), y), params_w, v), expected)


def test_hook_free_copy_drops_only_torch_distributed_hooks():
    net = _net()
    calls = []

    def user_hook(module, args):
        calls.append(1)
        return (2 * args[0],)

    def distributed_hook(module, args):
        raise AssertionError("a torch.distributed hook ran")

    distributed_hook.__module__ = "torch.distributed.fsdp._fully_shard._fsdp_state"
    net[0].register_forward_pre_hook(user_hook)
    net[2].register_forward_pre_hook(distributed_hook)
    net[2].register_forward_hook(distributed_hook, with_kwargs=True, always_call=True)
    copy = _hook_free_copy(net, {})
    assert copy[0] is not net[0] and len(copy[0]._forward_pre_hooks) == 1
    assert not copy[2]._forward_pre_hooks and not copy[2]._forward_hooks
    assert not copy[2]._forward_hooks_with_kwargs and not copy[2]._forward_hooks_always_called
    assert len(net[2]._forward_pre_hooks) == 1 and len(net[2]._forward_hooks) == 1  # untouched
    assert copy[0].weight.device.type == "meta" and net[0].weight.device.type != "meta"
    apply, params = from_sharded(net)
    X = torch.randn(5, 3)
    out = apply(params, X)
    assert calls == [1]
    hidden = torch.tanh(F.linear(2 * X, params["0.weight"], params["0.bias"]))
    expected = F.linear(hidden, params["2.weight"], params["2.bias"])
    assert_close(out, expected)


def test_tied_weights_stay_tied_in_the_copy():
    net = _net()
    net[2].weight = torch.nn.Parameter(torch.randn(2, 4))
    net.append(torch.nn.Linear(4, 2))
    net[3].weight = net[2].weight
    copy = _hook_free_copy(net, {})
    assert copy[3].weight is copy[2].weight
    apply, params = from_sharded(net)
    assert list(params) == list(hessfunc.from_module(net)[1])


def test_from_module_points_sharded_modules_to_from_sharded(monkeypatch):
    import sys
    import types

    class FSDPModule:  # a stand-in for torch.distributed.fsdp.FSDPModule
        pass

    fake = types.SimpleNamespace(FSDPModule=FSDPModule)
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", fake)
    sharded = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})(2, 1)
    with pytest.raises(TypeError, match=r"hessfunc.distributed.from_sharded\(module\)"):
        hessfunc.from_module(sharded)

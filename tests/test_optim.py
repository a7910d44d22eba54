"""Optimizers and schedules: each takes real steps; 8-bit AdamW runs on CPU or falls back clearly."""

import sys
import warnings

import pytest
import torch

from helpers.train import optim
from helpers.train.optim import build_optimizer, build_scheduler, optimizer_kind


def _fit(name: str, lr: float, steps: int = 30) -> tuple[float, float, torch.optim.Optimizer]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: bitsandbytes keeps 8-bit state
    target = torch.randn(64, 128)
    opt = build_optimizer(name, [{"params": [w], "lr": lr}], lr=lr, weight_decay=0.0)
    first = None
    for _ in range(steps):
        loss = ((w - target) ** 2).mean()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    return first, ((w - target) ** 2).mean().item(), opt


@pytest.mark.parametrize("name,lr,steps", [("adamw", 5e-2, 30), ("adamw8bit", 5e-2, 30), ("prodigy", 1.0, 300)])
def test_each_optimizer_lowers_a_loss(name, lr, steps):
    first, last, opt = _fit(name, lr, steps)
    assert last < 0.5 * first
    assert optimizer_kind(opt) == name


def test_adamw8bit_keeps_8bit_state_on_cpu():
    _, _, opt = _fit("adamw8bit", 1e-2, steps=2)
    state = next(iter(opt.state.values()))
    assert state["state1"].dtype == torch.uint8


def test_adamw8bit_falls_back_with_one_warning_when_bitsandbytes_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    monkeypatch.setattr(optim, "_warned_8bit", False)
    p = [torch.nn.Parameter(torch.zeros(3))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o1 = build_optimizer("adamw8bit", [{"params": p, "lr": 1e-3}], lr=1e-3)
        o2 = build_optimizer("adamw8bit", [{"params": p, "lr": 1e-3}], lr=1e-3)
    msgs = [str(w.message) for w in caught if "adamw8bit" in str(w.message)]
    assert len(msgs) == 1 and "Falling back to torch AdamW" in msgs[0]
    assert type(o1) is torch.optim.AdamW and optimizer_kind(o2) == "adamw"


def test_no_trainable_parameters_is_a_clear_error():
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("adamw", [{"params": [frozen], "lr": 1e-3}], lr=1e-3)


def _lrs(name, steps=20, warmup=4, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(name, opt, warmup_steps=warmup, total_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_have_warmup_and_their_shapes():
    const = _lrs("constant")
    assert const[:4] == [0.0, 0.25, 0.5, 0.75] and const[4:] == [1.0] * 16
    cos = _lrs("cosine")
    assert cos[4] == 1.0 and cos[-1] < 0.02 and all(a >= b for a, b in zip(cos[4:], cos[5:]))
    lin = _lrs("linear")
    assert lin[4] == 1.0 and abs(lin[12] - 0.5) < 1e-6
    poly = _lrs("polynomial", power=2.0)
    assert poly[4] == 1.0 and poly[12] < lin[12]
    restarts = _lrs("cosine_with_restarts", num_cycles=2)
    assert restarts[4] == 1.0 and max(restarts[13:]) > 0.9  # the second cycle starts high again
    with pytest.raises(ValueError, match="lr_scheduler must be"):
        _lrs("step")

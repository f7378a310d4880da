"""The stopping rule hook of training.lora.run_training: called every `eval_every` steps, stops on True."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from training.lora import run_training


class _TinyLM(nn.Module):
    """A stand-in with the call shape of a causal LM: model(**batch).loss."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0))

    def forward(self, input_ids, attention_mask, labels):
        return SimpleNamespace(loss=(self.w - 1.0) ** 2 + 0 * input_ids.float().sum())


def _run(on_eval, steps: int = 50, eval_every: int = 10):
    model = _TinyLM()
    encoded = [([1, 2, 3], [-100, 2, 3])] * 4
    loss, _ = run_training(model, encoded, [model.w], steps=steps, batch_size=2, lr=0.1, pad_id=0, label="t",
                           progress=lambda _: None, eval_every=eval_every, on_eval=on_eval)
    return model, loss


def test_on_eval_runs_every_n_steps_and_after_the_last() -> None:
    seen: list[tuple[int, float]] = []
    _run(lambda step, loss: seen.append((step, loss)) or False, steps=45)
    assert [s for s, _ in seen] == [10, 20, 30, 40, 45]
    assert seen[-1][1] < seen[0][1]  # the windowed loss it is handed goes down


def test_on_eval_true_stops_training() -> None:
    calls: list[int] = []

    def stop_at_20(step: int, loss: float) -> bool:
        calls.append(step)
        return step >= 20

    model, _ = _run(stop_at_20)
    assert calls == [10, 20]
    stopped = float(model.w.detach())
    full, _ = _run(lambda step, loss: False)
    assert float(full.w.detach()) != stopped  # it really stopped early


def test_no_hook_means_fixed_steps() -> None:
    model, loss = _run(None, steps=30, eval_every=0)
    assert loss < 4.0


def test_deadline_stops_with_one_last_evaluation() -> None:
    import time

    model = _TinyLM()
    calls: list[int] = []
    run_training(model, [([1, 2], [-100, 2])], [model.w], steps=1000, batch_size=1, lr=0.1, pad_id=0, label="t",
                 progress=lambda _: None, eval_every=500, on_eval=lambda s, l_: calls.append(s) or False,
                 deadline=time.time() - 1)
    assert calls == [1]  # past the deadline: stop after the first step, scoring the weights reached


def test_device_auto_is_the_cpu_without_a_gpu_and_names_pass_through(monkeypatch) -> None:
    from training.lora import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)

"""The README's deliberate RHO-LOSS differences in the scoring pass: BatchNorm statistics restored after a train-mode
scoring pass, score_mode=eval, bf16 scoring, channels_last, and the options reaching the pass from the module."""
import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datamatters.selection import module as mod
from datamatters.selection.module import SelectiveModule
from datamatters.selection.scoring import score_batch


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


def test_train_mode_scoring_uses_batch_statistics_and_restores_running_ones():
    net, x, y = _bn_net(), torch.randn(32, 5) * 3 + 1, torch.randint(0, 3, (32,))
    before = _bn_state(net)
    out = score_batch(net, x, y, train_mode=True, keep_bn=True)
    assert all(torch.equal(before[k], v) for k, v in _bn_state(net).items())  # running statistics untouched
    assert net.training  # mode restored (was train)
    ref = copy.deepcopy(net).train()(x)  # the reference's train-mode forward: batch statistics
    assert torch.allclose(out["logits"], ref, atol=1e-5)
    assert not torch.allclose(out["logits"], copy.deepcopy(net).eval()(x), atol=1e-3)
    # the control: the reference's behaviour (update_bn_on_score=true) moves the running statistics
    score_batch(net, x, y, train_mode=True, keep_bn=False)
    assert not torch.equal(before["1.running_mean"], net.state_dict()["1.running_mean"])


def test_eval_mode_scoring_uses_running_statistics():
    net, x, y = _bn_net(), torch.randn(32, 5) * 3 + 1, torch.randint(0, 3, (32,))
    net.train()
    out = score_batch(net, x, y, train_mode=False)
    assert torch.allclose(out["logits"], copy.deepcopy(net).eval()(x), atol=1e-5) and net.training
    assert torch.allclose(out["loss"], nn.functional.cross_entropy(out["logits"], y, reduction="none"))


def test_bf16_scoring_runs_in_bf16_and_stays_close_to_fp32():
    torch.manual_seed(0)
    net, x, y = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), torch.randn(128, 64), torch.randint(0, 10, (128,))
    fp32 = score_batch(net, x, y, train_mode=False)
    bf16 = score_batch(net, x, y, train_mode=False, precision="bf16")
    assert bf16["logits"].dtype == torch.float32  # returned as fp32 for the rules
    diff = (bf16["loss"] - fp32["loss"]).abs().max()
    assert 0 < diff < 0.05  # computed in bf16 (not identical), close enough to rank points


class _Indexed(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return i, x, y


def test_module_passes_score_options_and_channels_last(monkeypatch):
    seen = []
    real = mod.score_batch

    def spy(model, x, y, **kw):
        seen.append({"channels_last": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                     **kw})
        return real(model, x, y, **kw)

    monkeypatch.setattr(mod, "score_batch", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    ds = _Indexed(torch.randn(40, 3, 8, 8), torch.randint(0, 3, (40,)))
    m = SelectiveModule(net, num_classes=3, method="ce_loss", percent_train=0.25, score_mode="eval",
                        score_precision="bf16", channels_last=True)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(m, DataLoader(ds, batch_size=20))
    assert len(seen) == 2
    assert all(s["channels_last"] and s["train_mode"] is False and s["precision"] == "bf16" and s["keep_bn"]
               for s in seen)

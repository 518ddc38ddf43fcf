"""The loop's AdamW runs PyTorch's fused kernel on CPU, and trains to the same weights as the single-tensor loop."""

from types import SimpleNamespace

import pytest
import torch

from preftune.runtime.loop import Trainer
from preftune.runtime.run import RunContext, make_accelerator

TARGET = torch.tensor([[1.0, -2.0, 0.5]])


class Regression:
    """Task: a micro-batch of inputs -> mean squared error to a fixed nonlinear map."""

    def collate(self, xs):
        x = torch.stack(xs)
        return {"x": x, "y": torch.sin(x @ TARGET.T), "attention_mask": torch.ones(len(xs), 1)}

    def loss(self, model, batch):
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"loss": loss.detach()}

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]


class SingleTensorAdamW(torch.optim.AdamW):
    """PyTorch's CPU default before this change: neither fused nor foreach."""

    def __init__(self, params, **options):
        super().__init__(params, **{**options, "fused": False, "foreach": False})


def train(tmp_path, name, steps=6):
    settings = SimpleNamespace(per_device_batch_size=4, gradient_accumulation_steps=2, max_steps=steps, num_epochs=1,
                               learning_rate=0.005, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.98, warmup_steps=0,
                               warmup_ratio=0.0, lr_scheduler="constant", seed=3, resume=None, report_to=[],
                               eval_on_start=False, logging_steps=1, eval_steps=0, save_steps=0, save_total_limit=0,
                               max_grad_norm=1.0)
    ctx = RunContext(make_accelerator("fp32", [], tmp_path / name), tmp_path / name, "fp32", settings, {"name": name})
    torch.manual_seed(0)
    examples = [torch.randn(3) for _ in range(64)]
    model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 1))
    start = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer.from_run(ctx, model=model, task=Regression(), train_examples=examples, unit="samples")
    trainer.train()
    return trainer, start, [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_on_cpu_equals_the_single_tensor_loop(tmp_path, monkeypatch, one_thread):
    fused, start, weights = train(tmp_path, "fused")
    group = fused.optimizer.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    monkeypatch.setattr(torch.optim, "AdamW", SingleTensorAdamW)
    plain, plain_start, plain_weights = train(tmp_path, "plain")
    assert plain.optimizer.param_groups[0]["fused"] is False
    for a, b, s0, s1 in zip(weights, plain_weights, start, plain_start):
        assert torch.equal(s0, s1)
        assert (a - s0).abs().max() > 5e-4          # the updates (lr 5e-3) really moved every tensor
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_fused_kernel_takes_every_floating_dtype_on_cpu(dtype):
    """The loop asks for fused on any floating dtype: PyTorch's CPU kernel has them all."""
    p = torch.nn.Parameter(torch.ones(8, dtype=dtype))
    p.grad = torch.full((8,), 0.5, dtype=dtype)
    torch.optim.AdamW([p], lr=0.1, weight_decay=0.0, fused=True).step()
    torch.testing.assert_close(p.detach().float(), torch.full((8,), 0.9), rtol=0, atol=1e-2)

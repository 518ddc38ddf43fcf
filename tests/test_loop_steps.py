"""The loop's step-function hook: an online step's own batches, state in checkpoints, samples and gauges."""

import json
from types import SimpleNamespace

import torch

from preftune.runtime.loop import StepOutput, Trainer
from preftune.runtime.run import RunContext, make_accelerator

TARGET = torch.tensor([[1.0, -2.0, 0.5]])


class Regression:
    """Task: a micro-batch of inputs -> mean squared error to a fixed linear map."""

    def collate(self, xs):
        x = torch.stack(xs)
        return {"x": x, "y": x @ TARGET.T, "attention_mask": torch.ones(len(xs), 1)}

    def loss(self, model, batch):
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"loss": loss.detach()}

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]


class NoisyOnline:
    """Draws its own inputs around the step's prompts with the torch RNG, runs two updates, and keeps
    a running count and a decaying 'temperature' (state the checkpoint must carry)."""

    gauges = ("temperature",)

    def __init__(self):
        self.load_state_dict({})

    def state_dict(self):
        return {"seen": self.seen, "temperature": self.temperature}

    def load_state_dict(self, state):
        self.seen, self.temperature = state.get("seen", 0), state.get("temperature", 1.0)

    def run(self, trainer, step):
        prompts = trainer.step_examples(step, 4)
        xs = [p + self.temperature * torch.randn(3) for p in prompts]
        outs = [trainer.optimizer_step([xs[:2], xs[2:]]) for _ in range(2)]
        self.seen += len(xs)
        metrics = {"loss": outs[-1].metrics["loss"], "temperature": self.temperature, "seen": float(self.seen)}
        self.temperature *= 0.5
        return StepOutput(metrics, 4, 4, [{"first": xs[0].tolist()}] if step % 2 == 0 else [])


def run(tmp_path, name, resume=None):
    settings = SimpleNamespace(per_device_batch_size=2, gradient_accumulation_steps=1, max_steps=6, num_epochs=1,
                               learning_rate=0.05, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, warmup_steps=0,
                               warmup_ratio=0.0, lr_scheduler="linear", seed=3, resume=resume, report_to=[],
                               eval_on_start=False, logging_steps=2, eval_steps=0, save_steps=2, save_total_limit=0,
                               max_grad_norm=1.0)
    ctx = RunContext(make_accelerator("fp32", [], tmp_path / name), tmp_path / name, "fp32", settings, {"name": name})
    torch.manual_seed(0)
    prompts = [torch.randn(3) for _ in range(10)]
    model = torch.nn.Linear(3, 1, bias=False)
    trainer = Trainer.from_run(ctx, model=model, task=Regression(), train_examples=prompts, unit="samples",
                               step=NoisyOnline(), examples_per_step=4, updates_per_step=2)
    trainer.train()
    return trainer, [json.loads(line) for line in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_online_step_resumes_exactly_with_its_state_samples_and_gauges(tmp_path, one_thread):
    full, records = run(tmp_path, "full")
    assert full.steps_per_epoch == 2 and full.scheduler.get_last_lr()[0] == 0.0   # 6 steps x 2 updates scheduled
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["temperature"] for r in records] == [0.5, 0.125, 0.03125]           # gauge: the last value
    assert [r["seen"] for r in records] == [6.0, 14.0, 22.0]                      # others: the window mean
    assert records[-1]["loss"] < records[0]["loss"]
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["extra"] == {"seen": 16, "temperature": 0.0625}

    # a second run stops after step 4 ... then resumes from step 2 as if it had crashed there
    partial, _ = run(tmp_path, "resumed")
    resumed, resumed_records = run(tmp_path, "resumed", resume=str(tmp_path / "resumed" / "checkpoints" / "step-2"))
    torch.testing.assert_close(resumed.unwrapped().weight, full.unwrapped().weight, rtol=0, atol=0)
    assert resumed_records == [{**r, "samples/s": s["samples/s"], "tokens/s": s["tokens/s"]}
                               for r, s in zip(records, resumed_records)]
    samples = lambda d: (tmp_path / d / "samples.jsonl").read_text().splitlines()  # noqa: E731
    assert samples("resumed") == samples("full") and len(samples("full")) == 3

"""bf16 mixed precision on CPU: the precision choice, every fast path against the plain bf16 computation, first
losses, the reference cache, and that no matrix product of a bf16 step runs in float32.

bf16 here is autocast with float32 master weights (what ``--precision bf16`` and ``auto`` on a fast-bf16 machine
run). Tiny models keep these cheap where a CPU emulates bf16. Tolerances are stated next to each check with the
largest difference measured on this suite's models (an AMD EPYC Zen 4 with AVX512-BF16, torch 2.13); they are
bf16 rounding (eps 2^-8 = 0.0039 relative), not float32's.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preftune import models
from preftune.data.collate import collate_completions
from preftune.data.packed import collate_blocks
from preftune.errors import ConfigError
from preftune.logprobs import packed_sequence_logprobs, sequence_logprobs
from preftune.models import apply_lora, choose_precision, computing_copy, cpu_bf16
from preftune.speed.attention import blockwise_sdpa, use_blockwise_sdpa
from preftune.speed.fused_layers import fuse_layers
from preftune.speed.fused_lora import fuse_lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = torch.bfloat16

# (prompt, [completions]) blocks: prompts shared by two completions (a pair) and single ones
BLOCKS = [([1, 40, 41, 7, 9], [[50, 51, 2], [52, 53, 54, 2]]), ([1, 42, 8], [[55, 2], [56, 57, 58, 59, 2]]),
          ([1, 43, 44, 45, 11, 12], [[60, 61, 62, 2], [63, 2]])]
SEQUENCES = [(p, cs[k]) for k in range(2) for p, cs in BLOCKS]   # completion-major, as packed batches order them


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def gqa_llama(tied: bool = True, seed: int = 0):
    """A tiny Llama with grouped-query attention and a tied head (as SmolLM2), trained-looking logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():   # larger weights: sharper, more varied distributions than the initialisation's
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def plain_bf16_logps(model, sequences) -> torch.Tensor:
    """The reference computation: transformers' own forward under bf16 autocast, one padded row per sequence,
    log-softmax of the full logits in float32."""
    out = []
    with torch.no_grad(), autocast():
        for prompt, completion in sequences:
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, :-1].float()
            picked = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(picked[len(prompt) - 1:].sum())
    return torch.stack(out)


def padded_logps(model, sequences, chunk_size=1024) -> torch.Tensor:
    prompts, completions = zip(*sequences)
    batch = collate_completions(list(prompts), list(completions), 0)
    with autocast():
        return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                 chunk_size=chunk_size)[0]


def packed_logps(model, blocks) -> torch.Tensor:
    with autocast():
        return packed_sequence_logprobs(model, collate_blocks(blocks))


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matrix product (and attention) that runs."""

    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product")

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name.startswith(p) for p in self.PRODUCTS):
            operands = args[:5] if name.endswith("_backward") else args   # (grad, q, k, v, out); then the
            dtypes = {a.dtype for a in operands                             # float32 log-sum-exp statistics
                      if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.setdefault(name, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------- the precision choice


def test_detection_reports_amx_and_avx512_bf16_as_the_cpu_flags_say():
    found = cpu_bf16()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert found.avx512_bf16 == ("avx512_bf16" in flags)
    assert found.amx == ("amx_bf16" in flags)
    assert found.capability == torch.backends.cpu.get_cpu_capability()


def test_auto_follows_the_cpu_and_explicit_bf16_runs_anywhere(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU rules apply where there is no GPU")
    monkeypatch.setattr(models, "CPU_BF16_OVERRIDE", True)
    chosen = choose_precision("auto")
    assert chosen.precision == "bf16" and "fast bf16" in chosen.reason
    monkeypatch.setattr(models, "CPU_BF16_OVERRIDE", False)
    assert choose_precision("auto").precision == "fp32"
    slow = choose_precision("bf16")
    assert slow.precision == "bf16" and "emulated" in slow.note
    assert choose_precision("fp32").as_dict() == {"requested": "fp32", "precision": "fp32", "compute": "fp32",
                                                  "reason": "asked for"}
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        choose_precision("fp16")


# ---------------------------------------------------------------------- the crash, and attention


def test_blockwise_sdpa_takes_float32_query_and_key_with_a_bf16_value_under_autocast():
    """Rotary embeddings leave q, k in float32 and v in bf16 under autocast; the lower-right causal mask used to
    refuse the mix ("Expected query, key, and value to have the same dtype")."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    v = torch.randn(1, 2, 12, 8).to(BF16)
    from preftune.speed.attention import LAYOUT_KEY, BlockAttention

    layout = BlockAttention([(0, 0, 4, [3, 5])])   # prompt 4, two completions: the second needs the mask
    with autocast():
        out, _ = blockwise_sdpa(None, q, k, v, None, **{LAYOUT_KEY: layout})
    assert out.dtype == BF16 and out.shape == (1, 12, 4, 8)


# ---------------------------------------------------------------------- every fast path against plain bf16

# Summed log-probs of the sequences above (-10 to -22 each), largest |difference| measured against the plain bf16
# computation: the head function, its chunks, prefix sharing and padding-free blocks 1.9e-6 (the same bf16
# products, float32 sums in another order), allowed 1e-4; fused LoRA 0.022 (its update is added with one
# rounding, peft's with three: bf16 rounding itself, as large as bf16 against fp32 here, 0.014), allowed 0.1.
SAME_PRODUCTS_TOL = 1e-4
LOGP_TOL = 0.1


def test_head_function_and_chunks_equal_the_plain_bf16_computation():
    model = gqa_llama()
    expected = plain_bf16_logps(model, SEQUENCES)
    for chunk in (1024, 3):
        got = padded_logps(model, SEQUENCES, chunk_size=chunk)
        torch.testing.assert_close(got, expected, rtol=0, atol=SAME_PRODUCTS_TOL)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_prefix_sharing_and_padding_free_equal_padded_rows_in_bf16(share_prefix):
    model = gqa_llama()
    assert use_blockwise_sdpa(model)
    blocks = BLOCKS if share_prefix else [(p, [c]) for p, c in SEQUENCES]
    got = packed_logps(model, blocks)
    torch.testing.assert_close(got, plain_bf16_logps(model, SEQUENCES), rtol=0, atol=SAME_PRODUCTS_TOL)
    torch.testing.assert_close(got, padded_logps(model, SEQUENCES), rtol=0, atol=SAME_PRODUCTS_TOL)


def grads_of(model, sequences, packed_blocks=None):
    model.zero_grad(set_to_none=True)
    with autocast():
        if packed_blocks is None:
            values = padded_logps(model, sequences)
        else:
            values = packed_logps(model, packed_blocks)
    (values * torch.linspace(-1, 1, values.shape[0])).sum().backward()
    return values.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# Gradients: relative norm difference of each weight's gradient against the unfused modules, measured at most
# 0.0066 (fused layers) and 0.0235 (fused LoRA); allowed 0.05 (bf16 products round to 2^-8 relative).
GRAD_TOL = 0.05


def test_fused_layers_equal_transformers_modules_in_bf16_values_and_gradients():
    plain = gqa_llama().train()
    fused = copy.deepcopy(plain)
    assert fuse_layers(fused) == 2 * 2 + 1 + 2   # two norms and an MLP per layer, the final norm
    values_a, grads_a = grads_of(plain, SEQUENCES)
    values_b, grads_b = grads_of(fused, SEQUENCES)
    torch.testing.assert_close(values_b, values_a, rtol=0, atol=SAME_PRODUCTS_TOL)   # measured: 0.0
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert relative_difference(grads_b[name], grads_a[name]) < GRAD_TOL, name


@pytest.mark.parametrize("fused_layers", [False, True])
def test_fused_lora_equals_peft_in_bf16_values_and_gradients(fused_layers):
    def lora_model(fuse: bool):
        model = gqa_llama().train()
        if fused_layers:
            fuse_layers(model)
        model = apply_lora(model, 4, 8, 0.0, ["all-linear"])
        torch.manual_seed(1)
        with torch.no_grad():   # adapters that change the output
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        if fuse:
            assert fuse_lora_layers(model) > 0
        return model

    values_a, grads_a = grads_of(lora_model(False), SEQUENCES)
    values_b, grads_b = grads_of(lora_model(True), SEQUENCES)
    torch.testing.assert_close(values_b, values_a, rtol=0, atol=LOGP_TOL)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name in grads_a:
        assert relative_difference(grads_b[name], grads_a[name]) < GRAD_TOL, name


def test_no_matrix_product_of_a_bf16_training_step_runs_in_float32():
    """Forward and backward of the fast paths (padding-free blocks, fused layers, fused LoRA, the head function)
    under bf16 autocast: every product sees bf16 operands only. (Prefix-shared blocks build a CausalBias tensor
    subclass, which cannot be created under a dispatch mode; their attention inputs are cast to one dtype, see
    the blockwise SDPA test above, and their other products are these.)"""
    for lora in (False, True):
        model = gqa_llama().train()
        fuse_layers(model)
        if lora:
            model = apply_lora(model, 4, 8, 0.0, ["all-linear"])
            fuse_lora_layers(model)
        use_blockwise_sdpa(model)
        with MatmulDtypes() as seen:
            values, _ = grads_of(model, SEQUENCES, packed_blocks=[(p, [c]) for p, c in SEQUENCES])
        assert seen.seen, "no product recorded"
        wrong = {name: dtypes for name, dtypes in seen.seen.items() if dtypes != {BF16}}
        assert not wrong, f"products not in bf16 (lora={lora}): {wrong}"
        assert values.dtype == torch.float32   # the log-prob sums stay float32


# ---------------------------------------------------------------------- the reference and its cache


def test_a_reference_copy_stored_as_it_computes_is_bitwise_the_policy_under_autocast():
    policy = gqa_llama()
    fuse_layers(policy)
    copy_ = computing_copy(copy.deepcopy(policy), "bf16")
    linear = copy_.model.layers[0].self_attn.q_proj.weight
    assert linear.dtype == BF16 and copy_.model.embed_tokens.weight.dtype == torch.float32   # tied head: fp32
    assert copy_.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(packed_logps(copy_, BLOCKS), packed_logps(policy, BLOCKS), rtol=0, atol=0)


def test_the_cache_refuses_a_file_of_another_precision(tmp_path):
    from preftune.runtime.reference import LiveReference, cache_key, precompute_logps

    model = gqa_llama()
    reference = LiveReference(model, 1024, autocast=autocast)
    path = tmp_path / "cache.safetensors"
    first = precompute_logps(reference, SEQUENCES, 0, 4, path, precision="fp32")
    assert not first.hit
    assert precompute_logps(reference, SEQUENCES, 0, 4, path, precision="fp32").hit
    with pytest.raises(ConfigError, match="another computation.*precision 'fp32'"):
        precompute_logps(reference, SEQUENCES, 0, 4, path, precision="bf16")
    keys = {cache_key("model", SEQUENCES, p) for p in ("fp32", "bf16", "fp16")}
    assert len(keys) == 3


# ---------------------------------------------------------------------- training in bf16


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from toydata import make_toy_preferences

    root = tmp_path_factory.mktemp("bf16-data")
    return {"train": write_jsonl(root / "train.jsonl", make_toy_preferences(128, seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", make_toy_preferences(64, seed=2))}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def dpo_config(model_dir, data, out, **overrides):
    from preftune import DPOConfig

    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(out), per_device_batch_size=8,
                  learning_rate=1e-3, max_length=64, logging_steps=1, max_steps=2, warmup_ratio=0.0, seed=0,
                  precision="bf16", cache_dir=str(Path(out).parent / "ref-cache"))
    values.update(overrides)
    return DPOConfig(**values)


@pytest.mark.parametrize("options", [dict(precompute_ref=True), dict(precompute_ref=False),
                                     dict(lora=True), dict(lora=True, precompute_ref=True),
                                     dict(prefix_sharing=False, padding_free=False, fused_layers=False)],
                         ids=["precomputed", "frozen-copy", "lora-adapter", "lora-precomputed", "plain"])
def test_first_dpo_loss_is_exactly_ln2_in_bf16(tiny_model_dir, pairs, tmp_path, options):
    from preftune.recipes.dpo import train_dpo

    out = tmp_path / "run"
    train_dpo(dpo_config(tiny_model_dir, pairs["train"], out, max_steps=1, **options))
    assert steps(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)   # float32 rounding of ln 2 only
    chosen = json.loads((out / "config.json").read_text())["precision_chosen"]
    assert chosen["precision"] == "bf16" and chosen["requested"] == "bf16" and "bf16 autocast" in chosen["compute"]
    assert json.loads((out / "summary.json").read_text())["precision"] == chosen


@pytest.mark.parametrize("precompute", [True, False])
def test_first_kto_loss_is_exactly_one_half_in_bf16(tiny_model_dir, pairs, tmp_path, precompute):
    from preftune import KTOConfig
    from preftune.recipes.kto import train_kto

    out = tmp_path / "run"
    cfg = KTOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(pairs["train"]), output_dir=str(out),
                    per_device_batch_size=8, learning_rate=1e-3, max_length=64, logging_steps=1, max_steps=1,
                    warmup_ratio=0.0, seed=0, precision="bf16", precompute_ref=precompute,
                    cache_dir=str(tmp_path / "ref-cache"))
    train_kto(cfg)
    assert steps(out)[0]["loss"] == pytest.approx(0.5, abs=1e-7)


def test_dpo_learns_in_bf16(tiny_model_dir, pairs, tmp_path):
    from preftune.recipes.dpo import train_dpo

    out = tmp_path / "run"
    result = train_dpo(dpo_config(tiny_model_dir, pairs["train"], out, max_steps=24, eval_dataset=str(pairs["eval"]),
                                  eval_steps=0, learning_rate=2e-3, precompute_ref=True))
    losses = [r["loss"] for r in steps(out)]
    assert sum(losses[-4:]) / 4 < 0.45 < losses[0]
    assert result.train.eval_metrics["eval/rewards/accuracies"] > 0.8


def test_kto_learns_in_bf16(tiny_model_dir, pairs, tmp_path):
    from preftune import KTOConfig
    from preftune.recipes.kto import train_kto

    out = tmp_path / "run"
    cfg = KTOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(pairs["train"]), output_dir=str(out),
                    per_device_batch_size=8, learning_rate=2e-3, max_length=64, logging_steps=1, max_steps=24,
                    warmup_ratio=0.0, seed=0, precision="bf16", cache_dir=str(tmp_path / "ref-cache"))
    train_kto(cfg)
    last = steps(out)[-4:]
    assert sum(r["loss"] for r in last) / 4 < 0.45 and min(r["rewards/margins"] for r in last) > 0.3


def test_sft_learns_in_bf16(tiny_model_dir, pairs, tmp_path):
    from preftune.config import SFTConfig
    from preftune.recipes.sft import train_sft

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in map(json.loads, pairs["train"].open())]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "run"
    cfg = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(out),
                    per_device_batch_size=8, learning_rate=3e-3, max_length=64, logging_steps=1, max_steps=24,
                    warmup_ratio=0.0, seed=0, precision="bf16")
    train_sft(cfg)
    losses = [r["loss"] for r in steps(out)]
    assert sum(losses[-4:]) / 4 < 0.7 * losses[0]


def test_reward_model_learns_in_bf16(tiny_model_dir, pairs, tmp_path):
    from preftune.config import RewardConfig
    from preftune.recipes.reward import train_reward

    out = tmp_path / "run"
    cfg = RewardConfig(model_name_or_path=str(tiny_model_dir), dataset=str(pairs["train"]), output_dir=str(out),
                       eval_dataset=str(pairs["eval"]), per_device_batch_size=8, learning_rate=1e-3, max_length=64,
                       logging_steps=1, max_steps=16, warmup_ratio=0.0, seed=0, precision="bf16")
    result = train_reward(cfg)
    assert result.train.eval_metrics["eval/accuracy"] > 0.9


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory, tiny_tokenizer, one_thread):
    from test_ppo import online_setup

    return online_setup(tmp_path_factory, tiny_tokenizer, "grpo")


def test_grpo_learns_in_bf16(grpo_setup, tmp_path):
    from preftune.recipes.grpo import train_grpo
    from preftune.recipes.ppo import read_metrics
    from test_grpo import assert_learns, config

    run = train_grpo(config(grpo_setup, tmp_path / "run", precision="bf16"))
    assert_learns(read_metrics(run.run_dir))


def test_killed_bf16_run_resumes_to_the_same_final_weights(tiny_model_dir, pairs, tmp_path):
    from safetensors.torch import load_file

    from test_train_dpo import cli

    common = ["dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(pairs["train"]), "--max_steps",
              "6", "--per_device_batch_size", "8", "--learning_rate", "1e-3", "--max_length", "64", "--save_steps",
              "2", "--logging_steps", "1", "--precision", "bf16", "--warmup_steps", "1"]
    full = cli(*common, "--output_dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = cli(*common, "--output_dir", str(tmp_path / "resumed"), env_extra={"KILL_AT_STEP": "4"})
    assert killed.returncode == -9
    resumed = cli(*common, "--output_dir", str(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("full", "resumed"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert records(tmp_path / "full")[-1]["loss"] == records(tmp_path / "resumed")[-1]["loss"]


# ---------------------------------------------------------------------- generation


def test_generation_in_bf16_samples_under_autocast_and_stays_in_vocabulary():
    from preftune.generate import SamplingSettings, generate_ids

    model = gqa_llama()
    with MatmulDtypes() as seen:
        out = generate_ids(model, [[1, 40, 41], [1, 42]], SamplingSettings(max_new_tokens=5), pad_token_id=0,
                           eos_token_id=None, seed=0, precision="bf16")
    assert all(len(r) == 5 and all(0 <= t < 96 for t in r) for r in out.response_ids)
    assert all(dtypes == {BF16} for dtypes in seen.seen.values()), seen.seen
    again = generate_ids(model, [[1, 40, 41], [1, 42]], SamplingSettings(max_new_tokens=5), pad_token_id=0,
                         eos_token_id=None, seed=0, precision="bf16")
    assert again.response_ids == out.response_ids   # same seed, same samples


# ---------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    from toyvision import make_colour_pairs

    root = tmp_path_factory.mktemp("colours-bf16")
    return {"train": write_jsonl(root / "train.jsonl", make_colour_pairs(16, root / "images", seed=1))}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize("precompute", [False, True])
def test_vision_dpo_in_bf16_starts_at_ln2(colour_data, tmp_path, family, precompute):
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo
    from toyvision import build_tiny_vlm, build_vision_processor

    processor = build_vision_processor(family)
    cfg = DPOConfig(dataset=str(colour_data["train"]), output_dir=str(tmp_path / "run"), per_device_batch_size=4,
                    learning_rate=1e-3, max_length=128, logging_steps=1, max_steps=1, seed=0, precision="bf16",
                    precompute_ref=precompute, cache_dir=str(tmp_path / "cache"))
    cfg.validate(require_model=False)
    run = train_dpo(cfg, model=build_tiny_vlm(processor, family), tokenizer=processor)
    assert steps(run.run_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)

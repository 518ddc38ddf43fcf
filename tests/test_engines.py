"""Generation engines: the default engine is preftune's sampler, weights reach a weight-holding engine
(LoRA merged) exactly, and the trainers push the policy's new weights before every sampling phase.

``MirrorEngine`` stands in for vLLM on this CPU machine: like vLLM it keeps its own copy of the model
and only ever sees the policy's weights through :meth:`sync` (:func:`preftune.engines.merged_weights`).
"""

import copy

import pytest
import torch

from preftune.engines import ENGINES, TransformersEngine, make_engine, merged_weights, sample_with
from preftune.generate import SamplingSettings, encode_prompts, generate_ids
from preftune.recipes.ppo import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["Describe the river in a few words:", "Tell me", "Describe a small cat in a few words: calm and quiet"]
SETTINGS = SamplingSettings(max_new_tokens=10, temperature=1.0)


class MirrorEngine:
    """A test engine with its own copy of the model, updated only by :meth:`sync`."""

    name = "mirror"

    def __init__(self, model, tokenizer, syncs: bool = True):
        from preftune.models import base_model

        self.model = copy.deepcopy(base_model(model))
        if hasattr(self.model, "peft_config"):
            raise AssertionError("the mirror holds a plain transformers model")
        self.tokenizer = tokenizer
        self.syncs = syncs
        self.synced = 0
        self.awake = True

    def generate(self, prompt_ids, settings, *, seed=None, row_seeds=None):
        assert self.awake, "sampling from a sleeping engine"
        return generate_ids(self.model, prompt_ids, settings, pad_token_id=self.tokenizer.pad_token_id,
                            eos_token_id=self.tokenizer.eos_token_id, seed=seed, row_seeds=row_seeds)

    def sync(self, policy):
        self.synced += 1
        if self.syncs:
            self.model.load_state_dict(merged_weights(policy), strict=True)

    def sleep(self):
        self.awake = False

    def wake(self):
        self.awake = True


@pytest.fixture()
def model(tiny_tokenizer):
    from preftune.toy import build_tiny_llama

    return build_tiny_llama(tiny_tokenizer, seed=3)


def update(model, seed=0, scale=0.3):
    """A stand-in for an optimiser step: every trainable weight moves."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def test_transformers_engine_samples_what_generate_ids_samples(model, tiny_tokenizer):
    ids = encode_prompts(tiny_tokenizer, PROMPTS)
    engine = make_engine("transformers", model, tiny_tokenizer, batch_size=2)
    assert isinstance(engine, TransformersEngine)
    for kwargs in ({"seed": 5}, {"row_seeds": [7, 8, 9]}):
        expected = generate_ids(model, ids, SETTINGS, pad_token_id=tiny_tokenizer.pad_token_id,
                                eos_token_id=tiny_tokenizer.eos_token_id, batch_size=2, **kwargs)
        got = sample_with(engine, model, ids, SETTINGS, **kwargs)
        assert got.response_ids == expected.response_ids and got.ended == expected.ended


def test_a_stale_engine_samples_the_old_policy_and_a_synced_one_the_new(model, tiny_tokenizer):
    ids = encode_prompts(tiny_tokenizer, PROMPTS) * 4
    mirror = MirrorEngine(model, tiny_tokenizer)
    update(model)
    live = TransformersEngine(model, pad_token_id=tiny_tokenizer.pad_token_id,
                              eos_token_id=tiny_tokenizer.eos_token_id)
    stale = mirror.generate(ids, SETTINGS, seed=1)
    policy = live.generate(ids, SETTINGS, seed=1)
    assert stale.response_ids != policy.response_ids       # the copy is not the policy until synced
    synced = sample_with(mirror, model, ids, SETTINGS, seed=1)
    assert synced.response_ids == policy.response_ids and synced.ended == policy.ended
    assert mirror.synced == 1 and not mirror.awake          # one phase: wake, sync, sample, sleep


def test_merged_weights_of_a_lora_policy_give_its_outputs_and_leave_it_untouched(model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0))
    update(policy, seed=2, scale=0.5)          # LoRA B starts at zero: make the adapters matter
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    weights = merged_weights(policy)
    assert not any("lora" in k or "base_layer" in k for k in weights)
    assert set(weights) == set(model.state_dict())
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(weights, strict=True)
    ids = torch.tensor([encode_prompts(tiny_tokenizer, PROMPTS[:1])[0]])
    with torch.no_grad():
        adapted, merged, base = policy(ids).logits, plain(ids).logits, model(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-2                 # the adapters really change the outputs
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k])                       # nothing merged into the policy


def test_unknown_engine_and_vllm_options_are_config_errors():
    from preftune.config import GRPOConfig
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown generation_engine 'vlm'"):
        make_engine("vlm", None, None)
    base = dict(model_name_or_path="m", dataset="d.jsonl", reward_funcs=["x:y"], num_generations=2,
                per_device_batch_size=2)
    with pytest.raises(ConfigError, match="vllm_server_url is an option of generation_engine: vllm"):
        GRPOConfig(**base, vllm_server_url="http://localhost:8000").validate()
    with pytest.raises(ConfigError, match="needs --lora|train with --lora"):
        GRPOConfig(**base, generation_engine="vllm", vllm_server_url="http://localhost:8000").validate()
    with pytest.raises(ConfigError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\]"):
        GRPOConfig(**base, generation_engine="vllm", vllm_gpu_memory_utilization=1.5).validate()


def test_vllm_engine_without_vllm_says_how_to_install(model, tiny_tokenizer):
    from preftune.errors import ConfigError

    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here: bench/gpu/vllm_check.sh runs the real engine")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"pip install 'preftune\[vllm\]'"):
        make_engine("vllm", model, tiny_tokenizer, model_path="m")


def test_vllm_row_settings_and_eos_cut():
    from preftune.engines.vllm_engine import cut_at_eos, sampling_fields

    fields = sampling_fields(SamplingSettings(max_new_tokens=5, temperature=0.7, top_k=0, top_p=0.9), 11, 2)
    assert fields == {"n": 1, "max_tokens": 5, "seed": 11, "temperature": 0.7, "top_k": -1, "top_p": 0.9,
                      "ignore_eos": True, "stop_token_ids": [2], "skip_special_tokens": False}
    assert sampling_fields(SamplingSettings(do_sample=False, top_k=5), 0, None)["temperature"] == 0.0
    assert cut_at_eos([5, 6, 2, 7], False, 2) == ([5, 6, 2], True)
    assert cut_at_eos([5, 6], True, 2) == ([5, 6, 2], True)      # stopped on EOS without returning it
    assert cut_at_eos([5, 6], False, 2) == ([5, 6], False)       # reached max_tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, one_thread):
    from test_ppo import online_setup

    return online_setup(tmp_path_factory, tiny_tokenizer, "engines")


def grpo_rewards(setup, out, **overrides):
    from preftune.config import GRPOConfig
    from preftune.recipes.grpo import train_grpo

    cfg = GRPOConfig(model_name_or_path=str(setup["model"]), dataset=str(setup["prompts"]), output_dir=str(out),
                     reward_funcs=[setup["reward"]], per_device_batch_size=16, num_generations=4,
                     max_completion_length=8, learning_rate=3e-3, max_steps=4, seed=0, log_samples_steps=0,
                     **overrides)
    cfg.validate()
    train_grpo(cfg)
    return [(r["reward"], r["completions/mean_length"]) for r in read_metrics(out)]


def test_grpo_pushes_new_weights_to_a_weight_holding_engine_every_step(setup, tmp_path, monkeypatch):
    """Routed through ``generation_engine: vllm``, a mirror engine that syncs gives exactly the default
    engine's run; one that never receives the weights samples the starting policy and drifts apart."""
    engines = []

    def mirror(syncs):
        def factory(policy, tokenizer, options):
            engines.append(MirrorEngine(policy, tokenizer, syncs=syncs))
            return engines[-1]
        return factory

    default = grpo_rewards(setup, tmp_path / "default")
    monkeypatch.setitem(ENGINES, "vllm", mirror(True))
    assert grpo_rewards(setup, tmp_path / "mirror", generation_engine="vllm") == default
    assert engines[-1].synced == 4
    monkeypatch.setitem(ENGINES, "vllm", mirror(False))
    stale = grpo_rewards(setup, tmp_path / "stale", generation_engine="vllm")
    assert stale[0] == default[0] and stale[1:] != default[1:]

"""How the model options reach transformers: quantized loading (bitsandbytes), attention kernel, hub revision and
remote code, through the one place that builds ``from_pretrained``'s keyword arguments."""

import argparse
import importlib.util

import pytest
import torch
from torch import nn

from preftune import DPOConfig
from preftune.config.base import add_config_arguments, config_from_args, load_config
from preftune.errors import ConfigError
from preftune.models import from_pretrained_options, load_any_causal_lm, load_causal_lm, load_tokenizer


def dpo_config(model_dir, **values):
    return load_config(DPOConfig, overrides={"model_name_or_path": str(model_dir), "dataset": "unused.jsonl",
                                             **values})


def parse(*argv) -> DPOConfig:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser, DPOConfig)
    return config_from_args(DPOConfig, parser.parse_args(["--model_name_or_path", "m", "--dataset", "d", *argv]))


class Recorder:
    """Stands in for a ``from_pretrained``: records its keyword arguments, then loads as the original would (without
    the options a CPU cannot honour)."""

    def __init__(self, original):
        self.original, self.calls = original, []

    def __call__(self, name_or_path, *args, **kwargs):
        self.calls.append(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map", "revision")}
        return self.original(name_or_path, *args, **kwargs)


def record(monkeypatch, cls) -> Recorder:
    recorder = Recorder(cls.from_pretrained)
    monkeypatch.setattr(cls, "from_pretrained", recorder)
    return recorder


def test_options_parse_from_flags_and_trl_names():
    cfg = parse("--load_in_4bit", "--lora", "--attn_implementation", "eager", "--revision", "v1.0",
                "--trust_remote_code", "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant")
    assert (cfg.load_in_4bit, cfg.load_in_8bit, cfg.attn_implementation, cfg.revision, cfg.trust_remote_code,
            cfg.bnb_4bit_quant_type, cfg.use_bnb_nested_quant) == (True, False, "eager", "v1.0", True, "fp4", True)
    assert parse("--model_revision", "abc123").revision == "abc123"   # TRL ModelConfig's name


@pytest.mark.parametrize("values, message", [
    ({"load_in_4bit": True}, "load_in_4bit needs lora"),
    ({"load_in_8bit": True}, "load_in_8bit needs lora"),
    ({"load_in_4bit": True, "load_in_8bit": True, "lora": True}, "cannot both be set"),
    ({"load_in_4bit": True, "lora": True, "bnb_4bit_quant_type": "int3"}, "bnb_4bit_quant_type must be one of"),
])
def test_impossible_quantization_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        dpo_config("m", **values)


def test_model_options_reach_every_loader(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from preftune.scoring.reward_model import load_classifier

    cfg = dpo_config(tiny_model_dir, attn_implementation="eager", revision="v2", trust_remote_code=True)
    models, tokenizers = record(monkeypatch, AutoModelForCausalLM), record(monkeypatch, AutoTokenizer)
    classifiers = record(monkeypatch, AutoModelForSequenceClassification)
    model = load_causal_lm(str(tiny_model_dir), settings=cfg)
    load_tokenizer(str(tiny_model_dir), cfg)
    load_classifier(str(tiny_model_dir), settings=cfg)
    expected = {"attn_implementation": "eager", "revision": "v2", "trust_remote_code": True}
    assert models.calls == [{"dtype": torch.float32, **expected}]
    assert classifiers.calls == [{"num_labels": 1, "dtype": torch.float32, "ignore_mismatched_sizes": False,
                                  **expected}]
    assert tokenizers.calls == [{"revision": "v2", "trust_remote_code": True}]   # no attention kernel for a tokenizer
    assert model.config._attn_implementation == "eager"   # really loaded with it
    # the revision names a version of model_name_or_path only: another checkpoint (a reference) is loaded as it is
    assert from_pretrained_options(cfg, "another/model") == {"attn_implementation": "eager", "trust_remote_code": True}
    assert from_pretrained_options(None, str(tiny_model_dir)) == {}   # no settings: transformers' defaults


def test_vision_loaders_take_the_options(monkeypatch):
    import transformers

    from preftune.modality.vision import VISION

    calls = []

    def fake(name_or_path, **kwargs):
        calls.append((name_or_path, kwargs))
        raise OSError("not downloaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake)
    cfg = dpo_config("org/vlm", attn_implementation="sdpa", revision="r1", trust_remote_code=True)
    for load in (lambda: VISION.load_model("org/vlm", settings=cfg), lambda: VISION.load_processor("org/vlm", cfg)):
        with pytest.raises(ConfigError):
            load()
    assert calls == [("org/vlm", {"dtype": torch.float32, "attn_implementation": "sdpa", "revision": "r1",
                                  "trust_remote_code": True}),
                     ("org/vlm", {"revision": "r1", "trust_remote_code": True})]


def test_adapter_loading_passes_the_options(tiny_model_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from preftune.models import peft_wrapping

    adapter = tmp_path / "adapter"
    with peft_wrapping():
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2)).save_pretrained(adapter)
    recorder = record(monkeypatch, AutoPeftModelForCausalLM)
    load_any_causal_lm(str(adapter), settings=dpo_config(tiny_model_dir, attn_implementation="eager"))
    assert recorder.calls == [{"dtype": torch.float32, "attn_implementation": "eager"}]


def test_quantized_loading_builds_a_bitsandbytes_config(tiny_model_dir, monkeypatch):
    """Where bitsandbytes and a CUDA GPU are present, load_in_4bit/8bit reach from_pretrained as transformers'
    BitsAndBytesConfig on this process's GPU (both faked here: the model itself then loads unquantized on CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # the fake GPU, as precision sees it
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a fake GPU")
    recorder = record(monkeypatch, AutoModelForCausalLM)
    load_causal_lm(str(tiny_model_dir), settings=dpo_config(tiny_model_dir, load_in_4bit=True, lora=True,
                                                             precision="bf16", use_bnb_nested_quant=True))
    load_causal_lm(str(tiny_model_dir), settings=dpo_config(tiny_model_dir, load_in_8bit=True, lora=True))
    four, eight = recorder.calls
    assert four["device_map"] == {"": 0} and eight["device_map"] == {"": 0}
    quantization = four["quantization_config"]
    assert isinstance(quantization, BitsAndBytesConfig)
    assert (quantization.load_in_4bit, quantization.load_in_8bit, quantization.bnb_4bit_quant_type,
            quantization.bnb_4bit_use_double_quant, quantization.bnb_4bit_compute_dtype) == (
            True, False, "nf4", True, torch.bfloat16)
    assert (eight["quantization_config"].load_in_8bit, eight["quantization_config"].load_in_4bit) == (True, False)


def test_quantized_loading_is_refused_where_it_cannot_run(tiny_model_dir, monkeypatch):
    cfg = dpo_config(tiny_model_dir, load_in_4bit=True, lora=True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"load_in_4bit needs bitsandbytes: pip install 'preftune\[quantization\]'"):
        load_causal_lm(str(tiny_model_dir), settings=cfg)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA GPU"):
        load_causal_lm(str(tiny_model_dir), settings=cfg)


def test_dpo_command_refuses_quantization_on_this_machine_with_exit_2(tiny_model_dir, tmp_path):
    """The command line: a clear message and exit 2, no traceback (no GPU here, or no bitsandbytes)."""
    import subprocess
    import sys

    from helpers import subprocess_env, write_jsonl

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("this machine can load quantized models")
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "dpo", "--model_name_or_path", str(tiny_model_dir),
                           "--dataset", str(data), "--output_dir", str(tmp_path / "run"), "--lora", "--load_in_4bit"],
                          capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 2, done.stderr
    assert "load_in_4bit needs" in done.stderr and "Traceback" not in done.stderr


class QuantizedLinear(nn.Linear):
    """Shaped as bitsandbytes' Linear4bit/Linear8bitLt: an nn.Linear subclass whose call is its own."""


def test_speed_mechanisms_leave_quantized_linears_alone():
    from preftune.speed.fused_layers import plain_linear
    from preftune.speed.head import plain_linear as plain_head

    assert plain_linear(nn.Linear(4, 4)) and plain_head(nn.Linear(4, 4)) is not None
    assert not plain_linear(QuantizedLinear(4, 4)) and plain_head(QuantizedLinear(4, 4)) is None
    head = nn.Linear(4, 4)
    head.weight = type("Params4bit", (nn.Parameter,), {})(head.weight.data)   # a quantized parameter class
    assert plain_head(head) is None

"""An exported SmolLM2 in llama.cpp itself: the same tokens as transformers, the same greedy continuations.

The checkpoint is exported as a hub checkpoint would be (the keys an imported GGUF leaves in the config removed),
so the pre-tokenizer type comes from the probe of the tokenizer's behaviour, not from the imported file.
"""

import json
import shutil

import pytest
import torch
from llamacpp import LlamaCppModel

from preftune.cli import main
from preftune.gguf_metadata import PROBE
from preftune.models import load_causal_lm

PROBES = [line for line in PROBE.splitlines() if line.strip()] + [
    PROBE, "a +b", "f (x) + g (y)", "John's dog's bone", "It's 2024: 1+1=2, isn't it?", "  leading spaces",
    "<|im_start|>user\nHi!<|im_end|>\n"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a haiku about the sea (in English)."}],
         [{"role": "system", "content": "You answer briefly."},
          {"role": "user", "content": "Name three primary colours, e.g. red + ..."}]]
NEW_TOKENS = 12


def greedy(model, ids, new_tokens):
    """Argmax continuations by plain forward passes (no EOS handling, as llamacpp.greedy)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-new_tokens:]


@pytest.fixture(scope="module")
def hub_like_dir(smollm2_dir, tmp_path_factory):
    """The converted SmolLM2 without what the GGUF import remembered (its pre-tokenizer type, general.*)."""
    path = tmp_path_factory.mktemp("smollm2-hub") / "SmolLM2-135M-Instruct"
    shutil.copytree(smollm2_dir, path)
    config = json.loads((path / "config.json").read_text())
    for key in ("gguf_tokenizer_pre", "gguf_general", "gguf_file"):
        config.pop(key, None)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def exported(hub_like_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf"
    assert main(["export", "gguf", str(hub_like_dir), "--output", str(output), "--dtype", "f16"]) == 0
    return output


def test_pre_tokenizer_and_general_keys_are_written(exported):
    import gguf

    fields = {name: field.contents() for name, field in gguf.GGUFReader(exported).fields.items()
              if name.startswith(("general.", "tokenizer.ggml.pre"))}
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "SmolLM2-135M-Instruct"
    assert fields["general.type"] == "model" and fields["general.size_label"] == "135M"


def test_llama_cpp_tokenizes_and_continues_like_transformers(exported, hub_like_dir, smollm2_tokenizer, llama_cpp):
    runtime = LlamaCppModel(llama_cpp, exported)
    try:
        for text in PROBES:
            assert runtime.tokenize(text) == smollm2_tokenizer(text, add_special_tokens=False).input_ids, text
        model = load_causal_lm(str(hub_like_dir)).eval()
        for chat in CHATS:
            prompt = smollm2_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = smollm2_tokenizer(prompt, add_special_tokens=False).input_ids
            assert runtime.tokenize(prompt) == ids
            expected = greedy(model, ids, NEW_TOKENS)
            assert runtime.greedy(ids, NEW_TOKENS) == expected, smollm2_tokenizer.decode(expected)
    finally:
        runtime.close()


def test_the_default_pre_tokenizer_would_split_differently(hub_like_dir, smollm2_tokenizer, llama_cpp, tmp_path):
    """What the probe prevents: written as 'default', llama.cpp splits " +", " (" and "'s" otherwise."""
    output = tmp_path / "default.gguf"
    assert main(["export", "gguf", str(hub_like_dir), "--output", str(output), "--dtype", "q8_0",
                 "--tokenizer_pre", "default"]) == 0
    runtime = LlamaCppModel(llama_cpp, output)
    try:
        wrong = [text for text in PROBES
                 if runtime.tokenize(text) != smollm2_tokenizer(text, add_special_tokens=False).input_ids]
    finally:
        runtime.close()
    assert len(wrong) >= 4 and "a +b" in wrong


def test_the_import_keeps_what_the_file_said(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["gguf_tokenizer_pre"] == "smollm" and config["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert config["gguf_general"]["general.license"] == "apache-2.0"
    assert config["gguf_general"]["general.basename"] == "smollm2"

"""GGUF in (a .gguf becomes a cached ordinary checkpoint) and out (``preftune export gguf``), on tiny Llamas.

Tolerances of the round trip, relative to the largest logit: f32 1e-4 (exact here), f16 1e-2, q8_0 5e-2.
"""

import json
import shutil

import pytest
import torch

from preftune import gguf_import, gguf_metadata
from preftune.cli import main
from preftune.errors import ConfigError
from preftune.models import load_causal_lm, load_tokenizer
from toydata import make_toy_preferences

TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 5e-2}
TEXT = "The cat sat on the mat and the dog slept."


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_import.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with grouped-query attention (4 query heads, 2 key/value heads) and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer) + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("gqa-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def relative_error(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def load_gguf_file(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_export_round_trips_through_transformers(gqa_model_dir, tiny_tokenizer, tmp_path, dtype, one_thread):
    output = tmp_path / f"model-{dtype}.gguf"
    assert main(["export", "gguf", str(gqa_model_dir), "--output", str(output), "--dtype", dtype]) == 0
    back, back_tokenizer = load_gguf_file(output)
    ids = tiny_tokenizer(TEXT).input_ids
    assert back_tokenizer(TEXT).input_ids == ids
    assert back_tokenizer.chat_template == tiny_tokenizer.chat_template
    assert back_tokenizer.eos_token == tiny_tokenizer.eos_token
    original = load_causal_lm(str(gqa_model_dir))
    error = relative_error(logits(original, ids), logits(back, ids))
    assert error < TOLERANCE[dtype]
    if dtype != "f32":
        assert error > 0     # the weights really were stored in fewer bits
    import gguf

    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(output).tensors}
    assert "output.weight" not in kinds                                   # tied: the runtime reuses token_embd
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"


def test_lora_adapter_is_merged_before_export(tiny_model_dir, tiny_tokenizer, tmp_path, one_thread):
    from preftune.models import apply_lora

    model = apply_lora(load_causal_lm(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)       # a trained-looking adapter that changes the outputs
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    tiny_tokenizer.save_pretrained(run / "model")
    ids = tiny_tokenizer(TEXT).input_ids
    expected = logits(model.eval(), ids)
    assert relative_error(expected, logits(load_causal_lm(str(tiny_model_dir)), ids)) > 1e-2
    assert main(["export", "gguf", str(run), "--output", str(tmp_path / "merged.gguf"), "--dtype", "f32"]) == 0
    back, _ = load_gguf_file(tmp_path / "merged.gguf")
    assert relative_error(expected, logits(back, ids)) < TOLERANCE["f32"]


def test_gguf_in_is_converted_once_by_content(gqa_model_dir, tiny_tokenizer, tmp_path, monkeypatch, one_thread):
    from preftune.export_gguf import export_gguf

    path = tmp_path / "in" / "model.gguf"
    export_gguf(gqa_model_dir, path, "f32")
    ids = tiny_tokenizer(TEXT).input_ids
    model = load_causal_lm(str(path))
    torch.testing.assert_close(logits(model, ids), logits(load_causal_lm(str(gqa_model_dir)), ids), rtol=0, atol=1e-5)
    assert load_tokenizer(str(path))(TEXT).input_ids == ids
    converted = gguf_import.resolve_model_path(str(path))
    assert json.loads((gguf_import.cache_root() / "gguf" / "hashes.json").read_text())
    assert converted.endswith(gguf_import.sha256_of(path))
    assert gguf_import.resolve_model_path(str(path.parent)) == converted        # a directory holding one .gguf

    def fail(*args):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(gguf_import, "sha256_of", fail)      # hash remembered by (path, size, mtime)
    monkeypatch.setattr(gguf_import, "load_gguf", fail)      # converted once
    assert gguf_import.resolve_model_path(str(path)) == converted
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(path, copy)
    monkeypatch.undo()
    monkeypatch.setenv(gguf_import.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_import, "load_gguf", fail)      # same content elsewhere: same checkpoint, no conversion
    assert gguf_import.resolve_model_path(str(copy)) == converted


def write_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(4)))
    return path


def run_dpo(model, tmp_path, capsys):
    code = main(["dpo", "--model_name_or_path", str(model), "--dataset", str(write_pairs(tmp_path)),
                 "--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    return code, capsys.readouterr().err


def test_bad_gguf_files_give_clear_errors(gqa_model_dir, tmp_path, capsys):
    from preftune.export_gguf import export_gguf

    text_file = tmp_path / "notes.gguf"
    text_file.write_text('{"this": "is json, not gguf"}')
    code, err = run_dpo(text_file, tmp_path, capsys)
    assert code == 2 and "notes.gguf: not a GGUF file" in err and "Traceback" not in err

    good = tmp_path / "good.gguf"
    export_gguf(gqa_model_dir, good, "f32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:3000])     # a download cut short
    code, err = run_dpo(cut, tmp_path, capsys)
    assert code == 2 and "cut.gguf: corrupt or unsupported GGUF file" in err and "Traceback" not in err

    code, err = run_dpo(tmp_path / "missing.gguf", tmp_path, capsys)
    assert code == 2 and "GGUF file not found" in err
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(good, two / "a.gguf")
    shutil.copy(good, two / "b.gguf")
    with pytest.raises(ConfigError, match="several GGUF files"):
        gguf_import.resolve_model_path(two)


def test_export_refuses_other_architectures(tmp_path, tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    assert main(["export", "gguf", str(tmp_path / "gpt2"), "--output", str(tmp_path / "x.gguf")]) == 2
    assert "supports the Llama family" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    assert main(["export", "gguf", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.gguf")]) == 2


def gguf_fields(path):
    import gguf

    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()
            if name.startswith(("general.", "tokenizer.ggml.pre"))}


def test_metadata_pre_tokenizer_and_overwrite(gqa_model_dir, tmp_path, capsys, one_thread):
    """general.* keys written; an unknown tokenizer gets 'default' with a warning, --tokenizer_pre names one; an
    import keeps both through a re-export; an existing output is refused without --overwrite."""
    first = tmp_path / "first.gguf"
    with pytest.warns(UserWarning, match="not one preftune recognises"):
        assert main(["export", "gguf", str(gqa_model_dir), "--output", str(first), "--dtype", "f32"]) == 0
    fields = gguf_fields(first)
    assert fields["tokenizer.ggml.pre"] == "default" and fields["general.name"] == gqa_model_dir.name
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["general.size_label"].endswith("K")       # tens of thousands of parameters

    named = tmp_path / "named.gguf"
    assert main(["export", "gguf", str(gqa_model_dir), "--output", str(named), "--tokenizer_pre", "qwen2",
                 "--dtype", "f32"]) == 0
    assert gguf_fields(named)["tokenizer.ggml.pre"] == "qwen2"
    size = named.stat().st_size
    assert main(["export", "gguf", str(gqa_model_dir), "--output", str(named), "--dtype", "f16"]) == 2
    assert "already exists" in capsys.readouterr().err and named.stat().st_size == size
    assert main(["export", "gguf", str(gqa_model_dir), "--output", str(named), "--dtype", "f16", "--overwrite",
                 "--tokenizer_pre", "qwen2"]) == 0
    assert named.stat().st_size < size

    carried = gguf_metadata.carried_general(gguf_import.read_gguf(named))     # what an import keeps
    assert carried["general.name"] == gqa_model_dir.name and "general.architecture" not in carried
    copy = tmp_path / "from-gguf"           # a checkpoint as the import leaves it, then exported again
    shutil.copytree(gqa_model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(gguf_tokenizer_pre="qwen2", gguf_general=carried | {"general.license": "apache-2.0"})
    (copy / "config.json").write_text(json.dumps(config))
    again = tmp_path / "again.gguf"
    assert main(["export", "gguf", str(copy), "--output", str(again), "--dtype", "f32"]) == 0
    fields = gguf_fields(again)
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["general.name"] == gqa_model_dir.name
    assert fields["general.license"] == "apache-2.0"

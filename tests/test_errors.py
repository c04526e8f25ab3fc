"""Bad input: a clear error naming the problem, exit status 2, and nothing left on disk."""
import json

import pytest
import torch

import llmquant
from llmquant import QuantConfig
from llmquant.cli import main
from llmquant.errors import CheckpointError, ConfigError

from conftest import tiny_model


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--bits", "9"], "bits must be an integer from 2 to 8"),
    (["--bits", "1"], "bits must be an integer from 2 to 8"),
    (["--group-size", "0"], "group_size must be a positive integer or -1"),
    (["--group-size", "-2"], "group_size must be a positive integer or -1"),
    (["--group-size", "4096"], "larger than in_features"),
    (["--format", "exl9"], "unknown format"),
])
def test_bad_settings(capsys, tmp_path, tiny_folder, args, message):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", tiny_folder, "--out", out, *args)
    assert code == 2 and message in err
    assert not out.exists()


@pytest.mark.parametrize("model,message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("./missing/folder", "unknown model"),
])
def test_unknown_or_missing_model(capsys, tmp_path, model, message):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", model, "--out", out)
    assert code == 2 and message in err and "smollm2-135m" in err
    assert not out.exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "quantize", tmp_path / "empty", "--out", tmp_path / "out")
    assert code == 2 and "no config.json" in err
    assert leftovers(tmp_path) == ["empty"]


def test_unsupported_architecture(capsys, tmp_path, smollm2):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    smollm2[1].save_pretrained(folder)
    code, err = run_cli(capsys, "quantize", folder, "--out", tmp_path / "out")
    assert code == 2 and "unsupported architecture 'gpt2'" in err and "llama" in err
    assert leftovers(tmp_path) == ["gpt2"]


def test_existing_output_is_refused_then_overwritten(capsys, tmp_path, tiny_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "quantize", tiny_folder, "--group-size", "32", "--out", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert leftovers(out) == ["keep.txt"]
    code, _ = run_cli(capsys, "quantize", tiny_folder, "--group-size", "32", "--out", out, "--overwrite")
    assert code == 0 and (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == ["out", "tiny-llama"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    qmodel = llmquant.quantize(tiny_model("llama"), QuantConfig(bits=4, group_size=32), progress=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llmquant.checkpoint.write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        qmodel.save(tmp_path / "ckpt")
    assert leftovers(tmp_path) == []


@pytest.fixture
def checkpoint(tmp_path):
    qmodel = llmquant.quantize(tiny_model("llama"), QuantConfig(bits=4, group_size=32), progress=False)
    return qmodel.save(tmp_path / "ckpt")


def test_truncated_safetensors(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        llmquant.load(checkpoint)


def test_unknown_quant_method(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "exl9"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'exl9' is not a format llmquant reads"):
        llmquant.load(checkpoint)


def test_config_disagreeing_with_tensors(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="disagrees with the tensors"):
        llmquant.load(checkpoint)


def test_missing_weights_and_missing_folder(checkpoint, capsys, tmp_path):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        llmquant.load(checkpoint)
    code, err = run_cli(capsys, "generate", tmp_path / "nowhere", "--prompt", "hi")
    assert code == 2 and "unknown model" in err


def test_nan_weights_are_refused(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(llmquant.LlmquantError, match="layers.1.mlp.up_proj.weight contains NaN"):
        llmquant.quantize(model, QuantConfig(bits=4, group_size=32), progress=False)


def test_layer_that_cannot_be_packed_names_itself():
    from transformers import LlamaConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=100, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ConfigError, match="mlp.gate_proj: out_features=100 is not a multiple of 8"):
        llmquant.quantize(model, QuantConfig(bits=4, group_size=16), progress=False)

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
    (["--bits", "5"], "not 5-bit; no format llmquant writes holds them"),
    (["--bits", "6", "--method", "gptq"], "not 6-bit; no format llmquant writes holds them"),
    (["--bits", "7", "--method", "awq"], "not 7-bit; no format llmquant writes holds them"),
    (["--bits", "3", "--format", "awq"], "the awq format holds 4-bit weights, not 3-bit; use --format gptq"),
])
def test_bad_settings(capsys, tmp_path, tiny_folder, args, message):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", tiny_folder, "--out", out, *args)
    assert code == 2 and message in err
    assert not out.exists()


def test_bits_no_loader_reads_are_refused_everywhere(capsys, tmp_path, monkeypatch):
    """5- to 7-bit weights: refused before any model loads by quantize, qat and sensitivity alike."""
    from llmquant import models
    from llmquant.quantization.sensitivity import sensitivity_of

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(models, "load_fp_model", no_loading)
    monkeypatch.setattr(models, "resolve_model", no_loading)
    code, err = run_cli(capsys, "qat", "--bits", "6", "--out", tmp_path / "qat")
    assert code == 2 and "not 6-bit" in err
    with pytest.raises(ConfigError, match="not 5-bit"):
        sensitivity_of("smollm2-135m", "wiki", bits=(4, 5))
    assert leftovers(tmp_path) == []


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
    code, err = run_cli(capsys, "quantize", tiny_folder, "--group-size", "32", "--out", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _ = run_cli(capsys, "quantize", tiny_folder, "--group-size", "32", "--out", out, "--overwrite")
    assert code == 0 and (out / "config.json").exists()  # an empty folder is replaced
    code, _ = run_cli(capsys, "quantize", tiny_folder, "--bits", "3", "--group-size", "32", "--out", out, "--overwrite")
    assert code == 0 and json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert leftovers(tmp_path) == ["out", "tiny-llama"]


def _someone_elses(tmp_path, kind):
    """An existing output that is not llmquant's: (path, a function giving what is there now)."""
    out = tmp_path / "out"
    if kind == "user files":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif kind == "model folder":  # e.g. --out pointing at the source model by mistake
        tiny_model("llama").save_pretrained(out)
    elif kind == "foreign quantized":  # a checkpoint another tool wrote
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    elif kind == "file":
        out.write_text("mine")
    elif kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
        out.symlink_to(tmp_path / "elsewhere")

    def state():
        return sorted((str(p.relative_to(tmp_path)), p.is_symlink(), p.read_bytes() if p.is_file() else None)
                      for p in tmp_path.rglob("*") if "tiny-llama" not in p.parts)
    return out, state


KINDS = ["user files", "model folder", "foreign quantized", "file", "symlink"]


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_never_replaces_what_llmquant_did_not_write(capsys, tmp_path, tiny_folder, kind):
    out, state = _someone_elses(tmp_path, kind)
    before = state()
    code, err = run_cli(capsys, "quantize", tiny_folder, "--group-size", "32", "--out", out, "--overwrite")
    assert code == 2 and f"output {out}" in err and "nothing was changed" in err
    assert state() == before


@pytest.mark.parametrize("kind", KINDS[:3])
def test_overwrite_refusal_holds_in_every_writer(tmp_path, tiny_folder, kind):
    from llmquant.storage.checkpoint import write_folder_atomically
    from llmquant.errors import OutputExistsError
    from llmquant.quantization.streaming import quantize_to_disk

    out, state = _someone_elses(tmp_path, kind)
    before = state()
    qmodel = llmquant.quantize(tiny_model("llama"), QuantConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(OutputExistsError, match="nothing was changed"):
        qmodel.save(out, overwrite=True)
    with pytest.raises(OutputExistsError, match="nothing was changed"):
        quantize_to_disk(tiny_folder, QuantConfig(bits=4, group_size=32), None, out, overwrite=True, progress=False)
    assert state() == before

    # the output changes while the run works: the final move checks again
    fresh = tmp_path / "fresh"

    def write_while_someone_takes_the_path(folder):
        (folder / "config.json").write_text("{}")
        fresh.mkdir()
        (fresh / "keep.txt").write_text("theirs")

    with pytest.raises(OutputExistsError):
        write_folder_atomically(fresh, write_while_someone_takes_the_path, overwrite=True)
    assert leftovers(fresh) == ["keep.txt"] and not any(p.name.startswith(".fresh") for p in tmp_path.iterdir())


def test_progress_folder_must_be_our_own(tmp_path, tiny_folder):
    from llmquant.errors import OutputExistsError
    from llmquant.quantization.streaming import quantize_to_disk

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / ".out.partial").symlink_to(elsewhere)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        quantize_to_disk(tiny_folder, QuantConfig(bits=4, group_size=32), None, tmp_path / "out", progress=False)
    assert leftovers(elsewhere) == [] and not (tmp_path / "out").exists()
    (tmp_path / ".out.partial").unlink()
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="llmquant did not write"):
        quantize_to_disk(tiny_folder, QuantConfig(bits=4, group_size=32), None, tmp_path / "out", progress=False)
    assert leftovers(tmp_path / ".out.partial") == ["notes.txt"]


def test_overwrite_of_single_file_outputs_replaces_only_their_own_kind(capsys, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    code, err = run_cli(capsys, "sensitivity", "smollm2-135m", "--out", notes, "--overwrite")
    assert code == 2 and "is not a sensitivity table" in err
    code, err = run_cli(capsys, "export-gguf", "smollm2-135m", "--out", notes, "--overwrite")
    assert code == 2 and "is not a GGUF file" in err
    assert notes.read_text() == '{"mine": true}'


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    qmodel = llmquant.quantize(tiny_model("llama"), QuantConfig(bits=4, group_size=32), progress=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llmquant.storage.checkpoint.write_safetensors", disk_full)
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

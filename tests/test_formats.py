"""Every checkpoint format implements one typed protocol, and reads a bad quantization_config as a
CheckpointError naming the key, never as a TypeError or a traceback."""
import inspect

import pytest

from llmquant.formats import FORMATS, CheckpointFormat


def _parameters(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_implements_the_protocol_with_its_signatures(name):
    fmt = FORMATS[name]
    assert isinstance(fmt, CheckpointFormat) and fmt.name == name
    for method in ("reads", "check_config", "grid_min_zero", "check_layer", "pack", "quantization_config",
                   "build_linear", "check_tensors"):
        assert _parameters(getattr(fmt, method)) == _parameters(getattr(CheckpointFormat, method)), method
    assert all(isinstance(b, int) for b in fmt.bits) and fmt.marker_suffix in fmt.tensor_suffixes


# ---- reading a bad quantization_config ----

import json  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402

import llmquant  # noqa: E402
from llmquant import QuantConfig  # noqa: E402
from llmquant.errors import CheckpointError  # noqa: E402
from llmquant.inference.loading import load_quantized_linear  # noqa: E402

from conftest import tiny_model  # noqa: E402

CONFIGS = {
    "gptq": QuantConfig(bits=4, group_size=32),
    "awq": QuantConfig(bits=4, group_size=32, format="awq"),
    "compressed-tensors": QuantConfig(method="w8a8"),
    "bitsandbytes": QuantConfig(method="nf4"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {name: llmquant.quantize(tiny_model("llama"), config, progress=False).save(root / name)
            for name, config in CONFIGS.items()}


def _set(key, value):
    return lambda qc: qc.__setitem__(key, value)


def _drop(*keys):
    return lambda qc: [qc.pop(k, None) for k in keys]


def _weights(key, value):
    return lambda qc: qc["config_groups"]["group_0"]["weights"].__setitem__(key, value)


BAD = [
    ("gptq", _set("bits", 4.0), "bits"), ("gptq", _set("bits", "4"), "bits"), ("gptq", _set("bits", True), "bits"),
    ("gptq", _set("bits", 9), "bits"), ("gptq", _drop("bits"), "no 'bits'"),
    ("gptq", _set("group_size", 0), "group_size"), ("gptq", _set("group_size", -2), "group_size"),
    ("gptq", _set("group_size", 32.0), "group_size"), ("gptq", _set("group_size", "32"), "group_size"),
    ("gptq", _drop("group_size"), "no 'group_size'"), ("gptq", _set("checkpoint_format", ["gptq"]), "checkpoint_format"),
    ("gptq", _set("dynamic", ["x"]), "dynamic"), ("gptq", _set("dynamic", {"+:.*": {"bits": "4"}}), "bits"),
    ("awq", _set("bits", 4.0), "bits"), ("awq", _set("bits", "4"), "bits"), ("awq", _drop("bits"), "no 'bits'"),
    ("awq", _set("group_size", 0), "group_size"), ("awq", _set("group_size", 32.0), "group_size"),
    ("awq", _drop("group_size"), "no 'group_size'"), ("awq", _set("version", ["gemm"]), "version"),
    ("compressed-tensors", _set("config_groups", ["group_0"]), "config_groups"),
    ("compressed-tensors", _set("config_groups", {"group_0": "int8"}), "config_groups"),
    ("compressed-tensors", _drop("config_groups"), "no 'config_groups'"),
    ("compressed-tensors", _weights("num_bits", 8.0), "num_bits"),
    ("compressed-tensors", _weights("strategy", ["channel"]), "strategy"),
    ("compressed-tensors", _drop("format"), "no 'format'"),
    ("bitsandbytes", _drop("load_in_4bit", "_load_in_4bit"), "load_in_4bit"),
    ("bitsandbytes", _set("bnb_4bit_quant_type", ["nf4"]), "bnb_4bit_quant_type"),
    ("bitsandbytes", _set("bnb_4bit_quant_storage", ["uint8"]), "bnb_4bit_quant_storage"),
]


def _broken_copy(checkpoints, tmp_path, fmt, change):
    folder = tmp_path / fmt
    shutil.copytree(checkpoints[fmt], folder)
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("fmt,change,key", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_a_bad_quantization_config_is_a_checkpoint_error_naming_the_key(checkpoints, tmp_path, fmt, change, key):
    folder = _broken_copy(checkpoints, tmp_path, fmt, change)
    with pytest.raises(CheckpointError, match=key):
        llmquant.load(folder)
    with pytest.raises(CheckpointError, match=key):
        load_quantized_linear(folder, "model.layers.0.mlp.up_proj", 64, 128)


@pytest.mark.parametrize("value", [["gptq"], "gptq", 4, None])
def test_a_quantization_config_that_is_not_a_mapping_is_a_checkpoint_error(checkpoints, tmp_path, value):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["gptq"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = value
    if value is None:
        config["quantization_config"] = {"bits": 4}  # no quant_method
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization_config|quant_method"):
        llmquant.load(folder)


def test_a_bad_quant_state_blocksize_is_a_checkpoint_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bnb"
    shutil.copytree(checkpoints["bitsandbytes"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key].tolist()))
    state["blocksize"] = 64.0
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="blocksize"):
        llmquant.load(folder)

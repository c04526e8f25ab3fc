"""Every tensor a quantized checkpoint brings is checked before any op reads it: a wrong dtype, an
index out of range (g_idx), a zero point off the grid, a group count the tensors disagree with, or
a NaN / inf scale is a CheckpointError naming the folder and the tensor, never an IndexError, a
RuntimeError from a kernel, or a model that loads and computes NaNs. Each format's checkpoint is
written by llmquant (pack-quantized: in llm-compressor's layout, as test_pack_quantized does), one
tensor of it corrupted on disk, and loaded."""
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

import llmquant
from conftest import tiny_model
from llmquant import QuantConfig
from llmquant.errors import CheckpointError
from llmquant.inference.loading import load_quantized_linear
from test_pack_quantized import write_pack_quantized

LAYER = "model.layers.0.mlp.up_proj"  # 64 -> 128
LAYERS = {"gptq-bias": "model.decoder.layers.0.fc1"}  # OPT's, 64 -> 128 with a bias
CALIB = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
BUILT = {
    # act-order: a permuted g_idx, as GPTQ writes it
    "gptq": ("llama", QuantConfig(method="gptq", bits=4, group_size=32, act_order=True), CALIB),
    "gptq-bias": ("opt", QuantConfig(bits=4, group_size=32), None),
    "awq": ("llama", QuantConfig(bits=4, group_size=32, format="awq"), None),
    "w8a8": ("llama", QuantConfig(method="w8a8", act_quant="static"), CALIB),
    "fp8": ("llama", QuantConfig(method="fp8", dtype="float32"), None),
    "fp8-block": ("llama", QuantConfig(method="fp8-block", group_size=32, dtype="float32"), None),
    "nf4": ("llama", QuantConfig(method="nf4", double_quant=True), None),
    "fp4": ("llama", QuantConfig(method="fp4"), None),
}


def _with_g_idx(folder):
    """pack-quantized with llm-compressor's activation order "group": a permuted weight_g_idx."""
    tensors = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        in_features = int(tensors[key.replace("weight_packed", "weight_shape")][1])
        order = torch.randperm(in_features, generator=generator)
        tensors[key.replace("weight_packed", "weight_g_idx")] = (order // 32).to(torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    folders = {name: llmquant.quantize(tiny_model(kind), config, calib, progress=False, device="cpu").save(root / name)
               for name, (kind, config, calib) in BUILT.items()}
    folders["pack-quantized"] = root / "pack-quantized"
    write_pack_quantized(folders["pack-quantized"], 4, 32, symmetric=False)
    _with_g_idx(folders["pack-quantized"])
    return folders


def _weights_file(folder: Path) -> Path:
    (path,) = folder.glob("*.safetensors")
    return path


def _corrupted(source: Path, destination: Path, key: str, change) -> Path:
    """A copy of the checkpoint `source` with tensor `key` replaced by change(tensor)."""
    shutil.copytree(source, destination)
    path = _weights_file(destination)
    tensors = load_file(str(path))
    tensors[key] = change(tensors[key].clone()).contiguous()
    save_file(tensors, str(path))
    return destination


def _set(index, value):
    def change(tensor):
        tensor[index] = value
        return tensor
    return change


def _cast(dtype):
    return lambda tensor: tensor.to(dtype)


def _quant_state(**fields):
    def change(tensor):
        state = json.loads(bytes(tensor.tolist()))
        state.update(fields)
        return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return change


def _gptq_stored_zero(value):
    """qzeros with the first 4-bit field of word (0, 0) set to `value`."""
    return lambda tensor: tensor.bitwise_and_(~0xF).bitwise_or_(value)


NAN, INF = float("nan"), float("inf")
CORRUPTIONS = [
    # (checkpoint, tensor suffix of LAYER, change, what the message says)
    ("gptq", "qweight", _cast(torch.float32), "float32; the format stores it as int32"),
    ("gptq", "qzeros", _cast(torch.int64), "int64; the format stores it as int32"),
    ("gptq", "g_idx", _cast(torch.int64), "int64; the format stores it as int32"),
    ("gptq", "g_idx", _set(5, 2), "a group index"),  # 64 columns in groups of 32: 0..1
    ("gptq", "g_idx", _set(0, -1), "a group index"),
    ("gptq", "g_idx", _set(3, 1 << 30), "a group index"),
    ("gptq", "g_idx", lambda g: torch.zeros_like(g), "more than group_size 32"),  # one group of 64
    ("gptq", "scales", _set((1, 7), NAN), "nan at \\[1, 7\\]"),
    ("gptq", "scales", _set((0, 0), -INF), "-inf at \\[0, 0\\]"),
    ("gptq", "scales", _cast(torch.int32), "int32; the format stores it as float16 or bfloat16 or float32"),
    ("gptq", "qzeros", _gptq_stored_zero(15), "zero point"),  # reads as 16: off the 4-bit grid
    ("gptq-bias", "bias", _set(3, INF), "inf at \\[3\\]"),
    ("gptq-bias", "bias", _cast(torch.int32), "int32; the format stores it as float16 or bfloat16 or float32"),
    ("gptq-bias", "bias", _cast(torch.float8_e4m3fn), "float8_e4m3fn"),
    ("awq", "qweight", _cast(torch.float32), "float32; the format stores it as int32"),
    ("awq", "qzeros", _cast(torch.int16), "int16; the format stores it as int32"),
    ("awq", "scales", _set((0, 3), INF), "inf at \\[0, 3\\]"),
    ("awq", "scales", _cast(torch.float64), "float64"),
    ("w8a8", "weight", _cast(torch.int32), "int32; the format stores it as int8"),
    ("w8a8", "weight_scale", _set((2, 0), NAN), "nan"),
    ("w8a8", "input_scale", _set(0, 0.0), "> 0"),
    ("w8a8", "input_scale", _set(0, -1.0), "> 0"),
    ("w8a8", "input_scale", _set(0, INF), "finite"),
    ("w8a8", "input_scale", _cast(torch.int8), "int8"),
    ("pack-quantized", "weight_packed", _cast(torch.int64), "int64; the format stores it as int32"),
    ("pack-quantized", "weight_scale", _set((4, 1), NAN), "nan at \\[4, 1\\]"),
    ("pack-quantized", "weight_zero_point", _cast(torch.float32), "float32"),
    ("pack-quantized", "weight_g_idx", _set(10, 2), "a group index"),
    ("pack-quantized", "weight_g_idx", _set(10, -1), "a group index"),
    ("pack-quantized", "weight_g_idx", lambda g: torch.ones_like(g), "more than group_size 32"),
    ("pack-quantized", "weight_g_idx", _cast(torch.float32), "float32"),
    ("pack-quantized", "weight_shape", lambda s: s.flip(0), "weight_shape holds \\[64, 128\\]"),
    ("fp8", "weight", _cast(torch.float8_e5m2), "float8_e5m2; the format stores it as float8_e4m3fn"),
    ("fp8", "weight", _set((3, 5), NAN), "NaN"),
    ("fp8", "weight", _set((0, 0), -NAN), "NaN"),
    ("fp8", "weight_scale", _set((9, 0), INF), "inf"),
    ("fp8", "weight_scale", _cast(torch.float8_e4m3fn), "float8_e4m3fn"),
    ("fp8-block", "weight_scale", _set((1, 1), NAN), "nan"),
    ("fp4", "weight", _cast(torch.int8), "int8; the format stores it as uint8"),
    ("fp4", "weight.absmax", _set(7, INF), "inf at \\[7\\]"),
    ("fp4", "weight.absmax", _cast(torch.float16), "float16"),
    ("fp4", "weight.quant_map", _set(3, NAN), "nan"),
    ("fp4", "weight.quant_state.bitsandbytes__fp4", _quant_state(dtype="int8"), "quant_state dtype"),
    ("fp4", "weight.quant_state.bitsandbytes__fp4", lambda t: t.reshape(1, -1), "one dimension"),
    ("nf4", "weight.absmax", _cast(torch.float32), "float32; the format stores it as uint8"),
    ("nf4", "weight.nested_absmax", _set(0, NAN), "nan"),
    ("nf4", "weight.nested_quant_map", _set(255, -INF), "-inf"),
    ("nf4", "weight.quant_state.bitsandbytes__nf4", _quant_state(nested_offset=NAN), "nested_offset"),
    ("nf4", "weight.quant_state.bitsandbytes__nf4", _quant_state(nested_dtype="float16"), "nested_dtype"),
]


@pytest.mark.parametrize("fmt,suffix,change,message", CORRUPTIONS,
                         ids=[f"{fmt}-{suffix}-{i}" for i, (fmt, suffix, _, _) in enumerate(CORRUPTIONS)])
def test_a_corrupted_tensor_is_a_checkpoint_error_naming_it(checkpoints, tmp_path, fmt, suffix, change, message):
    layer = LAYERS.get(fmt, LAYER)
    tensor = f"{layer}.{suffix}"
    folder = _corrupted(checkpoints[fmt], tmp_path / fmt, tensor, change)
    with pytest.raises(CheckpointError) as raised:
        llmquant.load(folder, device="cpu")
    text = str(raised.value)
    assert str(folder) in text and (tensor in text or f"{layer}: quant_state" in text), text
    assert re.search(message, text), text
    with pytest.raises(CheckpointError, match=re.escape(layer)):  # the one-linear reader checks the same
        load_quantized_linear(folder, layer, 64, 128)


@pytest.mark.parametrize("fmt", sorted([*BUILT, "pack-quantized"]))
def test_the_uncorrupted_checkpoints_load_and_run(checkpoints, fmt):
    model = llmquant.load(checkpoints[fmt], device="cpu")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_zero_scales_load_they_are_what_an_all_zero_group_stores(checkpoints, tmp_path):
    """A zero multiplier is legitimate (bitsandbytes' absmax of an all-zero block, an fp16 scale
    that underflowed); only a scale that divides activations must be > 0."""
    folder = _corrupted(checkpoints["fp4"], tmp_path / "fp4", f"{LAYER}.weight.absmax", _set(0, 0.0))
    llmquant.load(folder, device="cpu")
    folder = _corrupted(checkpoints["gptq"], tmp_path / "gptq", f"{LAYER}.scales", _set((0, 0), 0.0))
    llmquant.load(folder, device="cpu")


def test_an_unquantized_tensor_of_the_wrong_kind_is_named(checkpoints, tmp_path):
    folder = _corrupted(checkpoints["gptq"], tmp_path / "int-norm", "model.norm.weight", _cast(torch.int32))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is torch\.int32"):
        llmquant.load(folder, device="cpu")
    folder = _corrupted(checkpoints["gptq"], tmp_path / "short-norm", "model.norm.weight", lambda t: t[:-1])
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(63,\)"):
        llmquant.load(folder, device="cpu")


# ---- fuzzing: any change to one tensor of a quantized linear loads cleanly or is our error ----

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.float8_e4m3fn, torch.bool]
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # any of these may stand for another
# small enough that a finite scale times any code stays finite in fp32
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e30, -1e-30]


def _perturbed(tensor: torch.Tensor, data) -> torch.Tensor:
    kind = data.draw(st.sampled_from(["dtype", "special", "special", "values", "shape"]), label="kind")
    if kind == "dtype":
        return tensor.to(data.draw(st.sampled_from(DTYPES), label="dtype"))
    if kind == "shape":
        flat = tensor.reshape(-1)
        return flat[:data.draw(st.integers(0, max(flat.numel() - 1, 0)), label="length")] \
            if data.draw(st.booleans(), label="truncate") else flat
    tensor = tensor.clone()
    flat = tensor.view(-1)
    for _ in range(data.draw(st.integers(1, 4), label="count")):
        position = data.draw(st.integers(0, flat.numel() - 1), label="position")
        if tensor.is_floating_point():
            values = st.sampled_from(SPECIAL_FLOATS) if kind == "special" else st.floats(-1e6, 1e6)
            flat[position] = torch.tensor(data.draw(values, label="value"), dtype=torch.float64).to(tensor.dtype)
        else:
            info = torch.iinfo(tensor.dtype)
            values = st.sampled_from([info.min, info.max, -1, 0, 1, 2, 15, 16, 255]) if kind == "special" \
                else st.integers(info.min, info.max)
            flat[position] = max(info.min, min(info.max, data.draw(values, label="value")))
    return tensor


def _linear_keys(tensors: dict, marker: str) -> list[str]:
    layers = {key[: -len(marker) - 1] for key in tensors if key.endswith("." + marker)}
    return sorted(key for key in tensors if key.rsplit(".", 1)[0] in layers
                  or any(key.startswith(layer + ".weight.") for layer in layers))


FUZZED = {"gptq": "qweight", "gptq-bias": "qweight", "awq": "qweight", "w8a8": "weight_scale",
          "pack-quantized": "weight_packed", "fp8": "weight_scale", "fp8-block": "weight_scale",
          "nf4": "weight.absmax", "fp4": "weight.absmax"}


@pytest.mark.parametrize("fmt", sorted(FUZZED))
def test_fuzzed_tensors_load_cleanly_or_raise_only_our_error(checkpoints, fmt):
    """One tensor of a quantized linear changed in dtype, values or shape: the load raises a
    CheckpointError naming that linear, or the model loads, runs, and holds finite weights, and
    then the tensor is in a dtype the format stores (only float scales may stand for each other)."""
    source = checkpoints[fmt]
    path = _weights_file(source)
    tensors = load_file(str(path))
    keys = _linear_keys(tensors, FUZZED[fmt])
    ids = torch.tensor([[1, 2, 3, 4, 5]])

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(data=st.data())
    def fuzz(data):
        key = data.draw(st.sampled_from(keys), label="tensor")
        original, changed = tensors[key], dict(tensors)
        changed[key] = _perturbed(original, data).contiguous()
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "ckpt"
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
            save_file(changed, str(folder / path.name))
            try:
                model = llmquant.load(folder, device="cpu")
            except CheckpointError as exc:
                layer = key.split(".weight.")[0] if ".weight." in key else key.rsplit(".", 1)[0]
                assert layer in str(exc), (key, str(exc))
                return
            stored = changed[key].dtype
            assert stored == original.dtype or (original.dtype in SCALE_DTYPES and stored in SCALE_DTYPES), \
                f"{key} loaded as {stored}"
            with torch.no_grad():
                model(ids)  # what loads must run (finite weights can still overflow activations)
                for name, module in model.named_modules():
                    if hasattr(module, "dequantized_weight"):
                        assert torch.isfinite(module.dequantized_weight()).all(), f"{name} after changing {key}"

    fuzz()

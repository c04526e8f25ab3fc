"""Reading compressed-tensors "pack-quantized" checkpoints (llm-compressor's W4A16 and the like) on a
tiny llama written by hand in that layout; the real llm-compressor output is compared with
compressed-tensors' own decompression in tests/interop/test_their_checkpoints.py."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model
from llmquant.storage import bitpack
from llmquant.errors import CheckpointError


def pack_rows(signed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing: signed codes + 2^(bits-1), one little-endian stream per row."""
    return bitpack.pack((signed.to(torch.int32) + 2 ** (bits - 1)).t(), bits, dim=0).t().contiguous()


def write_pack_quantized(folder, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    """A tiny llama whose block linears are pack-quantized; returns {name: expected fp32 weight}."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    low, high = -2 ** (bits - 1), 2 ** (bits - 1)
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        out_features, in_features = module.weight.shape
        groups = -(-in_features // group_size)
        codes = torch.randint(low, high, (out_features, in_features), generator=generator)
        scale = torch.rand(out_features, groups, generator=generator) / 50 + 1e-3
        zero = torch.zeros(out_features, groups, dtype=torch.int64) if symmetric else \
            torch.randint(low, high, (out_features, groups), generator=generator)
        g = torch.arange(in_features) // group_size
        expected[name] = (codes - zero[:, g]).float() * scale[:, g]
        tensors[f"{name}.weight_packed"] = pack_rows(codes, bits)
        tensors[f"{name}.weight_scale"] = scale
        tensors[f"{name}.weight_shape"] = torch.tensor([out_features, in_features])
        if not symmetric:
            tensors[f"{name}.weight_zero_point"] = pack_rows(zero.t(), bits).t().contiguous()
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in expected:
            tensors[key] = value.contiguous()
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
                                      "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                                                  "strategy": "group", "group_size": group_size}}},
        "ignore": ["lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return model, expected


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 32, False), (3, 64, False), (8, 48, True)])
def test_pack_quantized_checkpoints_load_with_their_dequantized_weights(tmp_path, bits, group_size, symmetric):
    import llmquant
    from llmquant.inference.nn import PackQuantizedLinear

    folder = tmp_path / "packed"
    _, expected = write_pack_quantized(folder, bits, group_size, symmetric)
    model = llmquant.load(folder)
    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert isinstance(module, PackQuantizedLinear)
        assert torch.equal(module.dequantized_weight(), weight), name
        x = torch.randn(3, module.in_features)
        torch.testing.assert_close(module(x), x @ weight.t())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()


def test_pack_quantized_schemes_llmquant_does_not_read_are_refused(tmp_path):
    import llmquant

    folder = tmp_path / "packed"
    write_pack_quantized(folder, 4, 32, True)
    config = json.loads((folder / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight-only"):
        llmquant.load(folder)
    group["input_activations"] = None
    group["weights"]["strategy"] = "block"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="strategy"):
        llmquant.load(folder)

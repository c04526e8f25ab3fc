"""GGUF export (llama so far): the file read back with the gguf package, and loaded by transformers."""
import gguf
import numpy as np
import pytest
import torch

from llmquant.api import evaluate
from llmquant.errors import ConfigError, UnsupportedArchitectureError
from llmquant.gguf_export import export_gguf, permute_for_llama_cpp


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    return export_gguf("smollm2-135m", tmp_path_factory.mktemp("gguf") / "smol-q8_0.gguf", "q8_0")


def test_file_holds_the_metadata_and_tensors_llama_cpp_expects(q8_file, smollm2):
    model, _ = smollm2
    reader = gguf.GGUFReader(str(q8_file))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama" and fields["GGUF.version"] == 3
    assert fields["llama.block_count"] == 30 and fields["llama.attention.head_count_kv"] == 3
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 30 * 9  # embedding, final norm, nine per block (head tied)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    q = tensors["blk.3.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0
    restored = gguf.quants.dequantize(q.data, q.tensor_type).reshape(576, 576)
    expected = permute_for_llama_cpp(model.model.layers[3].self_attn.q_proj.weight.detach(), 9).numpy()
    blocks = np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True)
    # q8_0: one scale d = absmax / 127 per 32 values, codes rounded to nearest, d stored in fp16:
    # error <= d / 2 + 127 * |d - fp16(d)| <= d * (0.5 + 127 * 2^-11)
    assert (np.abs(restored - expected).reshape(-1, 32) <= blocks / 127 * (0.5 + 127 * 2.0**-11)).all()


def test_transformers_loads_it_and_perplexity_stays_within_one_percent(q8_file, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = smollm2
    loaded = AutoModelForCausalLM.from_pretrained(str(q8_file.parent), gguf_file=q8_file.name, dtype=torch.float32)
    their_tokenizer = AutoTokenizer.from_pretrained(str(q8_file.parent), gguf_file=q8_file.name)
    text = "The capital of France is"
    assert their_tokenizer(text).input_ids == tokenizer(text).input_ids
    fp = evaluate(model, max_windows=2, progress=False, tokenizer=tokenizer)["perplexity"]
    q8 = evaluate(loaded, max_windows=2, progress=False, tokenizer=their_tokenizer)["perplexity"]
    assert abs(q8 / fp - 1) < 0.01, (fp, q8)


def test_unsupported_types_and_architectures_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="GGUF type"):
        export_gguf("smollm2-135m", tmp_path / "x.gguf", "q3_k")
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        export_gguf("gemma3-270m", tmp_path / "x.gguf", "q8_0")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_q4_k_blocks_read_by_gguf_beat_q4_0_and_respect_the_layout(smollm2):
    from llmquant.gguf_q4k import quantize_q4_k

    weight = smollm2[0].model.layers[2].mlp.down_proj.weight.detach().numpy()  # rows of 1536 = 6 x 256
    blocks = quantize_q4_k(weight)
    assert blocks.shape == (576, 6 * 144) and blocks.dtype == np.uint8
    restored = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).reshape(weight.shape)
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0),
                                  gguf.GGMLQuantizationType.Q4_0).reshape(weight.shape)
    assert ((restored - weight) ** 2).mean() < ((q4_0 - weight) ** 2).mean()
    # every value within one step of its sub-block's grid
    sub = np.abs(weight.reshape(-1, 32))
    assert (np.abs(restored - weight).reshape(-1, 32) <= (sub.max(1, keepdims=True) + 1e-3) / 7).all()

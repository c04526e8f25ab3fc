"""GGUF export: files read back with the gguf package and loaded by transformers; the block
quantizers against gguf's dequantizers; refusals leave nothing behind."""
import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_config
from llmquant.api import evaluate
from llmquant.errors import ConfigError, UnsupportedArchitectureError
from llmquant.gguf_export import export_gguf, permute_for_llama_cpp
from llmquant.gguf_export.blocks32 import quantize_q4_0, quantize_q4_1, quantize_q5_0
from llmquant.gguf_export.q4_k import quantize_q4_k

TYPES = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    return export_gguf("smollm2-135m", tmp_path_factory.mktemp("gguf") / "smol-q8_0.gguf", "q8_0")


def dequantized(blocks, qtype, shape):
    return gguf.quants.dequantize(blocks, qtype).reshape(shape)


def q8_0_bound(expected):
    """q8_0: one scale d = absmax / 127 per 32 values, codes rounded to nearest, d stored in fp16:
    error <= d / 2 + 127 * |d - fp16(d)| <= d * (0.5 + 127 * 2^-11)."""
    return np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2.0**-11)


def test_file_holds_the_metadata_and_tensors_llama_cpp_expects(q8_file, smollm2):
    model, _ = smollm2
    reader = gguf.GGUFReader(str(q8_file))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama" and fields["GGUF.version"] == 3
    assert fields["llama.block_count"] == 30 and fields["llama.attention.head_count_kv"] == 3
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    # what llama.cpp's converter names SmolLM's splitting, and the original SmolLM2 GGUF says
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 30 * 9  # embedding, final norm, nine per block (head tied)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == TYPES.F32
    q = tensors["blk.3.attn_q.weight"]
    assert q.tensor_type == TYPES.Q8_0
    restored = dequantized(q.data, q.tensor_type, (576, 576))
    expected = permute_for_llama_cpp(model.model.layers[3].self_attn.q_proj.weight.detach(), 9).numpy()
    assert (np.abs(restored - expected).reshape(-1, 32) <= q8_0_bound(expected)).all()


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
    ids = their_tokenizer(text, return_tensors="pt").input_ids
    answer = their_tokenizer.decode(loaded.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer


def test_unsupported_types_architectures_and_paths_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="GGUF type"):
        export_gguf("smollm2-135m", tmp_path / "x.gguf", "q3_k")
    with pytest.raises(ConfigError, match="importance matrix"):
        export_gguf("smollm2-135m", tmp_path / "x.gguf", "q8_0", calib="wiki")
    with pytest.raises(ConfigError, match="does not exist"):
        export_gguf("smollm2-135m", tmp_path / "missing" / "x.gguf", "q8_0")
    opt = tmp_path / "opt"
    tiny_config("opt").save_pretrained(opt)
    with pytest.raises(UnsupportedArchitectureError, match="not opt"):
        export_gguf(str(opt), tmp_path / "x.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt"]  # nothing half-written


def test_a_byte_level_tokenizer_llama_cpp_cannot_name_is_refused(tiny_folder, tmp_path):
    """A byte-level BPE whose check-text ids hash to no entry of llama.cpp's table (here SmolLM2's
    tokenizer made to add a prefix space) is refused rather than written with a guessed name."""
    import json

    from llmquant.gguf_export.pretokenizer import KNOWN_PRE_TOKENIZERS, check_hash
    from transformers import AutoTokenizer

    path = tiny_folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True
    path.write_text(json.dumps(data))
    assert check_hash(AutoTokenizer.from_pretrained(tiny_folder)) not in KNOWN_PRE_TOKENIZERS
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsupportedArchitectureError, match="pre-tokenizer"):
        export_gguf(str(tiny_folder), out / "x.gguf", "q8_0")
    assert list(out.iterdir()) == []


def test_a_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    from llmquant.gguf_export import export as export_module

    calls = []

    def failing(array, qtype, importance):
        calls.append(1)
        if len(calls) == 20:
            raise OSError("No space left on device")
        return original(array, qtype, importance)

    original = export_module.quantize_tensor
    monkeypatch.setattr(export_module, "quantize_tensor", failing)
    with pytest.raises(OSError, match="No space"):
        export_gguf("smollm2-135m", tmp_path / "x.gguf", "q4_0")
    assert list(tmp_path.iterdir()) == []


def test_q4_k_blocks_read_by_gguf_beat_q4_0_and_respect_the_layout(smollm2):
    weight = smollm2[0].model.layers[2].mlp.down_proj.weight.detach().numpy()  # rows of 1536 = 6 x 256
    blocks = quantize_q4_k(weight)
    assert blocks.shape == (576, 6 * 144) and blocks.dtype == np.uint8
    restored = dequantized(blocks, TYPES.Q4_K, weight.shape)
    q4_0 = dequantized(gguf.quants.quantize(weight, TYPES.Q4_0), TYPES.Q4_0, weight.shape)
    assert ((restored - weight) ** 2).mean() < ((q4_0 - weight) ** 2).mean()
    # every value within one step of its sub-block's grid
    sub = np.abs(weight.reshape(-1, 32))
    assert (np.abs(restored - weight).reshape(-1, 32) <= (sub.max(1, keepdims=True) + 1e-3) / 7).all()


@pytest.mark.parametrize("quantize,qtype", [(quantize_q4_0, TYPES.Q4_0), (quantize_q5_0, TYPES.Q5_0),
                                           (quantize_q4_1, TYPES.Q4_1), (quantize_q4_k, TYPES.Q4_K)])
def test_importance_weighted_blocks_cut_the_weighted_error(smollm2, quantize, qtype):
    """With an imatrix that stresses some input channels, our fit (read back by gguf's own
    dequantizer, so the layout is llama.cpp's) has lower importance-weighted error than the
    unweighted reference rounding, and every value stays within one grid step of its block."""
    weight = smollm2[0].model.layers[5].mlp.gate_proj.weight.detach().numpy()[:256]  # [256, 576]
    cols = weight.shape[1] // 256 * 256
    rng = np.random.default_rng(0)
    # SmolLM2's weights sit on a Q4_1 grid already (the model comes from a Q4_1 file): jitter them off it
    weight = weight[:, :cols] + 0.2 * weight.std() * rng.standard_normal((weight.shape[0], cols)).astype(np.float32)
    importance = rng.gamma(0.5, size=cols).astype(np.float32)
    ours = dequantized(quantize(weight, importance), qtype, weight.shape)
    plain = (quantize_q4_k(weight) if qtype == TYPES.Q4_K else gguf.quants.quantize(weight, qtype))
    reference = dequantized(plain, qtype, weight.shape)

    def weighted_error(restored):
        return float((importance * (restored - weight) ** 2).sum())

    assert weighted_error(ours) < 0.97 * weighted_error(reference)
    # the weighting moves error onto unimportant channels, but only a little of it
    assert ((ours - weight) ** 2).mean() < 2 * ((reference - weight) ** 2).mean()


@pytest.mark.slow
def test_gemma3_exports_load_in_transformers_with_the_same_tokens_and_perplexity(tmp_path):
    """Gemma-3: sentencepiece-style tokenizer ("llama" model with scores and byte pieces), norms as
    1 + w, head size and sliding window in the metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmquant.models import load_fp_model

    path = export_gguf("gemma3-270m", tmp_path / "gemma-q8_0.gguf", "q8_0")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "default"  # as llama.cpp writes every sentencepiece vocab
    assert reader.fields["gemma3.attention.key_length"].contents() == 256
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    model, tokenizer = load_fp_model("gemma3-270m")
    np.testing.assert_allclose(norm.data, model.model.layers[0].input_layernorm.weight.detach().numpy() + 1)

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    their_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["The capital of France is", "  two  spaces\n\ttab naïve café 東京 <b>x</b>"]:
        assert their_tokenizer(text).input_ids == tokenizer(text).input_ids
    fp = evaluate(model, max_windows=2, progress=False, tokenizer=tokenizer)["perplexity"]
    q8 = evaluate(loaded, max_windows=2, progress=False, tokenizer=their_tokenizer)["perplexity"]
    assert abs(q8 / fp - 1) < 0.01, (fp, q8)


@pytest.mark.slow
def test_cli_imatrix_export_differs_from_the_plain_one_only_in_the_weighted_blocks(tmp_path, capsys):
    from llmquant.cli import main

    assert main(["export-gguf", "smollm2-135m", "--type", "q4_k", "--out", str(tmp_path / "plain.gguf")]) == 0
    assert main(["export-gguf", "smollm2-135m", "--type", "q4_k", "--imatrix", "wiki", "--imatrix-samples", "2",
                 "--out", str(tmp_path / "imatrix.gguf")]) == 0
    assert main(["export-gguf", "smollm2-135m", "--out", str(tmp_path / "plain.gguf")]) != 0  # exists
    plain, weighted = ({t.name: t for t in gguf.GGUFReader(str(tmp_path / f"{n}.gguf")).tensors}
                       for n in ("plain", "imatrix"))
    assert plain.keys() == weighted.keys()
    for name, tensor in plain.items():
        same = np.array_equal(tensor.data, weighted[name].data)
        # the imatrix covers the block linears (Q4_K, or Q5_0 where rows are not multiples of 256)
        assert same == (name.startswith("token_embd") or tensor.tensor_type == TYPES.F32), name

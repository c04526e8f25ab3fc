"""The output head at batch-1 decode (llmquant.inference.cpu.head): a float16 gemv where the head's weights are
float16 numbers, the module's own forward everywhere else, state_dict and weight tying untouched."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from llmquant.inference import ops
from llmquant.inference.cpu import prepare_output_head
from llmquant.inference.cpu.head import HalfGemvHead
from test_cpu_fast import HALF_TOLERANCE, relative_error


def tiny_llama(tied=True, half_numbers=True):
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config).eval()
    if half_numbers:  # as a float16 checkpoint loads into float32
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model


def own_forward(head, x):
    return torch.nn.functional.linear(x, head.weight, head.bias)


def test_one_row_runs_the_float16_gemv_and_more_rows_the_heads_own_forward():
    model = tiny_llama()
    head = model.lm_head
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gemv = prepare_output_head(model)
    assert isinstance(gemv, HalfGemvHead) and head.forward is gemv and gemv.nbytes == 128 * 64 * 2
    assert prepare_output_head(model) is gemv  # a second call keeps it
    with torch.no_grad():
        row = torch.randn(1, 1, 64)
        out = head(row)
        assert out.shape == (1, 1, 128) and out.dtype == torch.float32
        assert not torch.equal(out, own_forward(head, row))  # it did run in float16
        assert relative_error(out, own_forward(head, row)) < HALF_TOLERANCE
        rows = torch.randn(2, 3, 64)
        assert torch.equal(head(rows), own_forward(head, rows))
        with ops.use_backend("reference"):
            assert torch.equal(head(row), own_forward(head, row))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_changed_weight_is_copied_again():
    model = tiny_llama(tied=False)
    head = model.lm_head
    prepare_output_head(model)
    row = torch.randn(1, 64)
    with torch.no_grad():
        before = head(row)
        head.weight.mul_(2)
        assert relative_error(head(row), 2 * before) < 1e-6
        head.weight.add_(1e-4)  # no longer float16 numbers: its own forward, exactly
        assert torch.equal(head(row), own_forward(head, row))


def test_a_head_that_is_not_float16_numbers_keeps_its_forward():
    model = tiny_llama(half_numbers=False)
    assert prepare_output_head(model) is None
    assert "forward" not in model.lm_head.__dict__


def test_gradients_take_the_heads_own_forward():
    model = tiny_llama()
    prepare_output_head(model)
    row = torch.randn(1, 64, requires_grad=True)
    out = model.lm_head(row)
    assert torch.equal(out, own_forward(model.lm_head, row))
    out.sum().backward()
    assert row.grad is not None


@pytest.mark.slow
def test_smollm2_checkpoint_decode_steps_keep_their_perplexity(tmp_path):
    """SmolLM2 quantized and saved (its head stored in float16): 256 one-row head calls on the wiki test
    split give the logits and the next-token perplexity of the head's own forward."""
    import llmquant
    from llmquant import QuantConfig
    from llmquant.data import tokenize_corpus

    qmodel = llmquant.quantize("smollm2-135m", QuantConfig(method="rtn", bits=4, group_size=128), progress=False)
    model = llmquant.load(qmodel.save(tmp_path / "ckpt"))
    head = model.lm_head
    assert isinstance(head.__dict__.get("forward"), HalfGemvHead)  # load() gave it the gemv
    ids = tokenize_corpus(qmodel.tokenizer, "wiki", "test")[:257]
    with torch.no_grad():
        hidden = model.model(input_ids=ids[None, :-1]).last_hidden_state
        gemv = torch.cat([head(hidden[:, t:t + 1]) for t in range(hidden.shape[1])], dim=1)
        own = own_forward(head, hidden)
    assert relative_error(gemv, own) < HALF_TOLERANCE
    nll = [torch.nn.functional.cross_entropy(logits[0], ids[1:]).item() for logits in (gemv, own)]
    assert abs(math.exp(nll[0]) / math.exp(nll[1]) - 1) < 1e-3, nll

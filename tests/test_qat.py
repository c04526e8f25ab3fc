"""QAT: the straight-through estimator, LSQ's step-size gradient, training on real text, export."""
import math

import pytest
import torch

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.errors import ConfigError
from llmquant.grid import QuantizedWeight
from llmquant.training.qat import FakeQuantLinear, QATSettings, fake_quantize_ste, prepare
from llmquant.training.loop import TrainingSettings, heldout_loss, train, training_windows

TRAINING = TrainingSettings(steps=6, batch_size=2, seqlen=128, lr=1e-4, warmup_steps=1, eval_windows=4)


def test_ste_passes_gradients_inside_the_range_and_zeroes_them_outside():
    # 4-bit asymmetric grid, scale 0.5, zero 3: representable w in [-1.5, 6.0]
    scale, zero = torch.tensor([[0.5]]), torch.tensor([[3]], dtype=torch.int32)
    w = torch.tensor([[-3.0, -1.5, -0.26, 0.0, 2.2, 6.0, 6.4, 9.0]], requires_grad=True)
    fake = fake_quantize_ste(w, scale, zero, torch.zeros(8, dtype=torch.int32), maxq=15)
    assert fake.tolist() == [[-1.5, -1.5, -0.5, 0.0, 2.0, 6.0, 6.0, 6.0]]
    fake.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


def test_lsq_step_size_gradient_is_the_papers_formula():
    # symmetric 4-bit: zero 8, so v = w / s is clipped to [-Q_N, Q_P] = [-8, 7]
    weight = torch.tensor([[0.3, -1.0, 2.6, 5.0, -6.0, 0.1]])
    init = QuantizedWeight(codes=torch.zeros(1, 6, dtype=torch.uint8), scale=torch.tensor([[0.5]]),
                           zero=torch.tensor([[8]], dtype=torch.int32), group_index=torch.zeros(6, dtype=torch.int32),
                           bits=4, group_size=-1)
    layer = FakeQuantLinear(weight, None, init, maxq=15, learn_scale=True)
    layer.fake_weight().sum().backward()
    v = [0.6, -2.0, 5.2, 10.0, -12.0, 0.2]
    # d w_hat / d s: round(v) - v inside, Q_P above, -Q_N below (Esser et al., eq. 3)
    per_weight = [round(x) - x if -8 < x < 7 else (7 if x >= 7 else -8) for x in v]
    assert per_weight == pytest.approx([0.4, 0.0, -0.2, 7, -8, -0.2])
    g = 1 / math.sqrt(6 * 7)  # 1 / sqrt(weights per step size * Q_P)
    assert layer.scale.grad.item() == pytest.approx(g * sum(per_weight), rel=1e-5)


@pytest.fixture(scope="module")
def trained():
    config = QuantConfig(bits=4, group_size=-1, sym=False, dtype="float32")
    prepared = prepare("smollm2-135m", config, QATSettings(learn_scales="lsq"))
    train_windows, heldout = training_windows(prepared.tokenizer, prepared.model, TRAINING)
    torch.manual_seed(0)
    before = heldout_loss(prepared.model, heldout)
    initial_scale = prepared.layers["model.layers.4.mlp.up_proj"].scale.detach().clone()
    losses = train(prepared.model, prepared.parameter_groups(TRAINING), train_windows, TRAINING, progress=False)
    after = heldout_loss(prepared.model, heldout)
    return prepared, before, after, losses, initial_scale


def test_qat_steps_lower_the_heldout_loss_of_w4_per_channel_smollm2(trained):
    prepared, before, after, losses, initial_scale = trained
    assert after < before
    assert len(losses) == TRAINING.steps
    layer = prepared.layers["model.layers.4.mlp.up_proj"]
    assert not torch.equal(layer.scale.detach(), initial_scale)  # LSQ moved the step sizes
    assert not prepared.model.model.embed_tokens.weight.requires_grad  # only the linears train


def test_exported_checkpoint_computes_what_the_fake_quantized_model_did(trained, tmp_path):
    prepared, *_ = trained
    layer = prepared.layers["model.layers.2.self_attn.q_proj"]
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight().dequantize(), layer.fake_weight())
        ids = prepared.tokenizer("The capital of France is", return_tensors="pt").input_ids
        fake_logits = prepared.model(ids).logits
    out = prepared.export().save(tmp_path / "qat")
    loaded = llmquant.load(out)
    assert type(loaded.model.layers[2].self_attn.q_proj).__name__ == "GPTQLinear"
    with torch.no_grad(), ops.use_backend("reference"):  # the checkpoint's exact numerics; the CPU fast path: test_cpu_fast.py
        assert torch.allclose(loaded(ids).logits, fake_logits, atol=1e-4)


@pytest.mark.parametrize("grid", ["per-token", "per-tensor"])
def test_activation_fake_quantization_rounds_inputs_and_passes_gradients(grid):
    from llmquant.grid.activations import fake_quantize
    from llmquant.training.qat import fake_quantize_input

    init = QuantizedWeight(codes=torch.zeros(3, 8, dtype=torch.uint8), scale=torch.full((3, 1), 0.1),
                           zero=torch.full((3, 1), 8, dtype=torch.int32), group_index=torch.zeros(8, dtype=torch.int32),
                           bits=4, group_size=-1)
    layer = FakeQuantLinear(torch.randn(3, 8), None, init, maxq=15, learn_scale=False, act_quant=grid)
    x = torch.randn(4, 8, requires_grad=True)
    expected_input = fake_quantize(x.detach(), None if grid == "per-token" else x.detach().abs().amax().reshape(1) / 127)
    assert torch.equal(fake_quantize_input(x.detach(), grid), expected_input)
    assert torch.allclose(layer(x), expected_input @ layer.fake_weight().t(), atol=1e-6)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.fake_weight().sum(0).expand(4, 8).detach(), atol=1e-6)  # straight through


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="learn_scales"):
        QATSettings(learn_scales="pact")
    with pytest.raises(ConfigError, match="act_quant"):
        QATSettings(act_quant="per-channel")
    with pytest.raises(ConfigError, match="init"):
        QATSettings(init="awq")
    with pytest.raises(ConfigError, match="not method"):
        prepare("smollm2-135m", QuantConfig(method="gptq"))


def test_latent_weights_start_at_full_precision_inside_the_ptq_codes():
    from llmquant.grid import AffineGrid
    from llmquant.training.qat import latent_start

    torch.manual_seed(4)
    full = torch.randn(6, 64)
    grid = AffineGrid(3, False, 32)
    quantized = grid.quantize(full)
    quantized.codes[0, :5] = (quantized.codes[0, :5].long() + 1).clamp(max=7).to(torch.uint8)  # as GPTQ might
    latent = latent_start(full, quantized, maxq=7)
    g = quantized.group_index.long()
    codes = grid.quantize_values(latent, quantized.scale[:, g], quantized.zero[:, g])
    assert torch.equal(codes.to(torch.uint8), quantized.codes)  # rounding the latent gives the PTQ codes
    same = codes.to(torch.uint8) == grid.quantize(full).codes
    # where RTN agrees the latent is the full-precision weight, but for those within 1% of a step of a tie
    step = quantized.scale[:, g]
    assert ((latent - full).abs() <= 0.0101 * step)[same].all()
    assert (latent == full)[same].float().mean() > 0.95

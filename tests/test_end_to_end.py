"""Real models, real text: quantize -> save -> load -> generate, and perplexity that orders as it must."""
import json

import pytest

import llmquant
from llmquant import QuantConfig
from llmquant.api import evaluate
from llmquant.cli import main
from llmquant.inference.nn import AWQLinear, GPTQLinear, W8A8Linear

pytestmark = pytest.mark.slow
WINDOWS = 4


def ppl(model, tokenizer):
    return evaluate(model, "wiki", "test", seqlen=512, max_windows=WINDOWS, progress=False, tokenizer=tokenizer)


def test_smollm2_cli_quantize_load_generate_and_perplexity_order(tmp_path, capsys, smollm2):
    fp_model, tokenizer = smollm2
    fp = ppl(fp_model, tokenizer)["perplexity"]

    out = tmp_path / "w4g64"
    assert main(["quantize", "smollm2-135m", "--bits", "4", "--group-size", "64", "--asym", "--out", str(out)]) == 0
    model = llmquant.load(out)
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 30 * 7
    report = json.loads((out / "quantize_report.json").read_text())
    packed = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    assert packed == report["quantized_layers_packed_bytes"]
    assert packed < 0.3 * report["quantized_layers_fp16_bytes"]
    g64 = ppl(model, tokenizer)["perplexity"]

    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is") + 5

    per_channel = llmquant.quantize("smollm2-135m", QuantConfig(bits=4, group_size=-1, sym=False), progress=False)
    pc = ppl(per_channel.model, per_channel.tokenizer)["perplexity"]
    assert fp < g64 < pc, (fp, g64, pc)


def test_gemma3_quantize_save_load_generate(tmp_path):
    qmodel = llmquant.quantize("gemma3-270m", QuantConfig(bits=4, group_size=64, sym=False), progress=False)
    qmodel.save(tmp_path / "gemma")
    model = llmquant.load(tmp_path / "gemma")
    tokenizer = qmodel.tokenizer
    quantized = ppl(model, tokenizer)
    assert quantized["bos"] is True
    fp_model, _ = llmquant.models.load_fp_model("gemma3-270m")
    fp = ppl(fp_model, tokenizer)
    assert fp["perplexity"] < quantized["perplexity"] < 3 * fp["perplexity"]
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    new_text = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert new_text.strip()


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 64)])
def test_smollm2_gptq_sits_between_fp_and_rtn(tmp_path, smollm2, bits, group_size):
    fp_model, tokenizer = smollm2
    fp = ppl(fp_model, tokenizer)["perplexity"]
    rtn = llmquant.quantize("smollm2-135m", QuantConfig(bits=bits, group_size=group_size, sym=False), progress=False)
    rtn_ppl = ppl(rtn.model, tokenizer)["perplexity"]
    del rtn
    config = QuantConfig(method="gptq", bits=bits, group_size=group_size, sym=False, act_order=True)
    gptq = llmquant.quantize("smollm2-135m", config, llmquant.Calibration("wiki", nsamples=16, seqlen=512),
                             progress=False)
    folder = gptq.save(tmp_path / "gptq")
    errors = [layer["relative_output_error"] for layer in gptq.report()["layers"]]
    assert len(errors) == 210 and all(e is not None and e >= 0 for e in errors)
    gptq_ppl = ppl(llmquant.load(folder), tokenizer)["perplexity"]
    assert fp < gptq_ppl < rtn_ppl, (fp, gptq_ppl, rtn_ppl)


def test_smollm2_awq_sits_between_fp_and_rtn_and_loads_from_the_awq_format(tmp_path, smollm2):
    fp_model, tokenizer = smollm2
    fp = ppl(fp_model, tokenizer)["perplexity"]
    rtn = llmquant.quantize("smollm2-135m", QuantConfig(bits=4, group_size=-1, sym=False), progress=False)
    rtn_ppl = ppl(rtn.model, tokenizer)["perplexity"]
    del rtn
    config = QuantConfig(method="awq", bits=4, group_size=-1, sym=False, format="awq")
    awq = llmquant.quantize("smollm2-135m", config, llmquant.Calibration("wiki", nsamples=16, seqlen=512),
                            progress=False)
    folder = awq.save(tmp_path / "awq")
    assert len(awq.report()["scaling"]) == 3 * 30  # v -> o does not fit SmolLM2's grouped-query attention
    loaded = llmquant.load(folder)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, AWQLinear)
    awq_ppl = ppl(loaded, tokenizer)["perplexity"]
    assert fp < awq_ppl < rtn_ppl, (fp, awq_ppl, rtn_ppl)


def test_smollm2_smoothquant_w8a8_beats_naive_w8a8_and_serves_from_compressed_tensors(tmp_path, smollm2):
    fp_model, tokenizer = smollm2
    fp = ppl(fp_model, tokenizer)["perplexity"]
    calibration = llmquant.Calibration("wiki", nsamples=8, seqlen=512)
    results = {}
    for method in ("w8a8", "smoothquant"):
        config = QuantConfig(method=method, act_quant="static", observer="minmax")
        folder = llmquant.quantize("smollm2-135m", config, calibration, progress=False).save(tmp_path / method)
        loaded = llmquant.load(folder)
        assert isinstance(loaded.model.layers[0].mlp.down_proj, W8A8Linear)
        results[method] = ppl(loaded, tokenizer)["perplexity"]
    assert fp < results["smoothquant"] <= results["w8a8"], (fp, results)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = loaded.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_smollm2_nf4_cli_orders_perplexity_and_qlora_cli_trains_evaluates_and_generates(tmp_path, capsys, smollm2):
    fp_model, tokenizer = smollm2
    fp = ppl(fp_model, tokenizer)["perplexity"]
    nf4, fp4 = tmp_path / "nf4", tmp_path / "fp4"
    assert main(["quantize", "smollm2-135m", "--method", "nf4", "--double-quant", "--out", str(nf4)]) == 0
    assert main(["quantize", "smollm2-135m", "--method", "fp4", "--blocksize", "64", "--out", str(fp4)]) == 0
    nf4_ppl = ppl(llmquant.load(nf4), tokenizer)["perplexity"]
    fp4_ppl = ppl(llmquant.load(fp4), tokenizer)["perplexity"]
    # NF4 is information-theoretically better matched to normal weights than FP4 (QLoRA, table 2)
    assert fp < nf4_ppl < fp4_ppl, (fp, nf4_ppl, fp4_ppl)

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["finetune", str(nf4), "--steps", "6", "--batch-size", "2", "--seqlen", "64", "--lr", "1e-3",
                 "--warmup-steps", "2", "--eval-windows", "4", "--out", str(adapter), "--merge-out", str(merged)]) == 0
    report = json.loads((adapter / "finetune_report.json").read_text())
    assert report["heldout_loss_after"] < report["heldout_loss_before"]
    result = tmp_path / "eval.json"
    assert main(["eval", str(nf4), "--adapter", str(adapter), "--max-windows", "2", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["adapter"] == str(adapter)
    capsys.readouterr()
    assert main(["generate", str(merged), "--prompt", "The capital of France is", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip().startswith("The capital of France is")


def test_smollm2_qat_cli_from_gptq_init_exports_a_checkpoint_that_loads_and_generates(tmp_path, capsys):
    out = tmp_path / "qat"
    assert main(["qat", "smollm2-135m", "--bits", "3", "--group-size", "64", "--init", "gptq", "--learn-scales",
                 "lsq", "--steps", "3", "--seqlen", "64", "--lr", "1e-4", "--warmup-steps", "1", "--eval-windows", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "qat_report.json").read_text())
    assert report["qat"]["init"] == "gptq" and len(report["train_losses"]) == 3
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 3 and config["group_size"] == 64
    model = llmquant.load(out)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 30 * 7
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip().startswith("The capital of France is")

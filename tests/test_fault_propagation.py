"""Errors are caught only where they mean what the handler says: the expected failure (a source
model gone, a tile that does not fit, a dataset not on the hub) is handled as before; anything else
(a programming error, a sticky CUDA error) propagates instead of being reported as the expected one.
Also the platform and dependency guards: llmquant imports without the `resource` module, and hub
datasets are loaded with trust_remote_code=False."""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from llmquant.errors import DataError, ModelNotFoundError

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


# --- report plots -------------------------------------------------------------------------------

@pytest.fixture
def checkpoint_with_source(tmp_path):
    """(checkpoint folder, its source model folder): a tiny llama quantized in memory."""
    from transformers import AutoModelForCausalLM

    import llmquant
    from llmquant import QuantConfig

    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)  # so that the report names the folder
    checkpoint = llmquant.quantize(model, QuantConfig(bits=4, group_size=32), progress=False).save(tmp_path / "ckpt")
    assert json.loads((checkpoint / "quantize_report.json").read_text())["source_model"] == str(source)
    return checkpoint, source


def test_report_skips_the_source_plots_when_the_source_is_gone(checkpoint_with_source):
    from llmquant.evaluation.report import write_report

    checkpoint, source = checkpoint_with_source
    assert "weight_histogram.png" in write_report(checkpoint).read_text()
    shutil.rmtree(source)
    text = write_report(checkpoint).read_text()
    assert "weight_histogram.png" not in text and "errors_by_layer.png" in text
    assert "plots needing the source model were skipped: ModelNotFoundError" in text


def test_report_plot_faults_propagate(checkpoint_with_source, monkeypatch):
    from llmquant.evaluation import report

    def bug(*args, **kwargs):
        raise TypeError("a bug in the plotting")

    monkeypatch.setattr(report, "load_quantized_linear", bug)
    with pytest.raises(TypeError, match="a bug in the plotting"):
        report.write_report(checkpoint_with_source[0])


# --- GPU autotuner ------------------------------------------------------------------------------

@pytest.fixture
def tuner(monkeypatch):
    """pick_config as on a GPU: do_bench times a candidate by calling the launch once."""
    import triton.testing

    from llmquant_kernels import _launch

    monkeypatch.setattr(_launch, "INTERPRETING", False)
    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.setattr(_launch, "device_limits", lambda device: ((9, 0), 232448))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    x = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)

    def kernel():
        pass

    # a kernel with no recorded compiles: the tuner alone decides what fits
    spec = _launch.KernelSpec("kernel", kernel, "tiled", {"only": {}}, lambda dtype, constants: {})

    def tune(launch):
        _launch._TUNED.clear()
        return _launch.pick_config(spec, {}, 1, 256, 256, x, launch)

    return tune


def _too_big(candidate):
    from triton.runtime.errors import OutOfResources

    if candidate["BLOCK_N"] >= 64:
        raise OutOfResources(232448, 101376, "shared memory")
    return float(candidate["BLOCK_K"])  # the "time"


def test_tuner_skips_candidates_that_do_not_fit(tuner):
    from triton.compiler.errors import CompileTimeAssertionFailure

    chosen = tuner(_too_big)
    assert chosen["BLOCK_N"] < 64 and chosen["BLOCK_K"] == 128

    def none_fit(candidate):
        raise CompileTimeAssertionFailure(None, None, "BLOCK_K too large")

    with pytest.raises(RuntimeError, match="no launch configuration of kernel .* runs") as info:
        tuner(none_fit)
    assert isinstance(info.value.__cause__, CompileTimeAssertionFailure)


def test_tuner_does_not_tune_past_a_cuda_fault(tuner):
    def faulting(candidate):
        if candidate["BLOCK_N"] == 64:  # a later candidate: the earlier ones ran
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _too_big(candidate)

    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuner(faulting)


# --- hub datasets -------------------------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch):
    """datasets.load_dataset replaced: records its calls, answers with `answer` (a Dataset or an exception)."""
    import datasets

    calls = []
    state = {"answer": datasets.Dataset.from_dict({"text": ["one", "two"]})}

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if isinstance(state["answer"], BaseException):
            raise state["answer"]
        return state["answer"]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, state


def test_hub_datasets_are_loaded_without_running_their_scripts(hub):
    from llmquant.data import corpus_text

    calls, _ = hub
    assert corpus_text("hf:someone/texts:config", "train") == "one\n\ntwo"
    assert calls == [(("someone/texts", "config"), {"split": "train", "trust_remote_code": False})]


def test_local_data_files_are_loaded_without_scripts_either(hub, tmp_path):
    from llmquant.data import corpus_text

    calls, _ = hub
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n')
    corpus_text(str(tmp_path / "t.jsonl"), "all")
    assert calls[0][1]["trust_remote_code"] is False


def test_hub_dataset_errors(hub):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from llmquant.data import corpus_text

    _, state = hub
    for expected in (DatasetNotFoundError("no such dataset"), ConnectionError("offline"),
                     ValueError("The repository for x contains custom code which must be executed")):
        state["answer"] = expected
        with pytest.raises(DataError, match="could not load dataset 'someone/texts'"):
            corpus_text("hf:someone/texts", "train")
    state["answer"] = AttributeError("'NoneType' object has no attribute 'arrow'")  # a fault, not absence
    with pytest.raises(AttributeError):
        corpus_text("hf:someone/texts", "train")
    state["answer"] = datasets.Dataset.from_dict({"sentence": ["one"]})
    with pytest.raises(DataError, match="no 'text' column"):
        corpus_text("hf:someone/texts", "train")


# --- hub models ---------------------------------------------------------------------------------

def test_hub_model_errors(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    from llmquant.models import hub_snapshot

    for answer, expected in ((OSError("404 Client Error: Repository Not Found"), ModelNotFoundError),
                             (HFValidationError("Repo id must use alphanumeric chars"), ModelNotFoundError),
                             (TypeError("snapshot_download() got an unexpected keyword argument"), TypeError)):
        def snapshot_download(*args, answer=answer, **kwargs):
            raise answer

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        with pytest.raises(expected):
            hub_snapshot("someone/model")


# --- architecture survey ------------------------------------------------------------------------

def test_survey_reports_unbuildable_families_but_not_its_own_faults(monkeypatch):
    import transformers

    from llmquant.arch import derived

    def no_such_family(model_type):
        raise ValueError(f"Unrecognized model identifier: {model_type}")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoConfig, "for_model", no_such_family)
        [(model_type, arch, reason)] = derived.survey(("nosuchfamily",))
    assert arch is None and "ValueError: Unrecognized model identifier: nosuchfamily" in reason

    def bug(model):
        raise AttributeError("a bug in derive_arch")

    monkeypatch.setattr(derived, "derive_arch", bug)
    with pytest.raises(AttributeError, match="a bug in derive_arch"):
        derived.survey(("llama",))


# --- platforms ----------------------------------------------------------------------------------

def test_llmquant_imports_without_the_resource_module():
    """Windows has no `resource`: llmquant imports, and the peak RSS is reported as unknown."""
    code = ("import sys; sys.modules['resource'] = None\n"
            "import llmquant, llmquant.cli\n"
            "from llmquant.evaluation.report import describe_mib, peak_rss_mib\n"
            "print(peak_rss_mib(), describe_mib(peak_rss_mib()))\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "unknown"]


def test_peak_rss_where_the_platform_reports_it():
    from llmquant.evaluation.report import describe_mib, peak_rss_mib

    peak = peak_rss_mib()
    assert peak is not None and 10 < peak < 1e6 and describe_mib(peak).endswith(" MiB")

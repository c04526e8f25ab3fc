"""What users check before trusting a model: task accuracy through lm-eval, the model card, the
newcomer's first run (labelled output, thread counts)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import llmquant
from conftest import tiny_model
from llmquant import QuantConfig
from llmquant.evaluation.model_card import ASIDE_FILE, CARD_FILE, EVALS_FILE, MARKER, record_eval
from llmquant.evaluation.task_accuracy import WIKI_LAST_WORD, builtin_task_folder, last_word_passages

ROOT = Path(__file__).resolve().parents[1]


# ---- the built-in task ----

def test_last_word_passages_end_on_a_plain_word_and_are_deterministic():
    documents = ["Paris is the capital and largest city of France. " * 6 + "It lies on the Seine.\nSecond paragraph.",
                 "Too short.", "A " * 200 + "tail."]
    passages = last_word_passages(documents)
    assert len(passages) == 1 and passages == last_word_passages(documents)
    assert passages[0].endswith("France") and "\n" not in passages[0] and 30 <= len(passages[0].split()) <= 120


def test_the_builtin_task_is_a_valid_lm_eval_task_over_the_wiki_test_split(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path))
    folder = builtin_task_folder()
    rows = [json.loads(line) for line in (folder / "wiki_last_word_test.jsonl").read_text().splitlines()]
    assert len(rows) > 500 and all(r["text"].rsplit(" ", 1)[1].isalpha() for r in rows)
    spec = yaml.safe_load((folder / f"{WIKI_LAST_WORD}.yaml").read_text())
    assert spec["task"] == WIKI_LAST_WORD and spec["output_type"] == "loglikelihood"
    assert Path(spec["dataset_kwargs"]["data_files"]["test"]).is_file()


def test_task_accuracy_runs_lm_eval_on_a_loaded_quantized_model(tmp_path, smollm2, monkeypatch):
    """A tiny random llama with SmolLM2's vocabulary, quantized, saved, loaded, through lm-eval's HFLM."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from llmquant.api import evaluate_tasks

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    config = tiny_config("llama")
    config.vocab_size = len(smollm2[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    saved = llmquant.quantize(model, QuantConfig(method="rtn", bits=4, group_size=32), progress=False).save(
        tmp_path / "ckpt")
    result = evaluate_tasks(llmquant.load(saved), [WIKI_LAST_WORD], limit=4, batch_size=2, tokenizer=smollm2[1])
    metrics = result["tasks"][WIKI_LAST_WORD]
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["perplexity"] > 1
    assert result["samples"][WIKI_LAST_WORD]["effective"] == 4 and result["lm_eval"] == "0.4.13"


def test_unknown_tasks_are_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from llmquant import cli
    from llmquant.inference import loading

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["eval", "smollm2-135m", "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task(s): no_such_task" in capsys.readouterr().err


# ---- the model card ----

def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def streamed(tmp_path, tiny_folder):
    from llmquant.quantization.streaming import quantize_to_disk

    out, _ = quantize_to_disk(tiny_folder, QuantConfig(method="gptq", bits=4, group_size=32, act_order=True),
                              torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)),
                              tmp_path / "ckpt", progress=False, report_extra={"command": "llmquant quantize ..."})
    return out


def test_every_checkpoint_has_a_model_card_the_hub_reads(streamed):
    text = (streamed / CARD_FILE).read_text()
    front = _front_matter(text)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"llmquant", "gptq", "4-bit", "quantized"} <= set(front["tags"])
    assert MARKER in text and "act-order (desc_act) | True" in text and "llmquant quantize ..." in text
    assert f'llmquant.load("{streamed}")' in text and "transformers + gptqmodel" in text


def test_the_cards_llmquant_snippet_runs(streamed):
    text = (streamed / CARD_FILE).read_text()
    snippet = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope = {}
    exec(snippet, scope)  # noqa: S102 - the card's own snippet, as a user would paste it
    assert scope["model"](torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_the_cards_transformers_snippet_runs_for_a_bitsandbytes_checkpoint(tmp_path):
    """transformers reads bitsandbytes NF4 on the CPU: the card's second snippet, as a user would paste it."""
    out = llmquant.quantize(tiny_model("llama"), QuantConfig(method="nf4", group_size=64, double_quant=True),
                            progress=False).save(tmp_path / "nf4")
    snippets = re.findall(r"```python\n(.*?)```", (out / CARD_FILE).read_text(), re.S)
    assert "AutoModelForCausalLM.from_pretrained" in snippets[-1]
    scope = {}
    exec(snippets[-1], scope)  # noqa: S102
    assert scope["model"](torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_base_model_names_the_hub_original_of_a_builtin_model():
    from llmquant.evaluation.model_card import render

    report = {"llmquant_config": QuantConfig(method="nf4", group_size=64).to_dict(), "source_model": "smollm2-135m",
              "llmquant_version": "x", "bits_per_weight": 4.5, "calibration": None}
    front = _front_matter(render(Path("/out/x"), report, []))
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "nf4" in front["tags"]


def test_an_eval_of_the_checkpoint_is_recorded_in_its_card(streamed):
    record_eval(streamed, "perplexity", "wiki (test)", "8 x 512 tokens", "21.1234", "cpu float32")
    assert json.loads((streamed / EVALS_FILE).read_text())[0]["result"] == "21.1234"
    assert "| perplexity | wiki (test) | 8 x 512 tokens | 21.1234 |" in (streamed / CARD_FILE).read_text()


def test_a_readme_the_user_wrote_is_never_overwritten(tmp_path, tiny_folder, streamed):
    from llmquant.quantization.streaming import quantize_to_disk

    (streamed / CARD_FILE).write_text("# My notes\n")
    record_eval(streamed, "perplexity", "wiki (test)", "8 x 512", "20.0", "cpu")
    assert (streamed / CARD_FILE).read_text() == "# My notes\n" and MARKER in (streamed / ASIDE_FILE).read_text()
    out, _ = quantize_to_disk(tiny_folder, QuantConfig(method="rtn", bits=8, group_size=32), None, streamed,
                              overwrite=True, progress=False)
    assert (out / CARD_FILE).read_text() == "# My notes\n" and MARKER in (out / ASIDE_FILE).read_text()


# ---- the newcomer's first run ----

def test_threads_above_the_free_cores_are_warned_about(monkeypatch, capsys):
    from llmquant import cli

    monkeypatch.setattr(cli, "free_cores", lambda: (2, 1, 1.2))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    cli._use_threads(2)
    assert "--threads 2 is more than the 1 free core (2 cores, load 1.2)" in capsys.readouterr().err
    cli._use_threads(1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["quantize", "eval", "generate", "finetune", "qat", "sensitivity"])
def test_every_command_that_computes_takes_threads(command):
    from llmquant.cli import build_parser

    help_text = subprocess.run([sys.executable, "-m", "llmquant.cli", command, "--help"], capture_output=True,
                               text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "--threads" in help_text, command
    assert build_parser() is not None


def test_llmquant_models_prints_no_warnings():
    run = subprocess.run([sys.executable, "-m", "llmquant.cli", "models"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "smollm2-135m" in run.stdout
    assert "[transformers]" not in run.stderr and "warning" not in run.stderr.lower(), run.stderr[-2000:]


# ---- real models (slow) ----

@pytest.mark.slow
def test_accuracy_orders_fp_over_4_bit_over_3_bit(tmp_path, monkeypatch):
    """SmolLM2 on 200 passages of the built-in task: FP >= 4-bit >= 3-bit (RTN, per channel, so that
    the ladder is steep), each within 2 points of slack for sampling noise."""
    from llmquant.api import evaluate_tasks

    results = {"fp": evaluate_tasks("smollm2-135m", [WIKI_LAST_WORD], limit=200, device="cpu")}
    for bits in (4, 3):
        out = llmquant.quantize("smollm2-135m", QuantConfig(method="rtn", bits=bits, group_size=-1, sym=False),
                                progress=False).save(tmp_path / f"w{bits}")
        results[f"w{bits}"] = evaluate_tasks(out, [WIKI_LAST_WORD], limit=200, device="cpu")
    acc = {name: r["tasks"][WIKI_LAST_WORD]["acc"] for name, r in results.items()}
    print(json.dumps(acc))
    assert acc["fp"] + 0.02 >= acc["w4"] and acc["w4"] + 0.02 >= acc["w3"]
    assert acc["fp"] > acc["w3"]


@pytest.mark.slow
def test_llmquant_eval_tasks_matches_lm_evals_own_cli(tmp_path):
    """The same model and task through lm-eval's CLI (it loads the folder itself) and through
    `llmquant eval --tasks`: the same accuracy."""
    from llmquant.models import builtin_model_path

    folder = builtin_model_path("smollm2-135m")
    include = builtin_task_folder()
    theirs_dir = tmp_path / "lm_eval_out"
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={folder},dtype=float32", "--tasks", WIKI_LAST_WORD, "--include_path",
                          str(include), "--limit", "40", "--device", "cpu", "--batch_size", "8",
                          "--output_path", str(theirs_dir)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(next(theirs_dir.rglob("results_*.json")).read_text())["results"][WIKI_LAST_WORD]
    ours_file = tmp_path / "ours.json"
    run = subprocess.run([sys.executable, "-m", "llmquant.cli", "eval", "smollm2-135m", "--tasks", WIKI_LAST_WORD,
                          "--limit", "40", "--device", "cpu", "--json", str(ours_file)], capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = json.loads(ours_file.read_text())["tasks"][WIKI_LAST_WORD]
    print(f"lm-eval CLI acc {theirs['acc,none']}, ppl {theirs['perplexity,none']}; "
          f"llmquant acc {ours['acc']}, ppl {ours['perplexity']}")
    assert abs(ours["acc"] - theirs["acc,none"]) <= 1 / 40  # at most one example flips on rounding
    assert ours["perplexity"] == pytest.approx(theirs["perplexity,none"], rel=1e-3)

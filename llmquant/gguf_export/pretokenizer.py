"""The pre-tokenizer name written as `tokenizer.ggml.pre`, found as llama.cpp's own converter finds it.

llama.cpp splits text with a fixed regex per name before applying a byte-level BPE; with the wrong
name (or "default") its token ids differ from the Hugging Face tokenizer's on ordinary text. Its
converter (convert_hf_to_gguf.py, get_vocab_base_pre) encodes a fixed check text with the model's
tokenizer, hashes the ids and looks the hash up in a table; we do the same with the entries for the
model families our GGUF export can meet. Sentencepiece-style vocabularies (tokenizer model "llama")
take no pre-tokenizer regex: llama.cpp's converter writes "default" for all of them.
"""
from __future__ import annotations

from hashlib import sha256

from ..errors import UnsupportedArchitectureError

# llama.cpp's check text, byte for byte: whitespace runs, emoji sequences, digit runs, scripts without
# spaces, CJK, repeated punctuation and English contractions in odd cases.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp pre-tokenizer name (from llama.cpp's
# convert_hf_to_gguf.py; the comment names the tokenizer each hash was taken from).
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B-Instruct
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # meta-llama/Llama-4-Scout-17B-16E-Instruct
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M (and SmolLM2)
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-ai/deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-ai/deepseek-coder-6.7b-base
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # deepseek-ai/DeepSeek-V3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # tiiuae/falcon-7b
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # allenai/OLMo-1.7-7B-hf (also MPT's)
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stabilityai/stablelm-2-zephyr-1_6b
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",  # smallcloudai/Refact-1_6-base
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",  # CohereForAI/c4ai-command-r-v01
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",  # LumiOpen/Poro-34B-chat
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",  # LumiOpen/Viking-7B
}
SENTENCEPIECE_PRE_TOKENIZER = "default"


def check_hash(tokenizer) -> str:
    """The hash llama.cpp's converter keys its table with: sha256 of the printed list of ids that
    `tokenizer.encode` gives for the check text (special tokens added as the tokenizer adds them)."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer, byte_level: bool) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE; raises for a byte-level BPE
    whose splitting llama.cpp's table does not name (a GGUF with a guessed name would tokenize
    differently in llama.cpp than in transformers)."""
    if not byte_level:
        return SENTENCEPIECE_PRE_TOKENIZER
    digest = check_hash(tokenizer)
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        raise UnsupportedArchitectureError(
            f"GGUF export cannot name this tokenizer's pre-tokenizer for llama.cpp: its check hash {digest} "
            "is not in llmquant's table (llmquant/gguf_export/pretokenizer.py, taken from llama.cpp's "
            "convert_hf_to_gguf.py get_vocab_base_pre); writing a guess would make llama.cpp split text "
            "differently from this tokenizer"
        )
    return name

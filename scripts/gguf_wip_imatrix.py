import torch
from llmquant.gguf_export import export_gguf
from llmquant.api import evaluate
from llmquant import Calibration
from transformers import AutoModelForCausalLM, AutoTokenizer
for label, calib in (("q4_k", None), ("q4_k+imatrix", Calibration("wiki", 16, 512))):
    p = export_gguf("smollm2-135m", f"/tmp/smol_{label}.gguf", "q4_k", calib)
    m = AutoModelForCausalLM.from_pretrained("/tmp", gguf_file=p.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained("/tmp", gguf_file=p.name)
    r = evaluate(m, max_windows=8, progress=False, tokenizer=tok)
    print(label, "ppl8", round(r["perplexity"], 3))

import torch, sys
from llmquant.gguf_export import export_gguf
from llmquant.api import evaluate
from transformers import AutoModelForCausalLM, AutoTokenizer
for t in sys.argv[1:]:
    p = export_gguf("smollm2-135m", f"/tmp/smol_{t}.gguf", t)
    m = AutoModelForCausalLM.from_pretrained("/tmp", gguf_file=p.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained("/tmp", gguf_file=p.name)
    r = evaluate(m, max_windows=8, progress=False, tokenizer=tok)
    print(t, round(p.stat().st_size/1e6, 1), "MB", "ppl8", round(r["perplexity"], 3))

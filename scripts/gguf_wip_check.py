import torch, time, sys
from llmquant.gguf_export import export_gguf
from llmquant.models import load_fp_model
t=time.time()
p = export_gguf("smollm2-135m", "/tmp/smol_q8.gguf", sys.argv[1])
print("written", p, p.stat().st_size/1e6, "MB", time.time()-t)
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained("/tmp", gguf_file="smol_q8.gguf", dtype=torch.float32)
tok = AutoTokenizer.from_pretrained("/tmp", gguf_file="smol_q8.gguf")
ref, rtok = load_fp_model("smollm2-135m")
ids = rtok("The capital of France is", return_tensors="pt").input_ids
print("tok equal", tok("The capital of France is", return_tensors="pt").input_ids.tolist() == ids.tolist())
with torch.no_grad():
    a = m(ids).logits; b = ref(ids).logits
print("max diff", (a-b).abs().max().item(), b.abs().max().item())
print(tok.decode(m.generate(ids, max_new_tokens=10, do_sample=False)[0]))

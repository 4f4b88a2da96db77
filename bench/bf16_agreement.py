"""How often bf16 greedy decoding of the default model keeps fp32's first 20 tokens, for Albireo and
for transformers itself (the yardstick: bf16 rounding flips near-ties in a 135M model). Runs on
the current device (CPU here; the GPU device test asks the same question there)."""

import torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from albireo import LLM, SamplingParams
from albireo.config import default_model_path
questions = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "Translate 'good morning' to Spanish.", "What planet is known as the red planet?",
    "Give me a synonym for happy.", "What is the largest ocean on Earth?", "How many legs does a spider have?",
]
llm = LLM()
tok = llm.get_tokenizer()
prompts = [tok.encode(llm.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False) for q in questions]
path = Path(default_model_path())
def hf(dtype):
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            o = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=2)
        outs.append(o[0, len(p):].tolist())
    return outs
params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
ours32 = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
del llm
ours16 = [o.outputs[0].token_ids for o in LLM(dtype="bfloat16").generate(prompts, params, use_tqdm=False)]
hf32, hf16 = hf(torch.float32), hf(torch.bfloat16)
def same(a, b): return sum(x == y for x, y in zip(a, b))
def prefix(a, b): return [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), len(u)) for u, v in zip(a, b)]
print("ours fp32 == hf fp32:", same(ours32, hf32), "/10")
print("hf bf16 == hf fp32 (20 tokens):", same(hf16, hf32), "/10", prefix(hf16, hf32))
print("ours bf16 (cpu) == hf fp32:", same(ours16, hf32), "/10", prefix(ours16, hf32))
print("ours bf16 (cpu) == hf bf16:", same(ours16, hf16), "/10", prefix(ours16, hf16))

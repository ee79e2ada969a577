"""Offline top-k teacher cache for language models: the teacher runs once, training reads k log-probs per token.

For every position t of every token block the cache keeps the teacher's k most likely next tokens at the kd
temperature T — their ids and log-probs log softmax(logits / T) — and the log of the mass of all other ids,
rest = log(1 − Σ p_topk), computed as the logsumexp of the other log-probs (stable when the top k hold nearly
all the mass). Positions follow the logits: position t is the distribution over token t + 1.

Storage per position: k ids (uint16 when V ≤ 65,536, else int32), k log-probs (float16) and rest (float32):
k = 64 → 64 · (2 + 2) + 4 = 260 bytes per token. Files, in one folder:

    shard_00000.ids.npy  (n, T, k)    shard_00000.logprobs.npy  (n, T, k)    shard_00000.rest.npy  (n, T)
    …  one shard per `shard_size` examples, each file written to a temp file and renamed
    manifest.json  k, temperature, V, T, dtypes, shards (file sizes and sha256), teacher and data fingerprints,
                   tokens stored, bytes per token; written atomically LAST, so a folder without it is no cache

Loading memory-maps the shards (np.load mmap_mode="r"), refuses a cache built from another teacher, another data
set, another k or temperature (a one-line DataError naming what differs), and refuses a truncated shard (file
sizes are checked on every open; verify=True also checks every sha256). Positions at or after an example's valid
length (padding) hold a placeholder — ids 0 … k − 1 with log-prob −inf and all mass in the rest bucket — that the
losses never read as long as those positions are masked (labels −100), which right-padded batches do.

Building costs little beyond the teacher's forward (bench/lm_cache.py; ~0.97× its bare tokens/s for SmolLM2-135M
on 2 CPU cores): topk_logprobs reads the logits once per chunk, finds the top k through group maxima and sums the
exponentials as exp2, and a background thread writes each full shard while the teacher computes the next rows.

The data layer does not know what a teacher is: it takes a function input_ids (B, T) int64 → logits (B, T, V).
Under several processes, build inside the runtime's main_process_first() so that one process builds and the
others load what it wrote.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.atomic import save_npy, sha256_file, write_json, write_with
from kdkit.data.cache_shards import CacheKind
from kdkit.errors import DataError
from kdkit.types import Batch, ModelOutputs, SparseLogprobs

FORMAT = "kdkit-topk-cache/1"
MANIFEST = "manifest.json"
ARRAYS = ("ids", "logprobs", "rest")
LOGPROB_DTYPE = np.float16
REST_DTYPE = np.float32  # the tail mass: 2 bytes more per token buy a log that keeps 7 digits
KIND = CacheKind("teacher top-k cache", MANIFEST, FORMAT)


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65,536 (SmolLM2's 49,152, GPT-2's 50,257); larger vocabularies (Llama 3, Qwen) need int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


# Rows of logits handled at once. On the CPU a chunk of 256 rows (50 MB of fp32 at V = 49,152) is mostly read from
# cache in its later passes; smaller chunks are ~15% faster on quiet cores but pay for every parallel region (about
# 8 per chunk) many times over when other processes hold the cores. An accelerator prefers fewer, larger kernels.
CPU_ROWS_PER_CHUNK = 256
DEVICE_ROWS_PER_CHUNK = 1024
GROUP = 8  # top-k candidates are found through groups of this many ids (see _topk_rows)
_LOG2_E = 1.0 / math.log(2.0)
_TINY = float(torch.finfo(torch.float32).tiny)  # below this a tail sum holds denormals: redo it in float64


@torch.no_grad()
def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0, rows_per_chunk: int | None = None
) -> SparseLogprobs:
    """The top-k of log_softmax(logits / T), and the log of the mass left outside it.

    logits (..., V) → SparseLogprobs with ids (..., k) int64, logprobs (..., k) float32 sorted high to low,
    rest (...) float32 = log Σ p over the V − k other ids (−inf when k = V), on the device of `logits`.
    Computed rows_per_chunk positions at a time (None: CPU_ROWS_PER_CHUNK on the CPU, else DEVICE_ROWS_PER_CHUNK).

    The ids come from the raw logits (dividing by T > 0 keeps the order; ties may come out in another order than
    a top-k of log_softmax would give them). With a = (z − max z) / T and e = exp(a) (as exp2, which is ~3× faster
    than exp on the CPU), the sums S_top = Σ_top e and S_rest = Σ_{v ∉ top} e are both taken directly, so
    logprobs = a_top − log(S_top + S_rest) and rest = log S_rest − log(S_top + S_rest) never subtract nearly equal
    numbers (1 − Σ p_top cancels to 0 when the top k hold nearly all the mass). Where S_rest falls below the
    smallest normal float32 (every other id ~87 nats below the top, or further), the row's rest is redone as a
    float64 logsumexp, so the rest is finite whenever k < V, and −inf only when k = V.
    """
    v = logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"k={k}; expected 1 ≤ k ≤ V={v}")
    if rows_per_chunk is None:
        rows_per_chunk = CPU_ROWS_PER_CHUNK if logits.device.type == "cpu" else DEVICE_ROWS_PER_CHUNK
    flat = logits.reshape(-1, v)
    n = flat.shape[0]
    ids = torch.empty(n, k, dtype=torch.long, device=logits.device)
    lps = torch.empty(n, k, device=logits.device)
    rest = torch.empty(n, device=logits.device)
    buf = torch.empty(min(rows_per_chunk, max(n, 1)), v, device=logits.device)  # e = exp(a), reused per chunk
    for lo in range(0, n, rows_per_chunk):
        chunk = flat[lo : lo + rows_per_chunk]
        ids[lo : lo + len(chunk)], lps[lo : lo + len(chunk)], rest[lo : lo + len(chunk)] = _chunk_topk(
            chunk, k, float(temperature), buf[: len(chunk)]
        )
    lead = logits.shape[:-1]
    return SparseLogprobs(ids.reshape(*lead, k), lps.reshape(*lead, k), rest.reshape(lead))


def _chunk_topk(chunk: torch.Tensor, k: int, temperature: float, e: torch.Tensor):
    """(ids, logprobs, rest) of the rows of chunk (m, V); e: an (m, V) float32 scratch buffer (overwritten)."""
    top, top_ids = _topk_rows(chunk, k)
    top = top.float()
    z_max = top[:, :1]
    a_top = (top - z_max) / temperature  # (m, k) ≤ 0
    torch.sub(chunk, z_max, out=e).mul_(_LOG2_E / temperature).exp2_()  # e = exp((z − max z) / T)
    s_rest = e.scatter_(-1, top_ids, 0.0).sum(-1)
    log_s = (a_top.exp().sum(-1) + s_rest).log()  # log Σ_v e_v; S_top ≥ 1 (the top id's e is 1)
    log_rest = s_rest.log()
    if k < chunk.shape[-1]:
        low = s_rest < _TINY
        if low.any():
            a = (chunk[low].double() - z_max[low].double()) / temperature
            log_rest[low] = a.scatter_(-1, top_ids[low], float("-inf")).logsumexp(-1).float()
    return top_ids, a_top - log_s.unsqueeze(-1), log_rest - log_s


def _topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) of x (m, V), sorted high to low, found through groups of GROUP ids.

    Column j of x[:, :GROUP·w].view(m, GROUP, w) is a group (ids j, j + w, …); the k largest values lie in the k
    groups with the largest maxima (a value outside them is exceeded by k group maxima), so the top-k of those
    k·GROUP candidates (plus the V mod GROUP ids left over) is the top-k of the row. One cheap elementwise max over
    the row and two small top-ks instead of a top-k over V: about half the time at V = 49,152, k = 64.
    """
    m, v = x.shape
    w = v // GROUP
    if w < 4 * k:  # few groups: nothing to gain
        return x.topk(k, dim=-1)
    group_max = x[:, : GROUP * w].view(m, GROUP, w).amax(1)  # (m, w)
    groups = group_max.topk(k, dim=-1, sorted=False).indices  # (m, k)
    offsets = torch.arange(0, GROUP * w, w, device=x.device).view(1, GROUP, 1)
    cand = (groups.unsqueeze(1) + offsets).view(m, GROUP * k)  # (m, k·GROUP) ids
    if GROUP * w < v:
        cand = torch.cat([cand, torch.arange(GROUP * w, v, device=x.device).expand(m, -1)], 1)
    top, pos = x.gather(-1, cand).topk(k, dim=-1)
    return top, cand.gather(-1, pos)


def fingerprint_blocks(blocks: Sequence[Any], lengths: Sequence[int] | None = None) -> str:
    """sha256 of every block's token ids and valid length, in order: what the cache's data check compares."""
    h = hashlib.sha256()
    for i in range(len(blocks)):
        ids, length = _tokens(blocks[i], None if lengths is None else lengths[i])
        h.update(np.ascontiguousarray(ids.cpu().numpy().astype(np.int64)).tobytes())
        h.update(int(length).to_bytes(8, "little"))
    return f"tokens:{len(blocks)}:{h.hexdigest()}"


def _tokens(item: Any, length: int | None) -> tuple[torch.Tensor, int]:
    """A block → (input_ids (T,) int64, valid length). Items: a 1-D tensor; a dict with "input_ids" (and
    "length" or "attention_mask"); a tuple or list whose first element is the ids. Padding is on the right."""
    mask = None
    if isinstance(item, dict):
        ids = item.get("input_ids", item.get("inputs"))
        length = item.get("length", length)
        mask = item.get("attention_mask")
    elif isinstance(item, (tuple, list)):
        ids = item[0]
    else:
        ids = item
    ids = torch.as_tensor(ids)
    if ids.dim() != 1:
        raise DataError(f"teacher top-k cache: a token block must be 1-D (T,); got shape {tuple(ids.shape)}")
    if length is None:
        length = int(torch.as_tensor(mask).sum()) if mask is not None else ids.shape[0]
    return ids.long(), int(length)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class TopKCache:
    """The teacher's top-k next-token log-probs per position, memory-mapped, looked up by Batch.index.

    `cache(batch)` → ModelOutputs(logits=None, sparse=SparseLogprobs) with ids (B, T, k) int64, logprobs
    (B, T, k) float32, rest (B, T) float32 on the device of batch.inputs, for the examples batch.index (B,).
    Build with TopKCache.build (always writes), open with TopKCache.load (checks), or TopKCache.build_or_load.
    """

    def __init__(self, path: Path, manifest: dict, shards: list[dict[str, np.ndarray]]):
        self.path = Path(path)
        self.manifest = manifest
        self._shards = shards  # per shard {"ids": (n, T, k), "logprobs": (n, T, k), "rest": (n, T)} memory maps
        self._shard_size = int(manifest["shard_size"])

    # ---- what the cache holds -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["examples"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def tokens(self) -> int:
        """Real positions stored: Σ valid lengths (padding excluded)."""
        return int(self.manifest["tokens"])

    @property
    def size_bytes(self) -> int:
        """Bytes of all shard files on disk (headers included; the manifest excluded)."""
        return int(self.manifest["bytes"])

    @property
    def bytes_per_token(self) -> float:
        """size_bytes / real tokens stored: padding positions count as overhead."""
        return self.size_bytes / max(self.tokens, 1)

    def describe(self) -> dict:
        """What the report shows about the cache."""
        return {
            "path": str(self.path),
            "examples": len(self),
            "k": self.k,
            "temperature": self.temperature,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "bytes": self.size_bytes,
            "bytes_per_token": round(self.bytes_per_token, 2),
        }

    # ---- lookup ---------------------------------------------------------------------------------------------
    def lookup(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> SparseLogprobs:
        """The stored top-k of the examples `index` (B,), in that order, as CPU tensors (int64, float32, float32)."""
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise DataError(f"teacher top-k cache {self.path}: example {bad} is not in it (it holds {n} examples)")
        out = {name: [] for name in ARRAYS}
        for i in idx.tolist():  # a batch is small; each example is one contiguous slice of one shard
            shard = self._shards[i // self._shard_size]
            j = i % self._shard_size
            for name in ARRAYS:
                out[name].append(shard[name][j])
        if not idx.size:
            t, k = self.seq_len, self.k
            return SparseLogprobs(torch.zeros(0, t, k, dtype=torch.long), torch.zeros(0, t, k), torch.zeros(0, t))
        ids = torch.from_numpy(np.stack(out["ids"]).astype(np.int64))  # uint16 → int64: torch indexes with int64
        logprobs = torch.from_numpy(np.stack(out["logprobs"]).astype(np.float32))
        rest = torch.from_numpy(np.stack(out["rest"]).astype(np.float32))
        return SparseLogprobs(ids, logprobs, rest)

    def __call__(self, batch: Batch) -> ModelOutputs:
        """The teacher source the engine calls: the batch's examples by batch.index, on the batch's device.

        A batch padded to fewer positions than the cache's T gets the first positions (padding is on the right);
        more positions than T is an error.
        """
        length = batch.inputs.shape[1] if batch.inputs.dim() >= 2 else self.seq_len
        if length > self.seq_len:
            raise DataError(
                f"teacher top-k cache {self.path}: batch of {length} positions, but the cache stores {self.seq_len}"
            )
        sp = self.lookup(batch.index)
        if length < self.seq_len:
            sp = SparseLogprobs(sp.ids[:, :length], sp.logprobs[:, :length], sp.rest[:, :length])
        return ModelOutputs(logits=None, sparse=sp.to(batch.inputs.device))

    # ---- opening --------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        teacher_fingerprint: str | None = None,
        data_fingerprint: str | None = None,
        k: int | None = None,
        temperature: float | None = None,
        verify: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> TopKCache:
        """Open the cache at `path`, refusing one that does not match what is expected (None: not checked).

        A DataError, one line: no manifest; another teacher, data set, k or temperature; a shard file missing or
        of the wrong size (truncated); with verify=True a shard whose sha256 differs (altered).
        """
        path = Path(path)
        manifest = KIND.matching_manifest(path, teacher_fingerprint, data_fingerprint, k, temperature)
        shards = [
            {name: KIND.open_file(path, shard[name], verify, part=f"shard {s} ") for name in ARRAYS}
            for s, shard in enumerate(manifest["shards"])
        ]
        cache = cls(path, manifest, shards)
        if log is not None:
            log(
                f"teacher top-k cache: reading {path} ({len(cache)} examples, k={cache.k}, "
                f"{cache.size_bytes / 1e6:.1f} MB, {cache.bytes_per_token:.0f} bytes/token)"
            )
        return cache

    @classmethod
    def build_or_load(
        cls,
        path: str | Path,
        blocks: Sequence[Any],
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        k: int,
        temperature: float,
        teacher_fingerprint: str,
        data_fingerprint: str | None = None,
        lengths: Sequence[int] | None = None,
        verify: bool = False,
        overwrite: bool = False,
        **build_kw,
    ) -> TopKCache:
        """Load the cache at `path` when it was built from this teacher, data, k and temperature and is intact;
        otherwise build it. A damaged cache (truncated or, with verify=True, altered shards; no manifest) is
        rebuilt with a log line. A cache made for another teacher or data set is refused (DataError) unless
        overwrite=True: the folder was named by the user, so replacing it silently could destroy a costly cache.
        build_kw: batch_size, shard_size, device, log (see build).
        """
        log = build_kw.get("log", print)
        path = Path(path)
        if data_fingerprint is None:
            data_fingerprint = fingerprint_blocks(blocks, lengths)
        problem = KIND.mismatch_at(path, teacher_fingerprint, data_fingerprint, k, temperature)
        if problem and not overwrite:
            raise DataError(f"teacher top-k cache {path}: {problem}; choose another folder or rebuild it (overwrite)")
        if problem == "":  # a matching manifest: load the cache unless a file is damaged
            try:
                return cls.load(path, teacher_fingerprint, data_fingerprint, k, temperature, verify, log)
            except DataError as exc:
                log(f"{exc}: rebuilding")
        return cls.build(
            path, blocks, logits_fn, k, temperature, teacher_fingerprint, data_fingerprint, lengths, **build_kw
        )

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        path: str | Path,
        blocks: Sequence[Any],
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        k: int,
        temperature: float,
        teacher_fingerprint: str,
        data_fingerprint: str | None = None,
        lengths: Sequence[int] | None = None,
        batch_size: int = 8,
        shard_size: int | None = None,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] = print,
        log_every_s: float = 30.0,
        timings: dict[str, float] | None = None,
    ) -> TopKCache:
        """Run logits_fn over every block and write the cache to `path` (an existing cache there is replaced).

        blocks: a sequence of token blocks of one length T (see _tokens for the item forms), indexable by example
        index — index i of the cache is blocks[i], which must be what Batch.index means in training. lengths:
        valid lengths per block (default: each item's own, else T). logits_fn: (b, T) int64 on `device` →
        (b, T, V) logits. batch_size blocks per call; shard_size examples per shard (default ≈ 2^20 positions).
        data_fingerprint default: fingerprint_blocks(blocks, lengths). Progress with ETA goes to `log`, and the
        closing line says where the time went. Shards are written by a background thread while the teacher runs
        (see _ShardWriter). timings: if given, the seconds of each stage (BUILD_STAGES) are added to it.
        """
        path = Path(path)
        n = len(blocks)
        _check_build(n, k, temperature)
        if data_fingerprint is None:
            data_fingerprint = fingerprint_blocks(blocks, lengths)
        first, _ = _tokens(blocks[0], None)
        seq_len = int(first.shape[0])
        shard_size = int(shard_size or max(1, (1 << 20) // seq_len))
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # from here until the new manifest, the folder is no cache
        log(f"teacher top-k cache: {n} blocks × {seq_len} tokens, k={k}, T={temperature:g} → {path}")

        start = time.perf_counter()
        shards, tokens, vocab, id_dtype, stages = _fill(
            path, blocks, lengths, logits_fn, k, temperature, seq_len, shard_size, batch_size, device, log, log_every_s
        )
        _remove_stale(path, len(shards))
        size = sum(entry[name]["bytes"] for entry in shards for name in ARRAYS)
        manifest = {
            "format": FORMAT,
            "teacher": teacher_fingerprint,
            "data": data_fingerprint,
            "k": int(k),
            "temperature": float(temperature),
            "vocab_size": vocab,
            "seq_len": seq_len,
            "examples": n,
            "shard_size": shard_size,
            "dtypes": {
                "ids": id_dtype.name,
                "logprobs": np.dtype(LOGPROB_DTYPE).name,
                "rest": np.dtype(REST_DTYPE).name,
            },
            "tokens": tokens,
            "bytes": size,
            "bytes_per_token": round(size / max(tokens, 1), 3),
            "shards": shards,
        }
        write_json(path / MANIFEST, manifest)
        seconds = time.perf_counter() - start
        log(
            f"teacher top-k cache: wrote {len(shards)} shards, {size / 1e6:.1f} MB, "
            f"{manifest['bytes_per_token']:.0f} bytes/token, in {_duration(seconds)} "
            f"({n * seq_len / max(seconds, 1e-9):.0f} tokens/s; {stages.summary()})"
        )
        if timings is not None:
            for stage, value in stages.seconds.items():
                timings[stage] = timings.get(stage, 0.0) + value
        return cls.load(path)


def _check_build(n: int, k: int, temperature: float) -> None:
    if n == 0:
        raise DataError("teacher top-k cache: the data set is empty")
    if k < 1:
        raise DataError(f"teacher top-k cache: k={k}; expected at least 1")
    if temperature <= 0:
        raise DataError(f"teacher top-k cache: temperature={temperature}; expected > 0")


def _teacher_logits(logits_fn, items: list, lo: int, seq_len: int, device) -> torch.Tensor:
    """The teacher's (b, T, V) logits of one batch of blocks (items: (ids, valid length)), shapes checked."""
    for i, (ids, length) in enumerate(items, start=lo):
        if ids.shape[0] != seq_len or not 0 <= length <= seq_len:
            raise DataError(
                f"teacher top-k cache: block {i} has {ids.shape[0]} tokens (valid length {length}); every "
                f"block must have T={seq_len} tokens"
            )
    input_ids = torch.stack([ids for ids, _ in items]).to(device)
    logits = logits_fn(input_ids)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise DataError(
            f"teacher top-k cache: the teacher gave logits of shape {tuple(logits.shape)} for input ids of "
            f"shape {tuple(input_ids.shape)}; expected (B, T, V)"
        )
    return logits


BUILD_STAGES = ("teacher", "topk", "convert", "write", "write_background")


class _Stages:
    """Seconds per build stage, each lap charged to the stage that just ended: teacher (input ids to logits),
    topk (topk_logprobs), convert (to numpy in the cache's dtypes, padding placeholders), write (copying into the
    shard buffer and waiting for the previous shard's write) and write_background (the writer thread's own time,
    overlapped with the others). On an accelerator the first three follow its synchronisation points."""

    def __init__(self):
        self.seconds = dict.fromkeys(BUILD_STAGES, 0.0)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now

    def summary(self) -> str:
        total = sum(v for stage, v in self.seconds.items() if stage != "write_background") or 1e-9
        parts = [f"{stage} {100 * self.seconds[stage] / total:.0f}%" for stage in BUILD_STAGES[:4]]
        return ", ".join(parts) + f"; writer thread {self.seconds['write_background']:.1f} s"


def _fill(
    path: Path,
    blocks,
    lengths,
    logits_fn,
    k: int,
    temperature: float,
    seq_len: int,
    shard_size: int,
    batch_size: int,
    device,
    log,
    log_every_s: float,
):
    """Run the teacher over every block and write the shards → (shard entries, real tokens, V, id dtype, stages)."""
    n = len(blocks)
    stages = _Stages()
    start = last_log = time.perf_counter()
    tokens, vocab, writer = 0, None, None
    try:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            items = [_tokens(blocks[i], None if lengths is None else lengths[i]) for i in range(lo, hi)]
            logits = _teacher_logits(logits_fn, items, lo, seq_len, device)
            stages.lap("teacher")
            if writer is None:
                vocab = int(logits.shape[-1])
                if k > vocab:
                    raise DataError(f"teacher top-k cache: k={k} exceeds the teacher's vocabulary of {vocab}")
                writer = _ShardWriter(path, n, seq_len, k, ids_dtype(vocab), shard_size)
            sparse = topk_logprobs(logits, k, temperature)
            del logits  # (b, T, V): let the allocator reuse it for the next batch's
            stages.lap("topk")
            arrays = _batch_arrays(sparse, [length for _, length in items], writer.id_dtype)
            tokens += sum(length for _, length in items)
            stages.lap("convert")
            writer.add(*arrays)
            stages.lap("write")
            now = time.perf_counter()
            if now - last_log >= log_every_s and writer.done < n:
                last_log = now
                rate = writer.done / (now - start)
                log(
                    f"teacher top-k cache: {writer.done}/{n} blocks ({100 * writer.done / n:.0f}%), "
                    f"{rate * seq_len:.0f} tokens/s, ETA {_duration((n - writer.done) / rate)}"
                )
        shards = writer.finish()
        stages.lap("write")
    finally:
        if writer is not None:
            writer.close()
            stages.seconds["write_background"] += writer.busy_s
    return shards, tokens, vocab, writer.id_dtype, stages


def _batch_arrays(sparse: SparseLogprobs, lengths: list[int], id_dtype) -> tuple[np.ndarray, ...]:
    """(ids, logprobs, rest) numpy arrays of one batch (b, T, k), (b, T, k), (b, T) in the cache's dtypes.
    Positions at or after a block's valid length (padding) get a placeholder distribution: ids 0 … k − 1 with
    log-prob −inf, all mass in the rest bucket."""
    ids_np = sparse.ids.cpu().numpy().astype(id_dtype)
    lp_np = sparse.logprobs.cpu().numpy().astype(LOGPROB_DTYPE)
    rest_np = sparse.rest.cpu().numpy().astype(REST_DTYPE)
    b, seq_len, k = ids_np.shape
    pad = np.arange(seq_len)[None, :] >= np.asarray(lengths).reshape(b, 1)  # (b, T)
    if pad.any():
        ids_np[pad] = np.arange(k, dtype=id_dtype)
        lp_np[pad] = -np.inf
        rest_np[pad] = 0.0
    return ids_np, lp_np, rest_np


class _ShardWriter:
    """Collects rows into shards of shard_size examples; each full shard (the last one when the n-th row arrives)
    is written by one background thread while the teacher computes the next rows.

    At most one shard is in flight: the next full shard waits for it, and its error (disk full, …) is raised there
    or by finish(). Each file is still written to a temp file and renamed (_write_shard), and the manifest is
    written only after finish(), so an interrupted build leaves no cache. close() — always, e.g. in a finally —
    waits for a write still running, so a failed build leaves no temp file behind. Memory: up to two shard
    buffers (≈ 2 × 272 MB at the default 2^20 positions and k = 64). shards holds the written shards' manifest
    entries in order; busy_s the writer thread's seconds."""

    def __init__(self, path: Path, n: int, seq_len: int, k: int, id_dtype, shard_size: int):
        self.path, self.n, self.seq_len, self.k = path, n, seq_len, k
        self.id_dtype, self.shard_size = id_dtype, shard_size
        self.done, self.shards, self.buf, self.busy_s = 0, [], None, 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdkit-topk-cache-writer")
        self._pending: Future | None = None

    def add(self, ids_np: np.ndarray, lp_np: np.ndarray, rest_np: np.ndarray) -> None:
        row = 0
        while row < ids_np.shape[0]:
            if self.buf is None:
                rows = min(self.shard_size, self.n - self.done)
                self.buf = {
                    "ids": np.empty((rows, self.seq_len, self.k), self.id_dtype),
                    "logprobs": np.empty((rows, self.seq_len, self.k), LOGPROB_DTYPE),
                    "rest": np.empty((rows, self.seq_len), REST_DTYPE),
                    "filled": 0,
                }
            buf = self.buf
            j = buf["filled"]
            take = min(ids_np.shape[0] - row, buf["ids"].shape[0] - j)
            for name, array in zip(ARRAYS, (ids_np, lp_np, rest_np)):
                buf[name][j : j + take] = array[row : row + take]
            buf["filled"] = j + take
            self.done += take
            row += take
            if buf["filled"] == buf["ids"].shape[0]:
                self._collect()
                self._pending = self._pool.submit(self._write, len(self.shards), buf)
                self.buf = None

    def _write(self, number: int, buf: dict) -> dict:
        start = time.perf_counter()
        try:
            return _write_shard(self.path, number, buf)
        finally:
            self.busy_s += time.perf_counter() - start

    def _collect(self) -> None:
        """Wait for the shard in flight, if any, and record its entry (raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.shards.append(pending.result())

    def finish(self) -> list[dict]:
        """Every shard written (the last write awaited) → their manifest entries."""
        self._collect()
        if self.done != self.n or self.buf is not None:
            raise RuntimeError(f"teacher top-k cache: {self.done} of {self.n} examples were written")
        return self.shards

    def close(self) -> None:
        """Wait for a write still running (its error, if any, is dropped: the build has already failed) and stop
        the thread."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()  # waits; returns the error instead of raising it
        self._pool.shutdown(wait=True)


def _write_shard(folder: Path, number: int, buf: dict) -> dict:
    """Write one shard's three arrays (temp file + rename each) → its manifest entry."""
    entry = {"examples": int(buf["filled"])}
    for name in ARRAYS:
        file = folder / f"shard_{number:05d}.{name}.npy"
        write_with(file, lambda p, a=buf[name]: save_npy(p, a))
        entry[name] = {"file": file.name, "bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return entry


def _remove_stale(folder: Path, shards: int) -> None:
    """Shard files of an earlier, larger build of this folder that the new manifest does not list."""
    for file in folder.glob("shard_*.npy"):
        try:
            number = int(file.name.split(".")[0].split("_")[1])
        except (IndexError, ValueError):
            continue
        if number >= shards:
            file.unlink(missing_ok=True)


"""Offline teacher cache across tokenizers (#14): the teacher's own tokens of every block's text, and its top-k.

A teacher with another tokenizer reads its own tokenisation of each training block's text (kdkit.run.cross_teacher
computes it: teacher_encoding). This cache keeps, per block, exactly what training needs from that teacher, so that
training never runs it:

- its tokens of the block text: ids (n, T_t), real lengths (n,) and character offsets into the text (n, T_t, 2);
- per teacher position, its top-k next-token log-probs at the kd temperature and the log of the rest mass, as the
  same-tokenizer cache stores them (a TopKCache over the teacher's ids, in the sub-folder topk/);
- per teacher token, the log-probability the teacher gave it at temperature 1, log p(x_i | x_<i) (0 at position 0
  and on padding): span_likelihood reads the likelihood of the teacher's realised tokens, which the top-k alone
  cannot give exactly.

The student is not in it: at training time its tokens are aligned to the cached teacher offsets by bytes
(kdkit.data.align), whatever the student's tokenizer. The key is the teacher (weights, how it runs, its tokenizer
and context: teacher_fingerprint), the corpus text of the blocks (text_fingerprint: every block's text and where its
document separators are, not the student's ids), k and the temperature. A student whose blocks hold the same texts
reads the same cache; one whose blocks are cut elsewhere (another tokenisation of the stream cuts other texts)
holds other texts and is refused in one line, like another teacher, k or temperature, or a truncated file. Blocks cut
by text (data.block_chars, kdkit.data.text_blocks) hold the same texts and separators for every student tokenizer, so
one cache serves them all.

Files, in one folder: topk/ (a kdkit TopKCache: shards and its own manifest), tokens.ids.npy, tokens.lengths.npy,
tokens.offsets.npy, tokens.logprob.npy, and cross.json (format, keys, file sizes and sha256, tokens, bytes per
teacher token), written atomically LAST: a folder without it is no cache.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdkit.atomic import save_npy, sha256_file, write_json, write_with
from kdkit.data.cache_shards import CacheKind
from kdkit.data.lm import LMData
from kdkit.data.lm_cache import TopKCache
from kdkit.errors import DataError
from kdkit.types import SparseLogprobs

FORMAT = "kdkit-cross-topk-cache/1"
MANIFEST = "cross.json"
TOKEN_FILES = ("ids", "lengths", "offsets", "logprob")
TOKEN_DTYPES = {"ids": np.int32, "lengths": np.int32, "offsets": np.int32, "logprob": np.float32}
ROWS_PER_CHUNK = 256  # rows of (T_t, V) logits read at once for the realised tokens' log-probs (memory, not speed)
KIND = CacheKind(
    "teacher cache across tokenizers",
    MANIFEST,
    FORMAT,
    teacher_words="another teacher or teacher tokenizer",
    data_words="other block texts",
    data_note="; blocks cut from another tokenisation of the corpus hold other texts: data.block_chars cuts them by "
    "text, the same for every student",
)


@dataclass
class TeacherTokens:
    """The teacher's tokens of n block texts, right-padded: ids (n, T_t) int64, lengths (n,) int64 and character
    offsets (n, T_t, 2) int64 into each block's text ((0, 0) on padding)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor


@dataclass
class CachedRows:
    """What the cache holds for a batch of blocks, cut to the batch's widest teacher row (w ≤ T_t): the teacher's
    ids, attention mask (B, w) int64, offsets (B lists of w pairs), its top-k (SparseLogprobs (B, w, k)) and its
    realised tokens' log-probs at temperature 1, token_logprobs (B, w) float32."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: list[list[tuple[int, int]]]
    sparse: SparseLogprobs
    token_logprobs: torch.Tensor


def text_fingerprint(data: LMData) -> str:
    """sha256 of the blocks' texts and of where each holds a document separator (the character span of each of
    its end-of-sequence tokens): all a teacher's tokenisation of a block depends on besides its own tokenizer. The
    student's ids are not in it, so a student tokenizer that cuts the same texts gives the same fingerprint."""
    if data.texts is None:
        raise DataError("teacher cache across tokenizers: the blocks carry no text; build them with_text")
    h = hashlib.sha256()
    for i, text in enumerate(data.texts):
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
        given = data.separators([i])  # blocks cut by text: from the text alone
        if given is not None:
            spans = np.asarray(given[0], dtype=np.int64).reshape(-1, 2)
        else:
            n = int(data.lengths[i])
            seps = (data.ids[i, :n] == data.eos_id) if data.eos_id is not None else torch.zeros(n, dtype=torch.bool)
            spans = data.offsets[i, :n][seps].to(torch.int64).numpy()
        h.update(len(spans).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(spans).tobytes())
    return f"text:{len(data.texts)}:{h.hexdigest()}"


def realised_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_i | x_<i) of each input token at temperature 1: (b, T, V), (b, T) → (b, T) float32, 0 at position 0.

    The same formula as kdkit.losses.span_likelihood.token_logprobs (z[x] − logsumexp z in float32), computed
    ROWS_PER_CHUNK positions at a time so that no float32 copy of all the logits is made."""
    b, t, v = logits.shape
    out = torch.zeros(b, t, dtype=torch.float32, device=logits.device)
    if t < 2:
        return out
    z = logits[:, :-1].reshape(-1, v)
    nxt = input_ids[:, 1:].to(logits.device).long().reshape(-1, 1)
    flat = torch.empty(z.shape[0], dtype=torch.float32, device=logits.device)
    for lo in range(0, z.shape[0], ROWS_PER_CHUNK):
        chunk = z[lo : lo + ROWS_PER_CHUNK].float()
        flat[lo : lo + len(chunk)] = chunk.gather(-1, nxt[lo : lo + len(chunk)]).squeeze(-1) - chunk.logsumexp(-1)
    out[:, 1:] = flat.view(b, t - 1)
    return out


class CrossTopKCache:
    """The teacher's tokens of every block and its top-k per teacher position (module docstring), looked up by
    block index. Build with CrossTopKCache.build, open with load (checks), or build_or_load."""

    def __init__(self, path: Path, manifest: dict, topk: TopKCache, tokens: dict[str, np.ndarray]):
        self.path, self.manifest, self.topk = Path(path), manifest, topk
        self._tokens = tokens  # memory maps: ids (n, T_t), lengths (n,), offsets (n, T_t, 2), logprob (n, T_t)

    def __len__(self) -> int:
        return int(self.manifest["examples"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def tokens(self) -> int:
        """Real teacher positions stored: Σ teacher lengths."""
        return int(self.manifest["tokens"])

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the top-k shards and the token files (manifests excluded)."""
        return int(self.manifest["bytes"])

    @property
    def bytes_per_token(self) -> float:
        """size_bytes / real teacher tokens: padding to the longest teacher row counts as overhead."""
        return self.size_bytes / max(self.tokens, 1)

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "examples": len(self),
            "k": self.k,
            "kd_temperature": self.temperature,
            "teacher_vocab_size": self.topk.vocab_size,
            "teacher_seq_len": self.topk.seq_len,
            "tokens": self.tokens,
            "bytes": self.size_bytes,
            "bytes_per_token": round(self.bytes_per_token, 1),
        }

    def lookup(self, index: Sequence[int]) -> CachedRows:
        """The cached rows of the blocks `index` (B,), in that order, cut to their widest teacher row (CPU)."""
        idx = np.asarray(list(index), dtype=np.int64)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise DataError(f"teacher cache across tokenizers {self.path}: block {bad} is not in it (it holds {n})")
        lengths = torch.from_numpy(self._tokens["lengths"][idx].astype(np.int64))
        width = max(int(lengths.max()) if idx.size else 0, 1)
        ids = torch.from_numpy(self._tokens["ids"][idx, :width].astype(np.int64))
        real = torch.arange(width)[None, :] < lengths[:, None]
        offsets = self._tokens["offsets"][idx, :width].tolist()
        sp = self.topk.lookup(idx)
        sparse = SparseLogprobs(sp.ids[:, :width], sp.logprobs[:, :width], sp.rest[:, :width])
        token_lp = torch.from_numpy(self._tokens["logprob"][idx, :width].astype(np.float32))
        return CachedRows(ids, real.long(), [[(s, e) for s, e in row] for row in offsets], sparse, token_lp)

    # ---- opening --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, teacher_fingerprint: str | None = None, data_fingerprint: str | None = None,
             k: int | None = None, temperature: float | None = None, verify: bool = False,
             log: Callable[[str], None] | None = None) -> CrossTopKCache:
        """Open the cache at `path`, refusing in one line (DataError) one without cross.json, built from another
        teacher (or teacher tokenizer), other block texts, another k or temperature (None: not checked), or with a
        file missing or of the wrong size (verify=True: or altered)."""
        path = Path(path)
        manifest = KIND.matching_manifest(path, teacher_fingerprint, data_fingerprint, k, temperature)
        tokens = {name: KIND.open_file(path, manifest["files"][name], verify) for name in TOKEN_FILES}
        topk = TopKCache.load(path / "topk", manifest["teacher"], manifest["data"], manifest["k"],
                              manifest["temperature"], verify)
        cache = cls(path, manifest, topk, tokens)
        if log is not None:
            log(f"teacher cache across tokenizers: reading {path} ({len(cache)} blocks, k={cache.k}, "
                f"{cache.size_bytes / 1e6:.1f} MB, {cache.bytes_per_token:.0f} bytes/teacher token)")
        return cache

    @classmethod
    def build_or_load(cls, path: str | Path, encode: Callable[[], TeacherTokens],
                      logits_fn: Callable[[torch.Tensor], torch.Tensor], k: int, temperature: float,
                      teacher_fingerprint: str, data_fingerprint: str, verify: bool = False,
                      **build_kw) -> CrossTopKCache:
        """Load the cache at `path` when it matches (teacher, texts, k, temperature) and is whole; else build it
        (encode() gives the teacher's tokens of every block, called only then). A damaged cache is rebuilt with a
        log line; one made for another teacher or other texts is refused (the folder is named by its keys, so
        that means a folder chosen by hand). build_kw: batch_size, device, log (see build)."""
        log = build_kw.get("log", print)
        path = Path(path)
        problem = KIND.mismatch_at(path, teacher_fingerprint, data_fingerprint, k, temperature)
        if problem:
            raise DataError(f"teacher cache across tokenizers {path}: {problem}; choose another folder")
        if problem == "":  # a matching manifest: load the cache unless a file is damaged
            try:
                return cls.load(path, teacher_fingerprint, data_fingerprint, k, temperature, verify, log)
            except DataError as exc:
                log(f"{exc}: rebuilding")
        return cls.build(path, encode(), logits_fn, k, temperature, teacher_fingerprint, data_fingerprint,
                         **build_kw)

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode()
    def build(cls, path: str | Path, tokens: TeacherTokens, logits_fn: Callable[[torch.Tensor], torch.Tensor],
              k: int, temperature: float, teacher_fingerprint: str, data_fingerprint: str, batch_size: int = 8,
              device: torch.device | str = "cpu", log: Callable[[str], None] = print,
              timings: dict[str, float] | None = None) -> CrossTopKCache:
        """Run logits_fn ((b, T_t) teacher ids → (b, T_t, V) logits) over the teacher's tokens of every block and
        write the cache to `path` (replacing one there): the top-k by TopKCache.build (same shards, same checks),
        the realised tokens' log-probs recorded from the same logits, then the token files, then cross.json."""
        path = Path(path)
        n, width = tokens.ids.shape
        if tokens.lengths.shape != (n,) or tuple(tokens.offsets.shape) != (n, width, 2):
            raise DataError(f"teacher cache across tokenizers: teacher ids {tuple(tokens.ids.shape)}, lengths "
                            f"{tuple(tokens.lengths.shape)}, offsets {tuple(tokens.offsets.shape)} do not fit")
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # from here until the new manifest, the folder is no cache
        start = time.perf_counter()
        recorded: list[torch.Tensor] = []

        def recording(input_ids: torch.Tensor) -> torch.Tensor:  # TopKCache.build calls it on blocks in order
            logits = logits_fn(input_ids)
            recorded.append(realised_logprobs(logits, input_ids).cpu())
            return logits

        lengths = tokens.lengths.tolist()
        topk = TopKCache.build(path / "topk", tokens.ids, recording, k, temperature, teacher_fingerprint,
                               data_fingerprint, lengths, batch_size=batch_size, device=device, log=log,
                               timings=timings)
        logprob = torch.cat(recorded).numpy()
        logprob[np.arange(width)[None, :] >= tokens.lengths.numpy()[:, None]] = 0.0
        arrays = {"ids": tokens.ids.numpy(), "lengths": tokens.lengths.numpy(), "offsets": tokens.offsets.numpy(),
                  "logprob": logprob}
        files = {}
        for name in TOKEN_FILES:
            file = path / f"tokens.{name}.npy"
            write_with(file, lambda p, a=arrays[name].astype(TOKEN_DTYPES[name]): save_npy(p, a))
            files[name] = {"file": file.name, "bytes": file.stat().st_size, "sha256": sha256_file(file)}
        size = topk.size_bytes + sum(f["bytes"] for f in files.values())
        real = int(tokens.lengths.sum())
        manifest = {
            "format": FORMAT,
            "teacher": teacher_fingerprint,
            "data": data_fingerprint,
            "k": int(k),
            "temperature": float(temperature),
            "examples": n,
            "teacher_seq_len": width,
            "tokens": real,
            "bytes": size,
            "bytes_per_token": round(size / max(real, 1), 3),
            "files": files,
        }
        write_json(path / MANIFEST, manifest)
        log(f"teacher cache across tokenizers: {n} blocks, {real} teacher tokens, {size / 1e6:.1f} MB "
            f"({manifest['bytes_per_token']:.0f} bytes/teacher token) in {time.perf_counter() - start:.1f} s")
        return cls.load(path)


"""Language-model blocks cut by text, not by tokens (data.block_chars): the same block texts for every tokenizer.

kdkit.data.lm cuts the corpus's token stream into blocks of block_size tokens, so where a block starts and ends
depends on the tokenizer: two students with different tokenizers train on blocks of different texts, and the
teacher cache across tokenizers (kdkit.data.cross_cache), keyed by the blocks' texts, serves one of them only. Cut
by text, each document is cut into chunks of at most block_chars characters (cut_text: a chunk ends before a
whitespace character, so no word is split; a run without whitespace longer than block_chars is cut where it reaches
it) and every chunk is one block: the tokenizer's tokens of the chunk, its end-of-sequence token after a document's
last chunk, right-padded to block_size. The chunks, and so the blocks' texts, their number and any split of them,
are the same for every tokenizer; only the tokens differ.

A chunk of more than block_size tokens keeps its first block_size (counted: truncated). Its text stays whole: a
teacher with another tokenizer reads all of it and the student is aligned to it up to its last token, so the
teacher's tokens, and its cache, do not depend on where a student's tokens stop. Choose block_chars so that chunks
fit: about block_size × the tokenizer's characters per token, less a margin (a truncated chunk is text the student
never trains on).

In a block's text the end-of-sequence token stands for SEPARATOR, the same for every tokenizer (the token-cut
blocks write the tokenizer's own eos string): its offsets cover exactly that separator. Where a document's last
chunk did not fit, its end-of-sequence token is cut off with the rest, but its text still ends with the separator:
where the separators are is known from the text alone (LMData.separators), so a teacher places its own
end-of-sequence token there whatever the student's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdkit.errors import DataError

SEPARATOR = "\n\n"  # the text a block's end-of-sequence token stands for


def cut_text(text: str, size: int) -> list[str]:
    """text in consecutive chunks of at most `size` characters whose concatenation is text: each chunk but the last
    ends before a whitespace character (the next chunk starts with it), or at `size` characters where the window
    holds none."""
    if size < 1:
        raise ValueError(f"size={size}; expected ≥ 1")
    chunks, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = next((i for i in range(end, start, -1) if text[i].isspace()), end)
        chunks.append(text[start:cut])
        start = cut
    if start < len(text):
        chunks.append(text[start:])
    return chunks


@dataclass
class CutBlocks:
    """Blocks cut by text: ids (N, block_size) int64 right-padded, lengths (N,), each block's text and its tokens'
    character offsets (N, block_size, 2) int32 ((0, 0) on padding; None without text), the tokens of every chunk
    before truncation, how many chunks were truncated, and which chunks end their document (N,) bool."""

    ids: torch.Tensor
    lengths: torch.Tensor
    texts: list[str] | None
    offsets: torch.Tensor | None
    tokens: int
    truncated: int
    ends: torch.Tensor


def text_cut_blocks(texts: list[str], tokenizer, block_size: int, block_chars: int, pad: int,
                    with_text: bool) -> CutBlocks:
    """Documents → CutBlocks (module docstring). with_text: keep each block's text and offsets (a fast tokenizer)."""
    if with_text:
        from kdkit.data.align import check_fast

        check_fast(tokenizer, "data.tokenizer (the student's)")
    eos = tokenizer.eos_token_id
    chunks: list[tuple[str, bool]] = []  # (chunk, it ends its document)
    for doc in texts:
        pieces = cut_text(doc, block_chars)  # a whitespace-only chunk is no block, unless it ends the document
        chunks += [(p, k == len(pieces) - 1) for k, p in enumerate(pieces) if p.strip() or k == len(pieces) - 1]
    if not chunks:
        raise DataError("data.block_chars: the corpus holds no text to cut into blocks")
    enc = tokenizer([c for c, _ in chunks], add_special_tokens=False, return_offsets_mapping=with_text)
    ids = torch.full((len(chunks), block_size), pad, dtype=torch.long)
    offsets = torch.zeros(len(chunks), block_size, 2, dtype=torch.int32) if with_text else None
    lengths, block_texts, tokens, truncated = [], [], 0, 0
    for b, (chunk, ends) in enumerate(chunks):
        row = list(enc["input_ids"][b])
        offs = [list(o) for o in enc["offset_mapping"][b]] if with_text else []
        text = chunk
        if ends and eos is not None:
            row.append(int(eos))
            offs.append([len(chunk), len(chunk) + len(SEPARATOR)])
            text = chunk + SEPARATOR
        tokens += len(row)
        truncated += len(row) > block_size
        row, offs = row[:block_size], offs[:block_size]
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        if with_text and offs:
            offsets[b, : len(offs)] = torch.tensor(offs, dtype=torch.int32)
        lengths.append(len(row))
        block_texts.append(text)
    return CutBlocks(ids, torch.tensor(lengths), block_texts if with_text else None, offsets, tokens, truncated,
                     torch.tensor([ends for _, ends in chunks], dtype=torch.bool))

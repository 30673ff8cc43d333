"""Shrink a byte-level BPE tokenizer.json to its first N vocabulary entries.

Small tiny-model vocabularies keep the embedding, lm_head and reference-logit fixtures small while
the tokenizer still encodes any text: the byte alphabet sits in the first ~260 ids of both DeepSeek
vocabularies. Kept: BPE entries with id < N, the merges whose two parts and result are all kept
(in their original priority order), and the added tokens (placeholders dropped), renumbered from N.
"""

from __future__ import annotations

import copy
import json
import re

PLACEHOLDER = re.compile(r"<｜place▁holder▁no▁\d+｜>")


def _merge_parts(merge: str | list[str]) -> tuple[str, str]:
    # tokenizers writes merges as "a b" (older files) or ["a", "b"] (newer files).
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    return left, right


def _renumber_added(added: list[dict], n_base: int) -> list[dict]:
    """Added tokens inside the kept base range keep their id; the rest follow from n_base."""
    kept, next_id = [], n_base
    for token in added:
        if PLACEHOLDER.fullmatch(token["content"]):
            continue
        new_id = token["id"] if token["id"] < n_base else next_id
        next_id += token["id"] >= n_base
        kept.append({**token, "id": new_id})
    return kept


def trim_tokenizer(tokenizer: dict, n_base: int) -> dict:
    """The tokenizer.json dict trimmed to `n_base` BPE entries plus the renumbered added tokens."""
    out = copy.deepcopy(tokenizer)
    model = out["model"]
    vocab = {tok: i for tok, i in model["vocab"].items() if i < n_base}
    if sorted(vocab.values()) != list(range(n_base)):
        raise ValueError("base vocabulary ids are not contiguous from 0")
    model["vocab"] = vocab
    model["merges"] = [
        m for m in model["merges"] if {*_merge_parts(m), "".join(_merge_parts(m))} <= vocab.keys()
    ]
    out["added_tokens"] = _renumber_added(out["added_tokens"], n_base)
    return out


def dumps(tokenizer: dict) -> str:
    return json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n"

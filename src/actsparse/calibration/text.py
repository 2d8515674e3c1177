"""Calibration and evaluation text: a ``.txt`` file, a folder of them, or ``builtin:wiki``.

``builtin:wiki`` is the Wikipedia dump that ships inside gensim's wheel (about 3.4 MB of
article text). It is extracted once into the cache and split by article: one article in
five (chosen by a hash of its title) is held out for evaluation, the rest calibrate.
"""
from __future__ import annotations

import bz2
import re
import zlib
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree

import numpy as np

from .._common import ActSparseError, cache_dir, fetch_wheel_member

WIKI = "builtin:wiki"
_WIKI_WHEEL = "gensim==4.4.0"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def read_documents(source: str, split: str = "calibration") -> list[str]:
    """Documents of ``source``; ``split`` ('calibration' or 'evaluation') applies to ``builtin:wiki``."""
    if source == WIKI:
        docs = _wiki_split(split)
    else:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise ActSparseError(f"text folder {path} has no .txt files")
        else:
            raise ActSparseError(f"text source {source} does not exist (give a .txt file, a folder or {WIKI})")
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ActSparseError(f"text source {source} is empty")
    return docs


def token_chunks(tokenizer, documents: list[str], samples: int, seq_len: int) -> np.ndarray:
    """Up to ``samples`` consecutive windows of ``seq_len`` tokens, ``[n, seq_len]`` int64.

    Documents are joined with the EOS token (when the tokenizer has one) and cut into
    non-overlapping windows, so every token is used at most once. An encoder's tokenizer (no
    EOS, but [CLS] and [SEP]) gets each window framed as ``[CLS] … [SEP]``, as it was trained.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    frame = [] if eos is not None or None in (tokenizer.cls_token_id, tokenizer.sep_token_id) else \
        [tokenizer.cls_token_id, tokenizer.sep_token_id]
    width = seq_len - len(frame)
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + ([eos] if eos is not None else []))
        if len(ids) >= samples * width:
            break
    n = min(samples, len(ids) // width) if width > 0 else 0
    if n == 0:
        raise ActSparseError(f"the text has {len(ids)} tokens, fewer than one sample of {seq_len}")
    windows = np.asarray(ids[: n * width], np.int64).reshape(n, width)
    if frame:
        windows = np.concatenate([np.full((n, 1), frame[0]), windows, np.full((n, 1), frame[1])], axis=1)
    return windows


def _wiki_split(split: str) -> list[str]:
    if split not in ("calibration", "evaluation"):
        raise ValueError(split)
    folder = cache_dir("text", "wiki")
    target = folder / f"{split}.txt"
    if not target.is_file():
        dump = fetch_wheel_member(_WIKI_WHEEL, _WIKI_MEMBER, cache_dir("downloads") / Path(_WIKI_MEMBER).name)
        parts = {"calibration": [], "evaluation": []}
        for title, text in _wiki_articles(dump):
            held_out = zlib.crc32(title.encode()) % 5 == 0
            parts["evaluation" if held_out else "calibration"].append(text)
        for name, docs in parts.items():
            partial = folder / f"{name}.txt.partial"
            partial.write_text("\n\x1e\n".join(docs), encoding="utf-8")
            partial.replace(folder / f"{name}.txt")
    return target.read_text(encoding="utf-8").split("\n\x1e\n")


def _wiki_articles(dump: Path) -> Iterator[tuple[str, str]]:
    title = None
    with bz2.open(dump, "rb") as stream:
        for _, elem in ElementTree.iterparse(stream):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "text":
                text = _strip_markup(elem.text or "")
                if title and ":" not in title and len(text) > 500 and not text.lower().startswith("#redirect"):
                    yield title, text
            elif tag == "page":
                elem.clear()


_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>|<ref.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://[^\s\]]*\s?([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"&nbsp;|&ndash;|&mdash;"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_markup(text: str) -> str:
    # Templates and tables nest, so remove them innermost first until none is left.
    nested = re.compile(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", re.S)
    while True:
        text, n = nested.subn("", text)
        if n == 0:
            break
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()

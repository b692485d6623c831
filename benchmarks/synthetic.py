"""Synthetic text with a realistic term distribution, for search benchmarks at scale.

Words are drawn from a Zipfian vocabulary (frequency of the r-th word ~ 1 / r^1.07, as in English text),
so a few words are in most chunks and most words are rare: the full-text index has short and long posting
lists, as a real corpus does, and a query's rare words decide its ranking. Chunks are 40 to 200 words.
Vectors are random unit vectors: dense search does its full work (a scan, or an index walk), though its
ranking carries no meaning.
"""

from __future__ import annotations

import numpy as np

_SYLLABLES = ["ka", "ro", "mi", "te", "su", "na", "lo", "vi", "de", "pa", "zu", "ne", "tor", "gal", "ben", "fis",
              "qua", "dre", "lin", "mos", "rah", "sel", "tun", "wex"]


class SyntheticCorpus:
    def __init__(self, *, vocabulary: int = 60_000, dim: int = 384, seed: int = 0, exponent: float = 1.07):
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        words = set()
        while len(words) < vocabulary:
            n = int(self.rng.integers(1, 5))
            words.add("".join(self.rng.choice(_SYLLABLES, n)))
        self.words = np.array(sorted(words, key=lambda w: (len(w), w)))
        weights = 1.0 / np.arange(1, vocabulary + 1) ** exponent
        self.p = weights / weights.sum()

    def chunks(self, n: int) -> list[str]:
        lengths = self.rng.integers(40, 201, n)
        drawn = self.rng.choice(len(self.words), size=int(lengths.sum()), p=self.p)
        out, at = [], 0
        for length in lengths:
            out.append(" ".join(self.words[drawn[at:at + length]]))
            at += length
        return out

    def vectors(self, n: int) -> np.ndarray:
        v = self.rng.standard_normal((n, self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    @staticmethod
    def query_from(text: str, rng: np.random.Generator, words: int = 5) -> str:
        """A query made of `words` words of a chunk: what someone who read it might type."""
        tokens = text.split()
        picks = rng.choice(len(tokens), size=min(words, len(tokens)), replace=False)
        return " ".join(tokens[i] for i in sorted(picks))


def fill_store(store, corpus: SyntheticCorpus, n_chunks: int, *, per_doc: int = 50, progress=None) -> list[str]:
    """Put `n_chunks` synthetic chunks into `store` through the store protocol (as an ingest with vectors
    given would: prepare_writes, then save_vectors at the end), `per_doc` per document, one document per
    transaction. Every tenth document carries the tag `t0` .. `t9` of its number, for filtered searches that
    keep a tenth. Returns sample texts (for queries)."""
    from kb.types import Chunk

    samples: list[str] = []
    docs = n_chunks // per_doc
    batch_docs = max(1, 10_000 // per_doc)
    store.prepare_writes(expected_files=docs)
    for first in range(0, docs, batch_docs):
        count = min(batch_docs, docs - first)
        texts = corpus.chunks(count * per_doc)
        vectors = corpus.vectors(count * per_doc)
        samples.extend(texts[::500])
        for i in range(count):
            d = first + i
            part = slice(i * per_doc, (i + 1) * per_doc)
            store.replace_document(path=f"/synthetic/{d:07d}.md", root="/synthetic", file_type="markdown",
                                   title=f"Document {d}", file_hash=f"{d:016x}", size=0, mtime=0.0,
                                   metadata={"tags": [f"t{d % 10}"]},
                                   chunks=[Chunk(text=t, ord=j) for j, t in enumerate(texts[part])],
                                   vectors=vectors[part])
        if progress:
            progress((first + count) * per_doc)
    store.save_vectors()
    return samples

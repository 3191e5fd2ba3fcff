"""Which LM linears of tinymed-med-270m lose most when quantized to optimum-quanto int4 (bf16 compute)?

Teacher-forced on the first N SLAKE validation questions (English; not a test split): per variant, the mean
KL(fp32 || variant) of the next-token distribution at every answer token, the answer NLL, and top-1 agreement
with fp32. Variants keep one group of layers in quanto int8 and the rest in int4 (plus bf16 alone, and int4 with
HQQ scales). Prints one JSON line per variant; README section "The real model" quotes a run (N = 384).

    python bench/int4_sensitivity.py --data ../shared/data --n 384
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from optimum.quanto import freeze, qint4, qint8, quantize
from optimum.quanto.tensor.optimizers import HqqOptimizer

from tinymed.data import load_dataset
from tinymed.models.loading import load_processor
from tinymed.models.zoo import resolve_model
from tinymed.quantize import QuantConfig
from tinymed.quantize.backends import MIXED_INT8_SUFFIXES, _plain_model
from tinymed.train.data import Collator, VQATrainDataset
from tinymed.train.loop import answer_logits

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", type=Path, default=Path("../shared/data"))
parser.add_argument("--n", type=int, default=384, help="SLAKE validation questions")
parser.add_argument("--variants", type=int, default=None, help="only the first N variants (quick look)")
args = parser.parse_args()
path = resolve_model("tinymed-med-270m")
proc = load_processor(path)
samples = load_dataset("slake", args.data / "slake", split="validation").samples[: args.n]
ds = VQATrainDataset(samples, proc, cache_bytes=1 << 30)
coll = Collator(proc.tokenizer.pad_token_id)
batches = [coll([ds[i] for i in range(j, min(j + 16, len(ds)))]) for j in range(0, len(ds), 16)]


def log_probs(model, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: log-probabilities at the answer positions and the answer tokens."""
    out = []
    with torch.no_grad():
        for b in batches:
            logits, targets, _ = answer_logits(model, {**b, "pixel_values": b["pixel_values"].to(dtype)})
            out.append((logits.float().log_softmax(-1), targets))
    return out


ref_model, _ = _plain_model(path, "cpu", QuantConfig(method="quanto-int4", compute_dtype="float32"))
ref = log_probs(ref_model, torch.float32)
del ref_model


def score(res):
    kl = torch.cat([F.kl_div(q, r, log_target=True, reduction="none").sum(-1) for (q, _), (r, _) in zip(res, ref)])
    nll = torch.cat([-q.gather(-1, t[:, None])[:, 0] for q, t in res])
    agree = torch.cat([q.argmax(-1) == r.argmax(-1) for (q, _), (r, _) in zip(res, ref)])
    return {"kl": kl.mean().item(), "nll": nll.mean().item(), "agree": agree.float().mean().item()}


print("fp32", {"nll": torch.cat([-r.gather(-1, t[:, None])[:, 0] for r, t in ref]).mean().item()}, flush=True)
groups = {
    "none": lambda n: False,
    "all": lambda n: True,
    "down": lambda n: "down_proj" in n,
    "attn": lambda n: "self_attn" in n,
    "mlp": lambda n: ".mlp." in n,
    "v+down": lambda n: n.endswith(MIXED_INT8_SUFFIXES),  # quanto-int4-mixed
    "first2": lambda n: any(f"layers.{i}." in n for i in (0, 1)),
    "last2": lambda n: any(f"layers.{i}." in n for i in (16, 17)),
    "first2+last2": lambda n: any(f"layers.{i}." in n for i in (0, 1, 16, 17)),
}
variants = [("bf16", None)] + [(g, None) for g in groups] + [("none", "hqq")]
variants = variants[: args.variants]
for group, opt in variants:
    t0 = time.time()
    model, names = _plain_model(path, "cpu", QuantConfig(method="quanto-int4", compute_dtype="bfloat16"))
    if group == "bf16":  # no quantization: what bf16 compute alone costs
        with torch.inference_mode(False):
            print(json.dumps({"int8": "bf16 only", **score(log_probs(model, torch.bfloat16))}), flush=True)
        continue
    keep8 = [n for n in names if groups[group](n)]
    four = [n for n in names if n not in keep8]
    kw = {"optimizer": HqqOptimizer()} if opt else {}
    quantize(model, weights=qint4, include=four, **kw)
    if keep8:
        quantize(model, weights=qint8, include=keep8)
    freeze(model)
    with torch.inference_mode(False):
        res = log_probs(model, torch.bfloat16)
    print(json.dumps({"int8": group, "opt": opt or "max", "n8": len(keep8), **score(res),
                      "s": round(time.time() - t0)}), flush=True)

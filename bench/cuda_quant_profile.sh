#!/usr/bin/env bash
# Profile bf16 (no quantization), bnb-int8 and bnb-nf4 variants of a random-init LLaVA on one CUDA GPU.
# Peak memory = torch.cuda.max_memory_allocated. About 2-4 minutes; runs offline.
#
#   OUT=/some/dir bash bench/cuda_quant_profile.sh      # from the repository root, on the GPU machine
#
# Needs a CUDA PyTorch and transformers, tokenizers, accelerate, typer, rich, psutil, pillow already there
# (it never installs or replaces torch). tinymed is imported from this checkout. What the machine lacks
# (pydantic, bitsandbytes) comes from `.whl/` when that folder exists — fetch it beforehand, where pip
# works, with `bash bench/fetch_cuda_wheels.sh` — else from pip.
# Writes to $OUT (seven small files): log.txt (GPU, versions, every command's output), summary.json,
# <variant>/profile.json, and <method>/tinymed_quant.json for the quantized variants. Models go to $WORK.
# DEVICE=cpu runs the same steps on a CPU (a rehearsal of the script, not a CUDA measurement).
set -uo pipefail
OUT="${OUT:-$PWD/cuda-profile-out}"
WORK="${WORK:-$(mktemp -d /tmp/tinymed-cuda-XXXXXX)}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1

# 1. tinymed from this checkout; the packages the machine lacks from carried wheels (or pip).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
elif ! "$PY" -c "import pydantic, bitsandbytes" 2>/dev/null; then
  "$PY" -m pip install -q "pydantic>=2.7" "bitsandbytes>=0.48"
fi
nvidia-smi || true
"$PY" - "$DEVICE" <<'PYEOF' || exit 1
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "tokenizers", "accelerate", "typer", "rich", "psutil", "PIL",
                       "safetensors", "pydantic", "bitsandbytes") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}")
import bitsandbytes, torch, transformers
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU")
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__,
      "| bitsandbytes", bitsandbytes.__version__, "|", torch.cuda.get_device_name(0) if sys.argv[1] == "cuda" else "cpu")
PYEOF
TINYMED=("$PY" -m tinymed.cli)

# 2. A ~100M-parameter random LLaVA (the CPU benchmark's preset), saved locally: no Hub needed.
MODEL="$WORK/fp32-model"
"$PY" - "$MODEL" <<'PYEOF' || exit 1
import sys
from tinymed.models import TinyConfig, build_tiny_model
texts = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 200
model, processor = build_tiny_model(texts, TinyConfig(text_hidden=768, text_layers=16, heads=8, vocab_size=2000,
                                                      image_size=64))
model.save_pretrained(sys.argv[1]); processor.save_pretrained(sys.argv[1])
PYEOF

# 3. Quantize on the GPU, then profile each variant (bf16 compute) at batch 1 and batch 8. A failing
#    variant is logged and the others still run.
PROFILE=(--device "$DEVICE" --batch-size 8 --max-new-tokens 32 --runs 5)
timeout 300 "${TINYMED[@]}" profile --model "$MODEL" --out "$OUT/bf16" "${PROFILE[@]}" || echo "FAILED: profile bf16"
for method in bnb-int8 bnb-nf4; do
  if timeout 300 "${TINYMED[@]}" quantize --model "$MODEL" --method "$method" --device "$DEVICE" --out "$WORK/$method"; then
    mkdir -p "$OUT/$method" && cp "$WORK/$method/tinymed_quant.json" "$OUT/$method/"
    timeout 300 "${TINYMED[@]}" profile --model "$WORK/$method" --out "$OUT/$method" "${PROFILE[@]}" \
      || echo "FAILED: profile $method"
  else
    echo "FAILED: quantize $method"
  fi
done

# 4. One summary of the figures the README quotes.
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for name in ("bf16", "bnb-int8", "bnb-nf4"):
    path = out / name / "profile.json"
    if not path.is_file():
        rows[name] = "missing: see log.txt"
        continue
    p = json.loads(path.read_text())
    rows[name] = {"static_bytes": p["static"]["bytes"], "peak_bytes": p["dynamic"]["peak_bytes"],
                  "quantized_layer_ratio": p["static"].get("quantized_layer_ratio"), "speed": p["speed"],
                  "versions": p["versions"]}
(out / "summary.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PYEOF

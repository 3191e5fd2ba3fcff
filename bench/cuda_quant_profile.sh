#!/usr/bin/env bash
# Profile bf16 (no quantization), bnb-int8 and bnb-nf4 variants of a random-init LLaVA on one CUDA GPU
# (prepared for a lent H100; ~3-5 min on a bare machine). Peak memory = torch.cuda.max_memory_allocated.
#
#   OUT=/some/dir bash bench/cuda_quant_profile.sh      # run from the repository root
#
# Writes $OUT/<variant>/profile.json, $OUT/<variant>/model/tinymed_quant.json (quantized variants),
# $OUT/summary.json, $OUT/env.txt. Never reinstalls a CUDA torch that is already there.
set -euo pipefail
OUT="${OUT:-$PWD/cuda-profile-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

# 1. Install tinymed without touching an existing CUDA torch (our pin names the CPU wheel's version).
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps -e .
  "$PY" -m pip install -q "transformers>=5.0,<6" "tokenizers>=0.22" "safetensors>=0.5" "accelerate>=1.10" \
    "bitsandbytes>=0.48" "pydantic>=2.7" "typer>=0.12" "rich>=13" "psutil>=5.9" "pillow>=10" "numpy>=1.26" \
    "datasets>=3.0" "nltk>=3.8" "peft>=0.17"
else
  "$PY" -m pip install -q torch  # default Linux wheel = CUDA build
  "$PY" -m pip install -q -e .
fi
{ nvidia-smi; "$PY" -c "import torch, transformers, bitsandbytes as b; print(torch.__version__, torch.version.cuda, transformers.__version__, b.__version__)"; } > "$OUT/env.txt" 2>&1 || true

# 2. A ~100M-parameter random LLaVA (same preset the CPU benchmark uses), saved locally: no Hub needed.
MODEL="$OUT/fp32-model"
"$PY" - "$MODEL" <<'PYEOF'
import sys
from tinymed.models import TinyConfig, build_tiny_model
texts = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 200
model, processor = build_tiny_model(texts, TinyConfig(text_hidden=768, text_layers=16, heads=8, image_size=64))
model.save_pretrained(sys.argv[1]); processor.save_pretrained(sys.argv[1])
PYEOF

# 3. Quantize on the GPU, then profile each variant (bf16 compute) at batch 1 and batch 8.
PROFILE=(--device cuda --batch-size 8 --max-new-tokens 32 --runs 5)
timeout 300 tinymed profile --model "$MODEL" --out "$OUT/bf16" "${PROFILE[@]}"
for method in bnb-int8 bnb-nf4; do
  timeout 300 tinymed quantize --model "$MODEL" --method "$method" --device cuda --out "$OUT/$method/model"
  timeout 300 tinymed profile --model "$OUT/$method/model" --out "$OUT/$method" "${PROFILE[@]}"
done

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for name in ("bf16", "bnb-int8", "bnb-nf4"):
    p = json.loads((out / name / "profile.json").read_text())
    rows[name] = {"static_bytes": p["static"]["bytes"], "peak_bytes": p["dynamic"]["peak_bytes"],
                  "quantized_layer_ratio": p["static"]["quantized_layer_ratio"], "speed": p["speed"],
                  "gpu": p["versions"].get("gpu")}
(out / "summary.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PYEOF

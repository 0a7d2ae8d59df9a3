"""What a Lightning checkpoint (a file, or DeepSpeed's directory) stores: tensor names, shapes, bytes.

    python bench/gpu/ckpt_report.py <run>/checkpoints/last.ckpt
"""
import json
import sys
from pathlib import Path

import torch

p = Path(sys.argv[1])
files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
out = {"path": str(p), "files": {str(f.relative_to(p.parent)): f.stat().st_size for f in files},
       "total_bytes": sum(f.stat().st_size for f in files)}
if p.is_file():
    sd = torch.load(p, map_location="cpu", weights_only=False)
    out["state_dict"] = {k: list(v.shape) for k, v in sd["state_dict"].items()}
    out["global_step"] = sd.get("global_step")
else:
    st = next(p.rglob("mp_rank_00_model_states.pt"))
    sd = torch.load(st, map_location="cpu", weights_only=False)
    out["state_dict"] = {k: list(v.shape) for k, v in sd["module"].items()}
    out["global_step"] = sd.get("global_step")
    frozen = sd.get("frozen_param_fragments")
    out["frozen_param_fragments"] = None if frozen is None else len(frozen)
print(json.dumps(out))

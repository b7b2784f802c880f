"""``excb export RUN --format torch`` / ``excb.export_weights``: a trained run's teacher as fine-tuning weights
(the format is excb.models.weights)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from excb.models.weights import META_FILE, WEIGHTS_FILE, save_backbone
from excb.training.teacher import load_teacher


def export_weights(source: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``excb export RUN --format torch``: the teacher weights of a run (or checkpoint); returns backbone.json."""
    cfg, model, ckpt, ckpt_path = load_teacher(source, "cpu")
    save_backbone(model, cfg, out_dir, {"checkpoint": str(ckpt_path.resolve()), "step": int(ckpt.get("step", 0))})
    return json.loads((Path(out_dir) / META_FILE).read_text())


def cmd_export_weights(source: str, out: str) -> int:
    """CLI body of ``excb export RUN --format torch --out DIR``: one JSON line, or ``excb export: ...`` + 2."""
    try:
        meta = export_weights(source, out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"excb export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"weights": str((Path(out) / WEIGHTS_FILE).resolve()), "architecture": meta["architecture"],
                      "embed_dim": meta["embed_dim"], "embedding": meta["embedding"]["kind"],
                      "whitening": meta["embedding"]["whitening"]["kind"], "backbone_dim": meta["backbone"]["dim"],
                      "loads_into": meta["loads_into"]}))
    return 0

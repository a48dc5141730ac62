"""`ggtorch export-lora` (merge adapters into a new GGUF, as llama-export-lora) and `ggtorch finetune`
(train a LoRA adapter on a GGUF model)."""
from __future__ import annotations

import sys

from .common import lora_specs


def register(sub) -> None:
    p = sub.add_parser("export-lora", help="merge LoRA adapters into a new GGUF model (llama-export-lora)")
    p.add_argument("model", help="the base model (.gguf)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="adapter (.gguf or PEFT directory) at scale 1 (repeatable)")
    p.add_argument("--lora-scaled", action="append", default=[], nargs=2, metavar=("FILE", "SCALE"),
                   help="adapter with a user scale (repeatable)")
    p.add_argument("-o", "--out", required=True, help="the merged model (.gguf)")
    p.add_argument("--type", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="type of the merged tensors (default: F32 where the base tensor is F32, else F16, "
                        "as llama-export-lora)")

    from ..lora.train import register_finetune

    register_finetune(sub)


def cmd_export_lora(a) -> int:
    from ..lora.export import export_lora
    from ..packaged import resolve

    r = export_lora(resolve(a.model), lora_specs(a), a.out, a.type)
    print(f"merged {r['merged']} tensors into {a.out}", file=sys.stderr)
    return 0


def cmd_finetune(a) -> int:
    from ..lora.train import cmd

    return cmd(a)

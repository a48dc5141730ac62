"""One pipeline stage's model: a contiguous range of the file's layers, built by the architecture's own
loader from a view of the GGUF file that shows only those layers (renamed from blk.0), so that only their
tensors are ever read or repacked (ggtorch.dist.pipeline runs the stages)."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

from ..errors import ModelError, PipelineError
from ..gguf.reader import GGUFFile
from ..model import ARCHITECTURES
from ..model.config import Config


def split_layers(n_layer: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, as even as possible (earlier stages take the remainder)."""
    if not 1 <= n_stages <= n_layer:
        raise PipelineError(f"a pipeline of {n_stages} stages needs 1..{n_layer} stages (the model has {n_layer} layers)")
    base, extra = divmod(n_layer, n_stages)
    out, a = [], 0
    for k in range(n_stages):
        b = a + base + (k < extra)
        out.append(range(a, b))
        a = b
    return out


@dataclass(frozen=True)
class StageConfig(Config):
    """A stage's hyper-parameters: n_layer is the stage's count; per-layer rules (is_swa, has_rope) take
    the stage's layer il at the file's number il + layer_offset."""
    layer_offset: int = 0
    n_layer_model: int = 0  # the whole model's layer count

    def is_swa(self, il: int) -> bool:
        return super().is_swa(il + self.layer_offset)

    def has_rope(self, il: int) -> bool:
        return super().has_rope(il + self.layer_offset)


class StageFile:
    """The GGUF file as one stage's model sees it: layers ``layers`` renamed ``blk.0.``.., the other
    layers' tensors absent, everything else (metadata, embeddings, output) as in the file."""

    def __init__(self, f: GGUFFile, layers: range):
        self.file, self.layers = f, layers
        self.path, self.metadata = f.path, f.metadata
        self._orig: dict[str, str] = {}
        for name in f.tensors:
            m = re.match(r"blk\.(\d+)\.(.*)", name)
            if m is None:
                self._orig[name] = name
            elif int(m.group(1)) in layers:
                self._orig[f"blk.{int(m.group(1)) - layers.start}.{m.group(2)}"] = name
        self.tensors = {n: f.tensors[o] for n, o in self._orig.items()}

    @property
    def architecture(self):
        return self.file.architecture

    def get(self, key, default=None):
        return self.file.get(key, default)

    def arch_key(self, suffix, default=None):
        return self.file.arch_key(suffix, default)

    def info(self, name):
        return self.file.info(self._orig.get(name, name))

    def raw(self, name):
        return self.file.raw(self._orig[name])

    def copy(self, name):
        return self.file.copy(self._orig[name])

    def rows(self, name, ids, row_bytes):
        return self.file.rows(self._orig[name], ids, row_bytes)

    def release(self, name, start=0, end=None):
        self.file.release(self._orig[name], start, end)

    def close(self):
        self.file.close()


def load_stage(path: str, stage: int, n_stages: int, device: str = "cpu", fast: bool = True):
    """Stage ``stage``'s model: its layers only, plus the embeddings on stage 0 and output_norm/output
    on the last stage. Returns (the stage's Transformer, the whole model's Config)."""
    f = GGUFFile(path)
    cfg = Config.from_gguf(f)
    if cfg.arch not in ARCHITECTURES:
        raise ModelError(f"{path}: architecture {cfg.arch!r} is not supported")
    layers = split_layers(cfg.n_layer, n_stages)[stage]
    scfg = StageConfig(**{k.name: getattr(cfg, k.name) for k in fields(Config)} | {"n_layer": len(layers)},
                       layer_offset=layers.start, n_layer_model=cfg.n_layer)
    net = ARCHITECTURES[cfg.arch](StageFile(f, layers), scfg, device)
    if cfg.arch == "gemma2":  # llama_model_gemma2's query scale reads the whole model's layer count (27B: 46)
        net.q_scale = (cfg.n_embd // cfg.n_head if cfg.n_layer == 46 else cfg.head_dim) ** -0.5
    last = stage == n_stages - 1
    # The ends of the model: stage 0 embeds (rows read from the file, no repacked form needed), the last
    # stage projects. A matrix this stage never multiplies by is left out of the repack, so its pages of
    # the file are never read.
    if not (last and net.output is net.tok_embd):
        net._weights.pop("token_embd.weight", None)
    if not last:
        net._weights.pop("output.weight", None)
    if fast:
        net.install_fast(cache=False)  # the repack cache is keyed by the whole file, not a stage's part of it
    return net, cfg

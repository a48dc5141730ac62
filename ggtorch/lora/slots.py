"""Per-request LoRA adapters in the continuous-batching engine, as llama.cpp's server has them.

The adapters are the ones loaded with the model (``--lora`` / ``--lora-scaled``; ids are their indices
in that order). ``GET /lora-adapters`` lists them with their global scales and ``POST /lora-adapters``
sets those scales; a request's ``lora: [{"id": i, "scale": s}]`` field overrides them for that request.
The semantics follow tools/server: an adapter not listed gets scale 0, both in a request's ``lora``
list and in a POST (server_context::construct_lora_list); a request without ``lora`` (or with an empty
list) takes the global scales in force when it enters its slot (launch_slot_with_task).

Unlike llama.cpp's server, which batches only slots with equal adapters (server_slot::can_batch_with),
requests with different scales share one forward: the base products are computed once for every row
and each row adds its own adapters' low-rank terms (SlotScales in apply.py: per-row scales for the
slot each row belongs to). A slot's KV cache holds keys and values computed under its request's
scales, so the prompt cache reuses a slot's tokens only for a request with the same scales (llama.cpp
clears the slot's cache when the adapters change).
"""
from __future__ import annotations

from ..errors import LoRAError
from .apply import set_slot_scales

# a user scale's bound: past it an adapter's term overflows float32 into inf/NaN logits (a 1e30 scale
# did on the tiny fixtures); useful scales are around 0..2 (llama.cpp sets no bound)
MAX_SCALE = 100.0


def parse_scales(entries, n_adapters: int, what: str = "lora") -> dict[int, float]:
    """``[{"id": i, "scale": s}, ...]`` (JSON) -> {id: scale}, checked against the ``n_adapters`` loaded:
    an id that names no adapter, or a scale that is not a number in [-MAX_SCALE, MAX_SCALE], is one line
    naming the entry.
    A repeated id takes its last scale (as llama.cpp's parse_lora_request)."""
    if not isinstance(entries, list):
        raise LoRAError(f'{what} must be a list of {{"id": N, "scale": X}} objects, got {type(entries).__name__}')
    out: dict[int, float] = {}
    for i, e in enumerate(entries):
        p = f"{what}[{i}]"
        if not isinstance(e, dict) or "id" not in e or "scale" not in e:
            raise LoRAError(f'{p} must be an object {{"id": N, "scale": X}}, got {str(e)[:60]}')
        k, s = e["id"], e["scale"]
        if isinstance(k, bool) or not isinstance(k, int):
            raise LoRAError(f"{p}.id must be an integer adapter id, got {str(k)[:40]}")
        if not 0 <= k < n_adapters:
            have = f"ids 0..{n_adapters - 1} (GET /lora-adapters lists them)" if n_adapters else \
                "no adapters are loaded (start the server with --lora FILE)"
            raise LoRAError(f"{p}.id {k} names no loaded LoRA adapter: {have}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not -MAX_SCALE <= s <= MAX_SCALE:  # NaN too
            raise LoRAError(f"{p}.scale must be a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {str(s)[:40]}")
        out[k] = float(s)
    return out


class SlotLoRA:
    """The engine's view of the model's adapters: the global scales, the scales each slot's KV cache was
    computed under, and the model's per-slot scale table kept in step with them. Only the engine thread
    calls :meth:`assign` / :meth:`note`; :meth:`set_scales` (POST) replaces one tuple, read at admission."""

    def __init__(self, net, n_slots: int):
        self.net = net
        self.adapters = [ad for ad, _ in net.loras]
        self.attached = tuple(float(u) for _, u in net.loras)  # the scales the model's terms carry
        self.scales = self.attached  # global: what a request without a lora field gets
        self.held: list[tuple[float, ...] | None] = [None] * n_slots
        self.mixed_steps = 0  # forwards whose rows ran under different adapter scales

    @classmethod
    def of(cls, net, n_slots: int, batched: bool) -> "SlotLoRA | None":
        """For a model with adapters behind a slot pool; None otherwise (nothing to switch)."""
        if not batched or not getattr(net, "loras", None) or getattr(net, "lora_rows", None) is None:
            return None
        return cls(net, n_slots)

    @staticmethod
    def check(sl: "SlotLoRA | None", lora: dict[int, float]) -> None:
        """A request's lora field fits the adapters behind the engine ``sl`` (None: none to switch)."""
        if sl is None:
            raise LoRAError("the request lists LoRA adapters (lora), but none are loaded for per-request "
                            "use (load them with --lora FILE)")
        sl.resolve(lora)

    def info(self) -> list[dict]:
        """GET /lora-adapters (server_task_result_get_lora::to_json)."""
        out = []
        for i, (ad, s) in enumerate(zip(self.adapters, self.scales)):
            md = ad.metadata if isinstance(ad.metadata, dict) else {}
            out.append({"id": i, "path": str(ad.path), "scale": s,
                        "task_name": str(md.get("adapter.lora.task_name", "") or ""),
                        "prompt_prefix": str(md.get("adapter.lora.prompt_prefix", "") or "")})
        return out

    def _full(self, given: dict[int, float]) -> tuple[float, ...]:
        return tuple(given.get(i, 0.0) for i in range(len(self.adapters)))  # construct_lora_list

    def set_scales(self, entries) -> None:
        """POST /lora-adapters: the listed scales, 0 for the others; requests admitted later use them."""
        self.scales = self._full(parse_scales(entries, len(self.adapters), "body"))

    def resolve(self, lora: dict[int, float] | None) -> tuple[float, ...]:
        """A request's scales: its lora field (unlisted adapters 0) or, without one, the global scales."""
        if not lora:
            return self.scales
        for k in lora:
            if not 0 <= k < len(self.adapters):
                raise LoRAError(f"lora id {k} names no loaded LoRA adapter (ids 0..{len(self.adapters) - 1})")
        return self._full(lora)

    def assign(self, slot: int, scales: tuple[float, ...]) -> None:
        """Slot ``slot`` now runs a request under ``scales``: the model's table follows (the plain path,
        no table, while every slot runs under the attached scales)."""
        self.held[slot] = scales
        rows = {i: list(h) for i, h in enumerate(self.held) if h is not None and h != self.attached}
        set_slot_scales(self.net, rows or None, len(self.held))

    def note(self, slots: list[int]) -> None:
        """One forward over the rows of ``slots`` happened: count it when they mixed adapter scales."""
        if len({self.held[s] for s in set(slots)}) > 1:
            self.mixed_steps += 1

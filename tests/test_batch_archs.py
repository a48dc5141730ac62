"""The batched decode step (forward_batch over a slot pool) on every architecture of fixtures/archs:
each sequence's logits equal the same sequence run alone (softcaps, sinks, sliding windows, MoE)."""
import pytest
import torch

import ggtorch
from conftest import FIXTURES

ARCHS = sorted((FIXTURES / "archs").glob("tiny-*-F32.gguf"))
SEQS = [[1, 5, 9, 33, 2], [7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("path", ARCHS, ids=lambda p: p.stem)
def test_forward_batch_equals_each_sequence_alone(path):
    net = ggtorch.load(str(path), fast=False).net
    pool = net.new_pool(len(SEQS), 64, dtype=torch.float32)
    for s, ids in enumerate(SEQS):
        net.forward(ids[:-1], pool, slot=s)
    batched = net.forward_batch([ids[-1] for ids in SEQS], list(range(len(SEQS))), pool)
    for s, ids in enumerate(SEQS):
        alone = net.forward(ids, net.new_cache(16, dtype=torch.float32))[-1]
        assert (alone - batched[s]).abs().max().item() < 1e-3 * alone.std().item(), s

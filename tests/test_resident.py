"""What a loaded model keeps resident of its GGUF mapping (issue 22's memory goal): the header's pages
are given back once parsed, norm vectors are copies read with pread, and embedding rows are read with
pread, so after load and a prompt's lookups the file's mapping holds (almost) nothing resident; the
values are the ones the mapping gives."""
import os

import numpy as np
import pytest
import torch

from conftest import tiny_files

import ggtorch
from ggtorch.gguf.reader import GGUFFile
from ggtorch.quant.linear import embedding

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")


def mapped_rss_kb(path: str) -> int:
    """Resident kB of every mapping of ``path`` in this process."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 5 and "-" in p[0] and ":" not in p[0]:
                inside = len(p) > 5 and p[5] == path
            elif inside and p[0] == "Rss:":
                total += int(p[1])
    return total


@pytest.mark.parametrize("path", tiny_files(), ids=lambda p: p.stem)
def test_embed_rows_and_vectors_equal_the_mapping(path):
    m = ggtorch.load(str(path), cache=False)
    net = m.net
    ids = torch.tensor([0, 5, 1023, 5, 77, 300])
    got = net.embed(ids)
    ref = embedding(ids, net.tok_embd)  # rows indexed in the mapped tensor
    assert torch.equal(got, ref)
    from ggtorch.quant.dequant import dequantize

    v = net.vector("output_norm.weight")
    ti = net.file.tensors["output_norm.weight"]
    assert torch.equal(v, dequantize(net.file.raw("output_norm.weight"), ti.type))
    raw = net.file.raw("output_norm.weight")
    assert v.data_ptr() != raw.ctypes.data  # a copy, not a view of the mapping


def test_row_read_rejects_out_of_range(smollm):
    f = smollm.net.file
    w = smollm.net.tok_embd
    with pytest.raises(IndexError):
        f.rows("token_embd.weight", np.array([w.out_features]), w.row_bytes)


@linux_only
def test_gemma_header_and_lookups_leave_the_mapping_unresident(gemma):
    """Gemma 3's 262k-token vocabulary and 262k-row table: opening the file keeps none of the parsed
    header resident (it kept ~8 MB), and a 128-token prompt's lookups do not make the table resident
    (they made 90-146 MB resident when rows were read through the mapping)."""
    path = os.path.realpath(gemma.path)
    before = mapped_rss_kb(path)  # the session's model maps the same file
    f = GGUFFile(path)
    try:
        assert len(f.metadata["tokenizer.ggml.tokens"]) == gemma.n_vocab
        assert mapped_rss_kb(path) - before < 2048
    finally:
        f.close()
    before = mapped_rss_kb(path)
    ids = torch.randint(0, gemma.n_vocab, (128,), generator=torch.Generator().manual_seed(0))
    x = gemma.net.embed(ids)
    assert x.shape == (128, gemma.cfg.n_embd)
    assert mapped_rss_kb(path) - before < 1024

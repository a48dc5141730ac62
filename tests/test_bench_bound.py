"""`ggtorch bench --bound`: the weight bytes a decode step reads and the bound they set."""
import ggtorch
from conftest import FIXTURES
from ggtorch.bench import bytes_per_token, format_table
from ggtorch.gguf.reader import GGUFFile


def test_bytes_per_token_counts_one_embedding_row_and_routed_experts():
    f = GGUFFile(str(FIXTURES / "tiny" / "tiny-llama-Q8_0.gguf"))
    infos = {t.name: t for t in f}
    total = sum(t.nbytes for t in f)
    emb = infos["token_embd.weight"]
    want = total - emb.nbytes + emb.nbytes // emb.shape[1] if "output.weight" in infos else total
    assert bytes_per_token(f) == want
    moe = GGUFFile(str(FIXTURES / "archs" / "tiny-qwen3moe-Q8_0.gguf"))
    cfg = ggtorch.load(moe.path, fast=False, cache=False).cfg
    sizes = {t.name: t for t in moe}
    assert any("_exps" in n for n in sizes) and cfg.n_expert_used < cfg.n_expert
    want = 0
    for n, t in sizes.items():
        if "_exps" in n:
            want += t.nbytes * cfg.n_expert_used // cfg.n_expert
        elif n == "token_embd.weight" and "output.weight" in sizes:
            want += t.nbytes // t.shape[1]
        else:
            want += t.nbytes
    assert bytes_per_token(moe, cfg.n_expert, cfg.n_expert_used) == want < sum(t.nbytes for t in moe)


def test_format_table_shows_the_bound():
    r = {"model": "m", "device": "cpu", "threads": 2, "load_s": 0.1, "pp8_tok_s": 10.0, "tg4_tok_s": 5.0,
         "peak_rss_mb": 100.0, "bound_tok_s": 20.0, "decode_of_bound": 0.25}
    text = format_table([r])
    assert "decode bound" in text and "20.0 (25%)" in text

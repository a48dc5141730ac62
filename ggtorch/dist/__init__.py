"""Past one process: a model's layers split across processes with torch.distributed (pipeline.py)."""

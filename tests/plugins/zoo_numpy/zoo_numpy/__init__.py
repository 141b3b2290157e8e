"""zoo-numpy: GPTBigCode in plain numpy, as an export backend ("npz") and a converter (HF -> .npz) for any plugin's
gpt_bigcode models. It reads weights and architecture through the host's component protocols only."""

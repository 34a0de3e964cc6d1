"""Shared test settings: CPU, offline, small."""
import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TAFM_CACHE", os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), "tafm-test-cache"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

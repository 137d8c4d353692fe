"""Suite-wide settings: keep torch to one thread per xdist worker so two workers share two cores."""

import os

import matplotlib
import torch

matplotlib.use("Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

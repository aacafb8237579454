"""Collection guard: the Lightning callback module needs the optional ``lightning`` package."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("lightning") else ["rdsim/torch/lightning.py"]

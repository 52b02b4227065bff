"""The portable files work when copied alone into an empty folder of another project.

Each of tokenizer.py (with its vocabulary), metrics.py, losses.py, lora.py, mona.py and model.py
is copied into a temporary folder and used from there by a fresh Python process whose working
directory is that folder, so nothing of clip_us can be imported by accident.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import clip_us

PACKAGE = Path(clip_us.__file__).parent
USES = {
    "tokenizer.py": """
import tokenizer
ids = tokenizer.tokenize(["an ultrasound image of a benign lesion."])
assert ids.shape == (1, 77) and ids[0, 0] == 49406
""",
    "metrics.py": """
import numpy as np, metrics
gt = np.zeros((16, 16), bool); gt[4:10, 4:10] = True
pred = np.roll(gt, 1, axis=0)
assert metrics.dice(gt, gt) == 1.0 and 0 < metrics.dice(pred, gt) < 1
assert metrics.hd95(pred, gt) == 1.0 and metrics.roc_auc([0.1, 0.9], [0, 1]) == 1.0
""",
    "losses.py": """
import torch, losses
logits, target = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8))
assert losses.dice_ce_loss(logits, target).ndim == 0
assert losses.focal_loss(torch.randn(4, 2), torch.tensor([0, 1, 1, 0])) > 0
""",
    "lora.py": """
import torch, lora
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
x = torch.randn(2, 5, 16)
with torch.no_grad():
    before = layer(x)
lora.add_lora(layer, r=4, dropout=0.0)
for name, p in layer.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.1)
with torch.no_grad():
    adapted = layer(x)
assert not torch.allclose(before, adapted)
lora.merge_lora(layer, remove=True)
assert type(layer.self_attn) is torch.nn.MultiheadAttention
with torch.no_grad():
    assert torch.allclose(layer(x), adapted, atol=1e-5)
head = lora.LoRALinear(torch.nn.Linear(16, 3), r=2)
assert head(x).shape == (2, 5, 3)
bare = lora.add_lora(torch.nn.MultiheadAttention(16, 2, batch_first=True), r=2)
assert isinstance(bare, lora.LoRAAttention) and bare(x, x, x)[0].shape == x.shape
""",
    "mona.py": """
import torch, mona
m = mona.Mona(width=32, bottleneck=8)
tokens = torch.randn(2, 1 + 3 * 4, 32)
assert m(tokens, grid=(3, 4)).shape == tokens.shape
assert m(torch.randn(2, 1 + 16, 32)).shape == (2, 17, 32)  # square grid by default
""",
    "model.py": """
import torch, model
clip = model.build_model(config="tiny")
image = clip.encode_image(torch.randn(1, 3, 64, 64))
text = clip.encode_text(torch.randint(1, 400, (1, 77)))
assert image.shape == text.shape == (1, 64)
""",
}


@pytest.mark.parametrize("name", sorted(USES))
def test_file_works_copied_alone(tmp_path, name):
    shutil.copy(PACKAGE / name, tmp_path / name)
    if name == "tokenizer.py":
        shutil.copy(PACKAGE / "bpe_simple_vocab_16e6.txt.gz", tmp_path)
    proc = subprocess.run([sys.executable, "-E", "-s", "-c", USES[name]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

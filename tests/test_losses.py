"""clip_us.losses against MONAI (DiceCELoss, FocalLoss) and open_clip (ClipLoss) on random inputs,
and clip_loss under two gloo processes against one process on the concatenated batch.

The peers are imported inside the tests: the spawned DDP workers import this module, and keeping
MONAI and open_clip out of that import saves seconds per worker.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_us.losses import clip_loss, dice_ce_loss, focal_loss


def random_seg(shape, classes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], classes) + shape[1:], generator=g, dtype=dtype) * 3
    target = torch.randint(0, classes, (shape[0], 1) + shape[1:], generator=g)  # [B, 1, *S], MONAI layout
    return logits, target


# ----------------------------------------------------------------------------- Dice-CE, focal
@pytest.mark.parametrize("shape,classes", [((4, 32, 32), 2), ((2, 16, 16), 3), ((2, 8, 9, 10), 2)])
def test_dice_ce_matches_monai(shape, classes):
    from monai.losses import DiceCELoss
    ref_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=1e-8, smooth_dr=1e-8)
    logits, target = random_seg(shape, classes, seed=classes)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = dice_ce_loss(ours_in, target), ref_fn(ref_in, target.double())
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    ours.backward(), ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-6, rtol=0)
    # target without the channel axis, and a perfect prediction gives ~0 Dice and ~0 CE
    torch.testing.assert_close(dice_ce_loss(logits, target[:, 0]), ours.detach(), atol=1e-12, rtol=0)
    perfect = F.one_hot(target[:, 0], classes).movedim(-1, 1).double() * 1e3
    assert dice_ce_loss(perfect, target).item() < 1e-6


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_matches_monai(use_softmax, alpha):
    from monai.losses import FocalLoss
    ref_fn = FocalLoss(to_onehot_y=True, use_softmax=use_softmax, alpha=alpha)
    # MONAI's FocalLoss builds float32 one-hot targets, so compare in float32
    cases = (random_seg((16,), 2, 0, torch.float32), random_seg((3, 12, 12), 3, 1, torch.float32))
    for logits, target in cases:
        ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = focal_loss(ours_in, target, alpha=alpha, use_softmax=use_softmax)
        ref = ref_fn(ref_in, target)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        ours.backward(), ref.backward()
        torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-6, rtol=0)
    # classification targets [B] work too; gamma=0 without alpha is plain BCE on one-hot targets
    logits, target = random_seg((16,), 2, seed=2)
    hot = F.one_hot(target[:, 0], 2).double()
    torch.testing.assert_close(focal_loss(logits, target[:, 0], gamma=0.0),
                               F.binary_cross_entropy_with_logits(logits, hot))


def test_bad_targets_raise():
    logits = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match="target must be"):
        dice_ce_loss(logits, torch.zeros(2, 2, 8, 8))  # one-hot targets are not accepted
    with pytest.raises(ValueError, match="target must be"):
        focal_loss(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- contrastive
def test_clip_loss_matches_open_clip():
    from open_clip.loss import ClipLoss
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    for scale in (1 / 0.07, torch.tensor(2.5, dtype=torch.float64)):
        torch.testing.assert_close(clip_loss(img, txt, scale), ClipLoss()(img, txt, scale))
    # paired rows that match perfectly at a high scale give a loss near zero
    assert clip_loss(img, img, 1000.0).item() < 1e-6
    with pytest.raises(ValueError, match="both be"):
        clip_loss(img, txt[:4], 1.0)


class TwoTower(torch.nn.Module):
    """Tiny image/text projections with a learnable log logit scale, as CLIP has."""

    def __init__(self):
        super().__init__()
        self.img = torch.nn.Linear(6, 4)
        self.txt = torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t, learnable):
        scale = self.logit_scale.exp() if learnable else 1 / 0.07
        return clip_loss(F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1), scale)


def make_model_and_data(world, per_rank):
    torch.manual_seed(0)
    model = TwoTower().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * per_rank, 6, generator=g, dtype=torch.float64)
    t = torch.randn(world * per_rank, 5, generator=g, dtype=torch.float64)
    return model, x, t


def _ddp_worker(rank, world, port, per_rank, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        result = {}
        for learnable in (True, False):
            model, x, t = make_model_and_data(world, per_rank)
            # with a fixed temperature logit_scale takes no part, which DDP must be told about
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=not learnable)
            loss = ddp(x[rows], t[rows], learnable)
            loss.backward()
            result[learnable] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clip_loss_ddp_equals_single_process(tmp_path):
    world, per_rank = 2, 4
    mp.spawn(_ddp_worker, args=(world, free_port(), per_rank, str(tmp_path)), nprocs=world, join=True)
    model, x, t = make_model_and_data(world, per_rank)
    for learnable in (True, False):
        model.zero_grad()
        loss = model(x, t, learnable)
        loss.backward()
        for rank in range(world):
            r_loss, r_grads = torch.load(tmp_path / f"rank{rank}.pt")[learnable]
            torch.testing.assert_close(r_loss, loss.detach(), atol=1e-5, rtol=0)
            for name, p in model.named_parameters():
                if p.grad is None:  # the fixed-temperature run leaves logit_scale unused
                    assert not learnable and name == "logit_scale"
                    assert r_grads[name] is None or not r_grads[name].any()
                    continue
                torch.testing.assert_close(r_grads[name], p.grad, atol=1e-5, rtol=0, msg=name)

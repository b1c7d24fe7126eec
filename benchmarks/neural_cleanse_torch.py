"""Reference: the published Neural Cleanse loop in PyTorch, class by class (Wang et al., S&P 2019).

Written from the paper and its released hyperparameters for MNIST: batch 32,
1,000 samples per epoch (31 mini-batches), Adam lr 0.1 betas (0.5, 0.9),
init cost 1e-3, patience 5, cost x2 up / x2^1.5 down, success threshold 0.99,
early stop after 25 epochs without improvement once the cost has moved both
ways. The cost starts at 0 and is switched on after `patience` successful
epochs (the released code's path when the initial cost is 0). Used only by
the benchmarks: torch is never a dependency of jaxrisk.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    batch_size: int = 32
    samples_per_epoch: int = 1000
    learning_rate: float = 0.1
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    patience: int = 5
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    early_stop_threshold: float = 1.0
    early_stop_patience: int = 25
    max_epochs: int = 1000


class TorchMnistCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, 1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, 1)
        self.fc1 = torch.nn.Linear(9216, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.flatten(torch.nn.functional.max_pool2d(x, 2), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def load_torch_cnn(path: str) -> TorchMnistCNN:
    from safetensors.torch import load_file

    net = TorchMnistCNN()
    net.load_state_dict(load_file(path))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def reverse_engineer(net, images: np.ndarray, labels: np.ndarray, target: int, cfg: ReferenceConfig, seed: int = 0):
    """One class's trigger; returns (mask [H,W], pattern [C,H,W], l1, epochs_run)."""
    gen = torch.Generator().manual_seed(seed)
    x_pool = torch.from_numpy(images[labels != target])
    _, c, h, w = x_pool.shape
    mask_raw = (torch.rand(h, w, generator=gen) * 4 - 2).requires_grad_(True)
    pattern_raw = (torch.rand(c, h, w, generator=gen) * 4 - 2).requires_grad_(True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=cfg.learning_rate, betas=(0.5, 0.9))
    eps = 1e-7
    cost = 0.0
    cost_set_count = up_count = down_count = 0
    up_flag = down_flag = False
    best_l1, best = float("inf"), None
    stop_best, stop_count = float("inf"), 0
    steps_per_epoch = cfg.samples_per_epoch // cfg.batch_size
    y = torch.full((cfg.batch_size,), target)
    for epoch in range(cfg.max_epochs):
        accs = []
        for _ in range(steps_per_epoch):
            idx = torch.randint(len(x_pool), (cfg.batch_size,), generator=gen)
            mask = torch.tanh(mask_raw) / (2 - eps) + 0.5
            pattern = torch.tanh(pattern_raw) / (2 - eps) + 0.5
            logits = net((1 - mask) * x_pool[idx] + mask * pattern)
            loss = torch.nn.functional.cross_entropy(logits, y) + cost * mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            accs.append((logits.argmax(-1) == target).float().mean().item())
        with torch.no_grad():
            mask = torch.tanh(mask_raw) / (2 - eps) + 0.5
            pattern = torch.tanh(pattern_raw) / (2 - eps) + 0.5
            l1 = mask.sum().item()
        success = float(np.mean(accs)) >= cfg.success_threshold
        if success and l1 < best_l1:
            best_l1, best = l1, (mask.numpy().copy(), pattern.numpy().copy())
        if best_l1 < float("inf"):
            stop_count = stop_count + 1 if best_l1 >= cfg.early_stop_threshold * stop_best else 0
        stop_best = min(stop_best, best_l1)
        if up_flag and down_flag and stop_count >= cfg.early_stop_patience:
            break
        if cost == 0 and success:
            cost_set_count += 1
            if cost_set_count >= cfg.patience:
                cost, up_count, down_count, up_flag, down_flag = cfg.init_cost, 0, 0, False, False
        else:
            cost_set_count = 0
        if success:
            up_count, down_count = up_count + 1, 0
        else:
            up_count, down_count = 0, down_count + 1
        if cost > 0 and up_count >= cfg.patience:
            up_count, cost, up_flag = 0, cost * cfg.cost_up, True
        elif cost > 0 and down_count >= cfg.patience:
            down_count, cost, down_flag = 0, cost / cfg.cost_down, True
    if best is None:
        best = (mask.numpy().copy(), pattern.numpy().copy())
        best_l1 = l1
    return best[0], best[1], best_l1, epoch + 1


def scan(net, images, labels, cfg: ReferenceConfig, n_classes: int = 10, seed: int = 0) -> dict:
    """Class by class, as the reference does; MAD flagging as in the paper."""
    t0 = time.perf_counter()
    norms, epochs, masks = [], [], []
    for target in range(n_classes):
        m, _, l1, ep = reverse_engineer(net, images, labels, target, cfg, seed + target)
        norms.append(l1), epochs.append(ep), masks.append(m)
    from jaxrisk.scan import flag_outliers, mad_anomaly_index

    norms = np.array(norms)
    return {"seconds": time.perf_counter() - t0, "l1_norms": norms.tolist(),
            "anomaly_index": mad_anomaly_index(norms).tolist(),
            "flagged": np.flatnonzero(flag_outliers(norms)).tolist(), "epochs": epochs, "masks": masks}


def scan_batched(net, images, labels, n_classes: int = 10, steps: int = 400, batch: int = 32,
                 steps_per_epoch: int = 8, cfg: ReferenceConfig = ReferenceConfig(), seed: int = 0,
                 device: str = "cpu") -> dict:
    """The straightforward fast PyTorch Neural Cleanse: every class's mask and pattern optimised at once,
    one forward pass over `batch` images per class per step, `steps` steps; the paper's cost schedule per
    class (epochs of `steps_per_epoch` steps), no early stop; MAD flagging as in the paper. On `device`
    (the host reads the attack success once per epoch)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    net = net.to(device)
    x_all, y_all = torch.from_numpy(images).to(device), torch.from_numpy(labels)
    pools = [torch.nonzero(y_all != t)[:, 0] for t in range(n_classes)]
    _, c, h, w = x_all.shape
    mask_raw = (torch.rand(n_classes, 1, h, w, generator=gen) * 4 - 2).to(device).requires_grad_(True)
    pattern_raw = (torch.rand(n_classes, c, h, w, generator=gen) * 4 - 2).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=cfg.learning_rate, betas=(0.5, 0.9))
    eps, k = 1e-7, n_classes
    cost = np.zeros(k)
    set_count, up_count, down_count = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
    best_l1, best_masks = np.full(k, np.inf), np.zeros((k, h, w), np.float32)
    y = torch.arange(k, device=device).repeat_interleave(batch)
    accs = []
    for step in range(steps):
        idx = torch.stack([p[torch.randint(len(p), (batch,), generator=gen)] for p in pools]).to(device)
        mask = torch.tanh(mask_raw) / (2 - eps) + 0.5
        pattern = torch.tanh(pattern_raw) / (2 - eps) + 0.5
        x = (1 - mask[:, None]) * x_all[idx] + (mask * pattern)[:, None]                      # [K, batch, C, H, W]
        logits = net(x.reshape(k * batch, c, h, w))
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none").reshape(k, batch).mean(1)
        l1 = mask.reshape(k, -1).sum(1)
        loss = (ce + torch.from_numpy(cost).float().to(device) * l1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append((logits.argmax(-1) == y).float().reshape(k, batch).mean(1).detach())
        if (step + 1) % steps_per_epoch:
            continue
        success = torch.stack(accs).mean(0).cpu().numpy() >= cfg.success_threshold
        accs = []
        l1_now = l1.detach().cpu().numpy()
        better = success & (l1_now < best_l1)
        best_l1 = np.where(better, l1_now, best_l1)
        best_masks[better] = mask.detach().cpu().numpy()[better, 0]
        off = cost == 0
        set_count = np.where(off & success, set_count + 1, 0)
        switch = off & (set_count >= cfg.patience)
        up_count = np.where(success & ~switch, up_count + 1, 0)
        down_count = np.where(~success & ~switch, down_count + 1, 0)
        go_up, go_down = ~off & (up_count >= cfg.patience), ~off & (down_count >= cfg.patience)
        cost = np.where(switch, cfg.init_cost,
                        np.where(go_up, cost * cfg.cost_up, np.where(go_down, cost / cfg.cost_down, cost)))
        up_count, down_count = np.where(go_up, 0, up_count), np.where(go_down, 0, down_count)
    final = (torch.tanh(mask_raw) / (2 - eps) + 0.5).detach().cpu().numpy()[:, 0]
    norms = np.where(np.isfinite(best_l1), best_l1, final.reshape(k, -1).sum(1))
    from jaxrisk.scan import flag_outliers, mad_anomaly_index

    return {"seconds": time.perf_counter() - t0, "l1_norms": norms.tolist(),
            "anomaly_index": mad_anomaly_index(norms).tolist(),
            "flagged": np.flatnonzero(flag_outliers(norms)).tolist(), "steps": steps}

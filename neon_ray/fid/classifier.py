"""A small Fashion-MNIST CNN whose 128-d penultimate activations serve as an offline FID feature space.

Pure torch. `scripts/train_fid_classifier.py` trains it deterministically and records its accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train-split pixel statistics (on [0, 1])


class FashionClassifier(nn.Module):
    """(B, 1, 28, 28) uint8 → (features (B, 128), logits (B, 10))."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 14×14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7×7
        )
        self.fc = nn.Linear(64 * 7 * 7, self.feature_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images_uint8.float() / 255.0 - MEAN) / STD
        features = F.relu(self.fc(self.conv(x).flatten(1)))  # (B, 128)
        return features, self.head(self.drop(features))


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 4, batch_size: int = 128,
                     lr: float = 2e-3, log=print) -> FashionClassifier:
    """Deterministic training (fixed seed, shuffles and augmentation drawn from one generator)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = FashionClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    x_all, y_all = torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels))
    steps = epochs * (len(y_all) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=g)
        for i in range(len(y_all) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # horizontal flips: label-preserving here
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            _, logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: last loss {loss.item():.4f}")
    return net.eval()


@torch.no_grad()
def accuracy(net: FashionClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        _, logits = net(torch.from_numpy(np.array(images[i : i + batch_size])))
        correct += (logits.argmax(1).numpy() == labels[i : i + batch_size]).sum()
    return float(correct) / len(labels)

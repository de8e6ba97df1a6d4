"""Your own network and data, the way initsearch takes them (README, "Your own model and data").

Run from the repository root, where ``examples.mynets`` imports:

    python -m initsearch model._target_=examples.mynets.TinyResNet +model.c=16 +model.in_ch=1 n_trials=10
    python -m initsearch study_name=diabetes model._target_=examples.mynets.Regressor \
        data._target_=examples.mynets.diabetes n_trials=10

A model is any ``nn.Module`` class: it receives its own arguments (``+model.KEY=VALUE``), plus
``input_shape``, ``num_classes`` (the number of outputs) and ``width_multiplier`` where its signature names
them. A data function returns ``(train, val)``, each a tuple of tensors ``(x, y)`` or a map-style Dataset.
"""
from __future__ import annotations

import torch
from torch import nn


class TinyResNet(nn.Module):
    """A small residual CNN that knows nothing of initsearch: no ``input_shape``, its own argument names."""

    def __init__(self, c: int = 16, n_blocks: int = 2, n_out: int = 10, in_ch: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_ch, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)) for _ in range(n_blocks)
        )
        self.head = nn.Linear(c, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(h.mean(dim=(2, 3)))


class Regressor(nn.Module):
    """A tanh MLP for a regression target. It takes ``width_multiplier``, so a study can search on a narrower
    proxy (``model.width_multiplier=0.5``) and validate on this full width."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 64, depth: int = 3,
                 width_multiplier: float = 1.0) -> None:
        super().__init__()
        width = max(1, round(hidden * width_multiplier))
        layers: list[nn.Module] = [nn.Flatten()]
        features = int(torch.tensor(input_shape).prod())
        for _ in range(depth - 1):
            layers += [nn.Linear(features, width), nn.Tanh()]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenClassifier(nn.Module):
    """Classifies sequences of token ids (integer inputs): embedding, mean over the sequence, MLP."""

    def __init__(self, num_classes: int, vocab: int = 64, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc1(self.embed(tokens).mean(dim=1))))


def diabetes(val_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's diabetes regression (442 patients, 10 features; ships with scikit-learn): the target
    standardized, a seeded split. Float targets: ``train.loss=auto`` trains it with MSE."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def tokens(n_train: int = 1024, n_val: int = 256, length: int = 16, vocab: int = 64, seed: int = 0
           ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences labelled by which third of the vocabulary their most frequent token falls in (3
    classes): integer inputs, as a text classifier gets them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n_train + n_val, length), generator=g)
    y = torch.mode(x, dim=1).values * 3 // vocab
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])

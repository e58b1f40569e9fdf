"""The projector / predictor MLP shared by MoBY, BYOL and SynCo."""

import torch.nn as nn


class MLP(nn.Module):
    """``num_layers - 1`` blocks of Linear-BN-ReLU, then a Linear.

    Parameter names (``linear_hidden.{1,4,...}``, ``linear_out``) follow the
    original MoBY code so checkpoints stay interchangeable. ``num_layers=0`` is
    the identity.

    x: [B, in_dim] -> [B, out_dim]
    """

    def __init__(self, in_dim, hidden_dim=4096, out_dim=256, num_layers=2):
        super().__init__()
        hidden = [nn.Identity()]
        for i in range(num_layers - 1):
            hidden += [
                nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
        self.linear_hidden = nn.Sequential(*hidden)
        if num_layers >= 1:
            self.linear_out = nn.Linear(in_dim if num_layers == 1 else hidden_dim, out_dim)
        else:
            self.linear_out = nn.Identity()

    def forward(self, x):
        return self.linear_out(self.linear_hidden(x))

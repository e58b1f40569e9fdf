"""The online / momentum-target pair that MoBY, BYOL and SynCo share."""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mlp import MLP


def cosine_momentum(base_momentum, step, total_steps):
    """Target momentum at ``step``: ``base_momentum`` at 0, rising to 1 at ``total_steps``."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


def embedding_std(z):
    """Mean over the dimensions of the batch's standard deviation of the L2-normalised rows of
    ``z`` [B, D]: 0 for a collapsed embedding (every row the same), about 1 / sqrt(D) for rows
    spread evenly over the sphere. A scalar tensor, computed in fp32."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def _copy_step_to_host(module, incompatible_keys):
    module.steps_done = int(module.step)


class MomentumFramework(nn.Module):
    """Online encoder + projector + predictor, and a momentum target encoder + projector.

    The target starts as a copy of the online branch, receives no gradient and
    follows it by an exponential moving average whose momentum rises from
    ``momentum`` to 1 along a cosine over ``total_steps`` forward passes. The
    step counter is a buffer, so the schedule resumes from a checkpoint.

    Subclasses implement ``loss(online, target)``.

    Args:
        encoder: online backbone, ``[B, 3, H, W] -> [B, encoder.num_features]``.
        encoder_k: target backbone of the same architecture (its own drop path);
            its weights are overwritten by the online ones.
        proj_dim, proj_hidden_dim, proj_num_layers, pred_num_layers: head MLPs.
        momentum: base momentum of the target update.
        steps_per_epoch, epochs: length of the momentum schedule (and of an epoch,
            for schedules that subclasses keep in epochs).
    """

    def __init__(
        self,
        encoder,
        encoder_k,
        proj_dim=256,
        proj_hidden_dim=4096,
        proj_num_layers=2,
        pred_num_layers=2,
        momentum=0.99,
        steps_per_epoch=1,
        epochs=1,
    ):
        super().__init__()
        self.encoder = encoder
        self.encoder_k = encoder_k
        # a projector of 0 layers is the identity: the heads then work on the features
        self.proj_dim = proj_dim if proj_num_layers > 0 else encoder.num_features
        self.projector = MLP(encoder.num_features, proj_hidden_dim, self.proj_dim, proj_num_layers)
        self.projector_k = copy.deepcopy(self.projector)
        self.predictor = MLP(self.proj_dim, proj_hidden_dim, self.proj_dim, pred_num_layers)

        self.base_momentum = momentum
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        # forward passes done so far: drives the momentum (and synco's) schedules
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # its host copy: reading a GPU buffer every step would synchronise host and device
        self.steps_done = 0
        self.register_load_state_dict_post_hook(_copy_step_to_host)

        for online, target in self._online_target_pairs():
            target.data.copy_(online.data)
            target.requires_grad = False

    def _online_target_pairs(self):
        for online_net, target_net in ((self.encoder, self.encoder_k), (self.projector, self.projector_k)):
            yield from zip(online_net.parameters(), target_net.parameters())

    @property
    def epoch(self):
        """The epoch of the current forward pass (counted from the step buffer)."""
        return self.steps_done // self.steps_per_epoch

    @property
    def momentum(self):
        """Momentum of the current step's target update."""
        return cosine_momentum(self.base_momentum, self.steps_done, self.total_steps)

    @torch.no_grad()
    def momentum_update(self):
        """target <- m * target + (1 - m) * online, with m the momentum of the current step."""
        targets, onlines = zip(*((t, o.detach()) for o, t in self._online_target_pairs()))
        torch._foreach_lerp_(list(targets), list(onlines), 1.0 - self.momentum)

    def forward(self, x1, x2):
        """x1, x2: [B, 3, H, W], two views of the same images. Returns ``loss(...)``'s dict with

        * ``features``: the online encoder's features of both views, detached, [2B, num_features]
          (view 1's rows first): what the online linear monitor trains on;
        * ``proj_std``: ``embedding_std`` of view 1's online projections (a collapse detector).
        """
        feat1, feat2 = self.encoder(x1), self.encoder(x2)  # [B, num_features]
        proj1, proj2 = self.projector(feat1), self.projector(feat2)  # [B, proj_dim]
        pred1, pred2 = self.predictor(proj1), self.predictor(proj2)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            proj1_k = self.projector_k(self.encoder_k(x1))  # [B, proj_dim]
            proj2_k = self.projector_k(self.encoder_k(x2))
        # the loss runs in fp32 whatever the autocast around it
        with torch.autocast(device_type=x1.device.type, enabled=False):
            out = self.loss((pred1.float(), pred2.float()), (proj1_k.float(), proj2_k.float()))
        if self.training:
            self.step += 1
            self.steps_done += 1
        with torch.no_grad():
            out["features"] = torch.cat([feat1, feat2]).detach()
            out["proj_std"] = embedding_std(proj1)
        return out

    def loss(self, online, target):
        raise NotImplementedError

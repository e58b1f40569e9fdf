"""Encoder weights of the original MoBY / SynCo-v2 code in this project's (timm 1.x) layout.

    encoder = {k[8:]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    encoder = convert_original_encoder(encoder, "swin_tiny")  # loads into models.build_encoder(...)

The original code (Transformer-SSL lineage) saved ``{'model', 'optimizer', 'epoch',
'config'}`` with ``encoder.*``, ``encoder_k.*``, ``projector(_k).*``, ``predictor.*``
and the queues. Its encoders differ from ours only in key names:

Swin (the original Swin Transformer implementation):
  * each stage's PatchMerging sits at the END of the stage, ``layers.{i}.downsample``
    for i = 0..2; timm puts it at the START of the next one, ``layers.{i+1}.downsample``;
  * ``attn.relative_position_index`` and ``attn_mask`` are saved buffers (timm
    rebuilds both, unsaved): dropped;
  * a classifier is ``head.*`` (timm: ``head.fc.*``);
  * PatchMerging concatenates the 2x2 neighbours as x0..x3 = (0::2, 0::2),
    (1::2, 0::2), (0::2, 1::2), (1::2, 1::2) ([B, H, W, C] indexing). timm's
    ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)`` orders the
    4C channels (w offset, h offset, C), i.e. the same x0, x1, x2, x3, so the
    ``reduction`` and ``norm`` weights carry over unpermuted;
  * blocks, patch embedding, final norm and the relative position bias tables
    are named and laid out alike.
  SynCo-v2's Swin built its LayerNorms (all but ``norm2``) with eps 1e-6 where timm
  and Transformer-SSL use 1e-5; ``models/swin_transformer.py`` builds the original's
  eps, so converted weights give the original's features.

ViT (MoCo v3's ``VisionTransformerMoCo`` on an older timm ``VisionTransformer``):
  ``cls_token``, ``pos_embed`` (the fixed sin-cos table, saved as a parameter),
  ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``
  and ``norm`` are exactly timm 1.x's keys, so ViT weights need no conversion.

ResNet (timm's ``resnet50`` ... ``resnet200`` in both): the same keys, no conversion.
"""

import re

_STAGE_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_DROPPED_BUFFERS = (".relative_position_index", ".attn_mask")


def is_original_swin(state_dict) -> bool:
    """Whether a Swin state dict has the original layout (a patch merging after stage 0)."""
    return any(k.startswith("layers.0.downsample.") for k in state_dict)


def convert_original_encoder(state_dict, encoder_name):
    """An encoder state dict of the original code in this project's layout; any other is returned unchanged.

    Args:
        state_dict: the encoder's weights, keys without the ``encoder.`` prefix.
        encoder_name: MODEL.ENCODER of the weights (``swin_*`` or ``vit_*``).
    """
    if not encoder_name.startswith("swin") or not is_original_swin(state_dict):
        return state_dict
    converted = {}
    for key, value in state_dict.items():
        if key.endswith(_DROPPED_BUFFERS):
            continue
        key = _STAGE_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        if key.startswith("head.") and not key.startswith("head.fc."):
            key = "head.fc." + key[len("head.") :]
        converted[key] = value
    return converted

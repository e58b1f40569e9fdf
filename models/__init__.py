from .build import build_encoder, build_model

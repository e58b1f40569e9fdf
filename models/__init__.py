from .build import build_encoder, build_model

__all__ = ["build_encoder", "build_model"]

"""MedMamba: hybrid CNN + state-space models for medical image classification."""
from .model import MedMamba, convert_official, infer_config
from .registry import create_model, list_models, register_model

__all__ = ["MedMamba", "convert_official", "create_model", "infer_config", "list_models", "register_model"]

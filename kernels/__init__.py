"""Selective scan and cross scan for MedMamba's SS2D (imported as ``medmamba.kernels``)."""
from .cross_scan import cross_merge, cross_scan
from .reference import selective_scan_ref
from .selective_scan import BACKENDS, resolve_backend, selective_scan_fn

__all__ = ["BACKENDS", "cross_merge", "cross_scan", "resolve_backend", "selective_scan_fn", "selective_scan_ref"]

"""Selective scan and cross scan for MedMamba's SS2D (imported as ``medmamba.kernels``)."""
from .cross_scan import cross_merge, cross_scan, scan_positions
from .reference import selective_scan_ref
from .selective_scan import BACKENDS, auto_backend, cross_selective_scan, resolve_backend, selective_scan_fn

__all__ = ["BACKENDS", "auto_backend", "cross_merge", "cross_scan", "cross_selective_scan", "resolve_backend",
           "scan_positions", "selective_scan_fn", "selective_scan_ref"]

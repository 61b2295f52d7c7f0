"""Backends of the fused operator: chunk primitives (torch, C++) and backend selection."""

"""Model adapters (one per transformer family) and the shipped models' loaders."""

from .adapters import ADAPTERS, AttentionSite, TransformerAdapter, find_adapter, supported_classes

__all__ = ["ADAPTERS", "AttentionSite", "TransformerAdapter", "find_adapter", "supported_classes"]

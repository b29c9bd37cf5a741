"""trustmgr: multi-cluster trust and certificate manager for Istio."""

__version__ = "0.1.0"

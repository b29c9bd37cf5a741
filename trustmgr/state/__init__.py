"""What trustmgr remembers between runs: provider material and what was written where."""

from trustmgr.state.model import BundleRecord, ClusterRecord, State

__all__ = ["BundleRecord", "ClusterRecord", "State"]

"""What trustmgr remembers between runs: provider material and what was written where."""

from trustmgr.state.model import ClusterRecord, State

__all__ = ["ClusterRecord", "State"]

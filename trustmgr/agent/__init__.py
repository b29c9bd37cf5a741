"""Agent mode: a cluster makes its own CA key and only public material leaves it.

The central run publishes, per agent cluster, a signed *desired document* (the
trust bundle, the roots its CA must chain to, how to get a CSR signed, with a
sequence number); the agent in the cluster checks it, issues or renews its CA
there, writes its own ``cacerts`` and reports back public material only. See
docs/agent.md."""

"""The contract kit: what a plugin's own tests import from the gateway (public, like ``gateway``).

- :mod:`gateway.testing.contract`: ``RmmAdapterContract`` and ``PsaAdapterContract``, the
  tests every adapter of a role must pass, to subclass;
- :mod:`gateway.testing.proxy`: ``FaultProxy``, the fault-injecting proxy the kit puts in
  front of a simulator, for a plugin's tests of its own;
- :mod:`gateway.testing.pytest_plugin`: the fixtures (``gateway_clock``, ``gateway_redact``,
  ``loopback_server``), which pytest loads through the ``pytest11`` entry point.

This package imports none of them: pytest imports it on every run wherever the gateway is
installed (to reach the fixtures), and the contract module needs pytest-asyncio, which an
unrelated test suite may not have.
"""

"""Building blocks for a simulator: the fake of a tool that an adapter's tests, the benchmarks and the demo run against.

Every bundled simulator (``gateway/plugins/*/simulator.py``) and the scaffold's are built
from these, and a plugin's own simulator may use them too: a :class:`Faults` plan served
at the start of each request, a :class:`RequestWindow` for the tool's request quota, and
:func:`company_names` for believable data, and :class:`VirtualTime` for a test that must
not really wait out a quota window. The contract kit does not need a simulator's
faults (its :class:`~gateway.testing.proxy.FaultProxy` injects its own, planned with the
same :class:`Faults` calls); tests, benchmarks and the demo use them directly.
"""

from gateway.simulators.faults import ErrorBody, Faults
from gateway.simulators.names import company_names
from gateway.simulators.quota import RequestWindow
from gateway.simulators.vtime import VirtualTime

__all__ = [
    "ErrorBody",
    "Faults",
    "RequestWindow",
    "VirtualTime",
    "company_names",
]

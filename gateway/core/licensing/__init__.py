"""The license lifecycle: rules L1-L17 over the canonical store, one module per use case.

Every function takes the caller's session (and never commits: the caller owns the
unit of work), the injected clock, and the :class:`~gateway.core.access.Principal`
acting, whose name is written into the license history (L10) of every change.

Callers import the module of the use case they need; this package re-exports nothing.

- :mod:`~gateway.core.licensing.rules`: status, dates, prices, discounts and limits, pure.
- :mod:`~gateway.core.licensing.queries`: reading and searching licenses (L11), unused keys.
- :mod:`~gateway.core.licensing.history`: the history of every change (L10) and notes.
- :mod:`~gateway.core.licensing.purchase`: buying keys (L5, L6) and placing their orders.
- :mod:`~gateway.core.licensing.assignment`: assigning keys (L2, L3, L5) and allocation limits (L15).
- :mod:`~gateway.core.licensing.renewal`: renewals by years, by coupon, into another edition
  (L7-L9), and auto-renewal on/off (L13).
- :mod:`~gateway.core.licensing.pool`: the pool and exchange (L14), allocation settings
  (L15), bulk delete (L16).
- :mod:`~gateway.core.licensing.orders`: the order history (L12).
- :mod:`~gateway.core.licensing.daily`: the daily job's decisions (L3, L4, L13, L14).

The package is synchronous and plugin-free: the scheduled job that runs
:func:`~gateway.core.licensing.daily.run_daily` and sends its notices through the
``gateway_notify`` hook is :func:`gateway.sync.jobs.run_daily_job`.

Decisions the rules leave open (DOMAIN.md's own decisions are not repeated) are noted
in the module they concern. One spans every module:

- **Who may do what** (S8): a customer admin sees the licenses of their customers and
  may edit their notes; everything that spends the partner's money or changes what
  is covered (buy, assign, renew, auto-renewal, pool, exchange, delete, settings, orders)
  is the admin's, and answers a customer admin 404 like anything else they cannot see.
"""

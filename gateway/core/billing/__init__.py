"""Billing over the canonical store: plans, associations, monthly billing, runs, bills, documents.

The rules are computed by :mod:`~gateway.core.billing.rules` and
:mod:`~gateway.core.billing.drafts` (pure: no session, no I/O); the use-case
modules beside them load what the rules need, store what they return and never
commit (the caller owns the transaction):

- :mod:`~gateway.core.billing.plans` (S1, S7) and
  :mod:`~gateway.core.billing.associations` (S2, S6): service plans and who is on them;
- :mod:`~gateway.core.billing.subscriptions` (M1-M8): monthly active-device billing;
- :mod:`~gateway.core.billing.run`: the billing run, which builds the due bills, with
  :mod:`~gateway.core.billing.run_store` (how a run's rows are written in bulk) and
  :mod:`~gateway.core.billing.numbering` (bill numbers);
- :mod:`~gateway.core.billing.lifecycle` (S3, S5, S8): a bill from draft to paid or void,
  adjustments and credits;
- :mod:`~gateway.core.billing.deliveries` (G2): the outbox rows and documents of the PSA pushes;
- :mod:`~gateway.core.billing.reports` (M6, M7) and :mod:`~gateway.core.billing.documents`
  (S5: CSV and PDF).

Callers that act for a person pass a :class:`~gateway.core.access.Principal`:
customer admins see only their customers' associations and bills and change
nothing (S8); whatever they may not see is answered with
:class:`~gateway.errors.NotFound`. Plugins take part only through plain
callables a caller passes in (the billing run's ``extra_lines``): nothing here
knows the plugin manager.
"""

"""Tests of the ``gateway`` command, one module per module of gateway/commands/.

A package (unlike the other test folders) because tests/commands/test_billing.py and
tests/core/test_billing.py share a basename, which pytest's default import mode allows only in packages.
"""

"""Bill documents (S5, M7): CSV and PDF, rendered from bills the caller loaded (with their lines).

- :mod:`gateway.core.billing.documents.csv`: per bill, per customer, the usage report;
- :mod:`gateway.core.billing.documents.pdf`: the invoices; it imports fpdf2, which takes a
  third of a second, so callers import it where they first make a PDF, not at start-up;
- :mod:`gateway.core.billing.documents.format`: how both (and the e-mails) print amounts,
  so neither imports the other.
"""

"""bills.email_claimed_by / email_claimed_until: a bill is claimed for e-mail before it is sent

Two ``gateway bill`` runs (or a run and the daemon) on SQLite both read a bill as
"not e-mailed yet" and both sent it: SQLite has no ``FOR UPDATE SKIP LOCKED``, and
holding a write transaction across an SMTP conversation would stop every other
writer. Now a sender claims the bill with one conditional UPDATE (``emailed_at IS
NULL`` and no live claim) committed before it sends, and records the outcome only
while it still holds the claim. A claim is a lease: a sender that dies leaves a
claim that expires, and the bill is sent at a later pass. Same on PostgreSQL.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

import gateway.core.models

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN on both databases (no batch copy of ``bills``, which other tables reference).
    op.add_column('bills', sa.Column('email_claimed_by', sa.String(length=100), nullable=True))
    op.add_column('bills', sa.Column('email_claimed_until', gateway.core.models.UTCDateTime(timezone=True),
                                     nullable=True))


def downgrade() -> None:
    op.drop_column('bills', 'email_claimed_until')
    op.drop_column('bills', 'email_claimed_by')

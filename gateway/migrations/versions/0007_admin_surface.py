"""editions get a price, a currency and an active flag; customers can be archived and change time zone (issue 15)

- ``editions.price_per_seat_year`` / ``editions.currency``: the price of one seat for one year, stored with the
  edition so an admin can set it with ``gateway editions`` or the API. NULL: the edition has no stored price and
  ``[licensing] prices.<code>`` in the configuration (the only place before) still prices it.
- ``editions.active``: an archived edition is no longer sold; licenses of it keep working and renew.
- ``customers.archived_at``: archiving keeps the customer and all it was billed (nothing billed is deleted).
- ``customers.pending_timezone`` / ``customers.timezone_from``: a time-zone change applies from the customer's
  next cycle (S4: a cycle starts and ends at local midnight, so the running one keeps the zone it started in).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

import gateway.core.models

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN on both databases (no batch copy of tables other tables reference).
    op.add_column('editions', sa.Column('price_per_seat_year', gateway.core.models.Money(precision=18, scale=4),
                                        nullable=True))
    op.add_column('editions', sa.Column('currency', sa.String(length=3), nullable=True))
    op.add_column('editions', sa.Column('active', sa.Boolean(), nullable=False, server_default=sa.true()))
    op.add_column('customers', sa.Column('archived_at', gateway.core.models.UTCDateTime(timezone=True),
                                         nullable=True))
    op.add_column('customers', sa.Column('pending_timezone', sa.String(length=64), nullable=True))
    op.add_column('customers', sa.Column('timezone_from', sa.Date(), nullable=True))


def downgrade() -> None:
    op.drop_column('customers', 'timezone_from')
    op.drop_column('customers', 'pending_timezone')
    op.drop_column('customers', 'archived_at')
    op.drop_column('editions', 'active')
    op.drop_column('editions', 'currency')
    op.drop_column('editions', 'price_per_seat_year')

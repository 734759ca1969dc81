"""M3: a refused device keeps when and by which workspace; S7/S4: price changes start per association

``devices.refused_at`` / ``refused_workspace_id``: a device refused at a workspace's
maximum (M3) is listed later with its reason, the workspace and the time of its first
refusal. Plain ADD COLUMN, no foreign key, so SQLite copies no table (a copy of
``devices`` would cascade into its activity).

``plan_price_starts``: an association that takes a plan's price change from a day of
its own (its customer's local "today", or its next cycle when the plan-wide day
reaches into a cycle already billed for it).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from gateway.core.models import UTCDateTime

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('devices', sa.Column('refused_at', UTCDateTime(), nullable=True))
    op.add_column('devices', sa.Column('refused_workspace_id', sa.Integer(), nullable=True))
    op.create_table(
        'plan_price_starts',
        sa.Column('price_id', sa.Integer(), nullable=False),
        sa.Column('association_id', sa.Integer(), nullable=False),
        sa.Column('effective_from', sa.Date(), nullable=False),
        sa.ForeignKeyConstraint(['association_id'], ['plan_associations.id'],
                                name=op.f('fk_plan_price_starts_association_id_plan_associations'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['price_id'], ['service_plan_prices.id'],
                                name=op.f('fk_plan_price_starts_price_id_service_plan_prices'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('price_id', 'association_id', name=op.f('pk_plan_price_starts')),
    )
    op.create_index(op.f('ix_plan_price_starts_association_id'), 'plan_price_starts', ['association_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_plan_price_starts_association_id'), table_name='plan_price_starts')
    op.drop_table('plan_price_starts')
    # SQLite (3.35+) drops a plain column in place.
    op.drop_column('devices', 'refused_workspace_id')
    op.drop_column('devices', 'refused_at')

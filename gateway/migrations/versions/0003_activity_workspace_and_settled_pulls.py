"""activity keeps its workspace; pulls record when their complete pass began; late check-ins become corrections

M5/G1: ``device_activity.workspace_id`` is the workspace the device was in on
that day (existing rows take the device's current workspace, all that is known).
M5: ``connection_state.pass_started_at`` / ``complete_pass_started_at`` let a
billing run wait until every connection of a customer has completed a pull that
began after the cycle ended; ``late_activity`` holds check-ins recorded after
that, and ``adjustments.corrects_bill_id`` / ``device_id`` the correction lines
they become (one per bill and device).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from gateway.core.models import UTCDateTime

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no constraint) on every backend: SQLite needs no copy of these tables.
    op.add_column('device_activity', sa.Column('workspace_id', sa.Integer(), nullable=True))
    op.execute(
        "UPDATE device_activity SET workspace_id = "
        "(SELECT devices.workspace_id FROM devices WHERE devices.id = device_activity.device_id)"
    )
    op.create_index('ix_device_activity_workspace', 'device_activity', ['workspace_id', 'device_id', 'day'])
    op.add_column('connection_state', sa.Column('pass_started_at', UTCDateTime(timezone=True), nullable=True))
    op.add_column('connection_state', sa.Column('complete_pass_started_at', UTCDateTime(timezone=True), nullable=True))
    op.add_column('adjustments', sa.Column('corrects_bill_id', sa.Integer(), nullable=True))
    op.add_column('adjustments', sa.Column('device_id', sa.Integer(), nullable=True))
    op.create_index('ux_adjustments_correction', 'adjustments', ['corrects_bill_id', 'device_id'], unique=True)
    op.create_table(
        'late_activity',
        sa.Column('device_id', sa.Integer(), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('workspace_id', sa.Integer(), nullable=True),
        sa.Column('noted_at', UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_late_activity_device_id_devices'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('device_id', 'day', name=op.f('pk_late_activity')),
    )


def downgrade() -> None:
    op.drop_table('late_activity')
    op.drop_index('ux_adjustments_correction', table_name='adjustments')
    with op.batch_alter_table('adjustments') as batch_op:
        batch_op.drop_column('device_id')
        batch_op.drop_column('corrects_bill_id')
    with op.batch_alter_table('connection_state') as batch_op:
        batch_op.drop_column('complete_pass_started_at')
        batch_op.drop_column('pass_started_at')
    op.drop_index('ix_device_activity_workspace', table_name='device_activity')
    with op.batch_alter_table('device_activity') as batch_op:
        batch_op.drop_column('workspace_id')

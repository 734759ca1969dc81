"""bill_devices without a foreign key to bills

The usage rows of a bill are an archive written once in the bill's own
transaction; the per-row key check cost a quarter of a billing run on
PostgreSQL. The reasoning is in ``gateway.core.models.BillDevice``.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite cannot drop a constraint: batch mode copies the table, which must stay WITHOUT ROWID.
    with op.batch_alter_table('bill_devices', table_kwargs={'sqlite_with_rowid': False}) as batch_op:
        batch_op.drop_constraint(op.f('fk_bill_devices_bill_id_bills'), type_='foreignkey')


def downgrade() -> None:
    with op.batch_alter_table('bill_devices', table_kwargs={'sqlite_with_rowid': False}) as batch_op:
        batch_op.create_foreign_key(
            op.f('fk_bill_devices_bill_id_bills'), 'bills', ['bill_id'], ['id'], ondelete='CASCADE'
        )

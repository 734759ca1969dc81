"""bill_devices without a foreign key to bills; a trigger removes a deleted bill's rows

The usage rows of a bill are an archive written once in the bill's own
transaction; the per-row key check cost a quarter of a billing run on
PostgreSQL. What the key's ON DELETE CASCADE did (a bill removed by hand, or
with its customer or partner) is done by a trigger on ``bills``, which costs
nothing when rows are inserted. The reasoning is in
``gateway.core.models.BillDevice``.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_SQLITE_TRIGGER = """
CREATE TRIGGER bills_delete_usage AFTER DELETE ON bills
BEGIN
    DELETE FROM bill_devices WHERE bill_id = OLD.id;
END
"""

# One statement-level trigger: a customer's cascade deleting many bills is one DELETE of their rows.
_POSTGRESQL_TRIGGER = (
    """
    CREATE FUNCTION bills_delete_usage() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM bill_devices WHERE bill_id IN (SELECT id FROM gone);
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER bills_delete_usage AFTER DELETE ON bills REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION bills_delete_usage()
    """,
)


def upgrade() -> None:
    # SQLite cannot drop a constraint: batch mode copies the table, which must stay WITHOUT ROWID.
    with op.batch_alter_table('bill_devices', table_kwargs={'sqlite_with_rowid': False}) as batch_op:
        batch_op.drop_constraint(op.f('fk_bill_devices_bill_id_bills'), type_='foreignkey')
    if op.get_bind().dialect.name == 'postgresql':
        for statement in _POSTGRESQL_TRIGGER:
            op.execute(statement)
    else:
        op.execute(_SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER bills_delete_usage ON bills")
        op.execute("DROP FUNCTION bills_delete_usage()")
    else:
        op.execute("DROP TRIGGER bills_delete_usage")
    # Rows whose bill is gone (possible only if the trigger was bypassed) would refuse the key.
    op.execute("DELETE FROM bill_devices WHERE bill_id NOT IN (SELECT id FROM bills)")
    with op.batch_alter_table('bill_devices', table_kwargs={'sqlite_with_rowid': False}) as batch_op:
        batch_op.create_foreign_key(
            op.f('fk_bill_devices_bill_id_bills'), 'bills', ['bill_id'], ['id'], ondelete='CASCADE'
        )

"""L5: a key remembers the workspace it was bound to; L15: a company's allocation can be "not set"

``licenses.bound_workspace_id`` is the workspace a key was bound to when first used
(L5: "can only be used by one customer with a single workspace"). It is filled from
the current assignment, or, for a key no longer assigned (exchanged out, L14), from
the first workspace its history (L10) names. It has no foreign key on purpose: the
binding must outlive the workspace.

``partners.pool_mode`` becomes nullable: NULL is "the company has no setting of its
own" (each user's applies), distinct from an explicit global pool, which now lifts
the users' limits (L15). Before this revision 'global' was the default and behaved as
"not set", so every 'global' becomes NULL: no partner's behaviour changes. The
downgrade turns NULL back into 'global', which the old code read the same way.

SQLite cannot alter a column's nullability without copying the table, and copying
``partners`` (DROP TABLE with foreign keys on) would cascade into every table that
references it; so there the column is replaced in place: add, copy, drop, rename.
(SQLite can add a NOT NULL column only with a default, so after a downgrade there the
column keeps ``DEFAULT 'global'``, which the ORM never relies on.)

Revision ID: 0005
Revises: 0004
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_POOL_MODE = sa.Enum('global', 'limited', name='poolmode', native_enum=False, length=32)


def _backfill_bindings() -> None:
    bind = op.get_bind()
    licenses = sa.table('licenses', sa.column('id', sa.Integer), sa.column('workspace_id', sa.Integer),
                        sa.column('activated_at'), sa.column('bound_workspace_id', sa.Integer))
    history = sa.table('license_history', sa.column('id', sa.Integer), sa.column('license_id', sa.Integer),
                       sa.column('before', sa.JSON), sa.column('after', sa.JSON))
    op.execute(licenses.update().where(licenses.c.workspace_id.is_not(None))
               .values(bound_workspace_id=licenses.c.workspace_id))
    loose = [row.id for row in bind.execute(
        sa.select(licenses.c.id).where(licenses.c.workspace_id.is_(None), licenses.c.activated_at.is_not(None)))]
    found: dict[int, int] = {}
    for start in range(0, len(loose), 500):
        chunk = loose[start:start + 500]
        rows = bind.execute(sa.select(history.c.license_id, history.c.before, history.c.after)
                            .where(history.c.license_id.in_(chunk)).order_by(history.c.id))
        for license_id, before, after in rows:
            if license_id in found:
                continue
            for side in (after, before):
                workspace = (side or {}).get('workspace_id') if isinstance(side, dict) else None
                if isinstance(workspace, int):
                    found[license_id] = workspace
                    break
    for license_id, workspace in found.items():
        op.execute(licenses.update().where(licenses.c.id == license_id).values(bound_workspace_id=workspace))


def _replace_pool_mode(nullable: bool, fill: Any) -> None:
    """SQLite: swap ``partners.pool_mode`` for a column of the other nullability without copying the table."""
    column_type = sa.String(32)
    if nullable:
        op.execute("ALTER TABLE partners ADD COLUMN pool_mode_0005 VARCHAR(32)")
    else:
        op.execute("ALTER TABLE partners ADD COLUMN pool_mode_0005 VARCHAR(32) NOT NULL DEFAULT 'global'")
    partners = sa.table('partners', sa.column('pool_mode', column_type), sa.column('pool_mode_0005', column_type))
    op.execute(partners.update().values(pool_mode_0005=fill(partners.c.pool_mode)))
    op.execute("ALTER TABLE partners DROP COLUMN pool_mode")
    op.execute("ALTER TABLE partners RENAME COLUMN pool_mode_0005 TO pool_mode")


def upgrade() -> None:
    op.add_column('licenses', sa.Column('bound_workspace_id', sa.Integer(), nullable=True))
    _backfill_bindings()
    if op.get_bind().dialect.name == 'sqlite':
        _replace_pool_mode(True, lambda old: sa.case((old == 'global', sa.null()), else_=old))
    else:
        op.alter_column('partners', 'pool_mode', existing_type=_POOL_MODE, nullable=True)
        op.execute("UPDATE partners SET pool_mode = NULL WHERE pool_mode = 'global'")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        _replace_pool_mode(False, lambda old: sa.func.coalesce(old, 'global'))
    else:
        op.execute("UPDATE partners SET pool_mode = 'global' WHERE pool_mode IS NULL")
        op.alter_column('partners', 'pool_mode', existing_type=_POOL_MODE, nullable=False)
    op.drop_column('licenses', 'bound_workspace_id')

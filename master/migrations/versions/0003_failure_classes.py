"""failure classes per attempt, retry budgets per stage, drained nodes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("failure_class", sa.String(length=16), nullable=False, server_default=""))
    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("retries", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("budget_from", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("drained", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("drain_deadline", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("drain_deadline")
        batch.drop_column("drained")
    with op.batch_alter_table("stages") as batch:
        batch.drop_column("budget_from")
        batch.drop_column("retries")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("failure_class")

"""gang members: an attempt of a multi-node stage is one row per member (rank), with its rendezvous

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("rank", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("rendezvous", sa.JSON(), nullable=True))
        batch.drop_constraint("uq_attempts_stage_number", type_="unique")
        batch.create_unique_constraint("uq_attempts_stage_number_rank", ["stage_id", "number", "rank"])


def downgrade() -> None:
    # an older schema holds one row per attempt: the rows of gang members other than member 0 go
    op.execute("DELETE FROM attempts WHERE rank > 0")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_constraint("uq_attempts_stage_number_rank", type_="unique")
        batch.create_unique_constraint("uq_attempts_stage_number", ["stage_id", "number"])
        batch.drop_column("rendezvous")
        batch.drop_column("rank")

"""adapter artefacts: where a version's files live (a URL) and the digest of their checksums

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 06:00:00

Versions registered before this revision have neither (``path`` is where they are, as before).
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("uri", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("artifact_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_column("artifact_sha256")
        batch_op.drop_column("uri")

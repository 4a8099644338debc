"""governance: repository-scoped tokens, repositories excluded from training, resampled
completions (source, parent)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:00:00

Tokens created before this revision keep reporting on every repository
(``all_repositories`` true), so an upgrade does not break a team's CI; new ``ci`` tokens are
scoped unless created with ``--all-repos``.
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # CI-side exploration: alternatives sampled for a served completion's context are recorded
    # as completions of their own, marked and linked to the completion they explore.
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", sa.String(length=16), nullable=False, server_default="serve")
        )
        batch_op.add_column(sa.Column("parent_id", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_completions_parent_id", ["parent_id"], unique=False)

    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "all_repositories", sa.Boolean(), nullable=False, server_default=sa.true()
            )
        )

    op.create_table(
        "api_token_repositories",
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("repository", sa.String(length=512), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["api_tokens.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_id", "repository"),
    )

    op.create_table(
        "excluded_repositories",
        sa.Column("repository", sa.String(length=512), nullable=False),
        sa.Column("excluded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("excluded_by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("repository"),
    )


def downgrade() -> None:
    op.drop_table("excluded_repositories")
    op.drop_table("api_token_repositories")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_column("all_repositories")
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.drop_index("ix_completions_parent_id")
        batch_op.drop_column("parent_id")
        batch_op.drop_column("source")

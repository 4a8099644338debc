"""executability and judge verdicts: the signals on completions that no test judged

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 11:00:00

``completion_executability``: per text of a completion and environment (``ci``: the project's,
by the plugin; ``sandbox``: the trainer's), whether it parses, its imports resolve, its API use
binds and it runs. ``judge_verdicts``: per text and judge (name, questionnaire version), the
judge's yes/no/unparsed answers and its raw reply. Neither is a verdict: a sealed CI or sandbox
verdict always wins over them.
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completion_executability",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("checked_in", sa.String(length=16), nullable=False),
        sa.Column("parses", sa.Boolean(), nullable=False),
        sa.Column("imports_ok", sa.Boolean(), nullable=True),
        sa.Column("api_ok", sa.Boolean(), nullable=True),
        sa.Column("runs", sa.Boolean(), nullable=True),
        sa.Column("executable", sa.Boolean(), nullable=False),
        sa.Column("problems", sa.JSON(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "completion_id",
            "choice_index",
            "text_sha256",
            "checked_in",
            name="uq_completion_executability_text",
        ),
    )
    with op.batch_alter_table("completion_executability", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_completion_executability_completion_id"),
            ["completion_id"],
            unique=False,
        )

    op.create_table(
        "judge_verdicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("judge_name", sa.String(length=200), nullable=False),
        sa.Column("prompt_version", sa.String(length=32), nullable=False),
        sa.Column("answers", sa.JSON(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("judged_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "completion_id",
            "choice_index",
            "text_sha256",
            "judge_name",
            "prompt_version",
            name="uq_judge_verdicts_text_judge",
        ),
    )
    with op.batch_alter_table("judge_verdicts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_judge_verdicts_completion_id"), ["completion_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("judge_verdicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_judge_verdicts_completion_id"))
    op.drop_table("judge_verdicts")
    with op.batch_alter_table("completion_executability", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_executability_completion_id"))
    op.drop_table("completion_executability")

"""feedback: events, ledger, CI runs, outcomes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 19:15:05.209779
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ci_runs",
        sa.Column("run_id", sa.String(length=256), nullable=False),
        sa.Column("repository", sa.String(length=512), nullable=False),
        sa.Column("commit", sa.String(length=64), nullable=False),
        sa.Column("branch", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("tests", sa.JSON(), nullable=False),
        sa.Column("log_tail", sa.Text(), nullable=False),
        sa.Column("raw", sa.JSON(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
        ),
        sa.PrimaryKeyConstraint("run_id"),
    )
    with op.batch_alter_table("ci_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ci_runs_repository"), ["repository"], unique=False)

    op.create_table(
        "completion_events",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_length", sa.Integer(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("completion_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_completion_events_completion_id"), ["completion_id"], unique=False
        )

    op.create_table(
        "completion_outcomes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=256), nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("final_text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("tests", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["ci_runs.run_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "completion_id", "choice_index"),
    )
    with op.batch_alter_table("completion_outcomes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_completion_outcomes_completion_id"), ["completion_id"], unique=False
        )

    op.create_table(
        "ledger_entries",
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("repository", sa.String(length=512), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("inserted_text", sa.Text(), nullable=False),
        sa.Column("current_text", sa.Text(), nullable=False),
        sa.Column("start_offset", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("completion_id", "choice_index"),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_repository"), ["repository"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_updated_at"), ["updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_updated_at"))
        batch_op.drop_index(batch_op.f("ix_ledger_entries_repository"))

    op.drop_table("ledger_entries")
    with op.batch_alter_table("completion_outcomes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_outcomes_completion_id"))

    op.drop_table("completion_outcomes")
    with op.batch_alter_table("completion_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_events_completion_id"))

    op.drop_table("completion_events")
    with op.batch_alter_table("ci_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ci_runs_repository"))

    op.drop_table("ci_runs")

"""trainer and registry: test code on outcomes, training rounds, adapters, transitions, rollout

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 18:40:00
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("completion_outcomes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("test_code", sa.Text(), nullable=True))

    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["parent_id"], ["adapters.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_adapters_state"), ["state"], unique=False)

    op.create_table(
        "adapter_transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("adapter_transitions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_adapter_transitions_adapter_id"), ["adapter_id"], unique=False
        )

    op.create_table(
        "training_rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("records_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parent_adapter_id", sa.Integer(), nullable=True),
        sa.Column("adapter_id", sa.Integer(), nullable=True),
        sa.Column("work_dir", sa.Text(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("funnel", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("durations", sa.JSON(), nullable=False),
        sa.Column("alarms", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"]),
        sa.ForeignKeyConstraint(["parent_adapter_id"], ["adapters.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("training_rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_rounds_status"), ["status"], unique=False)

    op.create_table(
        "rollout_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("canary_share", sa.Float(), nullable=False),
        sa.Column("auto_rollout", sa.Boolean(), nullable=False),
        sa.Column("training_paused", sa.Boolean(), nullable=False),
        sa.Column("pinned_adapter_id", sa.Integer(), nullable=True),
        sa.Column("canary_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("active_history", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["pinned_adapter_id"], ["adapters.id"]),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("rollout_state")
    with op.batch_alter_table("training_rounds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_rounds_status"))
    op.drop_table("training_rounds")
    with op.batch_alter_table("adapter_transitions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapter_transitions_adapter_id"))
    op.drop_table("adapter_transitions")
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapters_state"))
    op.drop_table("adapters")
    with op.batch_alter_table("completion_outcomes", schema=None) as batch_op:
        batch_op.drop_column("test_code")

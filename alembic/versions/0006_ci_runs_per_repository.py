"""ci runs per repository: a run is (repository, run id), not a global run id

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 06:00:00

Before this revision ``ci_runs.run_id`` was the primary key, so a token scoped to repository A
could post the run id that B's CI would use next, and B's real report was then answered
``duplicate`` and dropped. Now a run has a surrogate ``id``, the normalised repository
(``repository_key``) and the CI's ``run_id``, unique together; ``completion_outcomes`` point at
the run's ``id`` (``ci_run_id``) and keep the CI's ``run_id`` beside it.

Both tables are rebuilt (SQLite cannot change a primary key in place) and their rows copied.
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op
from server.store.repositories import normalise_repository

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _ci_runs(name: str) -> sa.Table:
    return op.create_table(
        name,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=256), nullable=False),
        sa.Column("repository", sa.String(length=512), nullable=False),
        sa.Column("repository_key", sa.String(length=512), nullable=False),
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
        sa.ForeignKeyConstraint(["token_id"], ["api_tokens.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("repository_key", "run_id", name="uq_ci_runs_repository_run"),
    )


def _outcomes(name: str, runs: str) -> sa.Table:
    return op.create_table(
        name,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ci_run_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=256), nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("final_text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("tests", sa.JSON(), nullable=False),
        sa.Column("test_code", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["ci_run_id"], [f"{runs}.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "ci_run_id", "completion_id", "choice_index", name="uq_completion_outcomes_run_choice"
        ),
    )


def _key(repository: str) -> str:
    try:
        return normalise_repository(repository)
    except ValueError:
        return repository


def upgrade() -> None:
    bind = op.get_bind()
    runs = _ci_runs("ci_runs_v6")
    outcomes = _outcomes("completion_outcomes_v6", "ci_runs_v6")
    old_runs = sa.Table("ci_runs", sa.MetaData(), autoload_with=bind)
    old_outcomes = sa.Table("completion_outcomes", sa.MetaData(), autoload_with=bind)
    ids: dict[str, int] = {}
    for number, row in enumerate(bind.execute(sa.select(old_runs)).mappings(), start=1):
        values = dict(row)
        bind.execute(
            runs.insert().values(id=number, repository_key=_key(values["repository"]), **values)
        )
        ids[values["run_id"]] = number
    for row in bind.execute(sa.select(old_outcomes)).mappings():
        bind.execute(outcomes.insert().values(ci_run_id=ids[row["run_id"]], **dict(row)))
    op.drop_table("completion_outcomes")
    op.drop_table("ci_runs")
    op.rename_table("ci_runs_v6", "ci_runs")
    op.rename_table("completion_outcomes_v6", "completion_outcomes")
    if bind.dialect.name == "postgresql":  # ids were copied: the sequences start after them
        for table in ("ci_runs", "completion_outcomes"):
            op.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            )
    op.create_index("ix_ci_runs_repository", "ci_runs", ["repository"])
    op.create_index(
        "ix_completion_outcomes_completion_id", "completion_outcomes", ["completion_id"]
    )


def downgrade() -> None:
    raise NotImplementedError(
        "0006 cannot be undone without losing runs: two repositories may now hold the same run "
        "id. Restore the database from a backup taken before `kaizen db upgrade`."
    )

"""Persistence: SQLAlchemy models, the database connection and the data-access functions."""

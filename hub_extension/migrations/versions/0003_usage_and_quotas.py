"""usage events, hourly usage rollups, quotas

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 02:05:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'usage_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('time', sa.DateTime(), nullable=False),
        sa.Column('user', sa.String(length=255), nullable=False),
        sa.Column('credential', sa.String(length=16), nullable=False),
        sa.Column('key_id', sa.Integer(), nullable=True),
        sa.Column('acting_admin', sa.String(length=255), nullable=True),
        sa.Column('model', sa.String(length=255), nullable=False),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.Column('streamed', sa.Boolean(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('latency_ms', sa.Float(), nullable=False),
        sa.Column('ttft_ms', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_usage_events_time', 'usage_events', ['time'])
    op.create_index('ix_usage_events_user_time', 'usage_events', ['user', 'time'])
    op.create_table(
        'usage_rollups',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('hour', sa.DateTime(), nullable=False),
        sa.Column('day', sa.String(length=10), nullable=False),
        sa.Column('month', sa.String(length=7), nullable=False),
        sa.Column('user', sa.String(length=255), nullable=False),
        sa.Column('model', sa.String(length=255), nullable=False),
        sa.Column('key_id', sa.Integer(), nullable=False),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('errors', sa.Integer(), nullable=False),
        sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
        sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('hour', 'user', 'model', 'key_id', 'endpoint', name='uq_usage_rollups_bucket'),
    )
    op.create_index('ix_usage_rollups_user_hour', 'usage_rollups', ['user', 'hour'])
    op.create_index('ix_usage_rollups_day', 'usage_rollups', ['day'])
    op.create_index('ix_usage_rollups_month', 'usage_rollups', ['month'])
    op.create_table(
        'quotas',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('subject_kind', sa.String(length=16), nullable=False),
        sa.Column('subject', sa.String(length=255), nullable=False),
        sa.Column('tokens_per_day', sa.BigInteger(), nullable=True),
        sa.Column('tokens_per_month', sa.BigInteger(), nullable=True),
        sa.Column('requests_per_minute', sa.Integer(), nullable=True),
        sa.Column('weight', sa.Float(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.Column('updated_by', sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('subject_kind', 'subject', name='uq_quotas_subject'),
    )


def downgrade() -> None:
    op.drop_table('quotas')
    op.drop_table('usage_rollups')
    op.drop_table('usage_events')

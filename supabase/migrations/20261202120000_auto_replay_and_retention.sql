-- Automatic replay of pending retry-queue entries, and retention of what is finished (issue 13).
-- docs/listing-truth.md ("Automatic replay", "Retention") says how the worker uses them.

-- ---------------------------------------------------------------------------------------------------
-- 1. Automatic replay. A `pending` entry is re-sent by the worker itself: first as soon as the circuit
-- lets a call through, then 1, 5, 15 and 60 minutes after each failed automatic replay, then it waits
-- for a person. next_auto_replay_at null: it waits for a person (every requires_investigation,
-- replayed and discarded entry, and a pending one whose automatic replays are used up). While a worker
-- replays an entry, next_auto_replay_at holds its lease: the claim pushes it forward in the statement
-- that takes it, so no other worker replays it at the same time.
alter table public.dynamics_sync_retry_queue
  add column auto_replay_count int not null default 0 check (auto_replay_count >= 0),
  add column next_auto_replay_at timestamptz;

-- What was pending before this migration is due now.
update public.dynamics_sync_retry_queue set next_auto_replay_at = now() where status = 'pending';

-- The workers' claim walks this: due pending entries, earliest first.
create index dynamics_sync_retry_queue_auto_replay_due_idx
  on public.dynamics_sync_retry_queue (next_auto_replay_at, id)
  where status = 'pending' and next_auto_replay_at is not null;

-- ---------------------------------------------------------------------------------------------------
-- 2. Retention. Delivered and superseded outbox events are pruned by closed_at through
-- certification_sync_events_closed_at_idx (20261202100000). Replayed and discarded queue entries are
-- pruned by updated_at (when they became final) through this partial index.
create index dynamics_sync_retry_queue_closed_idx
  on public.dynamics_sync_retry_queue (updated_at)
  where status in ('replayed', 'discarded');

-- The access audit (private.access_audit) is sealed against forgery, not against deletes: the database
-- owner, which the worker connects as, prunes it by read_at through access_audit_read_at_idx, as
-- docs/security.md has always told operators to. No function is added for it: a security-definer
-- delete callable by another role would be one more way to remove audit records.

-- Retention: what is finished is deleted once it is old, one small batch per statement, each statement
-- its own short transaction. Each walks a partial index from its oldest end and stops after
-- %(limit)s rows, so no statement locks or scans a whole table; SKIP LOCKED passes over rows another
-- session holds (a second worker pruning at the same moment, an operator's query).

-- name: prune_closed_events
-- Delivered and superseded outbox events closed before %(before)s, through
-- certification_sync_events_closed_at_idx. A retry-queue entry that names one keeps its row: the
-- foreign key sets its event_id to null (through dynamics_sync_retry_queue_event_id_idx).
with doomed as (
  select e.id
  from public.certification_sync_events e
  where e.status in ('delivered', 'superseded') and e.closed_at < %(before)s
  order by e.closed_at
  limit %(limit)s
  for update skip locked
),
gone as (
  delete from public.certification_sync_events e using doomed d where e.id = d.id returning 1
)
select count(*)::int as deleted from gone;

-- name: prune_final_retry_entries
-- Replayed and discarded queue entries final since before %(before)s, through
-- dynamics_sync_retry_queue_closed_idx. Pending and requires_investigation entries are never pruned.
with doomed as (
  select q.id
  from public.dynamics_sync_retry_queue q
  where q.status in ('replayed', 'discarded') and q.updated_at < %(before)s
  order by q.updated_at
  limit %(limit)s
  for update skip locked
),
gone as (
  delete from public.dynamics_sync_retry_queue q using doomed d where q.id = d.id returning 1
)
select count(*)::int as deleted from gone;

-- name: prune_access_audit
-- Access-audit records older than %(before)s, through access_audit_read_at_idx.
with doomed as (
  select a.id
  from private.access_audit a
  where a.read_at < %(before)s
  order by a.read_at
  limit %(limit)s
  for update skip locked
),
gone as (
  delete from private.access_audit a using doomed d where a.id = d.id returning 1
)
select count(*)::int as deleted from gone;

-- What the operator console and the metrics read: counts for a confirmation, the filter's choices and
-- the delivery figures of the overview (the queue's pages are retry_entries_page). Every filter is
-- optional (null = any).

-- name: console_count_retry_entries
select count(*) as entries
from public.dynamics_sync_retry_queue
where (%(status)s::text is null or status = %(status)s)
  and (%(operation_type)s::text is null or operation_type = %(operation_type)s)
  and (%(certification_id)s::uuid is null or certification_id = %(certification_id)s)
  and (%(created_from)s::timestamptz is null or created_at >= %(created_from)s)
  and (%(created_to)s::timestamptz is null or created_at < %(created_to)s)
  and (%(actionable_only)s::boolean is not true or status in ('pending', 'requires_investigation'));

-- name: console_operation_types
-- The operation types present, for the queue filter's choices.
select distinct operation_type from public.dynamics_sync_retry_queue order by operation_type;

-- name: console_delivery_figures
-- Deliveries closed since a moment (the overview's "last hour") and the last one ever: an alert on
-- "nothing delivered for N minutes" reads the latter. Both use the partial index on closed_at.
select (select count(*) from public.certification_sync_events
        where status = 'delivered' and closed_at >= %(since)s) as delivered_since,
       (select max(closed_at) from public.certification_sync_events
        where status = 'delivered') as last_delivered_at;

-- The Dynamics retry queue: what could not be delivered, for manual replay or investigation.

-- name: insert_retry_entry
insert into public.dynamics_sync_retry_queue
  (operation_type, certification_id, event_id, payload_json, failure_reason, attempt_count, status,
   failure_history, created_at, updated_at)
values
  (%(operation_type)s, %(certification_id)s, %(event_id)s, %(payload_json)s, %(failure_reason)s,
   %(attempt_count)s, %(status)s,
   jsonb_build_array(jsonb_build_object('at', %(now)s::timestamptz, 'reason', %(failure_reason)s::text,
                                        'attempts', %(attempt_count)s::int, 'status', %(status)s::text)),
   %(now)s, %(now)s)
returning id;

-- name: get_retry_entry
select id, operation_type, certification_id, event_id, failure_reason, attempt_count, status,
       replay_count, last_replayed_at, last_replayed_by, created_at, updated_at,
       payload_json, failure_history, discarded_reason, discarded_by
from public.dynamics_sync_retry_queue where id = %(id)s;

-- name: lock_retry_entry
select * from public.dynamics_sync_retry_queue where id = %(id)s for update;

-- name: retry_entries_page
-- Keyset paging on the queue's own order (created_at desc, id desc): the cursor is the last row seen,
-- so a page costs the same at any depth and rows added meanwhile never shift it.
select id, operation_type, certification_id, event_id, failure_reason, attempt_count, status,
       replay_count, last_replayed_at, last_replayed_by, created_at, updated_at
from public.dynamics_sync_retry_queue
where (%(status)s::text is null or status = %(status)s)
  and (%(operation_type)s::text is null or operation_type = %(operation_type)s)
  and (%(certification_id)s::uuid is null or certification_id = %(certification_id)s)
  and (%(created_from)s::timestamptz is null or created_at >= %(created_from)s)
  and (%(created_to)s::timestamptz is null or created_at < %(created_to)s)
  and (%(actionable_only)s::boolean is not true or status in ('pending', 'requires_investigation'))
  and (%(before_created_at)s::timestamptz is null
       or (created_at, id) < (%(before_created_at)s::timestamptz, %(before_id)s::bigint))
order by created_at desc, id desc
limit %(limit)s;

-- name: record_replay_outcome
update public.dynamics_sync_retry_queue
set status = %(status)s,
    failure_reason = coalesce(%(failure_reason)s, failure_reason),
    attempt_count = attempt_count + %(attempts)s,
    replay_count = replay_count + 1,
    last_replayed_at = %(now)s,
    last_replayed_by = %(by)s,
    payload_json = coalesce(%(payload_json)s, payload_json),
    failure_history = failure_history || jsonb_build_array(jsonb_build_object(
      'at', %(now)s::timestamptz, 'reason', coalesce(%(failure_reason)s::text, 'delivered'),
      'attempts', %(attempts)s::int, 'status', %(status)s::text, 'replayed_by', %(by)s::text)),
    updated_at = %(now)s
where id = %(id)s
returning id, status;

-- name: discard_retry_entry
update public.dynamics_sync_retry_queue
set status = 'discarded', discarded_reason = %(reason)s, discarded_by = %(by)s, updated_at = %(now)s,
    failure_history = failure_history || jsonb_build_array(jsonb_build_object(
      'at', %(now)s::timestamptz, 'status', 'discarded', 'reason', %(reason)s::text, 'by', %(by)s::text))
where id = %(id)s and status in ('pending', 'requires_investigation')
returning id;

-- name: retry_queue_counts
select status, count(*) as entries, min(created_at) as oldest_at
from public.dynamics_sync_retry_queue
group by status;

-- name: current_certification_state
-- A replay sends the certification as it is now, in the same shape the capture trigger records, and
-- only while its mentor is in the portal's organisation scope (%(organisation_id)s, null: every one).
select private.certification_sync_state(c) as state,
       private.peer_mentor_in_organisation(c.peer_mentor_id, %(organisation_id)s::uuid) as in_scope
from public.certifications c where c.id = %(id)s;

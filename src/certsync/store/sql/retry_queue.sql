-- The Dynamics retry queue: what could not be delivered, for manual replay or investigation.

-- name: insert_retry_entry
insert into public.dynamics_sync_retry_queue
  (operation_type, certification_id, event_id, payload_json, failure_reason, attempt_count, status,
   failure_history, created_at, updated_at, next_auto_replay_at)
values
  (%(operation_type)s, %(certification_id)s, %(event_id)s, %(payload_json)s, %(failure_reason)s,
   %(attempt_count)s, %(status)s,
   jsonb_build_array(jsonb_build_object('at', %(now)s::timestamptz, 'reason', %(failure_reason)s::text,
                                        'attempts', %(attempt_count)s::int, 'status', %(status)s::text)),
   %(now)s, %(now)s,
   -- A pending entry is due for its first automatic replay now (once the circuit lets a call
   -- through); one that requires investigation waits for a person.
   case when %(status)s::text = 'pending' then %(now)s::timestamptz end)
returning id;

-- name: get_retry_entry
select id, operation_type, certification_id, event_id, failure_reason, attempt_count, status,
       replay_count, last_replayed_at, last_replayed_by, created_at, updated_at,
       auto_replay_count, next_auto_replay_at,
       payload_json, failure_history, discarded_reason, discarded_by
from public.dynamics_sync_retry_queue where id = %(id)s;

-- name: lock_retry_entry
select * from public.dynamics_sync_retry_queue where id = %(id)s for update;

-- name: retry_entries_page
-- Keyset paging on the queue's own order (created_at desc, id desc): the cursor is the last row seen,
-- so a page costs the same at any depth and rows added meanwhile never shift it.
select id, operation_type, certification_id, event_id, failure_reason, attempt_count, status,
       replay_count, last_replayed_at, last_replayed_by, created_at, updated_at,
       auto_replay_count, next_auto_replay_at
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
-- A delivered replay says so in its reason (the failure it recovered from stays in it and in the
-- history), so a replayed entry no longer reads as failing.
update public.dynamics_sync_retry_queue
set status = %(status)s,
    failure_reason = case
      when %(status)s = 'replayed' and failure_reason not like 'delivered by replay%%'
        then 'delivered by replay; last failure: ' || failure_reason
      else coalesce(%(failure_reason)s, failure_reason)
    end,
    attempt_count = attempt_count + %(attempts)s,
    replay_count = replay_count + 1,
    last_replayed_at = %(now)s,
    last_replayed_by = %(by)s,
    payload_json = coalesce(%(payload_json)s, payload_json),
    failure_history = failure_history || jsonb_build_array(jsonb_build_object(
      'at', %(now)s::timestamptz, 'reason', coalesce(%(failure_reason)s::text, 'delivered'),
      'attempts', %(attempts)s::int, 'status', %(status)s::text, 'replayed_by', %(by)s::text)),
    updated_at = %(now)s,
    -- Pending again: a schedule or an automatic replay's lease already set is kept (the automatic
    -- replayer sets the next one from the outcome); otherwise it is due now while automatic replays
    -- are left, else it waits for a person. Any other status waits for a person or is final.
    next_auto_replay_at = case
      when %(status)s::text <> 'pending' then null
      when next_auto_replay_at > %(now)s::timestamptz then next_auto_replay_at
      when auto_replay_count < %(max_auto_replays)s::int then %(now)s::timestamptz
    end
where id = %(id)s
returning id, status;

-- name: discard_retry_entry
update public.dynamics_sync_retry_queue
set status = 'discarded', discarded_reason = %(reason)s, discarded_by = %(by)s, updated_at = %(now)s,
    next_auto_replay_at = null,
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

-- name: claim_due_auto_replays
-- Up to %(limit)s pending entries due for an automatic replay, earliest first, each taken by one worker:
-- SKIP LOCKED passes over rows another worker is claiming, and next_auto_replay_at moves to the end
-- of this claim's lease in the same statement, so the entry is not due again while it is replayed
-- (a worker that dies mid-replay leaves it due once the lease has passed).
with due as (
  select q.id
  from public.dynamics_sync_retry_queue q
  where q.status = 'pending' and q.next_auto_replay_at is not null and q.next_auto_replay_at <= %(now)s
  order by q.next_auto_replay_at, q.id
  limit %(limit)s
  for update skip locked
)
update public.dynamics_sync_retry_queue q
set next_auto_replay_at = %(lease_until)s
from due
where q.id = due.id
returning q.id, q.auto_replay_count;

-- name: schedule_auto_replay
-- After an automatic replay: count it (unless the open circuit refused it before any call) and set
-- when the next one is due. Only a still-pending entry keeps a schedule; null waits for a person.
update public.dynamics_sync_retry_queue
set auto_replay_count = auto_replay_count + case when %(counted)s::boolean then 1 else 0 end,
    next_auto_replay_at = case when status = 'pending' then %(next_at)s::timestamptz end
where id = %(id)s
returning id, auto_replay_count, next_auto_replay_at;

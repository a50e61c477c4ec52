-- One certification's sync history: its captured changes, its queue entries, the last reconcile's
-- verdict on it (`certsync history`, the console's History page). Read-only, operator-paced.

-- name: history_certification
select id, peer_mentor_id, status, version, valid_until, updated_at
from public.certifications where id = %(certification_id)s;

-- name: history_events
-- Every captured change in capture order (certification_sync_events_certification_idx).
select e.id, e.certification_version, e.operation_type, e.status, e.attempts, e.superseded_by,
       s.certification_version as superseded_by_version, e.occurred_at, e.available_at, e.closed_at,
       e.claimed_by, e.detail, e.attempt_log, e.capture_seq
from public.certification_sync_events e
left join public.certification_sync_events s on s.id = e.superseded_by
where e.certification_id = %(certification_id)s
order by e.capture_seq;

-- name: history_queue_entries
select id, event_id, operation_type, status, failure_reason, attempt_count, replay_count,
       last_replayed_at, last_replayed_by, discarded_reason, discarded_by, failure_history,
       created_at, updated_at
from public.dynamics_sync_retry_queue
where certification_id = %(certification_id)s
order by created_at, id;

-- name: history_reconcile_verdict
-- The last finished run that reached a verdict, and what it found for this certification (kind null:
-- nothing, it agreed).
select r.id as run_id, r.started_at, r.finished_at, m.kind, m.portal_version, m.database_version
from (
  select id, started_at, finished_at from public.reconcile_runs
  where finished_at is not null and outcome <> 'failed'
  order by finished_at desc
  limit 1
) r
left join public.reconcile_mismatches m on m.run_id = r.id and m.certification_id = %(certification_id)s;

-- name: history_mentor_certifications
-- A peer mentor's certifications as the database holds them now (certifications_peer_mentor_id_idx).
select id from public.certifications where peer_mentor_id = %(peer_mentor_id)s order by id;

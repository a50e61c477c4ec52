-- Outbox queries: claim, close (fenced by claim_token), release, rescue, and what the worker needs.

-- name: rescue_expired_claims
-- A worker that died leaves its claims in flight; once their lease has passed they wait again.
-- The dead worker's claim_token no longer matches, so a late result from it cannot close the event.
update public.certification_sync_events
set status = 'waiting', claim_token = null, claimed_by = null, lease_until = null
where status = 'in_flight' and lease_until < %(now)s
returning id;

-- name: claim_due_events
-- Claims the newest waiting event of up to %(limit)s certifications and supersedes the older ones.
-- Candidates are the certifications of the oldest due events; all of a candidate's waiting events are locked
-- with SKIP LOCKED, and it is taken only when every one of them was locked here (no other worker is
-- claiming it at this moment) and none of its events is in flight. FOR UPDATE re-checks each row's
-- latest version, so an event another worker has just claimed is never taken twice; the unique
-- index on in-flight events is the last guard.
--
-- What is sent is decided from the database as it is now, in this statement's snapshot: the
-- certification's current state (null when it is gone), whether its mentor is in the portal's
-- organisation scope (%(organisation_id)s, null: every organisation), and whether any of the claimed
-- or superseded events may have unlisted it (a delete, a membership change, a repair), which makes
-- an out-of-scope certification a DELETE rather than no request at all.
with due as (
  -- A bounded walk of the waiting index, oldest first: the cost of a claim does not grow with the
  -- backlog (grouping every waiting event cost 5.5 ms per claim at 20k).
  select e.certification_id
  from public.certification_sync_events e
  where e.status = 'waiting' and e.available_at <= %(now)s
  order by e.available_at, e.id
  limit %(limit)s * 4
),
candidates as materialized (
  -- One claimer per certification: a transaction-scoped advisory lock, tried before any row lock.
  -- Without it, claimers scanning in the same order split a certification's rows between them
  -- (SKIP LOCKED) and every one of them gives the certification up. A certification with an event in
  -- flight is passed over first (one statement, one snapshot: the same answer as later in it).
  -- The in-flight question is a scalar subquery so that it stays a lookup per candidate in the
  -- in-flight index, whatever the statistics say. As NOT EXISTS it became an anti join, and the
  -- planner, whose statistics had seen no event in flight, materialised every in-flight event and
  -- compared each candidate with each: 15.4 million comparisons, 987 of a 1,600-event claim's 1,035 ms
  -- with 9,600 events in flight, a cost that grew with every claim of a drain. (The dropped lease
  -- index, 20261207100000, was its other wrong choice.)
  --
  -- Only as many candidates as the claim takes: all but the rare one whose waiting events another
  -- transaction holds locked (below) are claimed, and one passed over waits for the next claim.
  -- Twice as many, as before, locked twice the rows it claimed.
  select d.certification_id
  from (select distinct due.certification_id from due) d
  where (select f.id from public.certification_sync_events f
         where f.certification_id = d.certification_id and f.status = 'in_flight') is null
    and pg_try_advisory_xact_lock(hashtextextended(d.certification_id::text, 0))
  limit %(limit)s
),
locked as (
  select e.id, e.certification_id, e.certification_version, e.capture_seq, e.operation_type
  from public.certification_sync_events e
  where e.certification_id in (select certification_id from candidates)
    and e.status = 'waiting' and e.available_at <= %(now)s
  for update skip locked
),
per_certification as (
  -- Its locked events, newest first: by version, then by capture order (a membership change keeps the
  -- version). The first is claimed, the others are superseded by it.
  select l.certification_id,
         array_agg(l.id order by l.certification_version desc, l.capture_seq desc) as ids,
         bool_or(l.operation_type in ('certification.deleted', 'certification.membership_changed',
                                      'certification.repaired')) as may_unlist
  from locked l
  group by l.certification_id
),
claimable as (
  select p.certification_id, p.ids[1] as newest_id, p.ids[2:] as older_ids, p.may_unlist
  from per_certification p
  where cardinality(p.ids) = (
      select count(*) from public.certification_sync_events w
      where w.certification_id = p.certification_id and w.status = 'waiting' and w.available_at <= %(now)s)
),
claimed as (
  update public.certification_sync_events e
  set status = 'in_flight', claim_token = gen_random_uuid(), claimed_by = %(worker)s,
      lease_until = %(now)s + make_interval(secs => %(lease_seconds)s), attempts = e.attempts + 1
  from claimable c
  where e.id = c.newest_id
  returning e.id, e.certification_id, e.certification_version, e.operation_type, e.occurred_at,
            e.attempts, e.claim_token, c.may_unlist
),
superseded as (
  -- Each certification's older events, from its own list: a join of the claimed events with the
  -- locked ones by certification was planned, on a one-row estimate, as a nested loop comparing
  -- every pair (quadratic in the claim's size).
  update public.certification_sync_events e
  set status = 'superseded', superseded_by = c.newest_id, closed_at = %(now)s
  from claimable c
  cross join lateral unnest(c.older_ids) as older(id)
  where e.id = older.id
  returning e.id
)
select k.*,
       case when c.id is not null then private.certification_sync_state(c) end as current_state,
       -- Every mentor is in scope when no organisation is set; asked here first, because the function
       -- (not inlined: it sets its search_path) cost 3 µs per claimed event to say so.
       c.id is not null
         and (%(organisation_id)s::uuid is null
              or private.peer_mentor_in_organisation(c.peer_mentor_id, %(organisation_id)s::uuid)) as in_scope,
       (select count(*) from superseded) as superseded_count
from claimed k
left join public.certifications c on c.id = k.certification_id
order by k.occurred_at, k.id;

-- name: mark_delivered_many
-- Delivered events closed in one statement (a bulk call's, or the single deliveries that finished while
-- the previous close ran), each fenced by its own claim token: an event whose claim was rescued meanwhile
-- is left to the newer claim (and not returned). Each row brings its own detail and its claim's failed
-- calls before the one that succeeded (history), appended here: recording attempts costs no round trip.
-- The fence is the claim token alone: every statement that ends a claim nulls it, so a matching token
-- means in flight under that claim. Adding "status = 'in_flight'" led the planner (which expects few
-- rows in flight) to scan the partial in-flight indexes, dead entries and all, instead of the primary
-- key: 52 ms per 100-event close during a 20,000-event bulk drain, against about 1 ms now. The same
-- holds for release_claims and extend_leases below.
update public.certification_sync_events e
set status = 'delivered', closed_at = %(now)s, claim_token = null, lease_until = null, detail = held.detail,
    attempt_log = e.attempt_log || coalesce(held.attempt_log, '[]'::jsonb)
from unnest(%(ids)s::uuid[], %(tokens)s::uuid[], %(details)s::text[], %(attempt_logs)s::jsonb[])
       as held(id, claim_token, detail, attempt_log)
where e.id = held.id and e.claim_token = held.claim_token
returning e.id;

-- name: mark_queued
update public.certification_sync_events
set status = 'queued', closed_at = %(now)s, claim_token = null, lease_until = null, detail = %(detail)s,
    attempt_log = attempt_log || %(attempt_log)s::jsonb
where id = %(id)s and claim_token = %(claim_token)s and status = 'in_flight'
returning id;

-- name: release_claim
-- Hands an event back unsent (circuit open, shutting down, a global pause): it waits again, due at
-- %(available_at)s, and the attempt it was claimed for does not count.
update public.certification_sync_events
set status = 'waiting', claim_token = null, claimed_by = null, lease_until = null,
    available_at = %(available_at)s, attempts = greatest(attempts - 1, 0), detail = %(detail)s,
    attempt_log = attempt_log || %(attempt_log)s::jsonb
where id = %(id)s and claim_token = %(claim_token)s and status = 'in_flight'
returning id;

-- name: release_claims
-- Several claims handed back unattempted in one statement (a stopping worker's work kept ready), each
-- fenced by its own claim token; like release_claim, the attempt they were claimed for does not count.
update public.certification_sync_events e
set status = 'waiting', claim_token = null, claimed_by = null, lease_until = null,
    available_at = %(available_at)s, attempts = greatest(e.attempts - 1, 0), detail = %(detail)s
from unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) as held(id, claim_token)
where e.id = held.id and e.claim_token = held.claim_token
returning e.id;

-- name: outbox_depth
select count(*) filter (where status = 'waiting') as waiting,
       count(*) filter (where status = 'in_flight') as in_flight,
       min(occurred_at) filter (where status in ('waiting', 'in_flight')) as oldest_open_at,
       min(available_at) filter (where status = 'waiting') as next_due_at
from public.certification_sync_events
where status in ('waiting', 'in_flight');

-- name: events_for_certification
select id, certification_version, operation_type, status, attempts, superseded_by, occurred_at, closed_at
from public.certification_sync_events
where certification_id = %(certification_id)s
order by certification_version, occurred_at;

-- name: extend_leases
-- The worker's heartbeat: every claim it still holds lives on; a lost claim (token changed) does not.
update public.certification_sync_events e
set lease_until = %(lease_until)s
from unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) as held(id, claim_token)
where e.id = held.id and e.claim_token = held.claim_token
returning e.id;

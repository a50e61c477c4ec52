-- Reconcile: what the database says the portal should hold, the repair events, and the runs' record.

-- name: reconcile_expected
-- Every certification in this portal's organisation scope, by id (uuid order = the portal's byte
-- order), read through a server-side cursor inside one REPEATABLE READ snapshot. publicly_listed as
-- contract v1 defines it (the scope part holds for every row here); in_transit: an outbox event of it
-- is still open, so the portal may lag it for now and that is not a mismatch.
select c.id, c.version, c.status,
       (c.status = 'active' and c.valid_until >= %(today)s) as publicly_listed,
       exists (
         select 1 from public.certification_sync_events e
         where e.certification_id = c.id and e.status in ('waiting', 'in_flight')
       ) as in_transit
from public.certifications c
where private.peer_mentor_in_organisation(c.peer_mentor_id, %(organisation_id)s)
order by c.id;

-- name: reconcile_confirm
-- A fresh read of just the ids the scan found mismatched: each id once, with the certification when
-- it exists in scope (version null otherwise), and whether any outbox event of it is open now (a
-- delete or a membership change in transit has no row in scope to say so).
select w.id,
       c.version, c.status,
       (c.status = 'active' and c.valid_until >= %(today)s) as publicly_listed,
       exists (
         select 1 from public.certification_sync_events e
         where e.certification_id = w.id and e.status in ('waiting', 'in_flight')
       ) as in_transit
from unnest(%(ids)s::uuid[]) as w(id)
left join public.certifications c
  on c.id = w.id and private.peer_mentor_in_organisation(c.peer_mentor_id, %(organisation_id)s);

-- name: reconcile_try_lock
-- Only one scheduled reconcile at a time across every worker: held until the claiming transaction ends.
select pg_try_advisory_xact_lock(hashtextextended('certsync.reconcile_runs', 0)) as held;

-- name: reconcile_last_scheduled_start
select max(started_at) as started_at from public.reconcile_runs where scheduled;

-- name: reconcile_start_run
insert into public.reconcile_runs (started_at, started_by, scheduled)
values (%(now)s, %(started_by)s, %(scheduled)s)
returning id;

-- name: reconcile_record_mismatches
insert into public.reconcile_mismatches (run_id, certification_id, kind, portal_version, database_version)
select %(run_id)s, m.certification_id, m.kind, m.portal_version, m.database_version
from unnest(%(ids)s::uuid[], %(kinds)s::text[], %(portal_versions)s::bigint[],
            %(database_versions)s::bigint[]) as m(certification_id, kind, portal_version, database_version);

-- name: reconcile_repair_events
-- One repair event per mismatch, in one statement per batch: the certification's current state (the
-- worker sends it as a PUT in scope, a DELETE outside it), or, where the database no longer has it,
-- a delete at the portal's version.
with repaired as (
  insert into public.certification_sync_events
    (certification_id, certification_version, operation_type, state)
  select w.id, coalesce(c.version, w.portal_version), 'certification.repaired',
         case when c.id is not null then private.certification_sync_state(c)
              else jsonb_build_object('id', w.id, 'version', w.portal_version, 'deleted', true) end
  from unnest(%(ids)s::uuid[], %(portal_versions)s::bigint[]) as w(id, portal_version)
  left join public.certifications c on c.id = w.id
  returning 1
)
select count(*) as repaired from repaired;

-- name: reconcile_notify
select pg_notify('certsync_outbox', '');

-- name: reconcile_finish_run
update public.reconcile_runs
set finished_at = %(now)s, outcome = %(outcome)s, counts = %(counts)s, in_transit = %(in_transit)s,
    repaired = %(repaired)s, error = %(error)s
where id = %(run_id)s;

-- name: reconcile_prune_mismatches
-- Only the last 20 finished runs keep their mismatches (the runs themselves stay: they are small).
delete from public.reconcile_mismatches m
using (
  select id from public.reconcile_runs
  where finished_at is not null
  order by finished_at desc
  offset 20
) old
where m.run_id = old.id;

-- name: reconcile_last_finished
-- The last finished run that reached a verdict (a failed one has no counts to report).
select id, started_at, finished_at, outcome, counts, in_transit, repaired
from public.reconcile_runs
where finished_at is not null and outcome <> 'failed'
order by finished_at desc
limit 1;

-- name: reconcile_run_mismatches
-- One run's mismatches (at most %(limit)s), for the console's Reconcile page.
select certification_id, kind, portal_version, database_version
from public.reconcile_mismatches
where run_id = %(run_id)s
order by kind, certification_id
limit %(limit)s;

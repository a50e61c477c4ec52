-- certsync backfill: the current state of chosen certifications queued for delivery, a keyset batch
-- by id per statement. Exactly one selector is given (the others are false, null or empty): every
-- certification, these ids, or the certifications of mentors with a peer_mentor membership in one of
-- this organisation's chapters (private.peer_mentor_in_organisation, the one definition of scope).

-- name: backfill_batch
-- One batch: the next %(limit)s chosen certifications after %(after)s in id order; each that has no
-- waiting event gets one (certification.backfilled, its current version and state); one that has is
-- merged with it (the waiting event is delivered, as its current state is decided at send time), so a
-- second backfill while the first waits queues nothing. %(dry_run)s: counted, nothing written.
with chosen as materialized (
  select c.id
  from public.certifications c
  where (%(after)s::uuid is null or c.id > %(after)s::uuid)
    and (%(everything)s::boolean
         or c.id = any(%(ids)s::uuid[])
         or (%(organisation_id)s::uuid is not null
             and private.peer_mentor_in_organisation(c.peer_mentor_id, %(organisation_id)s::uuid)))
  order by c.id
  limit %(limit)s
),
fresh as materialized (
  select ch.id
  from chosen ch
  where not exists (
    select 1 from public.certification_sync_events e
    where e.certification_id = ch.id and e.status = 'waiting')
),
queued as (
  insert into public.certification_sync_events
    (certification_id, certification_version, operation_type, state)
  select c.id, c.version, 'certification.backfilled', private.certification_sync_state(c)
  from public.certifications c
  join fresh f on f.id = c.id
  where not %(dry_run)s::boolean
  returning 1
)
select (select ch.id from chosen ch order by ch.id desc limit 1) as last_id,
       (select count(*) from chosen)::int as chosen,
       (select count(*) from fresh)::int as eligible,
       (select count(*) from queued)::int as queued;

-- name: backfill_notify
-- Wake the workers (LISTEN certsync_outbox), in the batch's own transaction: sent when it commits.
select pg_notify('certsync_outbox', '');

-- name: backfill_selected_count
-- How many certifications the selection names (the progress bar's total).
select count(*)::int as selected
from public.certifications c
where %(everything)s::boolean
   or c.id = any(%(ids)s::uuid[])
   or (%(organisation_id)s::uuid is not null
       and private.peer_mentor_in_organisation(c.peer_mentor_id, %(organisation_id)s::uuid));

-- name: backfill_unknown_certifications
select u.id
from unnest(%(ids)s::uuid[]) with ordinality as u(id, n)
where not exists (select 1 from public.certifications c where c.id = u.id)
order by u.n;

-- name: backfill_organisation_exists
select exists (select 1 from public.organisations o where o.id = %(organisation_id)s::uuid) as found;

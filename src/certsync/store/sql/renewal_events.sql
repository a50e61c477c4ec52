-- The normalised renewal history (docs/renewal-history.md, "Contingency"): one row per entry of
-- certifications.renewal_history, installed and filled by `certsync renewal-events migrate`. The JSONB
-- stays the read cache; a trigger copies every later append, the backfill copies what came before.

-- name: install_renewal_events
-- Idempotent: a rerun changes nothing that exists. The copy trigger is installed before the backfill
-- starts (and waits for in-flight writers, its lock conflicts with theirs), so every entry appended from
-- then on is copied by the trigger and every earlier one by the backfill; both skip what exists.
create table if not exists public.certification_renewal_events (
  certification_id uuid not null references public.certifications (id) on delete cascade,
  ordinal integer not null check (ordinal >= 1),     -- the entry's position in renewal_history
  schema_version integer not null,
  renewed_at timestamptz not null,
  previous_valid_until date not null,
  new_valid_until date not null,
  renewed_by uuid not null,
  note text,
  primary key (certification_id, ordinal)
);
create index if not exists certification_renewal_events_renewed_at_idx
  on public.certification_renewal_events (renewed_at);
create index if not exists certification_renewal_events_renewed_by_idx
  on public.certification_renewal_events (renewed_by);

-- Visible exactly when the certification is: the subquery runs under certifications' own policies
-- (coordinators, mentors, the lockdown switch). Written only by the trigger and the backfill.
alter table public.certification_renewal_events enable row level security;
revoke all on public.certification_renewal_events from anon, authenticated;
grant select on public.certification_renewal_events to authenticated;
grant all on public.certification_renewal_events to service_role;
drop policy if exists certification_renewal_events_select on public.certification_renewal_events;
create policy certification_renewal_events_select on public.certification_renewal_events
  for select to authenticated
  using (certification_id in (select c.id from public.certifications c));

-- Where the backfill has got to: one row, moved in the same transaction as each batch it copies.
create table if not exists private.certification_renewal_events_backfill (
  singleton boolean primary key default true check (singleton),
  after_id uuid not null default '00000000-0000-0000-0000-000000000000',
  finished_at timestamptz,
  updated_at timestamptz not null default now()
);
insert into private.certification_renewal_events_backfill default values on conflict (singleton) do nothing;

-- One entry as a row: the only place that maps an entry's fields to columns (the trigger and the
-- backfill both use it). An entry of a later schema_version is upcast here before that version is
-- written (docs/renewal-history.md). `setof`, so that PostgreSQL inlines it into the queries.
create or replace function private.renewal_event(p_certification_id uuid, p_ordinal bigint, p_entry jsonb)
returns setof public.certification_renewal_events
language sql immutable set search_path = ''
as $$
  select p_certification_id, p_ordinal::int, (p_entry ->> 'schema_version')::int,
         (p_entry ->> 'renewed_at')::timestamptz, (p_entry ->> 'previous_valid_until')::date,
         (p_entry ->> 'new_valid_until')::date, (p_entry ->> 'renewed_by')::uuid, p_entry ->> 'note'
$$;
revoke all on function private.renewal_event(uuid, bigint, jsonb) from public, anon, authenticated;

-- security definer: a coordinator's renewal through the API lands here too, in the same transaction.
create or replace function private.copy_new_renewal_entries() returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  insert into public.certification_renewal_events
  select r.*
  from pg_catalog.jsonb_array_elements(new.renewal_history) with ordinality as e (entry, ordinal)
  cross join lateral private.renewal_event(new.id, e.ordinal, e.entry) as r
  where e.ordinal > case when tg_op = 'INSERT' then 0 else pg_catalog.jsonb_array_length(old.renewal_history) end
  on conflict (certification_id, ordinal) do nothing;
  return null;
end
$$;
revoke all on function private.copy_new_renewal_entries() from public, anon, authenticated;

drop trigger if exists certifications_copy_new_renewal_entries on public.certifications;
create trigger certifications_copy_new_renewal_entries
  after update of renewal_history on public.certifications
  for each row
  when (jsonb_array_length(new.renewal_history) > jsonb_array_length(old.renewal_history))
  execute function private.copy_new_renewal_entries();
drop trigger if exists certifications_copy_inserted_renewal_entries on public.certifications;
create trigger certifications_copy_inserted_renewal_entries
  after insert on public.certifications
  for each row
  when (jsonb_array_length(new.renewal_history) > 0)
  execute function private.copy_new_renewal_entries();

-- name: restart_renewal_events_backfill
-- `--restart`: scan every certification again (copies only what is missing).
update private.certification_renewal_events_backfill
set after_id = '00000000-0000-0000-0000-000000000000', finished_at = null, updated_at = now()
where singleton;

-- name: renewal_events_backfill_progress
-- Where the backfill stands, in entries: all of them, and those of the certifications already scanned.
select s.after_id, s.finished_at is not null as finished,
       coalesce(sum(pg_catalog.jsonb_array_length(c.renewal_history)), 0)::bigint as total_entries,
       coalesce(sum(pg_catalog.jsonb_array_length(c.renewal_history)) filter (where c.id <= s.after_id), 0)::bigint
         as entries_done
from private.certification_renewal_events_backfill s
left join public.certifications c on true
where s.singleton
group by s.after_id, s.finished_at;

-- name: copy_renewal_events_batch
-- One batch, keyset by certification id after where the last one stopped; copies its entries and moves
-- the mark in the same transaction, so an interrupted run resumes after its last committed batch.
-- `on conflict do nothing`: what the trigger (or an earlier run) copied is never duplicated.
with state as (
  select s.after_id from private.certification_renewal_events_backfill s where s.singleton for update
),
batch as (
  select c.id, c.renewal_history
  from public.certifications c
  where c.id > (select after_id from state)
  order by c.id
  limit %(batch_size)s
),
copied as (
  insert into public.certification_renewal_events
  select r.*
  from batch b
  cross join lateral pg_catalog.jsonb_array_elements(b.renewal_history) with ordinality as e (entry, ordinal)
  cross join lateral private.renewal_event(b.id, e.ordinal, e.entry) as r
  on conflict (certification_id, ordinal) do nothing
  returning 1
),
last_one as (
  -- PostgreSQL 15 has no max(uuid)
  select b.id from batch b order by b.id desc limit 1
),
moved as (
  update private.certification_renewal_events_backfill s
  set after_id = coalesce((select id from last_one), s.after_id),
      finished_at = case when (select count(*) from batch) < %(batch_size)s then now() end,
      updated_at = now()
  where s.singleton
  returning s.finished_at
)
select (select id from last_one) as last_id,
       (select count(*) from batch) as certifications,
       (select coalesce(sum(pg_catalog.jsonb_array_length(b.renewal_history)), 0) from batch b)::bigint
         as entries_read,
       (select count(*) from copied) as entries_copied,
       (select m.finished_at is not null from moved m) as finished;

-- name: renewal_events_agreement
-- How many entries the table holds, and how many certifications whose JSONB holds another number.
with counts as (
  select r.certification_id, count(*) as n from public.certification_renewal_events r group by r.certification_id
)
select coalesce(sum(k.n), 0)::bigint as events,
       count(*) filter (where pg_catalog.jsonb_array_length(c.renewal_history) <> coalesce(k.n, 0)) as mismatched
from public.certifications c
left join counts k on k.certification_id = c.id;

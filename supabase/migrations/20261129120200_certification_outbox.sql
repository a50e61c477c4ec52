-- Durable capture: every change of a certification writes an event to the outbox in the same
-- transaction (a trigger, so changes from the app, the Supabase dashboard or plain SQL are all
-- captured) and wakes the workers with pg_notify. The worker claims events with SKIP LOCKED.
--
-- Statement-level triggers with transition tables: a sweep that expires 100k rows writes its 100k
-- events in one INSERT … SELECT and sends one notification, instead of 100k trigger calls.

create table public.certification_sync_events (
  id uuid primary key default gen_random_uuid(),            -- event_id = Idempotency-Key = webhook-id
  certification_id uuid not null,
  certification_version bigint not null,
  operation_type text not null
    check (operation_type in ('certification.created', 'certification.status_changed', 'certification.updated')),
  state jsonb not null,                                     -- the certification as the portal will see it
  occurred_at timestamptz not null default now(),
  status text not null default 'waiting'
    check (status in ('waiting', 'in_flight', 'delivered', 'superseded', 'queued')),
  available_at timestamptz not null default now(),
  attempts int not null default 0,
  claim_token uuid,                                         -- fencing: only the current claim may close it
  claimed_by text,
  lease_until timestamptz,
  superseded_by uuid,
  closed_at timestamptz,
  detail text
);

-- What workers scan: open events by due time.
create index certification_sync_events_waiting_idx
  on public.certification_sync_events (available_at, id) where status = 'waiting';
create index certification_sync_events_open_by_certification_idx
  on public.certification_sync_events (certification_id, certification_version)
  where status in ('waiting', 'in_flight');
-- The database itself guarantees never two requests in flight for one certification.
create unique index certification_sync_events_one_in_flight_idx
  on public.certification_sync_events (certification_id) where status = 'in_flight';
create index certification_sync_events_lease_idx
  on public.certification_sync_events (lease_until) where status = 'in_flight';
create index certification_sync_events_closed_at_idx
  on public.certification_sync_events (closed_at) where status = 'delivered';

create function private.certification_sync_state(c public.certifications) returns jsonb
language sql immutable
set search_path = ''
as $$
  select jsonb_build_object(
    'id', c.id, 'peer_mentor_id', c.peer_mentor_id, 'certification_type', c.certification_type,
    'status', c.status, 'valid_from', c.valid_from, 'valid_until', c.valid_until, 'version', c.version
  )
$$;

-- security definer: coordinators change certifications through RLS, but the outbox is not theirs
-- to read or write; the trigger writes it on their behalf. One function for both triggers: only
-- the rows it reads differ (an insert has no old_rows, and plpgsql plans each branch when it runs).
create function private.capture_certification_changes() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  if tg_op = 'INSERT' then
    insert into public.certification_sync_events (certification_id, certification_version, operation_type, state)
    select n.id, n.version, 'certification.created', private.certification_sync_state(n)
    from new_rows n;
  else
    insert into public.certification_sync_events (certification_id, certification_version, operation_type, state)
    select n.id, n.version,
           case when o.status is distinct from n.status then 'certification.status_changed'
                else 'certification.updated' end,
           private.certification_sync_state(n)
    from new_rows n
    join old_rows o on o.id = n.id;
  end if;
  if found then
    perform pg_notify('certsync_outbox', '');
  end if;
  return null;
end
$$;

revoke all on function private.capture_certification_changes(),
  private.certification_sync_state(public.certifications) from public, anon, authenticated;

create trigger certifications_capture_inserts
  after insert on public.certifications
  referencing new table as new_rows
  for each statement execute function private.capture_certification_changes();

create trigger certifications_capture_updates
  after update on public.certifications
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.capture_certification_changes();

alter table public.certification_sync_events enable row level security;
revoke all on public.certification_sync_events from anon, authenticated;
grant all on public.certification_sync_events to service_role;

-- The retry queue remembers which outbox event an entry came from (or none, for a replay).
alter table public.dynamics_sync_retry_queue
  add constraint dynamics_sync_retry_queue_event_fk
  foreign key (event_id) references public.certification_sync_events (id) on delete set null;

-- Listing truth, capture side: a certification that is deleted (directly, or with its erased mentor)
-- and a mentor who gains or loses a peer_mentor membership are captured in the outbox in the same
-- transaction as the change, like any other change of a certification.
--
-- What the worker sends for an event is decided when it is sent, from the database as it is then
-- (docs/listing-truth.md): the certification gone → DELETE; outside the portal's organisation scope →
-- DELETE when the change may have unlisted it (a membership change, a repair), else no request; in
-- scope → PUT of its current state. The event's `state` is the history of what changed.

alter table public.certification_sync_events
  drop constraint certification_sync_events_operation_type_check,
  add constraint certification_sync_events_operation_type_check check (operation_type in (
    'certification.created', 'certification.status_changed', 'certification.updated',
    'certification.deleted',             -- the row is gone (deleted, or its mentor erased)
    'certification.membership_changed',  -- its mentor gained or lost a peer_mentor membership
    'certification.repaired',            -- written by `certsync reconcile --repair`
    'certification.backfilled'           -- written by `certsync backfill`
  ));

-- Several events of one certification can carry the same version now (a membership change does not
-- change the certification): the claim orders them by version, then by capture order.
alter table public.certification_sync_events
  add column capture_seq bigint generated always as identity;
-- Supabase's default privileges grant the API roles every new sequence in public (20261201110000).
revoke all on sequence public.certification_sync_events_capture_seq_seq from public, anon, authenticated;

-- Retention deletes closed events by age, a small batch at a time (superseded ones too).
drop index public.certification_sync_events_closed_at_idx;
create index certification_sync_events_closed_at_idx
  on public.certification_sync_events (closed_at) where status in ('delivered', 'superseded');

-- Is this peer mentor this organisation's? True for every mentor when no organisation is given (a
-- portal that lists every organisation's mentors). The one definition of "in scope": the worker's
-- claim, replay, reconcile and backfill all ask it.
create function private.peer_mentor_in_organisation(p_peer_mentor_id uuid, p_organisation_id uuid)
returns boolean
language sql stable
set search_path = ''
as $$
  select p_organisation_id is null or exists (
    select 1
    from public.peer_mentors pm
    join public.chapter_memberships m on m.user_id = pm.user_id and m.role = 'peer_mentor'
    join public.chapters ch on ch.id = m.chapter_id
    where pm.id = p_peer_mentor_id and ch.organisation_id = p_organisation_id
  )
$$;
revoke all on function private.peer_mentor_in_organisation(uuid, uuid) from public, anon, authenticated;

-- A deleted certification: one delete event each, and what the outbox and the retry queue kept about it
-- is reduced to ids and versions. Erasure ("Delete user" on the dashboard) deletes the certifications
-- with the mentor (20261201120000), so this is also where erasure reaches certsync's own tables: no
-- peer mentor id, type or dates of an erased person stay in an event or a queue payload.
create function private.capture_certification_deletes() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  update public.certification_sync_events e
  set state = jsonb_build_object('id', e.certification_id, 'version', e.certification_version,
                                 'deleted', true)
  from old_rows o
  where e.certification_id = o.id;

  update public.dynamics_sync_retry_queue q
  set payload_json = jsonb_build_object('certification_id', q.certification_id, 'deleted', true),
      updated_at = now()
  from old_rows o
  where q.certification_id = o.id;

  insert into public.certification_sync_events (certification_id, certification_version, operation_type, state)
  select o.id, o.version, 'certification.deleted',
         jsonb_build_object('id', o.id, 'version', o.version, 'deleted', true)
  from old_rows o;
  if found then
    perform pg_notify('certsync_outbox', '');
  end if;
  return null;
end
$$;
revoke all on function private.capture_certification_deletes() from public, anon, authenticated;

create trigger certifications_capture_deletes
  after delete on public.certifications
  referencing old table as old_rows
  for each statement execute function private.capture_certification_deletes();

-- A peer_mentor membership gained, lost or moved: every certification of that mentor gets an event,
-- because the mentor may have entered or left a portal's organisation. Coordinator memberships do
-- not change what a portal lists and write nothing. A trigger with transition tables serves one
-- event, so three triggers share one function; each branch only collects the users concerned.
create function private.capture_certifications_of_users(p_user_ids uuid[]) returns void
language plpgsql security definer
set search_path = ''
as $$
begin
  insert into public.certification_sync_events (certification_id, certification_version, operation_type, state)
  select c.id, c.version, 'certification.membership_changed', private.certification_sync_state(c)
  from public.peer_mentors pm
  join public.certifications c on c.peer_mentor_id = pm.id
  where pm.user_id = any (p_user_ids);
  if found then
    perform pg_notify('certsync_outbox', '');
  end if;
end
$$;

create function private.capture_membership_changes() returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  v_users uuid[];
begin
  if tg_op = 'INSERT' then
    v_users := array(select distinct n.user_id from new_rows n where n.role = 'peer_mentor');
  elsif tg_op = 'DELETE' then
    v_users := array(select distinct o.user_id from old_rows o where o.role = 'peer_mentor');
  else
    v_users := array(
      select n.user_id from new_rows n where n.role = 'peer_mentor'
      union
      select o.user_id from old_rows o where o.role = 'peer_mentor');
  end if;
  if cardinality(v_users) > 0 then
    perform private.capture_certifications_of_users(v_users);
  end if;
  return null;
end
$$;

create trigger chapter_memberships_capture_inserts
  after insert on public.chapter_memberships
  referencing new table as new_rows
  for each statement execute function private.capture_membership_changes();
create trigger chapter_memberships_capture_updates
  after update on public.chapter_memberships
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.capture_membership_changes();
create trigger chapter_memberships_capture_deletes
  after delete on public.chapter_memberships
  referencing old table as old_rows
  for each statement execute function private.capture_membership_changes();

-- A chapter moved to another organisation moves its peer mentors with it.
create function private.capture_chapter_moves() returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  v_users uuid[];
begin
  v_users := array(
    select distinct m.user_id
    from new_rows n
    join old_rows o on o.id = n.id and o.organisation_id is distinct from n.organisation_id
    join public.chapter_memberships m on m.chapter_id = n.id and m.role = 'peer_mentor');
  if cardinality(v_users) > 0 then
    perform private.capture_certifications_of_users(v_users);
  end if;
  return null;
end
$$;

create trigger chapters_capture_moves
  after update on public.chapters
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.capture_chapter_moves();

revoke all on function private.capture_certifications_of_users(uuid[]), private.capture_membership_changes(),
  private.capture_chapter_moves() from public, anon, authenticated;

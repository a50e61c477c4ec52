-- Row-level security: a coordinator sees and changes certifications of the peer mentors in the
-- chapters they coordinate, across organisations, and nothing else; a peer mentor sees only their
-- own; anon sees nothing; service_role bypasses RLS.
--
-- Following Supabase's advice: policies `to authenticated`; `(select auth.uid())` and the helpers
-- wrapped in `(select …)` so they run once per statement (an initPlan), not once per row; the helpers
-- are `security definer` with `search_path = ''` in the unexposed schema `private`, so they read
-- memberships without recursing through RLS; every column a policy filters on is indexed.

create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated;

-- Chapters in which the current user holds any membership.
create function private.my_chapter_ids() returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select m.chapter_id from public.chapter_memberships m where m.user_id = (select auth.uid())
$$;

-- Chapters the current user coordinates.
create function private.coordinated_chapter_ids() returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select m.chapter_id
  from public.chapter_memberships m
  where m.user_id = (select auth.uid()) and m.role = 'coordinator'
$$;

-- Organisations of the chapters the current user belongs to.
create function private.my_organisation_ids() returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select distinct c.organisation_id
  from public.chapters c
  where c.id in (select m.chapter_id from public.chapter_memberships m where m.user_id = (select auth.uid()))
$$;

-- Peer mentors with a peer_mentor membership in a chapter the current user coordinates.
create function private.coordinated_mentor_ids() returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select distinct pm.id
  from public.chapter_memberships mine
  join public.chapter_memberships theirs
    on theirs.chapter_id = mine.chapter_id and theirs.role = 'peer_mentor'
    -- Separation of duties: a coordinator who is also a mentor does not coordinate themselves (they
    -- still read their own certification as a mentor, through visible_mentor_ids).
    and theirs.user_id <> mine.user_id
  join public.peer_mentors pm on pm.user_id = theirs.user_id
  where mine.user_id = (select auth.uid()) and mine.role = 'coordinator'
$$;

-- What the current user may read: the mentors they coordinate, and themselves if they are a mentor.
create function private.visible_mentor_ids() returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select id from private.coordinated_mentor_ids() as t(id)
  union
  select pm.id from public.peer_mentors pm where pm.user_id = (select auth.uid())
$$;


-- ---------------------------------------------------------------------------------------------------
-- Emergency switch: `select private.lockdown('public.certifications', 'reason');` denies the table to
-- every `authenticated` request from the next statement on (a restrictive policy reads this table);
-- `select private.lift_lockdown('public.certifications');` undoes it. service_role is not affected.
create table private.table_lockdowns (
  table_name text primary key,
  reason text not null,
  locked_at timestamptz not null default now(),
  locked_by text not null default current_user
);

create function private.is_locked(p_table text) returns boolean
language sql stable security definer set search_path = ''
as $$
  select exists (select 1 from private.table_lockdowns l where l.table_name = p_table)
$$;

create function private.lockdown(p_table regclass, p_reason text) returns void
language sql volatile security definer set search_path = ''
as $$
  insert into private.table_lockdowns (table_name, reason)
  select c.relname, p_reason from pg_catalog.pg_class c where c.oid = p_table
  on conflict (table_name) do update set reason = excluded.reason, locked_at = now()
$$;

create function private.lift_lockdown(p_table regclass) returns void
language sql volatile security definer set search_path = ''
as $$
  delete from private.table_lockdowns l
  using pg_catalog.pg_class c where c.oid = p_table and l.table_name = c.relname
$$;

-- ---------------------------------------------------------------------------------------------------
-- Access audit (off by default; `select private.set_access_audit(true);`): when on, every certification
-- read whose mentor also belongs to an organisation where the reader holds no membership is recorded,
-- and listed by `private.cross_organisation_reads(since)`. Cost when off: one initPlan per statement;
-- when on: one hash probe per row, plus one function call per cross-organisation row (docs/security.md).
create table private.settings (
  key text primary key,
  value jsonb not null
);
insert into private.settings (key, value) values ('access_audit_enabled', 'false'::jsonb);

create table private.access_audit (
  id bigint generated always as identity primary key,
  read_at timestamptz not null default now(),
  reader_id uuid not null,
  certification_id uuid not null,
  peer_mentor_id uuid not null,
  foreign_organisation_ids uuid[] not null
);
create index access_audit_read_at_idx on private.access_audit (read_at desc);

create function private.access_audit_enabled() returns boolean
language sql stable security definer set search_path = ''
as $$
  select coalesce((select s.value = 'true'::jsonb from private.settings s where s.key = 'access_audit_enabled'), false)
$$;

-- The mentors the current user can see who also hold a membership in an organisation where the
-- current user holds none: only their certifications are worth a per-row audit call. Computed once per
-- statement (an initPlan), so a read with no cross-organisation rows costs one hash probe per row.
create function private.cross_organisation_mentor_ids() returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select distinct pm.id
  from public.peer_mentors pm
  join public.chapter_memberships m on m.user_id = pm.user_id
  join public.chapters c on c.id = m.chapter_id
  where pm.id in (select private.visible_mentor_ids())
    and c.organisation_id not in (select private.my_organisation_ids())
$$;

-- Records one cross-organisation read; called by the certifications SELECT policy only for rows of the
-- mentors above. Returns true so that it never changes what the reader sees.
create function private.audit_certification_read(p_certification_id uuid, p_peer_mentor_id uuid)
returns boolean
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_reader uuid := (select auth.uid());
  v_foreign uuid[];
begin
  -- Written out rather than calling my_organisation_ids(): a security definer SQL function cannot be
  -- inlined, and calling it per row made the audit four times slower (docs/security.md).
  select array_agg(distinct c.organisation_id) into v_foreign
  from public.peer_mentors pm
  join public.chapter_memberships m on m.user_id = pm.user_id
  join public.chapters c on c.id = m.chapter_id
  where pm.id = p_peer_mentor_id
    and not exists (
      select 1
      from public.chapter_memberships mine
      join public.chapters mine_c on mine_c.id = mine.chapter_id
      where mine.user_id = v_reader and mine_c.organisation_id = c.organisation_id
    );
  if v_foreign is null or v_reader is null then
    return true;
  end if;
  if current_setting('transaction_read_only') = 'on' then
    -- PostgREST runs GETs read-only, where no table can be written: the record goes to the server log
    -- (Supabase: Logs Explorer) and to a NOTIFY that a listener may persist. The read is not refused.
    raise log 'certsync_access_audit reader=% certification=% foreign_organisations=%',
      v_reader, p_certification_id, v_foreign;
    perform pg_catalog.pg_notify('certsync_access_audit', pg_catalog.json_build_object(
      'reader_id', v_reader, 'certification_id', p_certification_id,
      'peer_mentor_id', p_peer_mentor_id, 'foreign_organisation_ids', v_foreign)::text);
  else
    insert into private.access_audit (reader_id, certification_id, peer_mentor_id, foreign_organisation_ids)
    values (v_reader, p_certification_id, p_peer_mentor_id, v_foreign);
  end if;
  return true;
end
$$;

create function private.set_access_audit(p_enabled boolean) returns void
language sql volatile security definer set search_path = ''
as $$
  update private.settings set value = to_jsonb(p_enabled) where key = 'access_audit_enabled'
$$;

-- Persists one `certsync_access_audit` NOTIFY payload (a read made in a read-only transaction), so
-- that a listener holding the owner's connection can complete the audit table.
create function private.record_cross_organisation_read(p_payload jsonb) returns void
language sql volatile security definer set search_path = ''
as $$
  insert into private.access_audit (reader_id, certification_id, peer_mentor_id, foreign_organisation_ids)
  select (p_payload ->> 'reader_id')::uuid, (p_payload ->> 'certification_id')::uuid,
         (p_payload ->> 'peer_mentor_id')::uuid,
         array(select pg_catalog.jsonb_array_elements_text(p_payload -> 'foreign_organisation_ids')::uuid)
$$;

-- The cross-organisation reads recorded since a moment (for operators; not exposed to the API).
create function private.cross_organisation_reads(p_since timestamptz default now() - interval '7 days')
returns table (read_at timestamptz, reader_id uuid, certification_id uuid, peer_mentor_id uuid,
               foreign_organisation_ids uuid[])
language sql stable security definer set search_path = ''
as $$
  select a.read_at, a.reader_id, a.certification_id, a.peer_mentor_id, a.foreign_organisation_ids
  from private.access_audit a where a.read_at >= p_since order by a.read_at desc
$$;

-- ---------------------------------------------------------------------------------------------------
-- Function privileges: PostgreSQL lets PUBLIC execute every new function. Policies run their helpers
-- with the caller's privileges, so authenticated may execute exactly the helpers the policies call;
-- the switches (lockdown, audit) and the audit listing are for the database owner and service_role.
revoke all on all functions in schema private from public, anon, authenticated;
grant execute on function private.my_chapter_ids(), private.coordinated_chapter_ids(),
  private.my_organisation_ids(), private.coordinated_mentor_ids(), private.visible_mentor_ids(),
  private.is_locked(text), private.access_audit_enabled(), private.cross_organisation_mentor_ids(),
  private.audit_certification_read(uuid, uuid)
  to authenticated;

-- ---------------------------------------------------------------------------------------------------
-- Privileges: anon gets nothing; authenticated reads the directory tables and reads/writes
-- certifications (RLS decides which rows); the retry queue is for service_role only.
revoke all on public.organisations, public.chapters, public.chapter_memberships, public.peer_mentors,
  public.certifications, public.dynamics_sync_retry_queue from anon, authenticated;
grant select on public.organisations, public.chapters, public.chapter_memberships, public.peer_mentors
  to authenticated;
grant select, insert, update on public.certifications to authenticated;
grant all on public.organisations, public.chapters, public.chapter_memberships, public.peer_mentors,
  public.certifications, public.dynamics_sync_retry_queue to service_role;

alter table public.organisations enable row level security;
alter table public.chapters enable row level security;
alter table public.chapter_memberships enable row level security;
alter table public.peer_mentors enable row level security;
alter table public.certifications enable row level security;
alter table public.dynamics_sync_retry_queue enable row level security;

create policy organisations_select on public.organisations for select to authenticated
  using (id in (select private.my_organisation_ids()));

create policy chapters_select on public.chapters for select to authenticated
  using (id in (select private.my_chapter_ids()));

create policy chapter_memberships_select on public.chapter_memberships for select to authenticated
  using (user_id = (select auth.uid()) or chapter_id in (select private.coordinated_chapter_ids()));

create policy peer_mentors_select on public.peer_mentors for select to authenticated
  using (id in (select private.visible_mentor_ids()));

create policy certifications_select on public.certifications for select to authenticated
  using (
    peer_mentor_id in (select private.visible_mentor_ids())
    and (
      not (select private.access_audit_enabled())
      or peer_mentor_id not in (select private.cross_organisation_mentor_ids())
      or private.audit_certification_read(id, peer_mentor_id)
    )
  );

create policy certifications_insert on public.certifications for insert to authenticated
  with check (peer_mentor_id in (select private.coordinated_mentor_ids()));

create policy certifications_update on public.certifications for update to authenticated
  using (peer_mentor_id in (select private.coordinated_mentor_ids()))
  with check (peer_mentor_id in (select private.coordinated_mentor_ids()));

-- The emergency switch's restrictive policies: ANDed with every permissive policy above.
create policy organisations_lockdown on public.organisations as restrictive for all to authenticated
  using (not (select private.is_locked('organisations')));
create policy chapters_lockdown on public.chapters as restrictive for all to authenticated
  using (not (select private.is_locked('chapters')));
create policy chapter_memberships_lockdown on public.chapter_memberships as restrictive for all to authenticated
  using (not (select private.is_locked('chapter_memberships')));
create policy peer_mentors_lockdown on public.peer_mentors as restrictive for all to authenticated
  using (not (select private.is_locked('peer_mentors')));
create policy certifications_lockdown on public.certifications as restrictive for all to authenticated
  using (not (select private.is_locked('certifications')))
  with check (not (select private.is_locked('certifications')));

-- certsync core schema: organisations, chapters, memberships, peer mentors, certifications and the
-- Dynamics retry queue. Names and pinned columns follow docs/interface (section 3).

create table public.organisations (
  id uuid primary key default gen_random_uuid(),
  name text not null check (length(name) between 1 and 200),
  created_at timestamptz not null default now()
);

create table public.chapters (
  id uuid primary key default gen_random_uuid(),
  organisation_id uuid not null references public.organisations (id) on delete cascade,
  name text not null check (length(name) between 1 and 200),
  created_at timestamptz not null default now()
);
create index chapters_organisation_id_idx on public.chapters (organisation_id);

-- A user may hold memberships in several chapters of several organisations, and both roles.
create table public.chapter_memberships (
  user_id uuid not null references auth.users (id) on delete cascade,
  chapter_id uuid not null references public.chapters (id) on delete cascade,
  role text not null check (role in ('coordinator', 'peer_mentor')),
  created_at timestamptz not null default now(),
  primary key (user_id, chapter_id, role)
);
-- The RLS helpers look memberships up by user (who am I?) and by chapter (who is in my chapters?).
create index chapter_memberships_chapter_role_user_idx
  on public.chapter_memberships (chapter_id, role, user_id);

create table public.peer_mentors (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null unique references auth.users (id) on delete cascade,
  display_name text not null,
  created_at timestamptz not null default now()
);

create table public.certifications (
  id uuid primary key default gen_random_uuid(),
  peer_mentor_id uuid not null references public.peer_mentors (id) on delete restrict,
  certification_type text not null default 'peer_mentor' check (length(certification_type) between 1 and 100),
  status text not null default 'active' check (status in ('active', 'suspended', 'expired', 'revoked')),
  valid_from date not null,
  valid_until date not null,
  renewal_history jsonb not null default '[]'::jsonb check (jsonb_typeof(renewal_history) = 'array'),
  version bigint not null default 1,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint certifications_validity_check check (valid_until >= valid_from)
);
create index certifications_peer_mentor_id_idx on public.certifications (peer_mentor_id);
-- The expiry sweep and the worker's "next expiry" look only at active rows by date.
create index certifications_active_valid_until_idx
  on public.certifications (valid_until) where status = 'active';

-- `version` grows by one on every change, whoever makes it (app, dashboard, plain SQL); a client
-- cannot set it. `updated_at` follows.
create function public.certifications_bump_version() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'INSERT' then
    new.version := 1;
  else
    new.version := old.version + 1;
  end if;
  new.updated_at := now();
  return new;
end
$$;
revoke execute on function public.certifications_bump_version() from public, anon, authenticated;

create trigger certifications_bump_version
  before insert or update on public.certifications
  for each row execute function public.certifications_bump_version();

-- What could not be delivered to Dynamics, kept for manual replay or investigation.
create table public.dynamics_sync_retry_queue (
  id bigint generated always as identity primary key,
  operation_type text not null,
  certification_id uuid,
  event_id uuid,
  payload_json jsonb not null,
  failure_reason text not null,
  attempt_count int not null default 0 check (attempt_count >= 0),
  status text not null default 'pending'
    check (status in ('pending', 'requires_investigation', 'replayed', 'discarded')),
  failure_history jsonb not null default '[]'::jsonb,
  replay_count int not null default 0,
  last_replayed_at timestamptz,
  last_replayed_by text,
  discarded_reason text,
  discarded_by text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index dynamics_sync_retry_queue_status_created_idx
  on public.dynamics_sync_retry_queue (status, created_at desc, id desc);
create index dynamics_sync_retry_queue_created_idx
  on public.dynamics_sync_retry_queue (created_at desc, id desc);
create index dynamics_sync_retry_queue_certification_idx
  on public.dynamics_sync_retry_queue (certification_id);

-- Local shims for a plain PostgreSQL: what a Supabase project already provides, so that the files in
-- supabase/migrations apply unchanged. Applied by `certsync migrate` only when no `auth` schema exists.
-- Mirrors Supabase's definitions (supabase/postgres: roles, auth.uid(), auth.jwt(), auth.role();
-- supabase/auth: auth.users).

-- The API roles as Supabase has them since 2023 (supabase/postgres 20230529180330): INHERIT, so that a
-- privilege granted to a role they are members of counts for them here as it does there.
do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin inherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin inherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin inherit bypassrls;
  end if;
exception when duplicate_object then
  null;  -- another database of this cluster created them concurrently (roles are cluster-wide)
end
$$;

do $$
declare
  v_role text;
begin
  -- Roles an older version of these shims created NOINHERIT.
  foreach v_role in array array['anon', 'authenticated', 'service_role'] loop
    if exists (select 1 from pg_roles where rolname = v_role and not rolinherit) then
      begin
        execute format('alter role %I inherit', v_role);
      exception when others then
        null;  -- altered concurrently by another database's shims, or not ours to alter: best effort
      end;
    end if;
  end loop;
end
$$;

create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;

-- auth.users as GoTrue (supabase/auth, migrations/) leaves it, for the columns certsync, its tests and
-- the demo touch. No default on `id`: GoTrue generates every id itself, so an insert that names none
-- fails here as it would on Supabase. Email is unique only among non-SSO users (users_email_partial_key).
create table if not exists auth.users (
  instance_id uuid,
  id uuid not null,
  aud varchar(255),
  role varchar(255),
  email varchar(255),
  raw_app_meta_data jsonb,
  raw_user_meta_data jsonb,
  created_at timestamptz,
  updated_at timestamptz,
  phone text unique default null,
  is_sso_user boolean not null default false,
  deleted_at timestamptz,
  is_anonymous boolean not null default false,
  constraint users_pkey primary key (id)
);
create unique index if not exists users_email_partial_key on auth.users (email) where (is_sso_user = false);

-- As on Supabase: the request's claims are set per transaction by PostgREST (set_config(..., true)).
create or replace function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role;

-- Supabase's default privileges (supabase/postgres, init-scripts/00000000000000-initial-schema.sql): every
-- table, function and sequence that the migrating role (there `postgres`) creates in `public` is granted
-- ALL to the API roles, and RLS is relied on for rows. Mirrored for the role that runs these shims, which
-- is the role that then runs the migrations, so that an object a migration forgets to revoke is as open
-- here as it would be there (tests/integration/test_privileges.py checks that it is).
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;

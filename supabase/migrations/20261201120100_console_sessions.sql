-- The operator console's signed-in sessions, held by the database so that every console process sees
-- the same ones: signing out deletes the session's row, "Revoke all sessions" deletes every row, and a
-- signed cookie whose row is gone (or past expires_at) is no longer a session (docs/console.md).
-- Times are written from the console's clock, like the breaker's.

create table public.console_sessions (
  id uuid primary key default gen_random_uuid(),
  operator text not null check (length(operator) between 1 and 200),
  created_at timestamptz not null,
  expires_at timestamptz not null,
  constraint console_sessions_expiry_check check (expires_at > created_at)
);
-- Sign-in forgets the expired ones.
create index console_sessions_expires_at_idx on public.console_sessions (expires_at);

comment on table public.console_sessions is
  'Signed-in certsync console sessions; a session cookie is valid only while its row exists.';

-- Only the service (the console) reads or writes it.
revoke all on public.console_sessions from anon, authenticated;
grant all on public.console_sessions to service_role;
alter table public.console_sessions enable row level security;

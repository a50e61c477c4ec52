-- The operator console's signed-in sessions (console_sessions); times come from the console's clock.

-- name: open_console_session
-- Records one sign-in, and forgets the sessions that have expired.
with expired as (
  delete from public.console_sessions where expires_at <= %(now)s
)
insert into public.console_sessions (operator, created_at, expires_at)
values (%(operator)s, %(now)s, %(expires_at)s)
returning id;

-- name: live_console_session_operator
select operator from public.console_sessions where id = %(id)s and expires_at > %(now)s;

-- name: close_console_session
delete from public.console_sessions where id = %(id)s;

-- name: close_every_console_session
with closed as (
  delete from public.console_sessions returning 1
)
select count(*) as closed from closed;

-- Circuit breaker state (public.dynamics_circuit_breakers), one row per breaker; no row = closed.
-- Each query is one atomic statement mirroring a rule of BreakerSnapshot in
-- certsync/resilience/breaker.py. %(now)s is always the caller's injected clock, never now().
-- A row that is being changed is locked (FOR UPDATE) and read in its latest committed version, so
-- the old state a query reports is the one it changed, even when workers race.

-- name: breaker_snapshot
-- Clock-skew guard: an opened_at in the future is clamped to now and persisted.
with clamped as (
  update public.dynamics_circuit_breakers
  set opened_at = %(now)s, updated_at = %(now)s
  where name = %(name)s and opened_at > %(now)s
  returning name, state, consecutive_failures, opened_at, probe_lease_until, last_failure_reason
)
select name, state, consecutive_failures, opened_at, probe_lease_until, last_failure_reason
from clamped
union all
select name, state, consecutive_failures, opened_at, probe_lease_until, last_failure_reason
from public.dynamics_circuit_breakers
where name = %(name)s and not exists (select 1 from clamped);

-- name: breaker_try_acquire
-- Closed (or no row): no row returned, nothing locked or written. Otherwise the row is locked, a
-- future opened_at (or a lease reaching past %(lease_until)s) is clamped, and the caller wins the
-- probe when the cool-down has elapsed (open) or the previous probe's lease has (half_open). A racing
-- caller waits for the lock, then sees half_open with a fresh lease: denied. Exactly one wins.
with locked as (
  select name, state, consecutive_failures, opened_at, probe_lease_until, last_failure_reason
  from public.dynamics_circuit_breakers
  where name = %(name)s and state <> 'closed'
  for update
),
clamped as (
  select
    locked.*,
    case when opened_at > %(now)s then %(now)s else opened_at end as safe_opened_at,
    case when probe_lease_until > %(lease_until)s then %(lease_until)s else probe_lease_until end
      as safe_lease_until
  from locked
),
decided as (
  select
    clamped.*,
    case state
      when 'open' then safe_opened_at + %(cooldown)s <= %(now)s
      else safe_lease_until <= %(now)s
    end as wins
  from clamped
),
written as (
  update public.dynamics_circuit_breakers b
  set state = case when d.wins then 'half_open' else d.state end,
      opened_at = d.safe_opened_at,
      probe_lease_until = case when d.wins then %(lease_until)s else d.safe_lease_until end,
      updated_at = %(now)s
  from decided d
  where b.name = d.name
    and (d.wins
         or d.safe_opened_at is distinct from d.opened_at
         or d.safe_lease_until is distinct from d.probe_lease_until)
)
select
  name,
  state as old_state,
  wins,
  case when wins then 'half_open' else state end as state,
  consecutive_failures,
  safe_opened_at as opened_at,
  case when wins then %(lease_until)s else safe_lease_until end as probe_lease_until,
  last_failure_reason
from decided;

-- name: breaker_record_success
-- Any success closes (and clears the count); a closed row without failures is not written.
with locked as (
  select name, state
  from public.dynamics_circuit_breakers
  where name = %(name)s and (state <> 'closed' or consecutive_failures > 0)
  for update
)
update public.dynamics_circuit_breakers b
set state = 'closed', consecutive_failures = 0, opened_at = null, probe_lease_until = null,
    updated_at = %(now)s
from locked
where b.name = locked.name
returning locked.state as old_state;

-- name: breaker_record_failure
-- Counted only while closed (opening at %(threshold)s); a half-open failure re-opens with a fresh
-- opened_at; while open nothing is written (no row returned). The first failure creates the row.
-- `prior` locks the row before the upsert runs (the upsert reads from it), so old_state is the
-- state the upsert changed; with no row yet, a concurrent first insert can only have left it
-- closed, or open (which the upsert's WHERE skips).
with locked as materialized (
  select state
  from public.dynamics_circuit_breakers
  where name = %(name)s
  for update
),
prior as materialized (
  select coalesce((select state from locked), 'closed') as old_state
),
written as (
  insert into public.dynamics_circuit_breakers as b
    (name, state, consecutive_failures, opened_at, last_failure_reason, updated_at)
  select
    %(name)s,
    case when %(threshold)s <= 1 then 'open' else 'closed' end,
    1,
    case when %(threshold)s <= 1 then %(now)s::timestamptz end,
    %(reason)s,
    %(now)s
  from prior
  on conflict (name) do update
  set consecutive_failures =
        case when b.state = 'closed' then b.consecutive_failures + 1 else b.consecutive_failures end,
      state =
        case when b.state = 'half_open' or b.consecutive_failures + 1 >= %(threshold)s
          then 'open' else 'closed' end,
      opened_at =
        case when b.state = 'half_open' or b.consecutive_failures + 1 >= %(threshold)s
          then %(now)s::timestamptz end,
      probe_lease_until = null,
      last_failure_reason = excluded.last_failure_reason,
      updated_at = excluded.updated_at
  where b.state <> 'open'
  returning b.name, b.state, b.consecutive_failures, b.opened_at, b.probe_lease_until, b.last_failure_reason
)
select prior.old_state, written.*
from prior
cross join written;

-- name: breaker_reset
-- Reset is forgetting: no row is closed with no failures.
delete from public.dynamics_circuit_breakers
where name = %(name)s
returning state as old_state;

-- The shared circuit breaker in front of the Dynamics portal: one row per breaker, so every worker
-- process sees one state and only one of them gets the half-open probe. No row means closed with no
-- failures; the rules live in src/certsync/resilience/breaker.py and store/sql/breaker_state.sql.

create table public.dynamics_circuit_breakers (
  name text primary key check (length(name) between 1 and 100),
  state text not null default 'closed' check (state in ('closed', 'open', 'half_open')),
  consecutive_failures int not null default 0 check (consecutive_failures >= 0),
  -- Written from the workers' clocks (not now()): the cool-down is compared with the same clock.
  opened_at timestamptz,
  probe_lease_until timestamptz,
  last_failure_reason text,
  updated_at timestamptz not null default now(),
  -- The state machine's shape, enforced: open and half-open know when the outage began, only
  -- half-open has a probe lease.
  constraint dynamics_circuit_breakers_opened_check check ((state = 'closed') = (opened_at is null)),
  constraint dynamics_circuit_breakers_lease_check check ((state = 'half_open') = (probe_lease_until is not null))
);

comment on table public.dynamics_circuit_breakers is
  'Circuit breaker state shared by every certsync worker (see certsync.resilience.breaker).';

-- Only the service (workers, CLI, console) reads or writes it.
revoke all on public.dynamics_circuit_breakers from anon, authenticated;
grant all on public.dynamics_circuit_breakers to service_role;
alter table public.dynamics_circuit_breakers enable row level security;
